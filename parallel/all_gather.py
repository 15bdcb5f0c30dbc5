"""`all_gather` context attention: gather K/V (and their segment ids) over `context`, attend the local queries
to the whole sequence in one block, and in the backward re-gather K/V and reduce-scatter the fp32 dK/dV.

Bytes per rank: forward (P-1)·n·2h_kv·b as one collective (no overlap unless chunked by heads); backward one more
gather plus a reduce-scatter of fp32 dK/dV, (P-1)·n·2h_kv·4. K/V memory is O(N·h_kv) per rank.
"""
from __future__ import annotations

import jax

from longtrain.parallel.blocks import Problem, block_bwd, block_fwd, saving_out_lse


def all_gather_attention_local(pb: Problem, q, k, v, seg):
    return _all_gather(pb)(q, k, v, seg)


def _all_gather(pb: Problem):
    ax, P = pb.axis_name, pb.context_size
    gather = lambda x: jax.lax.all_gather(x, ax, axis=1, tiled=True)

    def indices(q):
        B = q.shape[0]
        return pb.indices_of_rank(jax.lax.axis_index(ax), B), pb.indices_of_ranks(0, P, B)

    def forward(q, k, v, seg):
        q_idx, kv_idx = indices(q)
        seg_all = None if seg is None else gather(seg)
        return block_fwd(pb, q, gather(k), gather(v), q_idx, kv_idx, seg, seg_all)

    def backward(inputs, out, lse, dout):
        q, k, v, seg = inputs
        q_idx, kv_idx = indices(q)
        seg_all = None if seg is None else gather(seg)
        dq, dk_all, dv_all = block_bwd(pb, q, gather(k), gather(v), out, lse, dout, q_idx, kv_idx, seg, seg_all)
        scatter = lambda x: jax.lax.psum_scatter(x, ax, scatter_dimension=1, tiled=True)
        return dq.astype(q.dtype), scatter(dk_all).astype(k.dtype), scatter(dv_all).astype(v.dtype), None

    return saving_out_lse(forward, backward)
