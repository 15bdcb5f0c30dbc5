"""`ring` context attention: K/V rotate P-1 hops forward; Q, out and lse stay home.

Forward, rank r, step s = 0..P-1: holds the K/V block of rank (r - s) mod P. At the top of each step the send of
the current K/V to rank r+1 is issued (it is needed only next step, so it overlaps this step's block), then the
block is computed and merged in fp32. Only P-1 sends happen: the last block is never forwarded.

Backward (custom VJP; residuals are q, k, v, out fp32, lse): the same rotation of K/V, plus fp32 dK/dV
accumulators that trail one step behind their K/V (the accumulator of the block computed at step s-1 is sent at
the top of step s, so no send waits for this step's compute) and make one final hop home. Each block's gradients
are added straight into the arrived dK/dV and the running dq (`block_bwd(grads_into=)`; in place on the xla
kernel), so no per-block gradient arrays exist beside the accumulators. Bytes per rank per pass: forward
2(P-1)·n·h_kv·b (+ segment ids), backward the same for K/V plus 2·P·n·h_kv·4 for dK/dV.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain.parallel.blocks import (Problem, block_bwd, block_fwd, local_attention_vjp, ring_perm,
                                      saving_out_lse)


def ring_attention_local(pb: Problem, q, k, v, seg, tok=None):
    """Local shards in, local out [B,n,Hq,D] (q.dtype). Call inside shard_map over `pb.axis_name`.

    `tok` [B,n] int32 (or None): explicit causal index of each local token (e.g. positions within a document
    when split documents sit in zigzag order). Given, it replaces the layout's indices for q and travels with
    K/V around the ring like the kv segment ids; None sends exactly the bytes it did before."""
    return _ring(pb, 1)(q, k, v, seg, tok)


def ring_region_attention_local(pb: Problem, q, k, v, seg, tok, region: int):
    """Ring attention for the first `region` tokens of every rank's block, local attention for the rest.

    Queries in [0, region) attend over the ring to the first `region` tokens of every rank (only those bytes
    travel); queries in [region, n) attend to this rank's whole block [0, n), which also serves a document that
    starts inside the region and continues after it. Correct whenever no document in [region, n) has tokens on
    another rank (balance mode: split documents live in the region). `tok` [B,n] is required (causal index)."""
    n = q.shape[1]
    if region == n:
        return ring_attention_local(pb, q, k, v, seg, tok)
    tail = local_attention_vjp(pb)(q[:, region:], k, v, tok[:, region:], tok, seg[:, region:], seg)
    if region == 0:
        return tail
    head = ring_attention_local(pb, q[:, :region], k[:, :region], v[:, :region], seg[:, :region],
                                tok[:, :region])
    return jnp.concatenate([head, tail], axis=1)


def ring_attention_grouped(pb: Problem, q, k, v, seg, group: int):
    """The ring across groups of `group` consecutive ranks (hops of `group` ranks), each rank holding its
    group's tokens (layout positions of ranks g*group .. g*group+group-1) on a slice of the heads."""
    return _ring(pb, group)(q, k, v, seg, None)


def _ring(pb: Problem, group: int):
    P, ax = pb.context_size // group, pb.axis_name  # P: ring length (number of groups)
    fwd_perm = ring_perm(pb.context_size, 1, stride=group)

    def ring_rank():
        return jax.lax.axis_index(ax) // group

    def indices(ring_index, batch):
        return pb.indices_of_ranks(ring_index * group, group, batch)

    def source(rank, step):
        return (rank - step) % P

    def kv_block(k, v, seg, tok):
        # None entries are empty pytrees: without segment ids / token index nothing extra is sent
        return (k, v, seg, tok)

    def kv_index(block, rank, step, batch):
        tok = block[3]
        return indices(source(rank, step), batch) if tok is None else tok

    def forward(q, k, v, seg, tok):
        rank = ring_rank()
        B = q.shape[0]
        q_idx = indices(rank, B) if tok is None else tok

        def compute(block, step, acc=None):
            # this block's partial, merged into the running (out, lse) `acc` (in place on the xla kernel)
            kb, vb, sb, _ = block
            return block_fwd(pb, q, kb, vb, q_idx, kv_index(block, rank, step, B), seg, sb, merge_into=acc)

        block = kv_block(k, v, seg, tok)
        if P == 1:
            return compute(block, 0)
        nxt = jax.lax.ppermute(block, ax, fwd_perm)  # top of step 0: send own K/V onward
        acc = compute(block, 0)

        def body(carry, step):
            block, acc = carry
            nxt = jax.lax.ppermute(block, ax, fwd_perm)  # issued before this step's compute
            return (nxt, compute(block, step, acc)), None

        (block, acc), _ = jax.lax.scan(body, (nxt, acc), jnp.arange(1, P - 1))
        return compute(block, P - 1, acc)

    def backward(inputs, out, lse, dout):
        q, k, v, seg, tok = inputs
        rank = ring_rank()
        B = q.shape[0]
        q_idx = indices(rank, B) if tok is None else tok

        def grads(block, step, into=None):
            # adds this block's gradients into `into` = (dq, dK, dV) running sums (in place on the xla impl)
            kb, vb, sb, _ = block
            return block_bwd(pb, q, kb, vb, out, lse, dout, q_idx, kv_index(block, rank, step, B), seg, sb,
                             grads_into=into)

        block = kv_block(k, v, seg, tok)
        if P == 1:
            dq, dk, dv = grads(block, 0)
        else:
            nxt = jax.lax.ppermute(block, ax, fwd_perm)
            dq, dk, dv = grads(block, 0)

            def step_body(block, pending, dq, step, send_kv):
                nxt = jax.lax.ppermute(block, ax, fwd_perm) if send_kv else None
                # the dK/dV sums trail their K/V by one hop: the block computed last step has already moved on
                dk, dv = jax.lax.ppermute(pending, ax, fwd_perm)
                dq, dk, dv = grads(block, step, (dq, dk, dv))
                return nxt, (dk, dv), dq

            def body(carry, step):
                block, pending, dq = carry
                nxt, pending, dq = step_body(block, pending, dq, step, True)
                return (nxt, pending, dq), None

            (block, pending, dq), _ = jax.lax.scan(body, (nxt, (dk, dv), dq), jnp.arange(1, P - 1))
            _, pending, dq = step_body(block, pending, dq, P - 1, False)
            dk, dv = jax.lax.ppermute(pending, ax, fwd_perm)  # last hop home
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    return saving_out_lse(forward, backward)
