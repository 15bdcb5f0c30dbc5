"""`piece_lightning_attention`: lightning attention over rank buffers that hold PIECES of documents, in any order
(balance mode: a split document's zigzag chunks i and 2c-1-i lie in rank i's buffer, whole documents after them).

Causality comes from each token's position in its document, never from buffer offsets. A run is a maximal stretch
of consecutive buffer tokens of one document with consecutive positions; the kernel runs every run locally from a
zero state (runs are handed to it as their own segments). A run j that starts at position p0_j > 0 continues its
document, whose earlier tokens sit in other runs, on this or another rank of the context group. With, for every
run g, its summary (`parallel/lightning.py` conventions, fp32)
    S_g = sum over the run's tokens t of lambda^(e_g - 1 - pos_t) k_t v_t^T      (e_g = its last position + 1),
the state entering run j is the decayed sum over the earlier runs of its document
    S_in_j = sum_{g: doc_g = doc_j, e_g <= p0_j} lambda^(p0_j - e_g) S_g,
and a token t of run j gets  lambda^(pos_t + 1 - p0_j) q_t S_in_j  added to the kernel's output (the kernel's
`initial_state` term, per run). Runs never overlap in positions, so `e_g <= p0_j` selects exactly the runs
before j: the decayed state passes along the document's chunks in their order (zigzag over the group's ranks),
and resets at document boundaries (other documents and padding have other ids).

Only the first `num_pieces` runs of each buffer exchange summaries (static; balance mode puts the split pieces
first, and a whole document that starts at position 0 needs nothing): they are all-gathered over `context` (a few
[H, Dk, Dv] fp32 states per rank) and every rank forms its own S_in. Backward is autodiff (the all-gather's
transpose sums the state cotangents back to their ranks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from longtrain import kernels
from longtrain.parallel.blocks import CONTEXT_AXIS
from longtrain.parallel.context_attention import io_specs


def piece_runs(segment_ids, positions):
    """[B,N] int32 run index of every token (0-based, in buffer order): a new run starts where the document or
    the position sequence breaks. Padding (segment 0) gets runs too; callers mask it."""
    breaks = (segment_ids[:, 1:] != segment_ids[:, :-1]) | (positions[:, 1:] != positions[:, :-1] + 1)
    starts = jnp.concatenate([jnp.ones_like(breaks[:, :1]), breaks], axis=1)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1


def _local(q, k, v, slope, seg, pos, *, num_pieces, region, impl, block_size):
    run = piece_runs(seg, pos)
    live = seg != 0
    out = kernels.lightning_attention(q, k, v, slope, segment_ids=jnp.where(live, run + 1, 0), impl=impl,
                                      block_size=block_size)
    if num_pieces == 0:
        return out
    # the pieces that pass states lie in the first `region` tokens; a whole document among the first runs that
    # reaches past them starts at position 0, so it neither needs nor gives a state (its summary goes unread)
    R = out.shape[1] if region is None else min(region, out.shape[1])
    carried = _carried(q[:, :R], k[:, :R], v[:, :R], slope, seg[:, :R], pos[:, :R], run[:, :R], num_pieces)
    return jnp.concatenate([(out[:, :R].astype(carried.dtype) + carried).astype(out.dtype), out[:, R:]], axis=1)


def _carried(q, k, v, slope, seg, pos, run, num_pieces):
    """The incoming-state term of every token of the first `num_pieces` runs (module docstring), fp32."""
    live = seg != 0
    acc = jnp.promote_types(q.dtype, jnp.float32)
    slope = slope.astype(acc)
    in_run = (run[..., None] == jnp.arange(num_pieces)) & live[..., None]  # [B,N,K]
    pos_f = pos.astype(acc)
    end = jnp.max(jnp.where(in_run, pos_f[..., None] + 1, 0), axis=1)  # [B,K] e_g (0 for an empty run)
    start = jnp.min(jnp.where(in_run, pos_f[..., None], jnp.inf), axis=1)  # [B,K] p0_j
    doc = jnp.max(jnp.where(in_run, seg[..., None], 0), axis=1)  # [B,K] (0 for an empty run)
    # exponents masked before exp (no overflow off the run)
    w = jnp.exp(-slope * jnp.where(in_run, end[:, None, :] - 1 - pos_f[..., None], 0)[..., None])  # [B,N,K,H]
    w = jnp.where(in_run[..., None], w, 0)
    s_run = jnp.einsum("bnkh,bnhd,bnhe->bkhde", w, k.astype(acc), v.astype(acc))  # [B,K,H,Dk,Dv]
    g_s, g_end, g_doc = jax.lax.all_gather((s_run, end, doc), CONTEXT_AXIS, axis=1, tiled=True)  # [B,P*K,...]
    before = (g_doc[:, None, :] == doc[:, :, None]) & (doc[:, :, None] != 0) & (g_end[:, None, :] <= start[:, :, None])
    gap = jnp.where(before, start[:, :, None] - g_end[:, None, :], 0)  # [B,K,G]
    coef = jnp.where(before[..., None], jnp.exp(-slope * gap[..., None]), 0)  # [B,K,G,H]
    s_in = jnp.einsum("bkgh,bghde->bkhde", coef, g_s)  # [B,K,H,Dk,Dv]
    lam = jnp.exp(-slope * jnp.where(in_run, pos_f[..., None] + 1 - start[:, None, :], 0)[..., None])
    lam = jnp.where(in_run[..., None], lam, 0)  # [B,N,K,H]
    return jnp.einsum("bnkh,bnhd,bkhde->bnhe", lam, q.astype(acc), s_in)


def piece_lightning_attention(q, k, v, slope, *, mesh, segment_ids, positions, num_pieces: int, region=None,
                              impl="auto", block_size=64):
    """Lightning attention on global [B, N] buffers sharded over `context` (q, k [B,N,H,Dk], v [B,N,H,Dv], slope
    [H]) whose tokens carry their document (`segment_ids`, 0 = padding) and position in it (`positions`); see the
    module docstring. Equals the single-device kernel on the documents reassembled in position order.
    `region` (static): the state-passing pieces lie in each rank block's first `region` tokens (balance mode's
    split region S); the K-sized work and buffers then cover S tokens, not the whole block."""
    B, N, H, _ = q.shape
    spec, seg_spec = io_specs(mesh, B, (H,))
    slope_spec = jax.sharding.PartitionSpec(spec[2])
    put = lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s))  # noqa: E731
    args = (put(q, spec), put(k, spec), put(v, spec), put(slope, slope_spec), put(segment_ids, seg_spec),
            put(positions.astype(jnp.int32), seg_spec))

    def local(q, k, v, slope, seg, pos):
        return _local(q, k, v, slope, seg, pos, num_pieces=num_pieces, region=region, impl=impl,
                      block_size=block_size)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, slope_spec, seg_spec, seg_spec),
                         out_specs=spec, check_vma=False)(*args)
