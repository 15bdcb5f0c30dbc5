"""`ulysses_ring` (USP-style 2-D hybrid): the context axis of size P = u·r is split into groups of u consecutive
ranks. Inside a group, Ulysses all-to-alls trade sequence for heads (each rank then holds the group's u·n tokens
on H/u heads); across the r groups, a K/V ring (the `ring` strategy's schedule, hops of u ranks) runs on those
heads. Ring bytes shrink by u against a plain ring; the all-to-all bytes are Ulysses' at degree u.
"""
from __future__ import annotations

import jax

from longtrain.parallel.blocks import Problem
from longtrain.parallel.ulysses import heads_to_seq, seq_to_heads


def ulysses_ring_attention_local(pb: Problem, q, k, v, seg, ulysses_degree: int):
    from longtrain.parallel.ring import ring_attention_grouped

    ax, P, u = pb.axis_name, pb.context_size, ulysses_degree
    groups = [list(range(g * u, (g + 1) * u)) for g in range(P // u)]
    if u > 1:
        q, k, v = (seq_to_heads(x, ax, groups) for x in (q, k, v))
        if seg is not None:
            seg = jax.lax.all_gather(seg, ax, axis=1, tiled=True, axis_index_groups=groups)
    out = ring_attention_grouped(pb, q, k, v, seg, group=u)
    return heads_to_seq(out, ax, groups) if u > 1 else out
