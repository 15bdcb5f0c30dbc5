"""`token_ring` context attention (TokenRing, arXiv 2412.20501), with a backward the published code lacks.

K/V never move. Rank r, step s = 0..P-1, holds the query block of owner o = (r+s) mod P: Q travels one hop
backwards (r -> r-1) per step, and the partial (out fp32, lse) of step s goes straight to its owner (r -> r+s).
At the top of step s two sends are issued at once, in opposite directions: the next Q (needed at step s+1) and
the partial of step s-1; then the block of step s is computed, and the partial that arrived is merged in fp32.
The loop is unrolled (each step sends its partial a different distance, so each permutation is static); on
XLA:CPU its compiled temp memory grows with P (the scheduler keeps per-step block buffers alive: 0.28 / 0.45 /
0.73 MB forward at P = 2 / 4 / 8, n = 64), while the scanned `ring` stays flat.

Backward (custom VJP): the owner's (q, out, lse, dout, segment ids) travel like Q, the fp32 dQ partial travels
back to its owner like the forward partial, and dK/dV accumulate where K/V live, so nothing else moves.
Bytes per rank: forward (P-1)·n·(h·b) for Q + (P-1)·n·(h+Hq)·4 for partials; under GQA this is Hq/Hkv times a
K/V ring's Q-side traffic, but it uses both link directions at once.
"""
from __future__ import annotations

import jax

from longtrain.parallel.blocks import Problem, block_bwd, block_fwd, merge, saving_out_lse, shift_perm


def token_ring_attention_local(pb: Problem, q, k, v, seg):
    return _token_ring(pb)(q, k, v, seg)


def _token_ring(pb: Problem):
    P, ax = pb.context_size, pb.axis_name
    q_perm = shift_perm(P, -1)  # Q of owner r+s+1 arrives from r+1

    def owner(rank, step):
        return (rank + step) % P

    def run(traveller, own_result, local, partial_of, add):
        """The TokenRing schedule. `traveller`: the pytree that moves like Q; `partial_of(traveller, step, local)`
        returns (block result for the traveller's owner, updated `local` accumulator that stays here);
        `add(acc, partial)` folds a returned partial into the owner's result. Returns (own result, local)."""
        acc = own_result
        pending = None  # partial computed last step, not yet sent to its owner
        for step in range(1, P):
            # Q hops depend on no compute, so the hop for step s+1 can fly during step s's block
            nxt = jax.lax.ppermute(traveller, ax, q_perm)
            sent = jax.lax.ppermute(pending, ax, shift_perm(P, step - 1)) if pending is not None else None
            traveller = nxt
            partial, local = partial_of(traveller, step, local)
            if sent is not None:
                acc = add(acc, sent)
            pending = partial
        if pending is not None:
            acc = add(acc, jax.lax.ppermute(pending, ax, shift_perm(P, P - 1)))
        return acc, local

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
            dq_p, dk_p, dv_p = block_bwd(pb, qt, k, v, ot, lt, dot, pb.indices_of_rank(owner(rank, step), B),
                                         kv_idx, st, seg)
            return dq_p, (local[0] + dk_p, local[1] + dv_p)  # dK/dV accumulate where K/V live

        trav = (q, out, lse, dout) + ((seg,) if seg is not None else ())
        dq, (dk, dv) = run(trav, dq, (dk, dv), partial_of, lambda a, b: a + b)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

    return saving_out_lse(forward, backward)
