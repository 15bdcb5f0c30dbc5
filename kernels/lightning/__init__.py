"""Lightning attention (decayed linear attention): one API, impls behind a dispatch.

Contract (DESIGN.md §3): `lightning_attention(q, k, v, slope, *, segment_ids=None, initial_state=None,
return_state=False, impl="auto", block_size=...) -> out [B,T,H,D] (, state [B,H,D,D] fp32)`.
"""
from longtrain.kernels.lightning.api import lightning_attention

__all__ = ["lightning_attention"]
