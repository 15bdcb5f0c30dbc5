"""Shared pieces of the lightning kernel tests: random inputs, document layouts, a plain-bf16 baseline, errors.

Lives beside the kernels (not under tests/) so every lightning test file and the benchmark use the same cases.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longtrain.kernels.lightning.api import lightning_attention

SEGMENT_LAYOUTS = ("none", "aligned", "unaligned", "packed")


def segment_layout(kind: str, B: int, T: int, block_size: int = 16):
    """int32 [B,T] segment ids (None for "none"). "aligned": documents of exactly block_size tokens;
    "unaligned": documents cutting blocks mid-way; "packed": a 1-token document, padding in the middle and
    at the end of the row (row 0), and a row with two documents (row 1)."""
    if kind == "none":
        return None
    seg = np.ones((B, T), np.int32)
    if kind == "aligned":
        seg[:] = 1 + np.arange(T)[None, :] // block_size
    elif kind == "unaligned":
        cuts = [max(1, T // 3 + 1), max(2, (2 * T) // 3 - 1)]
        seg[:, cuts[0]:] = 2
        seg[:, cuts[1]:] = 3
    elif kind == "packed":
        a, b = max(1, T // 5), max(2, T // 5 + 1)
        seg[0, a:b] = 2  # a 1-token document
        seg[0, b:] = 3
        mid = (b + T) // 2
        seg[0, mid:mid + 3] = 0  # padding in the middle of the row splits document 3 into two runs
        seg[0, T - max(1, T // 8):] = 0  # the row ends in padding: final state 0
        if B > 1:
            seg[1, T // 2:] = 7
    else:
        raise ValueError(f"segment layout {kind!r} is not one of {SEGMENT_LAYOUTS}")
    return jnp.asarray(seg)


def random_inputs(seed: int, B: int, T: int, H: int, Dk: int, Dv: int, dtype=jnp.float32):
    """q, k, v (scaled so outputs are O(1)), slopes spanning slow to fast decay, a random initial state and
    random cotangents for out and for the final state."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(Dk)
    q = rng.standard_normal((B, T, H, Dk)) * scale
    k = rng.standard_normal((B, T, H, Dk))
    v = rng.standard_normal((B, T, H, Dv))
    slope = np.geomspace(0.01, 2.0, H)  # from an almost-undecayed head to one that forgets within a few tokens
    s0 = rng.standard_normal((B, H, Dk, Dv)) * scale
    dout = rng.standard_normal((B, T, H, Dv))
    dstate = rng.standard_normal((B, H, Dk, Dv))
    state_dtype = jnp.promote_types(dtype, jnp.float32)  # states are fp32 (fp64 in fp64 oracle runs)
    cast = lambda x, dt: jnp.asarray(x, dt)  # noqa: E731
    return dict(q=cast(q, dtype), k=cast(k, dtype), v=cast(v, dtype), slope=cast(slope, jnp.float32),
                s0=cast(s0, state_dtype), dout=cast(dout, dtype), dstate=cast(dstate, state_dtype))


def plain_bf16_lightning(q, k, v, slope, *, segment_ids=None, initial_state=None):
    """The quadratic form with every intermediate rounded to bf16: the "plain bf16 computation" a bf16 kernel
    must be within 2x of (DESIGN.md §4). Returns (out, state), differentiable by plain autodiff."""
    from longtrain.kernels.lightning.reference import run_ids

    bf = jnp.bfloat16
    B, T, H, _ = q.shape
    q, k, v = q.astype(bf), k.astype(bf), v.astype(bf)
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    runs, live = run_ids(segment_ids), segment_ids != 0
    t = jnp.arange(T)
    diff = t[:, None] - t[None, :]
    same = (diff >= 0) & (runs[:, :, None] == runs[:, None, :]) & live[:, :, None]
    decay = jnp.where(same[:, None], jnp.exp(-slope[None, :, None, None] * jnp.maximum(diff, 0)), 0.0).astype(bf)
    out = jnp.einsum("bhts,bshd->bthd", jnp.einsum("bthd,bshd->bhts", q, k) * decay, v)
    w = jnp.where((runs == runs[:, -1:]) & live, 1.0, 0.0)[:, None] * jnp.exp(-slope[None, :, None] * (T - 1 - t))
    state = jnp.einsum("bht,bthd,bthe->bhde", w.astype(bf), k, v)
    if initial_state is not None:
        s0 = initial_state.astype(bf)
        first = ((runs == 0) & live)[:, None, :] * jnp.exp(-slope[None, :, None] * (t + 1))  # [B,H,T]
        out = out + jnp.einsum("bht,bthd,bhde->bthe", first.astype(bf), q, s0)
        carries = ((runs[:, -1] == 0) & live[:, -1])[:, None, None, None]
        state = state + jnp.where(carries, jnp.exp(-slope * T)[None, :, None, None].astype(bf) * s0, 0.0)
    return out, state.astype(jnp.float32)


def rel_err(got, want) -> float:
    """max |got - want| / max |want| in fp64 (numpy), the tolerance measure of DESIGN.md §4."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def forward_and_grads(impl, x, segment_ids, block_size=64, dtype=None, **kw):
    """(out, state, dq, dk, dv, d_initial_state) of one impl, gradients by jax.vjp with random cotangents on
    both the output and the final state (q, k, v, dout cast to `dtype` when given). One jit per call: eager
    dispatch of the many small ops costs more than compiling them once."""
    def run(q, k, v, s0, slope, seg, dout, dstate):
        def f(q, k, v, s0):
            return lightning_attention(q, k, v, slope, segment_ids=seg, initial_state=s0, return_state=True,
                                       impl=impl, block_size=block_size, **kw)

        (out, state), vjp = jax.vjp(f, q, k, v, s0)
        return (out, state, *vjp((dout.astype(out.dtype), dstate.astype(state.dtype))))

    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
    return jax.jit(run)(cast(x["q"]), cast(x["k"]), cast(x["v"]), x["s0"], x["slope"], segment_ids,
                        cast(x["dout"]), x["dstate"])


NAMES = ("out", "state", "dq", "dk", "dv", "ds0")


def assert_close(got, want, tol, what=""):
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, f"{what} {name}: shape {g.shape} != {w.shape}"
        err = rel_err(g, w)
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol:g}"


def plain_bf16_forward_and_grads(x, segment_ids):
    """(out, state, dq, dk, dv, d_initial_state) of `plain_bf16_lightning` with the cotangents of `x`: the bf16
    baseline for the "no worse than 2x plain bf16 against the fp64 oracle" checks."""
    def run(q, k, v, s0, slope, seg, dout, dstate):
        def f(q, k, v, s0):
            return plain_bf16_lightning(q, k, v, slope, segment_ids=seg, initial_state=s0)

        (out, state), vjp = jax.vjp(f, q, k, v, s0)
        return (out, state, *vjp((dout, dstate)))

    bf = jnp.bfloat16
    return jax.jit(run)(x["q"].astype(bf), x["k"].astype(bf), x["v"].astype(bf), x["s0"], x["slope"], segment_ids,
                        x["dout"].astype(bf), x["dstate"])


def assert_bf16_within_2x_plain(got, x, segment_ids, oracle):
    """Each of out, state and the gradients is no further from the fp64 `oracle` than 2x the plain bf16 baseline."""
    baseline = plain_bf16_forward_and_grads(x, segment_ids)
    for name, g, b, o in zip(NAMES, got, baseline, oracle):
        err, base_err = rel_err(g, o), rel_err(b, o)
        assert err <= 2 * base_err + 1e-6, f"bf16 {name}: error {err:.3g} > 2x plain bf16 {base_err:.3g}"
