"""Per-token masks and per-block visibility for blockwise attention kernels.

Every kernel works on GLOBAL token indices (`q_index [B,T]`, `kv_index [B,S]`: position of the token in the full
sequence) and segment ids (`[B,T]`/`[B,S]`, 0 = padding). Padding added inside a kernel gets segment 0, so one
rule masks both the caller's padding and ours.

Block skipping: for each block we take the min/max of its indices and of its non-zero segment ids. A (q-block,
kv-block) pair can hold a visible entry only if the index ranges satisfy causality / the window and the segment
ranges overlap. That test is exact for sorted (packed) documents and conservative (never skips a needed block)
for any segment layout.
"""
from __future__ import annotations

import jax.numpy as jnp

_NO_SEGMENT = jnp.iinfo(jnp.int32).max  # min over an all-padding block: larger than any real id


def visible(q_index, kv_index, q_seg, kv_seg, causal, sliding_window):
    """Boolean [..., Tq, Sk] from broadcastable [..., Tq, 1] / [..., 1, Sk] indices and segment ids."""
    mask = (q_seg == kv_seg) & (q_seg != 0)
    if causal:
        mask &= kv_index <= q_index
    if sliding_window is not None:
        mask &= (q_index - kv_index) < sliding_window
        if not causal:
            mask &= (kv_index - q_index) < sliding_window
    return mask


def block_ranges(index_BN, seg_BN, block):
    """Per-block (index_min, index_max, seg_min, seg_max), each [B, N // block]; seg range over non-zero ids."""
    B, N = index_BN.shape
    idx = index_BN.reshape(B, N // block, block)
    seg = seg_BN.reshape(B, N // block, block)
    seg_min = jnp.min(jnp.where(seg > 0, seg, _NO_SEGMENT), axis=-1)
    return idx.min(-1), idx.max(-1), seg_min, seg.max(-1)


def block_pairs_needed(q_ranges, kv_ranges, causal, sliding_window, per_batch=False):
    """Boolean [nq, nk] ([B, nq, nk] if per_batch): True where a (query, key) entry of the block pair may be
    visible (for some batch row unless per_batch)."""
    qi_lo, qi_hi, qs_lo, qs_hi = (r[:, :, None] for r in q_ranges)
    ki_lo, ki_hi, ks_lo, ks_hi = (r[:, None, :] for r in kv_ranges)
    need = jnp.maximum(qs_lo, ks_lo) <= jnp.minimum(qs_hi, ks_hi)  # documents overlap (empty if all padding)
    if causal:
        need &= ki_lo <= qi_hi
    if sliding_window is not None:
        need &= (qi_lo - ki_hi) < sliding_window
        if not causal:
            need &= (ki_lo - qi_hi) < sliding_window
    return need if per_batch else jnp.any(need, axis=0)


def block_padded(seg_BN, block):
    """[B, N // block]: True where the block holds a padding token (segment 0)."""
    B, N = seg_BN.shape
    return jnp.any(seg_BN.reshape(B, N // block, block) == 0, axis=-1)


def block_pairs_full(q_ranges, kv_ranges, q_padded, kv_padded, causal, sliding_window):
    """Boolean [nq, nk]: True where EVERY (query, key) entry of the block pair is visible in every batch row (one
    document and no padding on both sides, keys inside the causal / window bounds of every query), so a kernel
    can leave out the mask there. Ranges from `block_ranges`, padding from `block_padded`."""
    qi_lo, qi_hi, qs_lo, qs_hi = (r[:, :, None] for r in q_ranges)
    ki_lo, ki_hi, ks_lo, ks_hi = (r[:, None, :] for r in kv_ranges)
    full = (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo) & ~q_padded[:, :, None] & ~kv_padded[:, None, :]
    if causal:
        full &= ki_hi <= qi_lo
    if sliding_window is not None:
        full &= (qi_hi - ki_lo) < sliding_window
        if not causal:
            full &= (ki_hi - qi_lo) < sliding_window
    return jnp.all(full, axis=0)


def needed_span(need):
    """For boolean [..., n, m]: per row (first True column, last True column + 1), int32 [..., n]; (0, 0) if none."""
    m = need.shape[-1]
    cols = jnp.arange(m, dtype=jnp.int32)
    any_ = need.any(axis=-1)
    lo = jnp.min(jnp.where(need, cols, m), axis=-1)
    hi = jnp.max(jnp.where(need, cols + 1, 0), axis=-1)
    return jnp.where(any_, lo, 0).astype(jnp.int32), jnp.where(any_, hi, 0).astype(jnp.int32)


def self_attention_indices(B, T, S):
    """Global indices for `attention()`: keys 0..S-1, queries bottom-right aligned (the last T positions)."""
    q_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + (S - T), (B, T))
    kv_index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return q_index, kv_index


def pad_tokens(x, n_to, axis, mode="constant"):
    """Pad axis `axis` of x to length n_to (zeros, or the edge value for indices)."""
    pad = n_to - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def round_up(n, m):
    return -(-n // m) * m
