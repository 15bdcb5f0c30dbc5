"""Shared pieces of the context-parallel strategies: static problem description, per-rank token indices, and
fp32 block compute / merge through the kernel block API (`longtrain.kernels.attention_block[_bwd]`).

Every strategy runs inside `jax.shard_map` on local shards: q [B, n, Hq, D], k/v [B, n, Hkv, D], seg [B, n]
(or None) with n = N / P tokens in layout order. Blocks are computed with GLOBAL token indices, so causal and
sliding-window masks and packed documents are exact in every layout without special kernels. Partial results
are kept as (out fp32 [B,T,Hq,D], lse fp32 [B,Hq,T]) and merged with `kernels.merge_partials` (fp32, -inf safe).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from longtrain import kernels
from longtrain.parallel.layout import global_index

CONTEXT_AXIS = "context"


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one context-parallel attention call (hashable; captured by the custom VJPs)."""

    layout: str
    seq_len: int          # N, global
    context_size: int     # P
    causal: bool
    sliding_window: int | None
    scale: float | None
    impl: str
    axis_name: str = CONTEXT_AXIS
    block_kwargs: tuple = ()  # extra kernel kwargs as sorted (name, value) pairs, e.g. (("interpret", True),)

    @property
    def local_len(self) -> int:
        return self.seq_len // self.context_size

    def indices_of_rank(self, rank, batch: int):
        """Global token indices [B, n] int32 of the tokens rank `rank` (traced ok) holds."""
        n = self.local_len
        pos = rank * n + jnp.arange(n, dtype=jnp.int32)
        idx = global_index(self.layout, pos, self.seq_len, self.context_size)
        return jnp.broadcast_to(idx[None], (batch, n))

    def indices_of_ranks(self, first_rank, num_ranks: int, batch: int):
        """Global indices [B, num_ranks*n] of the tokens of consecutive ranks first_rank.. (layout order)."""
        n = self.local_len
        pos = first_rank * n + jnp.arange(num_ranks * n, dtype=jnp.int32)
        idx = global_index(self.layout, pos, self.seq_len, self.context_size)
        return jnp.broadcast_to(idx[None], (batch, num_ranks * n))


def block_fwd(pb: Problem, q, k, v, q_index, kv_index, q_seg, kv_seg, merge_into=None):
    """(out fp32, lse fp32) of q against one key block; merged into the partial `merge_into` (in place on the xla
    impl; not differentiable there) when given."""
    return kernels.attention_block(q, k, v, q_index=q_index, kv_index=kv_index, q_segment_ids=q_seg,
                                   kv_segment_ids=kv_seg, causal=pb.causal, sliding_window=pb.sliding_window,
                                   scale=pb.scale, impl=pb.impl, merge_into=merge_into, **dict(pb.block_kwargs))


def block_bwd(pb: Problem, q, k, v, out, lse, dout, q_index, kv_index, q_seg, kv_seg, grads_into=None):
    """(dq, dk, dv) fp32 of one block, given the merged (global) out and lse; added to `grads_into` (fp32 running
    sums of the shapes of q, k, v; in place on the xla impl) when given."""
    return kernels.attention_block_bwd(q, k, v, out, lse, dout, q_index=q_index, kv_index=kv_index,
                                       q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=pb.causal,
                                       sliding_window=pb.sliding_window, scale=pb.scale, impl=pb.impl,
                                       grads_into=grads_into, **dict(pb.block_kwargs))


def merge(acc, part):
    """fp32 merge of two (out, lse) partials over disjoint key sets."""
    return kernels.merge_partials(acc[0], acc[1], part[0], part[1])


def shift_perm(size: int, shift: int):
    """ppermute pairs sending rank i to rank i+shift (mod size)."""
    return [(i, (i + shift) % size) for i in range(size)]


def ring_perm(size: int, shift: int, stride: int = 1):
    """Pairs sending rank i to rank i + shift*stride (mod size): a ring over ranks spaced `stride` apart."""
    return [(i, (i + shift * stride) % size) for i in range(size)]


def saving_out_lse(forward, backward):
    """An attention op whose custom VJP saves only its inputs and the fp32 (out, lse) of `forward`.

    `forward(q, *rest) -> (out fp32, lse)`; `backward(inputs, out, lse, dout) -> cotangents of inputs` (None for
    integer inputs). The op returns out in q's dtype. Every strategy's VJP has this shape; only the two
    functions differ."""

    @jax.custom_vjp
    def attend(*inputs):
        return forward(*inputs)[0].astype(inputs[0].dtype)

    def attend_fwd(*inputs):
        out, lse = forward(*inputs)
        return out.astype(inputs[0].dtype), (inputs, out, lse)

    def attend_bwd(res, dout):
        inputs, out, lse = res
        return backward(inputs, out, lse, dout)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def local_attention_vjp(pb: Problem):
    """Single-block attention with a custom VJP saving only (out fp32, lse): q [B,T,..] against k/v [B,S,..] with
    explicit global indices and segment ids. Used by all_to_all-style strategies after their collectives."""

    def forward(q, k, v, q_index, kv_index, q_seg, kv_seg):
        return block_fwd(pb, q, k, v, q_index, kv_index, q_seg, kv_seg)

    def backward(inputs, out, lse, dout):
        q, k, v, q_index, kv_index, q_seg, kv_seg = inputs
        dq, dk, dv = block_bwd(pb, q, k, v, out, lse, dout, q_index, kv_index, q_seg, kv_seg)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None

    return saving_out_lse(forward, backward)
