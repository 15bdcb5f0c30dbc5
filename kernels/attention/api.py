"""Dispatch for softmax attention. (Skeleton: only the reference impl so far; the kernel issue adds the rest.)"""
from __future__ import annotations

from longtrain.kernels.attention import reference

IMPLS = ("reference", "xla", "pallas", "cudnn", "auto")


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not an attention implementation; expected one of {IMPLS}")
    if impl not in ("reference", "auto"):
        raise NotImplementedError(f"attention impl={impl!r} is not implemented yet")


def attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None, impl="auto",
              return_lse=False, **block_kwargs):
    _check_impl(impl)
    return reference.attention_reference(q, k, v, segment_ids=segment_ids, causal=causal,
                                         sliding_window=sliding_window, scale=scale, return_lse=return_lse)


def attention_block(q, k, v, *, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None, causal=True,
                    sliding_window=None, scale=None, impl="auto"):
    """(out fp32 [B,T,Hq,D], lse fp32 [B,Hq,T]) of q against one key block; indices are global token positions."""
    _check_impl(impl)
    return reference.attention_block_reference(q, k, v, q_index=q_index, kv_index=kv_index,
                                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                               causal=causal, sliding_window=sliding_window, scale=scale)


def attention_block_bwd(q, k, v, out, lse, dout, *, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None,
                        causal=True, sliding_window=None, scale=None, impl="auto"):
    """(dq, dk, dv) fp32 of one block given the global out and lse."""
    _check_impl(impl)
    return reference.attention_block_bwd_reference(
        q, k, v, out, lse, dout, q_index=q_index, kv_index=kv_index, q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window, scale=scale)
