"""fp64 NumPy oracle for softmax attention (forward and closed-form gradients) and the shared case builders.

The oracle needs no compilation, so the kernel tests spend their time on the kernels. Its own test checks it
against `jax.vjp` of the `reference` impl, so the oracle and the reference vouch for each other.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.kernels import attention
from longtrain.kernels.attention import masks


def np_mask(q_index, kv_index, q_seg, kv_seg, causal, window):
    """[B, T, S] visibility, written independently of the kernels' mask code."""
    qi, ki = q_index[:, :, None], kv_index[:, None, :]
    m = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    if causal:
        m &= ki <= qi
    if window is not None:
        m &= (qi - ki) < window
        if not causal:
            m &= (ki - qi) < window
    return m


def oracle(q, k, v, do, *, q_index, kv_index, q_seg, kv_seg, causal, window, scale=None):
    """(out, lse [B,H,T], dq, dk, dv) in float64; rows without keys: out 0, lse -inf, zero gradients."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    B, T, Hq, D = q.shape
    G = k.shape[2]
    R = Hq // G
    scale = D ** -0.5 if scale is None else scale
    q5, do5 = q.reshape(B, T, G, R, D), do.reshape(B, T, G, R, D)
    s = np.einsum("btgrd,bsgd->bgrts", q5, k) * scale
    mask = np_mask(np.asarray(q_index), np.asarray(kv_index), np.asarray(q_seg), np.asarray(kv_seg), causal,
                   window)[:, None, None]
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(s - m), 0.0)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)
    lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m[..., 0], -np.inf)
    out5 = np.einsum("bgrts,bsgd->btgrd", p, v)
    dv = np.einsum("bgrts,btgrd->bsgd", p, do5)
    dp = np.einsum("btgrd,bsgd->bgrts", do5, v)
    delta = np.einsum("btgrd,btgrd->bgrt", out5, do5)[..., None]
    ds = p * (dp - delta) * scale
    dq = np.einsum("bgrts,bsgd->btgrd", ds, k).reshape(B, T, Hq, D)
    dk = np.einsum("bgrts,btgrd->bsgd", ds, q5)
    return out5.reshape(B, T, Hq, D), lse.reshape(B, Hq, T), dq, dk, dv


def make_segments(kind, B, T, rng, block=32):
    """int32 [B, T] segment ids: none / aligned / unaligned / one_token / padding (see the test matrix)."""
    if kind == "none":
        return None
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        if kind == "aligned":  # documents end on block boundaries
            bounds = list(range(0, T, 2 * block)) + [T]
        elif kind == "unaligned":
            bounds = [0] + sorted(rng.choice(np.arange(1, T), size=3, replace=False).tolist()) + [T]
        elif kind == "one_token":  # a document of a single token in the middle
            mid = T // 2 + b
            bounds = [0, mid, mid + 1, T]
        elif kind == "padding":  # two documents then trailing padding (segment 0)
            cut = sorted(rng.choice(np.arange(1, T - 10), size=2, replace=False).tolist())
            bounds = [0] + cut + [T]
        else:
            raise ValueError(f"unknown segment kind {kind!r}")
        for i, (a, c) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[b, a:c] = i + 1 + 10 * b
        if kind == "padding":
            seg[b, bounds[-2]:] = 0
    return jnp.asarray(seg)


def random_qkv(rng, B, T, Hq, Hkv, D, dtype=jnp.float32, S=None):
    S = T if S is None else S
    shapes = [(B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, T, Hq, D)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def self_indices(B, T, S=None):
    return masks.self_attention_indices(B, T, T if S is None else S)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def lse_err(lse, ref):
    """Max abs error over rows with keys; also checks that exactly the key-less rows are -inf."""
    lse, ref = np.asarray(lse, np.float64), np.asarray(ref, np.float64)
    assert np.array_equal(np.isfinite(lse), np.isfinite(ref)), "-inf rows of lse differ from the oracle"
    fin = np.isfinite(ref)
    return float(np.max(np.abs(lse[fin] - ref[fin]), initial=0.0))


def run_with_grads(impl, q, k, v, do, *, segment_ids, causal, window, **kw):
    """jit of (out, lse, dq, dk, dv) through jax.vjp with the random cotangent `do` (lse cotangent 0)."""

    def f(q, k, v, do):
        (out, lse), vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids=segment_ids, causal=causal,
                                                            sliding_window=window, impl=impl, return_lse=True,
                                                            **kw), q, k, v)
        return (out, lse) + vjp((do, jnp.zeros_like(lse)))

    return jax.jit(f)(q, k, v, do)


@pytest.mark.parametrize("seg_kind,causal,window,hkv", [("unaligned", True, None, 2), ("padding", False, 24, 1)])
def test_reference_autodiff_matches_fp64_oracle(seg_kind, causal, window, hkv):
    """The jax reference (autodiff) and the NumPy closed-form oracle agree, so either can judge a kernel."""
    rng = np.random.default_rng(1)
    B, T, Hq, D = 2, 70, 4, 32
    q, k, v, do = random_qkv(rng, B, T, Hq, hkv, D)
    seg = make_segments(seg_kind, B, T, rng)
    got = run_with_grads("reference", q, k, v, do, segment_ids=seg, causal=causal, window=window)
    qi, ki = self_indices(B, T)
    segs = np.ones((B, T), np.int32) if seg is None else seg
    want = oracle(q, k, v, do, q_index=qi, kv_index=ki, q_seg=segs, kv_seg=segs, causal=causal, window=window)
    assert lse_err(got[1], want[1]) < 1e-5
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if name != "lse":
            assert rel_err(g, w) < 1e-5, name
