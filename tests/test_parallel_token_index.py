"""Ring attention with an explicit token_index (balance mode: split documents in zigzag buffer order, positions
restarting per document) equals a dense single-device attention whose mask is built from (token_index,
segment_ids) on the gathered arrays: outputs and gradients. Other strategies refuse token_index by name."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.parallel import context_attention
from test_parallel_helpers import assert_close, context_mesh, packed_segments, qkv


def dense_reference(q, k, v, seg, tok):
    """Plain softmax attention, mask = same non-zero segment and key index <= query index (GQA by repeat)."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (tok[:, None, :] <= tok[:, :, None])
    s = jnp.where(mask[:, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * mask[:, None].any(-1, keepdims=True)  # rows with no key give 0
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def positions_of(seg):
    """Index of every token within its document (restarts at 0 per segment)."""
    seg = np.asarray(seg)
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    return pos


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_ring_with_token_index_matches_dense_reference(impl):
    P, B, N, D = 4, 2, 64, 8
    rng = np.random.default_rng(3)
    q, k, v, dout = qkv(rng, B, N, 4, 2, D)
    seg = np.asarray(packed_segments(rng, B, N))
    tok = positions_of(seg)
    # shuffle every row's tokens across the ranks (documents end up split, out of order, zigzag and worse):
    # causality can only come from token_index now
    perm = np.stack([rng.permutation(N) for _ in range(B)])
    take = lambda x: jnp.take_along_axis(x, jnp.asarray(perm).reshape(B, N, *([1] * (x.ndim - 2))), axis=1)
    q, k, v, dout = (take(x) for x in (q, k, v, dout))
    seg, tok = (jnp.asarray(np.take_along_axis(x, perm, axis=1)) for x in (seg, tok))

    out_ref, vjp_ref = jax.vjp(lambda q, k, v: dense_reference(q, k, v, seg, tok), q, k, v)
    g_ref = vjp_ref(dout)
    mesh = context_mesh(P)
    f = jax.jit(lambda q, k, v: context_attention(q, k, v, mesh=mesh, strategy="ring", layout="contiguous",
                                                  segment_ids=seg, token_index=tok, impl=impl))
    out, vjp = jax.vjp(f, q, k, v)
    g = vjp(dout)
    assert_close(out, out_ref, 1e-5, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref):
        assert_close(a, b, 1e-4, name)


def test_token_index_refused_by_other_strategies():
    rng = np.random.default_rng(0)
    q, k, v, _ = qkv(rng, 1, 16, 4, 4, 8)
    tok = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="ulysses"):
        context_attention(q, k, v, mesh=context_mesh(2), strategy="ulysses", layout="contiguous", token_index=tok)
