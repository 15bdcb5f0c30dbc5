"""SeCO / SpaCO against exact oracles in fp64 (DESIGN.md §4): SeCO equals jax.grad of the full-sequence loss to
1e-10; SpaCO's expectation over all 2^k Bernoulli selections equals it too; the paper's fixed-count estimator is
biased. fp64 is scoped with `jax.enable_x64(True)` so other tests in the process stay fp32."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain import models
from longtrain.chunkwise import chunk_weighted_grad, num_chunks, seco_grad, sequence_loss
from longtrain.chunkwise.selection import bernoulli_weights, fixed_count_weights
from longtrain.config import ModelConfig

pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture
def x64():
    """fp64 for the duration of one test only (jax_enable_x64 is process-global otherwise)."""
    with jax.enable_x64(True):
        yield


def _llama64(**kw):
    return ModelConfig(architecture="llama", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=4, num_kv_heads=2, dtype="float64", param_dtype="float64",
                       attention_impl="reference", **kw)


def _hybrid64(layer_types=("linear_attention", "full_attention"), **kw):
    kw = {"num_experts": 2, "experts_per_token": 2, **kw}
    return ModelConfig(architecture="minimax", vocab_size=48, hidden_size=16, intermediate_size=16,
                       num_layers=len(layer_types), num_heads=2, num_kv_heads=1, layer_types=list(layer_types),
                       moe_impl="dense", dtype="float64", param_dtype="float64", attention_impl="reference",
                       lightning_impl="reference", **kw)


def _packed_batch(B, T, vocab, seed=1):
    """Row 0: three documents then padding; row 1: one document. Random loss mask inside documents."""
    rng = np.random.default_rng(seed)
    cuts = [5, 12, T - 3]  # documents [0,5) [5,12) [12,T-3), then padding
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for d, (a, b) in enumerate(zip([0] + cuts[:-1], cuts)):
        seg[0, a:b], pos[0, a:b] = d + 1, np.arange(b - a)
    seg[1:], pos[1:] = 1, np.arange(T)
    mask = (seg != 0) & (rng.random((B, T)) < 0.8)
    return {"tokens": jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
            "loss_mask": jnp.asarray(mask), "positions": jnp.asarray(pos), "segment_ids": jnp.asarray(seg)}


def _rel_err(tree, ref):
    num = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)))
    den = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref))
    return num / den


def _exact(config, params, batch, z_loss=0.0):
    return jax.jit(jax.value_and_grad(lambda p: sequence_loss(config, p, batch, z_loss=z_loss)))(params)


def test_seco_equals_full_gradient_llama_packed():
    """Packed documents + padding, z-loss, a chunk size that does not divide T=20 (7: last chunk padded; the
    sliding-window test below uses one that divides)."""
    config = _llama64()
    params = models.init(config, jax.random.PRNGKey(0))
    batch = _packed_batch(2, 20, config.vocab_size)
    loss, grads = _exact(config, params, batch, z_loss=1e-3)
    s_loss, s_grads = jax.jit(lambda p, b: seco_grad(config, p, b, 7, z_loss=1e-3))(params, batch)
    assert abs(float(s_loss) - float(loss)) <= 1e-10 * abs(float(loss))
    assert _rel_err(s_grads, grads) <= 1e-10


def test_seco_sliding_window_across_chunks():
    """Also the benchmarked layout: scanned layers with remat=full (stacked caches, cotangent sink in the scan)."""
    config = _llama64(sliding_window=6, scan_layers=True, remat="full")
    params = models.init(config, jax.random.PRNGKey(3))
    batch = _packed_batch(2, 16, config.vocab_size, seed=4)
    loss, grads = _exact(config, params, batch)
    s_loss, s_grads = jax.jit(lambda p, b: seco_grad(config, p, b, 4))(params, batch)  # 4 divides T=16
    assert abs(float(s_loss) - float(loss)) <= 1e-10 * abs(float(loss))
    assert _rel_err(s_grads, grads) <= 1e-10


@pytest.mark.slow  # ~12 s; the default run keeps the scanned hybrid below (same caches, the benchmarked layout)
def test_seco_equals_full_gradient_hybrid_lightning_fp64():
    """MiniMax hybrid (lightning + softmax layers, MoE), unscanned layers: lightning states and their cotangents
    cross chunks; packed documents reset the carried state; T=20 in chunks of 7."""
    config = _hybrid64()
    params = models.init(config, jax.random.PRNGKey(0))
    batch = _packed_batch(2, 20, config.vocab_size)
    loss, grads = _exact(config, params, batch)
    s_loss, s_grads = jax.jit(lambda p, b: seco_grad(config, p, b, 7))(params, batch)
    assert abs(float(s_loss) - float(loss)) <= 1e-10 * abs(float(loss))
    assert _rel_err(s_grads, grads) <= 1e-10


def test_seco_equals_full_gradient_hybrid_scanned_periods_fp64():
    """The benchmarked hybrid layout: scanned periods with remat=full, the softmax K/V stack viewed as [R=2 periods,
    2 softmax layers per period, ...] inside the scan, each layer's cotangent added into the in-place sink at stack
    index r*2+j (a wrong index or a dropped cotangent breaks 1e-10), lightning states beside the stack; packed
    documents reset the carried state; T=18 in chunks of 6."""
    config = _hybrid64(["linear_attention", "full_attention", "full_attention"] * 2, scan_layers=True, remat="full",
                       num_experts=1, experts_per_token=1)
    params = models.init(config, jax.random.PRNGKey(5))
    batch = _packed_batch(2, 18, config.vocab_size, seed=6)
    loss, grads = _exact(config, params, batch)
    s_loss, s_grads = jax.jit(lambda p, b: seco_grad(config, p, b, 6))(params, batch)
    assert abs(float(s_loss) - float(loss)) <= 1e-10 * abs(float(loss))
    assert _rel_err(s_grads, grads) <= 1e-10


def _enumerate_expectation(config, params, batch, chunk_size, selections):
    """sum_z prob(z) * grads(weights(z)) over (prob, weights) pairs, with one compiled program."""
    run = jax.jit(lambda p, b, w: chunk_weighted_grad(config, p, b, chunk_size, w, loss_from_forward=True))
    expected = None
    for prob, weights in selections:
        _, g = run(params, batch, jnp.asarray(weights, jnp.float64))
        expected = jax.tree.map(lambda g_: prob * g_, g) if expected is None else \
            jax.tree.map(lambda e, g_: e + prob * g_, expected, g)
    return expected


def test_spaco_bernoulli_expectation_is_exact_and_fixed_count_is_biased():
    config = _llama64(scan_layers=True)  # skipped chunks (lax.cond) with the in-place K/V cotangent sink
    params = models.init(config, jax.random.PRNGKey(1))
    batch = _packed_batch(2, 15, config.vocab_size, seed=2)
    chunk_size, p = 4, 0.4
    k = num_chunks(15, chunk_size)
    assert k == 4  # last chunk padded
    _, exact = _exact(config, params, batch)
    bernoulli = [(p ** sum(z) * (1 - p) ** (k - sum(z)), [zi / p for zi in z])
                 for z in itertools.product((0, 1), repeat=k)]
    mean_bernoulli = _enumerate_expectation(config, params, batch, chunk_size, bernoulli)
    assert _rel_err(mean_bernoulli, exact) <= 1e-10
    # the published estimator: exactly t of k chunks, k/t per hop -> biased
    t = 2
    subsets = list(itertools.combinations(range(k), t))
    fixed = [(1.0 / len(subsets), [k / t if i in s else 0.0 for i in range(k)]) for s in subsets]
    mean_fixed = _enumerate_expectation(config, params, batch, chunk_size, fixed)
    assert _rel_err(mean_fixed, exact) > 1e-2


def test_selection_weights():
    w = bernoulli_weights(jax.random.PRNGKey(0), 4000, 0.25)
    assert set(np.unique(np.asarray(w)).tolist()) <= {0.0, 4.0}
    assert abs(float(jnp.mean(w)) - 1.0) < 0.1  # E[w] = 1 (3 sigma ~ 0.08)
    f = fixed_count_weights(jax.random.PRNGKey(1), 6, 2)
    assert int(jnp.sum(f > 0)) == 2 and float(jnp.max(f)) == 3.0
    with pytest.raises(ValueError, match="keep_prob"):
        bernoulli_weights(jax.random.PRNGKey(0), 4, 0.0)
    with pytest.raises(ValueError, match="num_selected"):
        fixed_count_weights(jax.random.PRNGKey(0), 4, 5)
