"""`context_lightning_attention`: lightning (decayed linear) attention with the sequence split over `context`.

Each rank holds whole chunks of the sequence (contiguous: chunk r; zigzag: chunks r and 2P-1-r, each n/2 long).
Per chunk it summarises its effect on the recurrent state with zero initial state (fp32):
    S_ext [B,H,Dk,Dv] = sum over the run open at the chunk's last token of lambda^(m-1-t) k_t v_t^T
    a     [B,H]       = lambda^m if that run is the chunk's first run (the state passes through), else 0
and the state entering chunk i is the decay-aware prefix (LASP-2 with decay, notes §A5)
    S_in[0] = initial_state,   S_in[i] = g_i * (a_{i-1} S_in[i-1] + S_ext_{i-1}),
    g_i = 1 iff chunk i's first token continues the document of chunk i-1's last token (same, non-zero id).
`variant="all_gather"` all-gathers the per-chunk (S_ext, a, boundary ids) and every rank runs the C-step
prefix locally (C = number of chunks, tiny work); `variant="ring"` (LASP-1) passes S_out = a S_in + S_ext
to the next rank P-1 times (contiguous layout only). Then each chunk runs the kernel locally with
`initial_state=S_in` (the kernel feeds it to the chunk's first run). Backward is autodiff: the transpose of the
all-gather is a reduce-scatter of the state cotangents, the ring's is the reverse ring (LASP's backward);
only (B,H,Dk,Dv) fp32 states cross ranks. Layout `striped` is not served (every token would be its own
chunk): use contiguous or zigzag for models with lightning layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from longtrain import kernels
from longtrain.parallel.blocks import CONTEXT_AXIS, shift_perm
from longtrain.parallel.context_attention import axis_size, io_specs
from longtrain.parallel.layout import check_layout

VARIANTS = ("all_gather", "ring")


def chunk_ids(layout: str, rank, context_size: int):
    """Global chunk ids of the chunks a rank holds, in local order (contiguous: [r]; zigzag: [r, 2P-1-r])."""
    if layout == "contiguous":
        return [rank]
    return [rank, 2 * context_size - 1 - rank]


def chunk_summary(k, v, seg, slope):
    """(S_ext fp32 [B,H,Dk,Dv], a fp32 [B,H]) of one chunk (see module docstring; fp64 inputs stay fp64).
    seg: [B,m] int."""
    B, m, H, _ = k.shape
    change = jnp.concatenate([jnp.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run = jnp.cumsum(change.astype(jnp.int32), axis=1)
    live = seg != 0
    in_last = (run == run[:, -1:]) & live  # tokens of the run open at the chunk's last token
    acc = jnp.promote_types(k.dtype, jnp.float32)
    t = jnp.arange(m, dtype=acc)
    slope = slope.astype(acc)
    w = jnp.exp(-slope[None, :, None] * (m - 1 - t)[None, None, :])  # [1,H,m]
    w = jnp.where(in_last[:, None, :], w, 0.0)
    s_ext = jnp.einsum("bht,bthd,bthe->bhde", w, k.astype(acc), v.astype(acc))
    passes = (run[:, -1] == 0) & live[:, -1]  # [B]
    a = jnp.where(passes[:, None], jnp.exp(-slope * m)[None, :], 0.0)
    return s_ext, a


def continues(first_seg, prev_last_seg):
    """fp32 [B] gate: 1 where a chunk's first token continues the previous chunk's last document."""
    return ((first_seg == prev_last_seg) & (first_seg != 0)).astype(jnp.float32)


def state_prefix(s_ext, a, first, last, initial):
    """(S_in for every chunk in global order, the state at the last token). s_ext [C,B,H,Dk,Dv], a [C,B,H],
    first/last [C,B]; initial [B,H,Dk,Dv]."""
    states = [initial]
    for i in range(1, s_ext.shape[0]):
        carried = a[i - 1][..., None, None] * states[-1] + s_ext[i - 1]
        states.append(continues(first[i], last[i - 1])[:, None, None, None] * carried)
    return jnp.stack(states), a[-1][..., None, None] * states[-1] + s_ext[-1]


def local_lightning(q, k, v, slope, seg, init, *, layout, P, variant, impl, block_size, return_state=False):
    """One rank's share inside a shard_map over `context` (module docstring); with `return_state` (all_gather
    variant) also the state at the sequence's last token [B,H,Dk,Dv] fp32, the same on every rank."""
    rank = jax.lax.axis_index(CONTEXT_AXIS)
    B, n = q.shape[:2]
    c = 1 if layout == "contiguous" else 2
    m = n // c
    # local chunks stacked on the batch axis: [c*B, m, ...] so one kernel call serves both zigzag chunks
    split = lambda x: jnp.concatenate([x[:, j * m:(j + 1) * m] for j in range(c)], axis=0)
    qs, ks, vs, ss = split(q), split(k), split(v), split(seg)
    s_ext, a = chunk_summary(ks, vs, ss, slope)
    per_chunk = lambda x: x.reshape((c, B) + x.shape[1:])
    s_ext, a = per_chunk(s_ext), per_chunk(a)
    first, last = per_chunk(ss[:, 0]), per_chunk(ss[:, -1])
    if variant == "all_gather":
        gathered = jax.lax.all_gather((s_ext, a, first, last), CONTEXT_AXIS)  # leaves [P, c, ...]
        order = np.empty(c * P, np.int32)  # gathered slot (rank p, local chunk j) of each global chunk id
        for p in range(P):
            for j, cid in enumerate(chunk_ids(layout, p, P)):
                order[cid] = p * c + j
        glob = [x.reshape((P * c,) + x.shape[2:])[order] for x in gathered]
        s_in_all, final = state_prefix(*glob, init)
        s_in = jnp.concatenate([s_in_all[cid] for cid in chunk_ids(layout, rank, P)], axis=0) if c > 1 else \
            s_in_all[rank]
    else:
        if return_state:
            raise ValueError("lightning variant 'ring' does not return the final state; use 'all_gather'")
        s_ext, a, first, last = s_ext[0], a[0], first[0], last[0]
        perm = shift_perm(P, 1)
        prev_last = jax.lax.ppermute(last, CONTEXT_AXIS, perm)
        gate = continues(first, prev_last)[:, None, None, None]
        s_in = init
        for _ in range(P - 1):  # after hop h, ranks 0..h hold their exact entering state
            arrived = jax.lax.ppermute(a[..., None, None] * s_in + s_ext, CONTEXT_AXIS, perm)
            s_in = jnp.where(rank == 0, init, gate * arrived)
    out = kernels.lightning_attention(qs, ks, vs, slope, segment_ids=ss, initial_state=s_in, impl=impl,
                                      block_size=block_size)
    out = jnp.concatenate(jnp.split(out, c, axis=0), axis=1) if c > 1 else out
    return (out, final) if return_state else out


def context_lightning_attention(q, k, v, slope, *, mesh, layout="contiguous", segment_ids=None,
                                initial_state=None, variant="all_gather", impl="auto", block_size=64):
    """Lightning attention on global arrays in layout order (q, k [B,N,H,Dk], v [B,N,H,Dv], slope [H]) whose
    sequence axis is sharded over `context`; equals `kernels.lightning_attention` on the gathered arrays.
    `initial_state` [B,H,Dk,Dv] feeds the first document of the sequence, as in the kernel."""
    if variant not in VARIANTS:
        raise ValueError(f"lightning context variant={variant!r} is unknown; expected one of {VARIANTS}")
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"context_lightning_attention serves layouts 'contiguous' and 'zigzag', not {layout!r} "
                         "(striped would make every token its own chunk); use contiguous or zigzag")
    if variant == "ring" and layout != "contiguous":
        raise ValueError(f"lightning variant 'ring' passes the state rank to rank and needs layout 'contiguous'; "
                         f"got {layout!r} (use variant='all_gather', which serves zigzag)")
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    P = axis_size(mesh, CONTEXT_AXIS)
    check_layout(layout, N, P)
    spec, seg_spec = io_specs(mesh, B, (H,))
    state_spec = PartitionSpec(spec[0], spec[2], None, None)
    slope_spec = PartitionSpec(spec[2])
    if segment_ids is None:
        segment_ids = jnp.ones((B, N), jnp.int32)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, Dk, Dv), jnp.float32)
    put = lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s))
    args = (put(q, spec), put(k, spec), put(v, spec), put(slope, slope_spec), put(segment_ids, seg_spec),
            put(initial_state.astype(jnp.float32), state_spec))

    def local(q, k, v, slope, seg, init):
        return local_lightning(q, k, v, slope, seg, init, layout=layout, P=P, variant=variant, impl=impl,
                                block_size=block_size)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, slope_spec, seg_spec, state_spec),
                           out_specs=spec, check_vma=False)
    return mapped(*args)
