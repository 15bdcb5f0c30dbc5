"""Model-level properties of the Llama-family decoder, with the model itself as the oracle in a simpler setting:
packed documents == each document alone; two chunks with a kv prefix == one pass; scan/remat == unrolled (values
and gradients); every attention goes through the runtime call site; logical axes cover every parameter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain import models
from longtrain.config import ModelConfig, RopeScalingConfig
from longtrain.models.attention_site import LocalRuntime

BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
            init_std=0.1)
CONFIGS = {
    "llama3_bias": ModelConfig(architecture="llama", attention_bias=True, attention_out_bias=True, mlp_bias=True,
                               rope_scaling=RopeScalingConfig(type="llama3", factor=4.0,
                                                              original_max_position_embeddings=8), **BASE),
    "mistral_window": ModelConfig(architecture="mistral", sliding_window=5, **BASE),
    "qwen3_yarn": ModelConfig(architecture="qwen3", qk_norm=True, head_dim=16, tie_embeddings=True,
                              rope_scaling=RopeScalingConfig(type="yarn", factor=4.0,
                                                             original_max_position_embeddings=8), **BASE),
}


def random_params(config, seed=0):
    """Random normal values in every leaf of the `models.init` layout (so zero biases and unit norm scales are not
    special). Drawn with numpy from the abstract shapes: compiling the threefry init would dominate test time."""
    shapes = jax.eval_shape(lambda: models.init(config, jax.random.key(0)))
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def tokens_of(shape, seed=0, vocab=61):
    return jnp.asarray(np.random.RandomState(seed).randint(1, vocab, shape), jnp.int32)


def forward_fn(config, **kw):
    """models.forward jitted for one config (configs are not hashable, so close over it)."""
    return jax.jit(lambda params, tokens, **a: models.forward(config, params, tokens, **a, **kw))


def hidden_fn(config, **kw):
    return jax.jit(lambda params, tokens, **a: models.forward_hidden(config, params, tokens, **a, **kw))


def assert_close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    err = np.abs(a - b).max()
    assert err <= tol * max(1.0, np.abs(b).max()), f"max abs diff {err}"


@pytest.mark.parametrize("name", ["mistral_window", "qwen3_yarn"])
def test_packed_documents_equal_each_document_alone(name):
    config = CONFIGS[name]
    params = random_params(config)
    doc_a, doc_b = tokens_of((1, 9), 1), tokens_of((1, 11), 2)
    pad = 3
    tokens = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, pad), jnp.int32)], axis=1)
    segment_ids = jnp.asarray([[1] * 9 + [2] * 11 + [0] * pad], jnp.int32)
    positions = jnp.asarray([list(range(9)) + list(range(11)) + [0] * pad], jnp.int32)
    forward = forward_fn(config)
    packed = forward(params, tokens, positions=positions, segment_ids=segment_ids)
    assert_close(packed[:, :9], forward(params, doc_a))
    assert_close(packed[:, 9:20], forward(params, doc_b))


@pytest.mark.parametrize("name,scan", [("mistral_window", False), ("qwen3_yarn", True)])
def test_two_chunks_with_kv_prefix_equal_one_pass(name, scan):
    config = ModelConfig(**{**CONFIGS[name].__dict__, "scan_layers": scan})
    params = random_params(config)
    B, C = 2, 8
    tokens = tokens_of((B, 2 * C), 3)
    # row 0: one document across both chunks; row 1: a document that ends in chunk 1, one that spans the boundary
    segment_ids = jnp.asarray([[1] * 16, [1] * 5 + [2] * 11], jnp.int32)
    positions = jnp.asarray([list(range(16)), list(range(5)) + list(range(11))], jnp.int32)
    full = hidden_fn(config)(params, tokens, positions=positions, segment_ids=segment_ids)

    index = jnp.broadcast_to(jnp.arange(2 * C, dtype=jnp.int32), (B, 2 * C))
    chunk = hidden_fn(config, return_kv=True)
    h1, kv1 = chunk(params, tokens[:, :C], positions=positions[:, :C], segment_ids=segment_ids[:, :C],
                    token_index=index[:, :C])
    assert len(kv1) == config.num_layers and kv1[0]["k"].shape == (B, C, config.num_kv_heads, config.resolved_head_dim)
    h2, kv2 = chunk(params, tokens[:, C:], positions=positions[:, C:], segment_ids=segment_ids[:, C:],
                    token_index=index[:, C:], kv_prefix=kv1)
    assert_close(h1, full[:, :C])
    assert_close(h2, full[:, C:])
    np.testing.assert_array_equal(kv2[1]["token_index"], index[:, C:])


@pytest.mark.parametrize("variants", [
    [(True, "save_attention_output")],
    pytest.param([(True, "none"), (True, "full"), (False, "save_dots"), (False, "save_attention_output")],
                 marks=pytest.mark.slow),
])
def test_scan_and_remat_equal_unrolled_in_value_and_gradient(variants):
    base = CONFIGS["qwen3_yarn"]
    params = random_params(base)
    tokens = tokens_of((2, 12), 4)
    cotangent = jax.random.normal(jax.random.key(7), (2, 12, base.vocab_size))

    def value_and_grad(config):
        def f(p):
            return jnp.sum(models.forward(config, p, tokens) * cotangent)
        return jax.jit(jax.value_and_grad(f))(params)

    ref_value, ref_grad = value_and_grad(base)
    for scan, remat in variants:
        value, grad = value_and_grad(ModelConfig(**{**base.__dict__, "scan_layers": scan, "remat": remat}))
        assert_close(value, ref_value)
        for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            assert_close(g, r, tol=1e-4)


class RecordingRuntime(LocalRuntime):
    """A non-local runtime stand-in that records what reaches the call site."""

    def __init__(self):
        super().__init__()
        self.calls, self.constrained = [], []

    def attention(self, q, k, v, *, segment_ids, causal, sliding_window, scale):
        self.calls.append((q.shape, k.shape, sliding_window, scale))
        return super().attention(q, k, v, segment_ids=segment_ids, causal=causal, sliding_window=sliding_window,
                                 scale=scale)

    def constrain(self, x, logical_axes):
        assert len(logical_axes) == x.ndim
        self.constrained.append(logical_axes)
        return x


def test_every_attention_goes_through_the_runtime():
    config = CONFIGS["mistral_window"]
    params = random_params(config)
    tokens = tokens_of((1, 10))
    runtime = RecordingRuntime()
    out = jax.eval_shape(lambda p, t: models.forward(config, p, t, runtime=runtime), params, tokens)  # trace only
    assert out.shape == (1, 10, config.vocab_size)
    assert [c[2] for c in runtime.calls] == [5] * config.num_layers
    assert runtime.calls[0][3] == pytest.approx(config.resolved_head_dim ** -0.5)
    assert ("batch", "seq", "heads", "head_dim") in runtime.constrained


def test_kv_prefix_needs_a_local_runtime():
    class Other:  # duck-typed context-parallel runtime
        def attention(self, q, k, v, **kw):
            raise AssertionError("not reached")

        def constrain(self, x, axes):
            return x

    config = CONFIGS["llama3_bias"]
    params = random_params(config)
    with pytest.raises(ValueError, match="single-device"):
        models.forward_hidden(config, params, tokens_of((1, 4)), runtime=Other(), return_kv=True)


@pytest.mark.parametrize("name", ["llama3_bias", "qwen3_yarn"])
def test_logical_axes_cover_every_param(name):
    config = CONFIGS[name]
    params = jax.eval_shape(lambda: models.init(config, jax.random.key(0)))
    axes = models.param_logical_axes(config)
    is_axes = lambda t: isinstance(t, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
    allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "experts", None}
    for names, leaf in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(params)):
        assert len(names) == leaf.ndim and set(names) <= allowed
    w = jax.eval_shape(lambda p: models.lm_head_weight(config, p), params)
    assert w.shape == (config.hidden_size, config.vocab_size)


def test_unknown_architecture_and_dynamic_rope_chunks_fail_clearly():
    config = CONFIGS["llama3_bias"]
    with pytest.raises(ValueError, match="not registered"):
        models.get_architecture("gpt2")
    dyn = ModelConfig(**{**config.__dict__, "rope_scaling": RopeScalingConfig(type="dynamic", factor=2.0)})
    with pytest.raises(ValueError, match="dynamic"):
        models.forward_hidden(dyn, random_params(config), tokens_of((1, 4)), return_kv=True)


def test_partial_rotary_rotates_only_the_leading_channels():
    """rope.apply_rope with partial_rotary_factor=0.5 against the textbook formula in numpy (fp64): channel pairs
    (i, i + R/2) of the first R channels rotate by position * theta^(-2i/R); the rest pass through."""
    from longtrain.models.rope import apply_rope, rope_cos_sin

    config = ModelConfig(head_dim=16, partial_rotary_factor=0.5, rope_theta=100.0, **BASE)
    R = 8
    positions = jnp.asarray([[0, 3, 7, 1, 2]], jnp.int32)
    x = np.random.RandomState(0).standard_normal((1, 5, 2, 16)).astype(np.float32)
    cos, sin = rope_cos_sin(config, positions, jnp.float32)
    assert cos.shape == (1, 5, R)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    angle = np.asarray(positions, np.float64)[..., None] * 100.0 ** (-np.arange(0, R, 2) / R)  # [1, 5, R/2]
    c, s = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]
    x1, x2 = x[..., : R // 2].astype(np.float64), x[..., R // 2: R].astype(np.float64)
    want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., R:]], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_seed_gives_the_parameters_it_gave_before_the_models_were_modules():
    """The parameter keys come from fixed splits of the seed key (models/layers.py `module_keys`), the derivation
    the dict-based models used, so a run's seed draws the same initial parameters as before: checked here leaf by
    leaf against that derivation written out with jax.random."""
    from flax import nnx

    config = ModelConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4,
                         num_kv_heads=2, tie_embeddings=False, init_std=0.05)
    key = jax.random.PRNGKey(3)
    params = models.init(config, key)
    normal = lambda k, shape: config.init_std * jax.random.normal(k, shape, jnp.float32)  # noqa: E731
    k_outer, k_layers = jax.random.split(key)
    k_embed, k_head = jax.random.split(k_outer)
    np.testing.assert_array_equal(params["embed"]["embedding"], normal(k_embed, (61, 16)))
    np.testing.assert_array_equal(params["lm_head"]["kernel"], normal(k_head, (16, 61)))
    for layer, k_layer in enumerate(jax.random.split(k_layers, 3)):
        k_attn, k_mlp = jax.random.split(k_layer)
        kq, kk, kv, ko = jax.random.split(k_attn, 4)
        np.testing.assert_array_equal(params["layers"]["attn"]["q_proj"]["kernel"][layer], normal(kq, (16, 4, 4)))
        np.testing.assert_array_equal(params["layers"]["attn"]["o_proj"]["kernel"][layer], normal(ko, (4, 4, 16)))
        k_gate, k_up, k_down = jax.random.split(k_mlp, 3)
        np.testing.assert_array_equal(params["layers"]["mlp"]["down_proj"]["kernel"][layer], normal(k_down, (24, 16)))
    # building the module with the same key, or from nnx.Rngs, goes through the same splits
    built = nnx.to_pure_dict(nnx.state(models.build(config, key=key)))
    for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    rngs_key = nnx.Rngs(5).params()
    from_rngs = nnx.to_pure_dict(nnx.state(models.build(config, rngs=nnx.Rngs(5))))
    np.testing.assert_array_equal(from_rngs["embed"]["embedding"],
                                  normal(jax.random.split(jax.random.split(rngs_key)[0])[0], (61, 16)))


def test_a_parameter_without_logical_axis_names_is_an_error_naming_it(monkeypatch):
    """param_logical_axes never replicates a parameter silently: one created without names is refused by path."""
    from flax import nnx

    from longtrain.models import entry_points

    class Unnamed(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(4, 4, rngs=nnx.Rngs(0))  # flax's own Linear: no logical axis names

    monkeypatch.setattr(entry_points, "abstract_model", lambda config: nnx.split(nnx.eval_shape(Unnamed)))
    with pytest.raises(ValueError, match="parameter proj.(bias|kernel) of architecture 'llama' has no logical axis names"):
        entry_points.param_logical_axes(ModelConfig())
