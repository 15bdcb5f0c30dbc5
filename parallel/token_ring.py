"""`token_ring` context attention (TokenRing, arXiv 2412.20501), with a backward the published code lacks.

K/V never move. Rank r, step s = 0..P-1, holds the query block of owner o = (r+s) mod P: Q travels one hop
backwards (r -> r-1) per step, and the partial (out fp32, lse) of step s goes straight to its owner (r -> r+s).
At the top of step s two sends are issued at once, in opposite directions: the next Q (needed at step s+1) and
the partial of step s-1; then the block of step s is computed, and the partial that arrived is merged in fp32.
The steps run as a `lax.scan`, so compiled temp memory does not grow with P (the unrolled loop it replaces kept
every step's block buffers alive: 0.28 / 0.45 / 0.73 MB forward at P = 2 / 4 / 8, n = 64). Each step sends its
partial a different distance, and a permutation must be static, so the partial's send is a `lax.switch` over the
P - 2 possible distances: one branch, one collective-permute runs per step (hlo_comm counts a conditional's
largest branch once), and the bytes on the wire are those of the unrolled schedule.

Backward (custom VJP): the owner's (q, out, lse, dout, segment ids) travel like Q, the fp32 dQ partial travels
back to its owner like the forward partial, and dK/dV accumulate where K/V live, so nothing else moves.
Bytes per rank: forward (P-1)·n·(h·b) for Q + (P-1)·n·(h+Hq)·4 for partials; under GQA this is Hq/Hkv times a
K/V ring's Q-side traffic, but it uses both link directions at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain.parallel.blocks import Problem, block_bwd, block_fwd, merge, saving_out_lse, shift_perm


def token_ring_attention_local(pb: Problem, q, k, v, seg):
    return _token_ring(pb)(q, k, v, seg)


def _token_ring(pb: Problem):
    P, ax = pb.context_size, pb.axis_name
    q_perm = shift_perm(P, -1)  # Q of owner r+s+1 arrives from r+1

    def owner(rank, step):
        return (rank + step) % P

    def send_back(partial, distance):
        """The partial to its owner `distance` (traced, 1..P-2) ranks ahead: one static permutation per value."""
        branches = [lambda x, d=d: jax.lax.ppermute(x, ax, shift_perm(P, d)) for d in range(1, P - 1)]
        return jax.lax.switch(distance - 1, branches, partial)

    def run(traveller, own_result, local, partial_of, add):
        """The TokenRing schedule. `traveller`: the pytree that moves like Q; `partial_of(traveller, step, local)`
        returns (block result for the traveller's owner, updated `local` accumulator that stays here);
        `add(acc, partial)` folds a returned partial into the owner's result. Returns (own result, local)."""
        if P == 1:
            return own_result, local
        # step 1: nothing computed yet to send back
        traveller = jax.lax.ppermute(traveller, ax, q_perm)
        pending, local = partial_of(traveller, 1, local)  # computed this step, sent to its owner the next

        def step_body(carry, step):
            traveller, acc, pending, local = carry
            # both sends first, in opposite directions; the Q hop depends on no compute, so it flies during
            # this step's block, and the last step's partial travels step - 1 ranks ahead to its owner
            traveller = jax.lax.ppermute(traveller, ax, q_perm)
            sent = send_back(pending, step - 1)
            partial, local = partial_of(traveller, step, local)
            return (traveller, add(acc, sent), partial, local), None

        carry = (traveller, own_result, pending, local)
        if P > 2:
            carry, _ = jax.lax.scan(step_body, carry, jnp.arange(2, P, dtype=jnp.int32))
        _, acc, pending, local = carry
        return add(acc, jax.lax.ppermute(pending, ax, shift_perm(P, P - 1))), local

    def forward(q, k, v, seg):
        rank = jax.lax.axis_index(ax)
        B = q.shape[0]
        kv_idx = pb.indices_of_rank(rank, B)
        own = block_fwd(pb, q, k, v, kv_idx, kv_idx, seg, seg)

        def partial_of(trav, step, local):
            qt, st = trav if seg is not None else (trav[0], None)
            return block_fwd(pb, qt, k, v, pb.indices_of_rank(owner(rank, step), B), kv_idx, st, seg), local

        trav = (q, seg) if seg is not None else (q,)
        acc, _ = run(trav, own, None, partial_of, merge)
        return acc

    def backward(inputs, out, lse, dout):
        q, k, v, seg = inputs
        rank = jax.lax.axis_index(ax)
        B = q.shape[0]
        kv_idx = pb.indices_of_rank(rank, B)
        dq, dk, dv = block_bwd(pb, q, k, v, out, lse, dout, kv_idx, kv_idx, seg, seg)

        def partial_of(trav, step, local):
            qt, ot, lt, dot = trav[:4]
            st = trav[4] if seg is not None else None
            # dK/dV accumulate where K/V live (added in place); dq of the travelling queries goes back to them
            dq_p, dk, dv = block_bwd(pb, qt, k, v, ot, lt, dot, pb.indices_of_rank(owner(rank, step), B), kv_idx,
                                     st, seg, grads_into=(jnp.zeros(qt.shape, jnp.float32), *local))
            return dq_p, (dk, dv)

        trav = (q, out, lse, dout) + ((seg,) if seg is not None else ())
        dq, (dk, dv) = run(trav, dq, (dk, dv), partial_of, lambda a, b: a + b)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

    return saving_out_lse(forward, backward)
