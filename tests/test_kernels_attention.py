"""Softmax attention, impl='xla' (blockwise flash, custom VJP) and the API around it, against the fp64 oracle.

Sampled matrix over T (incl. not a block multiple), head_dim {64, 96, 128}, (Hq, Hkv) {(4,4), (4,2), (4,1)},
causal on/off, segments (none, aligned, unaligned, 1-token document, padding), sliding window; the wider sweep
is marked slow. Outputs, lse and gradients (random cotangent through jax.vjp).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.kernels import attention, attention_block, attention_block_bwd, merge_partials
from longtrain.kernels.attention import api, masks
from test_kernels_attention_oracle import (lse_err, make_segments, np_mask, oracle, random_qkv, rel_err,
                                           run_with_grads, self_indices)

XLA_BLOCKS = dict(block_q=32, block_k=64)  # several blocks per sequence, q and k blocks of different sizes

# (T, D, Hq, Hkv, causal, segments, sliding_window): a sample covering every value of every axis
CASES = [
    (128, 64, 4, 4, True, "none", None),
    (200, 96, 4, 2, True, "unaligned", None),
    (200, 128, 4, 1, False, "padding", None),
    (160, 64, 4, 2, True, "aligned", None),
    (130, 64, 4, 1, True, "one_token", None),
    (200, 64, 4, 4, True, "none", 48),
    (200, 96, 4, 2, False, "unaligned", 40),
    (200, 64, 4, 2, True, "padding", 64),
    (65, 96, 4, 4, True, "one_token", 16),
]
SLOW_CASES = [c for c in itertools.product((100, 256), (64, 96, 128), ((4, 4), (4, 2), (4, 1)), (True, False),
                                           ("none", "aligned", "unaligned", "one_token", "padding"), (None, 33))]


def check_against_oracle(impl, T, D, Hq, Hkv, causal, seg_kind, window, seed=0, **kw):
    rng = np.random.default_rng(seed)
    B = 2
    q, k, v, do = random_qkv(rng, B, T, Hq, Hkv, D)
    seg = make_segments(seg_kind, B, T, rng)
    out, lse, dq, dk, dv = run_with_grads(impl, q, k, v, do, segment_ids=seg, causal=causal, window=window, **kw)
    qi, ki = self_indices(B, T)
    segs = jnp.ones((B, T), jnp.int32) if seg is None else seg
    want = oracle(q, k, v, do, q_index=qi, kv_index=ki, q_seg=segs, kv_seg=segs, causal=causal, window=window)
    assert rel_err(out, want[0]) < 1e-5
    assert lse_err(lse, want[1]) < 1e-5
    for name, g, w in (("dq", dq, want[2]), ("dk", dk, want[3]), ("dv", dv, want[4])):
        assert rel_err(g, w) < 1e-4, name
        assert g.shape == w.shape and g.dtype == q.dtype, name


@pytest.mark.parametrize("T,D,Hq,Hkv,causal,seg_kind,window", CASES)
def test_xla_matches_oracle(T, D, Hq, Hkv, causal, seg_kind, window):
    check_against_oracle("xla", T, D, Hq, Hkv, causal, seg_kind, window, **XLA_BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("T,D,heads,causal,seg_kind,window", SLOW_CASES)
def test_xla_matches_oracle_sweep(T, D, heads, causal, seg_kind, window):
    check_against_oracle("xla", T, D, *heads, causal, seg_kind, window, block_q=64, block_k=32)


def test_xla_default_blocks_and_queries_shorter_than_keys():
    """T != S (queries are the last T positions) with the default (single) block size."""
    rng = np.random.default_rng(3)
    B, T, S, Hq, Hkv, D = 1, 50, 130, 4, 2, 64
    q, k, v, do = random_qkv(rng, B, T, Hq, Hkv, D, S=S)
    out, lse, dq, dk, dv = run_with_grads("xla", q, k, v, do, segment_ids=None, causal=True, window=None)
    qi, ki = self_indices(B, T, S)
    want = oracle(q, k, v, do, q_index=qi, kv_index=ki, q_seg=np.ones((B, T)), kv_seg=np.ones((B, S)),
                  causal=True, window=None)
    for got, w in zip((out, dq, dk, dv), (want[0],) + want[2:]):
        assert rel_err(got, w) < 1e-4


@pytest.mark.parametrize("impl_kw", [{"impl": "xla", **XLA_BLOCKS}], ids=["xla"])
def test_bf16_error_within_2x_of_plain_bf16(impl_kw):
    """bf16 kernel error vs the fp64 oracle <= 2x the error of the plain reference run on the same bf16 inputs."""
    rng = np.random.default_rng(4)
    B, T, Hq, Hkv, D = 2, 200, 4, 2, 64
    q, k, v, do = random_qkv(rng, B, T, Hq, Hkv, D, jnp.bfloat16)
    seg = make_segments("unaligned", B, T, rng)
    qi, ki = self_indices(B, T)
    want = oracle(q, k, v, do, q_index=qi, kv_index=ki, q_seg=seg, kv_seg=seg, causal=True, window=None)
    kw = dict(impl_kw)
    got = run_with_grads(kw.pop("impl"), q, k, v, do, segment_ids=seg, causal=True, window=None, **kw)
    plain = run_with_grads("reference", q, k, v, do, segment_ids=seg, causal=True, window=None)
    for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
        assert got[i].dtype == jnp.bfloat16
        assert rel_err(got[i], want[i]) <= 2 * rel_err(plain[i], want[i]), name


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_fully_masked_rows_give_zero_not_nan(impl):
    """Padding queries (segment 0) and queries before every key (block API): out 0, lse -inf, finite grads."""
    rng = np.random.default_rng(5)
    B, T, Hq, Hkv, D = 1, 40, 2, 1, 16
    q, k, v, do = random_qkv(rng, B, T, Hq, Hkv, D)
    seg = jnp.asarray(np.r_[np.zeros(8), np.ones(24), np.zeros(8)][None].astype(np.int32))
    out, lse, dq, dk, dv = run_with_grads(impl, q, k, v, do, segment_ids=seg, causal=True, window=None,
                                          **({} if impl == "reference" else dict(block_q=16, block_k=16)))
    pad = np.asarray(seg[0]) == 0
    assert np.all(np.asarray(out)[0, pad] == 0) and np.all(np.isneginf(np.asarray(lse)[0][:, pad]))
    for g in (out, dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(g)))
    # block API: keys all in the future of the queries -> nothing visible
    idx = jnp.arange(T, dtype=jnp.int32)[None]

    @jax.jit
    def blocks(q, k, v, do):
        o_blk, lse_blk = attention_block(q, k, v, q_index=idx, kv_index=idx + T, impl=impl)
        return o_blk, lse_blk, attention_block_bwd(q, k, v, o_blk, lse_blk, do, q_index=idx, kv_index=idx + T,
                                                   impl=impl)

    o_blk, lse_blk, grads = blocks(q, k, v, do)
    assert np.all(np.asarray(o_blk) == 0) and np.all(np.isneginf(np.asarray(lse_blk)))
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_block_api_ring_steps_merge_to_full_attention():
    """Two key blocks at global (zigzag) offsets: merged (out, lse) and summed block gradients equal the full
    attention of those queries, as a ring strategy would compute them."""
    rng = np.random.default_rng(6)
    B, N, Hq, Hkv, D = 2, 192, 4, 2, 32
    q_all, k_all, v_all, do_all = random_qkv(rng, B, N, Hq, Hkv, D)
    seg_all = make_segments("unaligned", B, N, rng)
    q_rows = np.r_[32:64, 128:160]  # a zigzag shard of queries
    kv_blocks = [np.r_[0:48, 144:192], np.r_[48:144]]
    gidx = lambda rows: jnp.broadcast_to(jnp.asarray(rows, jnp.int32), (B, len(rows)))
    q, do = q_all[:, q_rows], do_all[:, q_rows]
    kw = dict(causal=True, sliding_window=100, impl="xla", block_q=16, block_k=32)

    @jax.jit
    def ring(q, do, k_all, v_all):
        parts = [attention_block(q, k_all[:, r], v_all[:, r], q_index=gidx(q_rows), kv_index=gidx(r),
                                 q_segment_ids=seg_all[:, q_rows], kv_segment_ids=seg_all[:, r], **kw)
                 for r in kv_blocks]
        out, lse = merge_partials(*parts[0], *parts[1])
        grads = [attention_block_bwd(q, k_all[:, r], v_all[:, r], out, lse, do, q_index=gidx(q_rows),
                                     kv_index=gidx(r), q_segment_ids=seg_all[:, q_rows],
                                     kv_segment_ids=seg_all[:, r], **kw)
                 for r in kv_blocks]
        return out, lse, grads

    out, lse, grads = ring(q, do, k_all, v_all)
    want = oracle(q, k_all, v_all, do, q_index=gidx(q_rows), kv_index=gidx(np.arange(N)), q_seg=seg_all[:, q_rows],
                  kv_seg=seg_all, causal=True, window=100)
    assert rel_err(out, want[0]) < 1e-5 and lse_err(lse, want[1]) < 1e-5
    assert rel_err(grads[0][0] + grads[1][0], want[2]) < 1e-4
    for (dq, dk, dv), r in zip(grads, kv_blocks):
        assert rel_err(dk, want[3][:, r]) < 1e-4 and rel_err(dv, want[4][:, r]) < 1e-4


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_block_forward_merges_into_a_partial(impl):
    """`merge_into`: a block's attention folded into the partial (out, lse) of other keys equals attention over
    both key sets. The first block is in the causal future of every query, so the partial starts with no keys
    seen (lse -inf) everywhere; 80 queries are not a multiple of the xla query block (padded rows)."""
    rng = np.random.default_rng(12)
    B, N, Hq, Hkv, D = 2, 160, 4, 2, 32
    q_all, k_all, v_all, _ = random_qkv(rng, B, N, Hq, Hkv, D)
    seg_all = make_segments("unaligned", B, N, rng)
    q_rows, kv_blocks = np.r_[40:120], [np.r_[120:160], np.r_[0:120]]
    gidx = lambda rows: jnp.broadcast_to(jnp.asarray(rows, jnp.int32), (B, len(rows)))
    kw = dict(causal=True, impl=impl, **({"block_q": 32, "block_k": 64} if impl == "xla" else {}))

    @jax.jit
    def run(q, k_all, v_all):
        part = None
        for r in kv_blocks:
            part = attention_block(q, k_all[:, r], v_all[:, r], q_index=gidx(q_rows), kv_index=gidx(r),
                                   q_segment_ids=seg_all[:, q_rows], kv_segment_ids=seg_all[:, r], merge_into=part,
                                   **kw)
        return part

    q = q_all[:, q_rows]
    out, lse = run(q, k_all, v_all)
    want = oracle(q, k_all, v_all, q, q_index=gidx(q_rows), kv_index=gidx(np.arange(N)), q_seg=seg_all[:, q_rows],
                  kv_seg=seg_all, causal=True, window=None)
    assert rel_err(out, want[0]) < 1e-5 and lse_err(lse, want[1]) < 1e-5
    with pytest.raises(ValueError, match="merge_into's lse"):
        attention_block(q, k_all, v_all, q_index=gidx(q_rows), kv_index=gidx(np.arange(N)),
                        merge_into=(out, lse[:, :, :5]), **kw)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_block_bwd_adds_into_running_sums(impl):
    """`grads_into`: two key blocks' gradients added into random running sums (dq across both blocks, dK/dV per
    block) equal the sums plus the oracle's gradients; the xla impl also runs its backward on blocks of other
    sizes than its forward (block_q_bwd / block_k_bwd)."""
    rng = np.random.default_rng(11)
    B, N, Hq, Hkv, D = 1, 160, 4, 2, 32
    q_all, k_all, v_all, do_all = random_qkv(rng, B, N, Hq, Hkv, D)
    q_rows, kv_blocks = np.r_[80:160], [np.r_[0:80], np.r_[80:160]]
    gidx = lambda rows: jnp.broadcast_to(jnp.asarray(rows, jnp.int32), (B, len(rows)))
    q, do = q_all[:, q_rows], do_all[:, q_rows]
    kw = dict(causal=True, impl=impl)
    if impl == "xla":
        kw.update(block_q=32, block_k=64, block_q_bwd=16, block_k_bwd=48)
    want = oracle(q, k_all, v_all, do, q_index=gidx(q_rows), kv_index=gidx(np.arange(N)), q_seg=np.ones((B, 80)),
                  kv_seg=np.ones((B, N)), causal=True, window=None)
    sums = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (q, k_all[:, :80], v_all[:, :80])]

    @jax.jit
    def run(q, do, k_all, v_all, dq0, dk0, dv0):
        (out_a, lse_a), (out_b, lse_b) = [attention_block(q, k_all[:, r], v_all[:, r], q_index=gidx(q_rows),
                                                          kv_index=gidx(r), **kw) for r in kv_blocks]
        out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
        dq, per_block = dq0, []
        for r in kv_blocks:
            dq, dk, dv = attention_block_bwd(q, k_all[:, r], v_all[:, r], out, lse, do, q_index=gidx(q_rows),
                                             kv_index=gidx(r), grads_into=(dq, dk0, dv0), **kw)
            per_block.append((dk, dv))
        return dq, per_block

    dq, per_block = run(q, do, k_all, v_all, *sums)
    assert rel_err(dq - sums[0], want[2]) < 1e-4
    for (dk, dv), r in zip(per_block, kv_blocks):
        assert rel_err(dk - sums[1], want[3][:, r]) < 1e-4 and rel_err(dv - sums[2], want[4][:, r]) < 1e-4
    with pytest.raises(ValueError, match="grads_into's dk"):
        attention_block_bwd(q, k_all, v_all, q, jnp.zeros((B, Hq, 80)), do, q_index=gidx(q_rows),
                            kv_index=gidx(np.arange(N)), grads_into=(sums[0], sums[1], sums[2]), **kw)


def test_block_api_differentiable_in_out_and_lse():
    """jax.grad through attention_block(impl='xla') with cotangents on both out and lse == reference autodiff."""
    rng = np.random.default_rng(7)
    B, T, S, Hq, Hkv, D = 1, 48, 80, 4, 1, 32
    q, k, v, _ = random_qkv(rng, B, T, Hq, Hkv, D, S=S)
    c_out = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
    c_lse = jnp.asarray(rng.standard_normal((B, Hq, T)), jnp.float32)
    q_index = jnp.arange(40, 40 + T, dtype=jnp.int32)[None]
    kv_index = jnp.arange(S, dtype=jnp.int32)[None]

    def loss(impl, q, k, v):
        out, lse = attention_block(q, k, v, q_index=q_index, kv_index=kv_index, impl=impl,
                                   **({"block_q": 16, "block_k": 32} if impl == "xla" else {}))
        return jnp.sum(out * c_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * c_lse)

    got = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-4


def test_dot_product_attention_agrees_with_reference():
    """jax.nn.dot_product_attention (xla; GQA, causal, a document mask) equals our reference."""
    rng = np.random.default_rng(8)
    B, T, Hq, Hkv, D = 2, 96, 4, 2, 64
    q, k, v, _ = random_qkv(rng, B, T, Hq, Hkv, D)
    seg = make_segments("unaligned", B, T, rng)
    qi, ki = self_indices(B, T)
    mask = jnp.asarray(np_mask(np.asarray(qi), np.asarray(ki), np.asarray(seg), np.asarray(seg), True, None))

    @jax.jit
    def both(q, k, v):
        ours = attention(q, k, v, segment_ids=seg, causal=True, impl="reference")
        theirs = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
        ours_w = attention(q, k, v, causal=True, sliding_window=20, impl="reference")
        theirs_w = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(19, 0),
                                                implementation="xla")
        return ours, theirs, ours_w, theirs_w

    ours, theirs, ours_w, theirs_w = both(q, k, v)
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours_w, theirs_w) < 1e-5


def test_block_skipping_structure():
    """Per-block visibility: causal keeps the lower triangle, documents keep only overlapping block pairs, a
    sliding window keeps a band; spans cover exactly the needed key blocks."""
    B, T, blk = 1, 256, 32
    idx = jnp.arange(T, dtype=jnp.int32)[None]
    ones = jnp.ones((B, T), jnp.int32)
    r = masks.block_ranges(idx, ones, blk)
    causal = np.asarray(masks.block_pairs_needed(r, r, True, None))
    assert np.array_equal(causal, np.tril(np.ones((8, 8), bool)))
    seg = jnp.asarray(np.repeat(np.arange(1, 5), 64)[None].astype(np.int32))  # 4 documents of 2 blocks each
    rs = masks.block_ranges(idx, seg, blk)
    docs = np.asarray(masks.block_pairs_needed(rs, rs, True, None))
    assert docs.sum() == 4 * 3  # 3 lower-triangle block pairs per document, none across documents
    band = np.asarray(masks.block_pairs_needed(r, r, True, 40))
    assert band.sum() == 8 + 7 + 6  # diagonal + two sub-diagonals: 40 keys span at most 3 blocks
    lo, hi = masks.needed_span(jnp.asarray(docs))
    assert np.array_equal(np.asarray(lo), [0, 0, 2, 2, 4, 4, 6, 6]) and np.array_equal(np.asarray(hi),
                                                                                       [1, 2, 3, 4, 5, 6, 7, 8])
    # padding-only blocks are never needed
    pad = jnp.asarray(np.r_[np.ones(64), np.zeros(192)][None].astype(np.int32))
    rp = masks.block_ranges(idx, pad, blk)
    assert not np.asarray(masks.block_pairs_needed(rp, rp, False, None))[2:].any()


def test_auto_resolves_per_platform(monkeypatch):
    """auto: xla on CPU; pallas on GPU; on TPU pallas (splash) only where splash can serve the call."""
    assert api.resolve_impl("auto") == "xla"
    assert api.resolve_impl("reference") == "reference"
    monkeypatch.setattr(api, "platform", lambda: "gpu")
    assert api.resolve_impl("auto") == api.resolve_impl("auto", splash_can_serve=False) == "pallas"
    monkeypatch.setattr(api, "platform", lambda: "tpu")
    assert api.resolve_impl("auto") == "pallas"
    assert api.resolve_impl("auto", splash_can_serve=False) == "xla"


BAD_INPUTS = [
    (dict(q=(2, 8, 4, 16), k=(2, 8, 3, 16), v=(2, 8, 3, 16)), {}, "multiple of k/v heads"),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 9, 2, 16)), {}, "k and v must have the same shape"),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 8), v=(2, 8, 2, 8)), {}, "same head_dim"),
    (dict(q=(2, 8, 4, 16), k=(1, 8, 2, 16), v=(1, 8, 2, 16)), {}, "same batch size"),
    (dict(q=(8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16)), {}, "q must be a 4-d array"),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16)), {"segment_ids": np.ones((2, 7), np.int32)},
     "segment_ids must have shape"),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16)), {"segment_ids": np.ones((2, 8), np.float32)},
     "segment_ids must have an integer dtype"),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16)), {"impl": "flash"}, "impl='flash' is not"),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16)), {"sliding_window": 0}, "sliding_window"),
    (dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16)), {"impl": "xla", "block_z": 3}, "block_z"),
]


@pytest.mark.parametrize("shapes,kwargs,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_it(shapes, kwargs, message):
    arrays = {n: jnp.ones(s, jnp.float32) for n, s in shapes.items()}
    kwargs = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        attention(arrays["q"], arrays["k"], arrays["v"], **kwargs)


def test_block_api_bad_indices_raise():
    q = jnp.ones((1, 8, 2, 16))
    k = jnp.ones((1, 6, 2, 16))
    idx = jnp.arange(8, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match="kv_index must have shape"):
        attention_block(q, k, k, q_index=idx, kv_index=idx)
    with pytest.raises(ValueError, match="q_segment_ids and kv_segment_ids must be given together"):
        attention_block(q, k, k, q_index=idx, kv_index=idx[:, :6], q_segment_ids=idx)
    with pytest.raises(ValueError, match="lse must have shape"):
        attention_block_bwd(q, k, k, q, jnp.zeros((1, 8, 2)), q, q_index=idx, kv_index=idx[:, :6])


def test_cudnn_raises_naming_the_case():
    q = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(NotImplementedError, match="segment_ids"):
        attention(q, q, q, segment_ids=seg, impl="cudnn")
    with pytest.raises(NotImplementedError, match="dtype float32"):
        attention(q.astype(jnp.float32), q, q, impl="cudnn")
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
        attention(q, q, q, impl="cudnn")
    with pytest.raises(NotImplementedError, match="global token indices"):
        attention_block(q, q, q, q_index=seg, kv_index=seg, impl="cudnn")


def test_pallas_without_accelerator_or_interpret_raises():
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(NotImplementedError, match="needs a GPU or TPU"):
        attention(q, q, q, impl="pallas")
