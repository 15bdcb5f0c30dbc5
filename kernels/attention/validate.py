"""Argument checks shared by every attention impl: a bad argument raises ValueError naming it and what was expected."""
from __future__ import annotations

import numbers

import jax.numpy as jnp

IMPLS = ("reference", "xla", "pallas", "cudnn", "auto")
MAX_HEAD_DIM = 256


def check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not an attention implementation; expected one of {IMPLS}")


def check_qkv(q, k, v):
    """q [B,T,Hq,D], k/v [B,S,Hkv,D] with Hq % Hkv == 0."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-d array [batch, seq, heads, head_dim]; got shape "
                             f"{getattr(x, 'shape', type(x))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B,S,Hkv,D]; got k {k.shape} and v {v.shape}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size; got q {q.shape} and k {k.shape}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim; got q {q.shape} and k {k.shape}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]}) for GQA; "
                         f"got q {q.shape} and k {k.shape}")


def check_token_array(name, x, batch, length):
    """An int [batch, length] array (segment ids or global token indices), or None."""
    if x is None:
        return
    if getattr(x, "shape", None) != (batch, length):
        raise ValueError(f"{name} must have shape [batch, seq] = {(batch, length)}; got {getattr(x, 'shape', x)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype (int32); got {x.dtype}")


def check_mask_args(causal, sliding_window, scale):
    if causal not in (True, False):
        raise ValueError(f"causal must be a bool; got {causal!r}")
    if sliding_window is not None and (not isinstance(sliding_window, numbers.Integral) or isinstance(
            sliding_window, bool) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int (keys per query); got {sliding_window!r}")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be None or a Python float; got {scale!r}")


def check_attention(q, k, v, segment_ids, causal, sliding_window, scale, impl):
    check_impl(impl)
    check_qkv(q, k, v)
    check_mask_args(causal, sliding_window, scale)
    if segment_ids is not None and q.shape[1] != k.shape[1]:
        raise ValueError(f"segment_ids needs q and k of the same length (self-attention); got q {q.shape} and "
                         f"k {k.shape}; use attention_block with q_segment_ids/kv_segment_ids instead")
    check_token_array("segment_ids", segment_ids, q.shape[0], q.shape[1])


def check_block(q, k, v, q_index, kv_index, q_segment_ids, kv_segment_ids, causal, sliding_window, scale, impl):
    check_impl(impl)
    check_qkv(q, k, v)
    check_mask_args(causal, sliding_window, scale)
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    if q_index is None or kv_index is None:
        raise ValueError("q_index [B,T] and kv_index [B,S] (global token positions) are required")
    check_token_array("q_index", q_index, B, T)
    check_token_array("kv_index", kv_index, B, S)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together (or both None)")
    check_token_array("q_segment_ids", q_segment_ids, B, T)
    check_token_array("kv_segment_ids", kv_segment_ids, B, S)


def check_block_kwargs(impl, block_kwargs, allowed):
    unknown = sorted(set(block_kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown keyword(s) {unknown} for attention impl={impl!r}; expected some of "
                         f"{sorted(allowed)}")
