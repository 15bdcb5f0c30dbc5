"""Lightning (decayed linear) attention oracles: the quadratic masked form and the token recurrence.

Convention (DESIGN.md §3, the Hugging Face MiniMax one): per head decay lambda_h = exp(-slope_h);
    S_t = lambda S_{t-1} + k_t v_t^T,   o_t = q_t^T S_t      (no softmax, no scale)
so o_t = sum_{j<=t} lambda^(t-j) (q_t . k_j) v_j, and the returned state is S at the last token.
Documents: a token only sees earlier tokens of the same run of equal segment ids; segment 0 (padding) gives
output 0 and adds nothing. `initial_state` [B,H,Dk,Dv] feeds the first run (the document continuing from the
previous chunk or device) and decays per token like any other state. The final state is the state of the
run open at the last token (zero if the row ends in padding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def run_ids(segment_ids):
    """[B,T] int: index of the maximal run of equal segment ids each token is in (0 for the first run)."""
    change = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def lightning_reference(q, k, v, slope, *, segment_ids=None, initial_state=None, return_state=False):
    """Quadratic form. q, k: [B,T,H,Dk]; v: [B,T,H,Dv]; slope: [H]. Computed in fp32 (fp64 under x64 inputs)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dt = jnp.promote_types(q.dtype, jnp.float32)
    qf, kf, vf = q.astype(dt), k.astype(dt), v.astype(dt)
    slope = slope.astype(dt)
    t = jnp.arange(T)
    diff = t[:, None] - t[None, :]  # [T,T]
    causal = diff >= 0
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    runs = run_ids(segment_ids)
    live = segment_ids != 0
    same = (runs[:, :, None] == runs[:, None, :]) & live[:, :, None] & live[:, None, :] & causal  # [B,T,T]
    # log-space exponent is -slope * diff, masked *before* exp so no -inf appears
    decay = jnp.exp(-slope[None, :, None, None] * jnp.where(same[:, None], diff, 0))  # [B,H,T,T]
    decay = jnp.where(same[:, None], decay, 0.0)
    scores = jnp.einsum("bthd,bshd->bhts", qf, kf) * decay
    out = jnp.einsum("bhts,bshd->bthd", scores, vf)
    first_run = (runs == 0) & live  # [B,T]
    if initial_state is not None:
        s0 = initial_state.astype(dt)
        lam_t1 = jnp.exp(-slope[None, :, None] * (t[None, None, :] + 1))  # [1,H,T]
        inter = jnp.einsum("bthd,bhde->bthe", qf, s0) * jnp.swapaxes(lam_t1, 1, 2)[..., None]
        out = out + jnp.where(first_run[:, :, None, None], inter, 0.0)
    out = jnp.where(live[:, :, None, None], out, 0.0).astype(q.dtype)
    if not return_state:
        return out
    last = T - 1
    open_run = runs[:, last]  # [B]
    in_last = (runs == open_run[:, None]) & live  # tokens of the run open at the end
    w = jnp.exp(-slope[None, :, None] * (last - t)[None, None, :])  # [1,H,T]
    w = jnp.where(in_last[:, None, :], w, 0.0)  # [B,H,T]
    state = jnp.einsum("bht,bthd,bthe->bhde", w, kf, vf)
    if initial_state is not None:
        carries = (open_run == 0) & live[:, last]
        state = state + jnp.where(carries[:, None, None, None],
                                  jnp.exp(-slope * T)[None, :, None, None] * initial_state.astype(dt), 0.0)
    return out, state.astype(jnp.promote_types(dt, jnp.float32))


def lightning_scan(q, k, v, slope, *, segment_ids=None, initial_state=None, return_state=False):
    """Token-by-token recurrence (the second oracle)."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dt = jnp.promote_types(q.dtype, jnp.float32)
    lam = jnp.exp(-slope.astype(dt))[None, :, None, None]
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    reset = (segment_ids != prev)  # a new run starts here (token 0 continues the initial state)
    s0 = jnp.zeros((B, H, Dk, Dv), dt) if initial_state is None else initial_state.astype(dt)

    def step(state, xs):
        q_t, k_t, v_t, seg_t, reset_t = xs
        live = (seg_t != 0)[:, None, None, None]
        state = jnp.where(reset_t[:, None, None, None] | ~live, 0.0, state)
        state = lam * state + jnp.einsum("bhd,bhe->bhde", k_t, v_t) * live
        o_t = jnp.einsum("bhd,bhde->bhe", q_t, state) * live[..., 0]
        return state, o_t

    xs = (jnp.swapaxes(q.astype(dt), 0, 1), jnp.swapaxes(k.astype(dt), 0, 1), jnp.swapaxes(v.astype(dt), 0, 1),
          segment_ids.T, reset.T)
    state, out = jax.lax.scan(step, s0, xs)
    out = jnp.swapaxes(out, 0, 1).astype(q.dtype)
    return (out, state.astype(jnp.promote_types(dt, jnp.float32))) if return_state else out
