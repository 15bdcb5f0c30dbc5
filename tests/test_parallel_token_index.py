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


def _split_region_batch(rng, P, n, S, B=1):
    """Rank blocks as balance mode lays them out: the first S-2 slots of every rank hold two split documents'
    tokens scattered over all ranks (causality only from token_index); each rank's slots S-2.. hold its own whole
    documents, the first of which starts inside the region and ends after it; the last slot is padding (0)."""
    N = P * n
    seg = np.zeros((B, N), np.int32)
    tok = np.zeros((B, N), np.int32)
    for b in range(B):
        slots = np.concatenate([r * n + np.arange(S - 2) for r in range(P)])
        la = int(rng.integers(1, len(slots)))
        ids = np.where(np.arange(len(slots)) < la, 1, 2)
        pos = np.where(ids == 1, np.arange(len(slots)), np.arange(len(slots)) - la)
        perm = rng.permutation(len(slots))
        seg[b, slots[perm]], tok[b, slots[perm]] = ids, pos
        next_id = 3
        for r in range(P):
            start, end = r * n + S - 2, (r + 1) * n - 1  # [start, end): whole docs; end: padding
            cuts = np.sort(rng.choice(np.arange(start + 3, end), size=2, replace=False))  # first doc straddles S
            for a, z in zip((start, *cuts), (*cuts, end)):
                seg[b, a:z], tok[b, a:z] = next_id, np.arange(z - a)
                next_id += 1
    return jnp.asarray(seg), jnp.asarray(tok)


def test_ring_region_matches_dense_reference():
    """Only the first S tokens per rank ring; whole documents after them (one straddling S) attend locally."""
    P, n, S, D = 4, 16, 6, 8
    rng = np.random.default_rng(5)
    seg, tok = _split_region_batch(rng, P, n, S, B=2)
    q, k, v, dout = qkv(rng, 2, P * n, 4, 2, D)
    out_ref, vjp_ref = jax.vjp(lambda q, k, v: dense_reference(q, k, v, seg, tok), q, k, v)
    g_ref = vjp_ref(dout)
    f = jax.jit(lambda q, k, v: context_attention(q, k, v, mesh=context_mesh(P), strategy="ring",
                                                  layout="contiguous", segment_ids=seg, token_index=tok,
                                                  ring_region=S, impl="xla"))
    out, vjp = jax.vjp(f, q, k, v)
    assert_close(out, out_ref, 1e-5, "out")
    for name, a, b in zip(("dq", "dk", "dv"), vjp(dout), g_ref):
        assert_close(a, b, 1e-4, name)


def test_ring_region_sends_only_the_region():
    """Ring bytes (forward + backward) scale with the region S, not the block n: the whole documents after the
    region never travel."""
    from longtrain.parallel.hlo_comm import bytes_per_collective

    P, n, D = 4, 32, 8
    rng = np.random.default_rng(0)
    q, k, v, dout = qkv(rng, 1, P * n, 4, 2, D)
    seg = jnp.ones((1, P * n), jnp.int32)
    tok = jnp.asarray(np.arange(P * n, dtype=np.int32)[None])
    mesh = context_mesh(P)

    def ring_bytes(region):
        def loss(q, k, v):
            out = context_attention(q, k, v, mesh=mesh, strategy="ring", layout="contiguous", segment_ids=seg,
                                    token_index=tok, ring_region=region, impl="xla")
            return jnp.sum(out * dout)
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
        return bytes_per_collective(hlo, P).get("collective-permute", 0)

    full, region, none = ring_bytes(n), ring_bytes(n // 4), ring_bytes(0)
    assert full > 0 and none == 0
    assert region == pytest.approx(full / 4, rel=0.02), (region, full)


def test_ring_region_needs_token_index_and_fits_the_block():
    rng = np.random.default_rng(0)
    q, k, v, _ = qkv(rng, 1, 16, 4, 2, 8)
    tok = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="token_index"):
        context_attention(q, k, v, mesh=context_mesh(2), strategy="ring", layout="contiguous", ring_region=4)
    with pytest.raises(ValueError, match="ring_region=9"):
        context_attention(q, k, v, mesh=context_mesh(2), strategy="ring", layout="contiguous", token_index=tok,
                          ring_region=9)
