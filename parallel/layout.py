"""Sequence layouts for context parallelism: which global tokens each of the P context ranks holds.

Layout order is the order of tokens along the sharded sequence axis: rank r holds layout positions
[r*n, (r+1)*n) with n = N/P. The layouts (N must be divisible by P, and by 2P for zigzag):
  contiguous: rank r holds global tokens [r*n, (r+1)*n)                              (causal work ~ r: imbalanced)
  zigzag:     rank r holds chunks r and 2P-1-r of size n/2 (one early, one late)     (causal work balanced)
  striped:    rank r holds tokens r, r+P, r+2P, ...                                   (causal work balanced)
`to_layout` permutes a global-order array into layout order; `from_layout` inverts it. Strategies never permute
tokens: they compute each token's global index with `global_index` and pass it to the block kernels, so masks
(causal, sliding window, packed documents) stay exact in any layout.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str, seq_len: int, context_size: int) -> None:
    """Raise ValueError naming the layout/sequence length when the sequence cannot be split that way."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a sequence layout; expected one of {LAYOUTS}")
    if context_size < 1:
        raise ValueError(f"context_size={context_size} must be >= 1")
    unit = 2 * context_size if layout == "zigzag" else context_size
    if seq_len % unit:
        raise ValueError(f"layout={layout!r} with context_size={context_size} needs the sequence length to be a "
                         f"multiple of {unit}; got {seq_len}")


def global_index(layout: str, layout_pos, seq_len: int, context_size: int):
    """Global token index of each layout position (int32 array, elementwise; works on traced arrays).

    `layout_pos` may be any integer array of positions in layout order, e.g. the positions held by one rank.
    """
    n = seq_len // context_size
    xp = np if isinstance(layout_pos, np.ndarray) else jnp  # host permutations stay numpy (usable under jit)
    p = xp.asarray(layout_pos).astype(xp.int32)
    if layout == "contiguous" or context_size == 1:
        return p
    rank, j = p // n, p % n
    if layout == "zigzag":
        half = n // 2
        first = rank * half + j
        second = (2 * context_size - 1 - rank) * half + (j - half)
        return xp.where(j < half, first, second).astype(xp.int32)
    if layout == "striped":
        return (j * context_size + rank).astype(xp.int32)
    raise ValueError(f"layout={layout!r} is not a sequence layout; expected one of {LAYOUTS}")


def layout_permutation(layout: str, seq_len: int, context_size: int) -> np.ndarray:
    """Host int array perm [N]: layout position i holds global token perm[i]."""
    check_layout(layout, seq_len, context_size)
    return np.asarray(global_index(layout, np.arange(seq_len), seq_len, context_size))


def to_layout(x, layout: str, context_size: int, axis: int = 1):
    """Permute the sequence axis of a global-order array into layout order."""
    perm = layout_permutation(layout, x.shape[axis], context_size)
    return jnp.take(x, jnp.asarray(perm), axis=axis)


def from_layout(x, layout: str, context_size: int, axis: int = 1):
    """Inverse of `to_layout`: layout order back to global token order."""
    perm = layout_permutation(layout, x.shape[axis], context_size)
    return jnp.take(x, jnp.asarray(np.argsort(perm)), axis=axis)


def causal_work_per_rank(layout: str, seq_len: int, context_size: int, segment_ids=None) -> np.ndarray:
    """Useful causal attention work per rank: number of (query, key) pairs with key <= query in the same document.

    `segment_ids` (optional, [N] global order, 0 = padding) counts pairs per document only. Host-side numpy.
    """
    perm = layout_permutation(layout, seq_len, context_size)
    if segment_ids is None:
        seg = np.ones(seq_len, np.int64)
    else:
        seg = np.asarray(segment_ids).reshape(-1)
    # for each token, the number of visible keys: its offset inside its document + 1 (0 for padding)
    starts = np.r_[True, seg[1:] != seg[:-1]]
    doc_start = np.maximum.accumulate(np.where(starts, np.arange(seq_len), 0))
    visible = np.where(seg != 0, np.arange(seq_len) - doc_start + 1, 0)
    per_pos = visible[perm]  # layout order
    return per_pos.reshape(context_size, -1).sum(axis=1)


def imbalance(work) -> float:
    """max / mean of per-rank work (1.0 = perfectly balanced)."""
    work = np.asarray(work, np.float64)
    return float(work.max() / work.mean())
