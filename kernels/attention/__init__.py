"""Softmax attention: one API (`attention`), block-level entries for ring strategies, impls behind a dispatch.

Contract (DESIGN.md §3): `attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None,
impl="auto", return_lse=False, **block_kwargs) -> out [B,T,Hq,D] (, lse [B,Hq,T] fp32)`, plus the block-level
entries `attention_block` / `attention_block_bwd` (global token indices) and `merge_partials` for ring strategies.

Modules: `api` (dispatch), `validate` (argument errors), `masks` (visibility rule, per-block skipping),
`reference` (oracle), `xla_flash`, `pallas_gpu` (Triton), `pallas_tpu` (splash wrapper), `cudnn`.
"""
from longtrain.kernels.attention.api import attention, attention_block, attention_block_bwd
from longtrain.kernels.attention.reference import merge_partials

__all__ = ["attention", "attention_block", "attention_block_bwd", "merge_partials"]
