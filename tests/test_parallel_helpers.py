"""Shared random inputs and oracles for the parallel tests (helpers only; no tests here)."""
import jax
import jax.numpy as jnp
import numpy as np

from longtrain import kernels
from longtrain.parallel import from_layout, make_mesh, to_layout


def context_mesh(P):
    """A mesh with context=P on the first P devices (data=1)."""
    return make_mesh(data=1, context=P, devices=jax.devices()[:P])


def packed_segments(rng, B, N, *, pad_tail=3):
    """[B,N] int32: documents of random lengths (1..N/2, crossing rank boundaries), padding (0) at the end and
    one padding gap inside the first row."""
    seg = np.zeros((B, N), np.int32)
    for b in range(B):
        t, doc = 0, 1
        while t < N - pad_tail:
            length = min(int(rng.integers(1, N // 2 + 1)), N - pad_tail - t)
            seg[b, t:t + length] = doc
            t, doc = t + length, doc + 1
    seg[0, N // 3:N // 3 + 2] = 0
    return jnp.asarray(seg)


def qkv(rng, B, N, Hq, Hkv, D, dtype=jnp.float32):
    mk = lambda H: jnp.asarray(rng.normal(size=(B, N, H, D)), jnp.float32).astype(dtype)
    return mk(Hq), mk(Hkv), mk(Hkv), jnp.asarray(rng.normal(size=(B, N, Hq, D)), jnp.float32).astype(dtype)


def reference_vjp(q, k, v, dout, *, segment_ids, causal, sliding_window=None):
    out, vjp = jax.vjp(lambda q, k, v: kernels.attention(q, k, v, segment_ids=segment_ids, causal=causal,
                                                         sliding_window=sliding_window, impl="reference"), q, k, v)
    return out, vjp(dout)


def parallel_vjp(q, k, v, dout, *, mesh, strategy, layout, segment_ids, causal, sliding_window=None,
                 ulysses_degree=None, impl="reference"):
    """context_attention on to_layout'ed inputs, results mapped back with from_layout (global order)."""
    from longtrain.parallel import context_attention

    P = mesh.shape["context"]
    L = lambda x: to_layout(x, layout, P)
    seg = None if segment_ids is None else L(segment_ids)

    def f(q, k, v):
        out = context_attention(L(q), L(k), L(v), mesh=mesh, strategy=strategy, layout=layout, segment_ids=seg,
                                causal=causal, sliding_window=sliding_window, impl=impl,
                                ulysses_degree=ulysses_degree)
        return from_layout(out, layout, P)

    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    return out, vjp(dout)


def max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def assert_close(got, want, rel, what):
    scale = float(jnp.max(jnp.abs(jnp.asarray(want, jnp.float32)))) + 1e-12
    err = max_err(got, want)
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:g} * max|ref| {scale:.3e}"
