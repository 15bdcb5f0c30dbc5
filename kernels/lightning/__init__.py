"""Lightning attention (decayed linear attention): one API, impls behind a dispatch.

Contract (DESIGN.md §3): `lightning_attention(q, k, v, slope, *, segment_ids=None, initial_state=None,
return_state=False, impl="auto", block_size=64) -> out [B,T,H,Dv] (, state [B,H,Dk,Dv] fp32)`.

Modules: reference.py (quadratic and token-scan oracles), chunking.py (block decomposition and per-token decays
shared by the fast impls), xla_chunked.py (impl="xla"), pallas_gpu.py / pallas_tpu.py (impl="pallas"),
api.py (validation and dispatch), testing.py (cases and checks shared by the tests).
"""
from longtrain.kernels.lightning.api import lightning_attention

__all__ = ["lightning_attention"]
