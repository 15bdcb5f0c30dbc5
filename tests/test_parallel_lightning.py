"""context_lightning_attention (all_gather and ring state passing) equals single-device lightning attention,
outputs and gradients incl. the initial state, with packed documents crossing rank boundaries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain import kernels
from longtrain.parallel import context_lightning_attention, from_layout, to_layout
from test_parallel_helpers import assert_close, context_mesh


def lightning_case(rng, B=2, N=32, H=2, D=4):
    q, k, v = (jnp.asarray(rng.normal(size=(B, N, H, D)) * 0.5, jnp.float32) for _ in range(3))
    slope = jnp.asarray(rng.uniform(0.05, 0.8, size=H), jnp.float32)
    init = jnp.asarray(rng.normal(size=(B, H, D, D)), jnp.float32)
    seg = np.ones((B, N), np.int32)  # row 0: documents crossing rank boundaries, a padding gap, tail padding
    seg[0, 5:13], seg[0, 13:15], seg[0, 15:29], seg[0, 29:] = 2, 0, 3, 0
    seg[1, 16:] = 2  # row 1: a boundary exactly on a rank edge (P=2, 4)
    dout = jnp.asarray(rng.normal(size=(B, N, H, D)), jnp.float32)
    return q, k, v, slope, init, jnp.asarray(seg), dout


@pytest.mark.parametrize("variant,layout,P,packed", [("all_gather", "zigzag", 4, True),
                                                      ("all_gather", "contiguous", 8, False),
                                                      ("ring", "contiguous", 4, True)])
def test_context_lightning_matches_single_device(variant, layout, P, packed):
    q, k, v, slope, init, seg, dout = lightning_case(np.random.default_rng(P))
    seg = seg if packed else None
    ref, vjp = jax.vjp(lambda q, k, v, s0: kernels.lightning_attention(
        q, k, v, slope, segment_ids=seg, initial_state=s0, impl="reference"), q, k, v, init)
    g_ref = vjp(dout)
    mesh = context_mesh(P)
    L = lambda x: to_layout(x, layout, P)

    def f(q, k, v, s0):
        out = context_lightning_attention(L(q), L(k), L(v), slope, mesh=mesh, layout=layout,
                                          segment_ids=None if seg is None else L(seg), initial_state=s0,
                                          variant=variant, impl="reference")
        return from_layout(out, layout, P)

    out, vjp2 = jax.vjp(jax.jit(f), q, k, v, init)
    assert_close(out, ref, 1e-5, "out")
    for name, a, b in zip(("dq", "dk", "dv", "d_initial_state"), vjp2(dout), g_ref):
        assert_close(a, b, 1e-4, name)


def test_lightning_layout_errors():
    q = jnp.ones((1, 16, 2, 4))
    mesh = context_mesh(4)
    with pytest.raises(ValueError, match="striped"):
        context_lightning_attention(q, q, q, jnp.ones(2), mesh=mesh, layout="striped")
    with pytest.raises(ValueError, match="variant 'ring'.*contiguous"):
        context_lightning_attention(q, q, q, jnp.ones(2), mesh=mesh, layout="zigzag", variant="ring")
