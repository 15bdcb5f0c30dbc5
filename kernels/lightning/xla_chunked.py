"""Chunked lightning attention in pure JAX (impl="xla") with a Lightning Attention-2 custom VJP.

Forward (block form of chunking.py): the intra-block quadratic part and every block's own state contribution
(K_n * k_decay)^T V_n are computed for all blocks at once; a cheap sequential scan over blocks (one [Dk,Dv]
multiply-add per block) turns them into the states S_{n-1} entering each block; the inter-block part
q_decay * Q_n S_{n-1} is again one batched matmul. Memory is linear in T: [B,H,N,C,C] scores and N states.

Backward (Lightning-2, Qin et al. 2024, Alg. 4, in the HF MiniMax convention), saving only q, k, v, the initial
state and the segment ids:
  intra, parallel over blocks:  dP = (dO V^T) * D;  dQ = dP K;  dK = dP^T Q;  dV = (Q K^T * D)^T dO
  sweep 1 (forward, recomputes the states):  dQ_n += q_decay * dO_n S_{n-1}^T
  sweep 2 (reverse, dS_n = grad w.r.t. the state at block n's end; dS_{N-1} = cotangent of the final state):
      dK_n += k_decay * V_n dS_n^T;  dV_n += (K_n * k_decay) dS_n
      dS_{n-1} = state_decay_n dS_n + (Q_n * q_decay)^T dO_n          (dS_{-1} = d initial_state)
The slope is NOT differentiated (a fixed ALiBi-style schedule): its cotangent is zero.
Computation is in fp32 (fp64 for fp64 inputs) whatever the input dtype; outputs are cast back.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from longtrain.kernels.lightning.chunking import block_decays, intra_decay_mask, num_blocks, pad_tokens


def _compute_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _blocks(x_BTHD, N, C):
    """[B,Tp,H,D] -> [B,H,N,C,D]: heads and blocks lead, so every matmul below is a plain batched GEMM."""
    B, _, H, D = x_BTHD.shape
    return jnp.moveaxis(x_BTHD.reshape(B, N, C, H, D), 3, 1)


def _unblock(x_BHNCD, T):
    """[B,H,N,C,D] -> [B,T,H,D] (drops the padding tokens)."""
    B, H, N, C, D = x_BHNCD.shape
    return jnp.moveaxis(x_BHNCD, 1, 3).reshape(B, N * C, H, D)[:, :T]


def _prepare(q, k, v, slope, segment_ids, block_size):
    """Pad to whole blocks ([B,H,N,C,D] operands), cast to the compute dtype and build the decays (fwd and bwd)."""
    B, T, H, _ = q.shape
    C = block_size
    N = num_blocks(T, C)
    dt = _compute_dtype(q)
    dec = block_decays(segment_ids, slope, T, C, dt)
    qb, kb, vb = (_blocks(pad_tokens(x.astype(dt), N * C), N, C) for x in (q, k, v))
    D = intra_decay_mask(dec.runs_BT.reshape(B, N, C), dec.live_BT.reshape(B, N, C), slope, dt)  # [B,H,N,C,C]
    qd = dec.q_decay_BHT.reshape(B, H, N, C)
    kd = dec.k_decay_BHT.reshape(B, H, N, C)
    return qb, kb, vb, D, qd, kd, dec.state_decay_BHN, N, C, dt


def _scan_states(block_kv_BHNDE, state_decay_BHN, s0_BHDE):
    """States entering each block, [B,H,N,Dk,Dv], and the state at the end, from S_n = a_n S_{n-1} + KV_n."""
    def step(S, xs):
        kv, a = xs
        return a[:, :, None, None] * S + kv, S

    xs = (jnp.moveaxis(block_kv_BHNDE, 2, 0), jnp.moveaxis(state_decay_BHN, 2, 0))
    final, entering = jax.lax.scan(step, s0_BHDE, xs)
    return jnp.moveaxis(entering, 0, 2), final


def _reverse_scan_grads(block_dm_BHNDE, state_decay_BHN, ds_final_BHDE):
    """dS_n (grad w.r.t. the state at block n's end), [B,H,N,Dk,Dv], and d initial_state (reverse sweep)."""
    def step(dS, xs):
        dm, a = xs  # dS is the grad of S_n; emit it, then pass it back through S_n = a_n S_{n-1} + ...
        return a[:, :, None, None] * dS + dm, dS

    xs = (jnp.moveaxis(block_dm_BHNDE, 2, 0), jnp.moveaxis(state_decay_BHN, 2, 0))
    ds0, at_end = jax.lax.scan(step, ds_final_BHDE, xs, reverse=True)
    return jnp.moveaxis(at_end, 0, 2), ds0


def _forward(q, k, v, slope, segment_ids, s0, block_size):
    B, T, H, _ = q.shape
    qb, kb, vb, D, qd, kd, sd, N, C, dt = _prepare(q, k, v, slope, segment_ids, block_size)
    scores = jnp.einsum("bhnid,bhnjd->bhnij", qb, kb) * D
    out = jnp.einsum("bhnij,bhnje->bhnie", scores, vb)
    block_kv = jnp.einsum("bhnj,bhnjd,bhnje->bhnde", kd, kb, vb)
    entering, final = _scan_states(block_kv, sd, s0.astype(dt))
    out = out + jnp.einsum("bhni,bhnid,bhnde->bhnie", qd, qb, entering)
    return _unblock(out, T).astype(q.dtype), final


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def lightning_chunked_core(q, k, v, slope, segment_ids, s0, block_size):
    """(out [B,T,H,Dv] in q.dtype, final state [B,H,Dk,Dv] in the compute dtype); segment_ids int32 [B,T]."""
    return _forward(q, k, v, slope, segment_ids, s0, block_size)


def _core_fwd(q, k, v, slope, segment_ids, s0, block_size):
    return _forward(q, k, v, slope, segment_ids, s0, block_size), (q, k, v, slope, segment_ids, s0)


def _core_bwd(block_size, res, cotangents):
    q, k, v, slope, segment_ids, s0 = res
    dout, dstate = cotangents
    B, T, H, _ = q.shape
    qb, kb, vb, D, qd, kd, sd, N, C, dt = _prepare(q, k, v, slope, segment_ids, block_size)
    dob = _blocks(pad_tokens(dout.astype(dt), N * C), N, C)

    # intra part, parallel over blocks
    dP = jnp.einsum("bhnie,bhnje->bhnij", dob, vb) * D
    dq = jnp.einsum("bhnij,bhnjd->bhnid", dP, kb)
    dk = jnp.einsum("bhnij,bhnid->bhnjd", dP, qb)
    P = jnp.einsum("bhnid,bhnjd->bhnij", qb, kb) * D
    dv = jnp.einsum("bhnij,bhnie->bhnje", P, dob)

    # sweep 1: recompute the states entering each block; inter part of dQ
    block_kv = jnp.einsum("bhnj,bhnjd,bhnje->bhnde", kd, kb, vb)
    entering, _ = _scan_states(block_kv, sd, s0.astype(dt))
    dq = dq + jnp.einsum("bhni,bhnie,bhnde->bhnid", qd, dob, entering)

    # sweep 2 (reverse): grads of the block-end states; inter part of dK, dV; d initial_state
    block_dm = jnp.einsum("bhni,bhnid,bhnie->bhnde", qd, qb, dob)
    ds_end, ds0 = _reverse_scan_grads(block_dm, sd, dstate.astype(dt))
    dk = dk + jnp.einsum("bhnj,bhnje,bhnde->bhnjd", kd, vb, ds_end)
    dv = dv + jnp.einsum("bhnj,bhnjd,bhnde->bhnje", kd, kb, ds_end)

    return (_unblock(dq, T).astype(q.dtype), _unblock(dk, T).astype(k.dtype), _unblock(dv, T).astype(v.dtype),
            jnp.zeros_like(slope), None, ds0.astype(s0.dtype))


lightning_chunked_core.defvjp(_core_fwd, _core_bwd)


def lightning_xla(q, k, v, slope, *, segment_ids, initial_state, return_state, block_size):
    """impl="xla": arguments already validated by api.py; segment_ids int32 [B,T] (never None here)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dt = _compute_dtype(q)
    s0 = jnp.zeros((B, H, Dk, Dv), dt) if initial_state is None else initial_state
    out, state = lightning_chunked_core(q, k, v, slope, segment_ids, s0, block_size)
    if not return_state:
        return out
    return out, state.astype(jnp.promote_types(dt, jnp.float32))
