"""context_attention (every strategy x layout x mask) equals single-device attention on the gathered arrays,
outputs and gradients (random cotangent), fp32 and bf16; errors for cases a strategy cannot serve."""
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.parallel import context_attention, pick_strategy
from test_parallel_helpers import (assert_close, context_mesh, max_err, packed_segments, parallel_vjp, qkv,
                            reference_vjp)

STRATEGIES = ("ring", "token_ring", "all_gather", "ulysses", "ulysses_ring")
LAYOUTS = ("contiguous", "zigzag", "striped")
MASKS = ("causal", "packed", "noncausal")
HEADS = {"mha": (4, 4), "gqa": (4, 2)}


def check_case(strategy, P, layout, mask, heads, *, seed=0, N=32, impl="reference"):
    Hq, Hkv = HEADS[heads]
    if strategy == "ulysses":  # ulysses needs heads divisible by P: scale the head counts with P
        Hq, Hkv = Hq * P // 2, Hkv * P // 2
    rng = np.random.default_rng(seed)
    B, D = 2, 8
    q, k, v, dout = qkv(rng, B, N, Hq, Hkv, D)
    seg = packed_segments(rng, B, N) if mask == "packed" else None
    causal = mask != "noncausal"
    out_ref, g_ref = reference_vjp(q, k, v, dout, segment_ids=seg, causal=causal)
    out, g = parallel_vjp(q, k, v, dout, mesh=context_mesh(P), strategy=strategy, layout=layout, segment_ids=seg,
                          causal=causal, ulysses_degree=2 if strategy == "ulysses_ring" else None, impl=impl)
    assert not any(bool(jnp.isnan(x).any()) for x in (out, *g)), "NaN in outputs or gradients"
    assert_close(out, out_ref, 1e-5, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref):
        assert_close(a, b, 1e-4, name)
    if seg is not None:  # padding rows see no key: exactly 0
        assert float(jnp.abs(jnp.where((seg == 0)[..., None, None], out, 0.0)).max()) == 0.0


# default run: a sample in which every strategy, layout, mask, P and head layout appears at least once
DEFAULT_CASES = [
    ("ring", 4, "zigzag", "packed", "gqa"),
    ("ring", 8, "contiguous", "causal", "mha"),
    ("token_ring", 4, "striped", "packed", "gqa"),
    ("token_ring", 2, "zigzag", "noncausal", "mha"),
    ("all_gather", 8, "zigzag", "packed", "gqa"),
    ("ulysses", 2, "contiguous", "packed", "gqa"),
    ("ulysses_ring", 8, "striped", "causal", "gqa"),
]


@pytest.mark.parametrize("strategy,P,layout,mask,heads", DEFAULT_CASES)
def test_context_attention_matches_single_device(strategy, P, layout, mask, heads):
    # the first case runs the blockwise XLA flash kernel (what impl="auto" runs on CPU), the rest the reference
    impl = "xla" if (strategy, P, layout) == ("ring", 4, "zigzag") else "reference"
    check_case(strategy, P, layout, mask, heads, impl=impl)


FULL = [c for c in itertools.product(STRATEGIES, (2, 4, 8), LAYOUTS, MASKS, HEADS)
        if c not in DEFAULT_CASES and not (c[0] == "ulysses_ring" and c[1] == 2)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,P,layout,mask,heads", FULL)
def test_context_attention_full_product(strategy, P, layout, mask, heads):
    check_case(strategy, P, layout, mask, heads, seed=1)


def test_sliding_window_ring_zigzag():
    rng = np.random.default_rng(3)
    q, k, v, dout = qkv(rng, 2, 32, 4, 2, 8)
    seg = packed_segments(rng, 2, 32)
    out_ref, g_ref = reference_vjp(q, k, v, dout, segment_ids=seg, causal=True, sliding_window=5)
    out, g = parallel_vjp(q, k, v, dout, mesh=context_mesh(4), strategy="ring", layout="zigzag", segment_ids=seg,
                          causal=True, sliding_window=5)
    assert_close(out, out_ref, 1e-5, "out")
    for a, b in zip(g, g_ref):
        assert_close(a, b, 1e-4, "grad")


def test_bf16_error_no_worse_than_single_device():
    """bf16 inputs: error vs an fp32 oracle on the same (bf16-rounded) inputs is at most 2x the plain
    single-device bf16 error (fp32 merges are what make this pass)."""
    rng = np.random.default_rng(4)
    q, k, v, dout = qkv(rng, 2, 32, 4, 2, 16, dtype=jnp.bfloat16)
    seg = packed_segments(rng, 2, 32)
    up = lambda x: x.astype(jnp.float32)
    out_hi, g_hi = reference_vjp(up(q), up(k), up(v), up(dout), segment_ids=seg, causal=True)
    out_lo, g_lo = reference_vjp(q, k, v, dout, segment_ids=seg, causal=True)
    for strategy, layout in (("ring", "zigzag"),):
        out, g = parallel_vjp(q, k, v, dout, mesh=context_mesh(4), strategy=strategy, layout=layout,
                              segment_ids=seg, causal=True)
        assert out.dtype == jnp.bfloat16
        for name, got, single, hi in zip(("out", "dq", "dk", "dv"), (out, *g), (out_lo, *g_lo), (out_hi, *g_hi)):
            assert max_err(got, hi) <= 2 * max_err(single, hi) + 1e-6, (strategy, name)


def test_ulysses_rejects_indivisible_heads():
    rng = np.random.default_rng(0)
    q, k, v, _ = qkv(rng, 1, 16, 6, 6, 8)
    with pytest.raises(ValueError, match="ulysses.*num_heads=6"):
        context_attention(q, k, v, mesh=context_mesh(4), strategy="ulysses", layout="zigzag")


def test_bad_arguments_name_the_problem():
    rng = np.random.default_rng(0)
    q, k, v, _ = qkv(rng, 1, 12, 4, 2, 8)
    mesh = context_mesh(4)
    with pytest.raises(ValueError, match="zigzag.*multiple of 8"):
        context_attention(q, k, v, mesh=mesh, strategy="ring", layout="zigzag")
    with pytest.raises(ValueError, match="strategy='spiral'"):
        context_attention(q, k, v, mesh=mesh, strategy="spiral", layout="contiguous")
    with pytest.raises(ValueError, match="layout='diagonal'"):
        context_attention(q, k, v, mesh=mesh, strategy="ring", layout="diagonal")
    with pytest.raises(ValueError, match="ulysses_degree"):
        context_attention(q, k, v, mesh=mesh, strategy="ulysses_ring", layout="contiguous", ulysses_degree=3)


def test_auto_picks_by_rule_and_logs_once(caplog):
    with caplog.at_level(logging.WARNING):
        assert pick_strategy(context_size=4, num_heads=8, num_kv_heads=4) == "ulysses"
        assert pick_strategy(context_size=4, num_heads=8, num_kv_heads=4) == "ulysses"
        assert pick_strategy(context_size=8, num_heads=8, num_kv_heads=2) == "ring"
    picks = [r.getMessage() for r in caplog.records if "context_strategy=auto" in r.getMessage()]
    assert len([p for p in picks if "'ulysses'" in p and "context=4" in p]) <= 1


def test_fully_masked_rank_gives_zero_not_nan():
    """A rank holding only padding, and queries whose document has no key on the first ring steps."""
    rng = np.random.default_rng(5)
    q, k, v, dout = qkv(rng, 1, 32, 4, 2, 8)
    seg = np.ones((1, 32), np.int32)
    seg[0, 8:16] = 0  # contiguous P=4: rank 1 holds only padding
    seg[0, 16:] = 2
    seg = jnp.asarray(seg)
    out_ref, g_ref = reference_vjp(q, k, v, dout, segment_ids=seg, causal=True)
    for strategy in ("ring",):
        out, g = parallel_vjp(q, k, v, dout, mesh=context_mesh(4), strategy=strategy, layout="contiguous",
                              segment_ids=seg, causal=True)
        assert not any(bool(jnp.isnan(x).any()) for x in (out, *g))
        assert float(jnp.abs(out[:, 8:16]).max()) == 0.0
        assert_close(out, out_ref, 1e-5, "out")
        for a, b in zip(g, g_ref):
            assert_close(a, b, 1e-4, "grad")


def test_ulysses_replicates_kv_heads_when_fewer_than_ranks():
    """GQA with Hkv=2 < P=4: each kv head is replicated so every rank owns Hq/P query heads and their kv head."""
    rng = np.random.default_rng(6)
    q, k, v, dout = qkv(rng, 1, 16, 8, 2, 8)
    seg = packed_segments(rng, 1, 16, pad_tail=2)
    out_ref, g_ref = reference_vjp(q, k, v, dout, segment_ids=seg, causal=True)
    out, g = parallel_vjp(q, k, v, dout, mesh=context_mesh(4), strategy="ulysses", layout="zigzag",
                          segment_ids=seg, causal=True)
    assert_close(out, out_ref, 1e-5, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref):
        assert_close(a, b, 1e-4, name)
