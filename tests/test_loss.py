"""The tiled LM loss (longtrain.loss.lm_loss) against the naive full-logits oracle: value, gradients, memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.loss import lm_loss, lm_loss_reference


def _random_inputs(B, T, E, V, seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(k[0], (B, T, E), dtype)
    w = (jax.random.normal(k[1], (E, V)) * 0.3).astype(dtype)
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = jax.random.bernoulli(k[3], 0.7, (B, T))
    return hidden, w, targets, mask


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("T,V,token_chunk,vocab_chunk,z_loss", [
    (37, 101, 8, 16, 0.0),      # neither T nor V a multiple of its tile
    (37, 101, 8, 16, 1e-3),     # z-loss
    (64, 96, 16, 32, 1e-2),     # exact multiples
    (21, 50, 512, None, 0.0),   # tiles larger than the data; whole-vocab tile
])
def test_value_and_grads_match_naive(T, V, token_chunk, vocab_chunk, z_loss):
    hidden, w, targets, mask = _random_inputs(3, T, 24, V)
    num_targets = 57.0  # global count from outside, deliberately not this batch's own count

    def tiled(h, w_):
        return lm_loss(h, w_, targets, mask, num_targets=num_targets, z_loss=z_loss,
                       token_chunk=token_chunk, vocab_chunk=vocab_chunk)

    def naive(h, w_):
        return lm_loss_reference(h, w_, targets, mask, num_targets=num_targets, z_loss=z_loss)

    val, (dh, dw) = jax.jit(jax.value_and_grad(tiled, argnums=(0, 1)))(hidden, w)
    ref, (rdh, rdw) = jax.value_and_grad(naive, argnums=(0, 1))(hidden, w)
    assert abs(float(val) - float(ref)) <= 1e-5 * abs(float(ref))
    assert _rel(dh, rdh) < 1e-5
    assert _rel(dw, rdw) < 1e-5
    # masked tokens get no gradient at all
    assert float(jnp.max(jnp.abs(dh * (~mask)[..., None]))) == 0.0


def test_float_mask_weights_and_their_gradient():
    hidden, w, targets, _ = _random_inputs(2, 19, 8, 33, seed=1)
    weights = jax.random.uniform(jax.random.PRNGKey(5), (2, 19))
    f = lambda m: lm_loss(hidden, w, targets, m, num_targets=10.0, z_loss=1e-2, token_chunk=4, vocab_chunk=8)
    r = lambda m: lm_loss_reference(hidden, w, targets, m, num_targets=10.0, z_loss=1e-2)
    assert _rel(jax.grad(f)(weights), jax.grad(r)(weights)) < 1e-5


def test_bf16_inputs_give_fp32_loss_close_to_fp64_oracle():
    hidden, w, targets, mask = _random_inputs(2, 40, 32, 70, seed=2)
    val = lm_loss(hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets, mask, num_targets=50.0,
                  token_chunk=16, vocab_chunk=32)
    assert val.dtype == jnp.float32
    grads = jax.grad(lambda h: lm_loss(h, w.astype(jnp.bfloat16), targets, mask, num_targets=50.0,
                                       token_chunk=16, vocab_chunk=32))(hidden.astype(jnp.bfloat16))
    assert grads.dtype == jnp.bfloat16
    ref = lm_loss_reference(hidden.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets, mask, num_targets=50.0)
    assert abs(float(val) - float(ref)) < 1e-4 * abs(float(ref))


@pytest.mark.parametrize("kwargs,match", [
    (dict(token_chunk=0), "token_chunk"),
    (dict(vocab_chunk=-3), "vocab_chunk"),
    (dict(z_loss=-1.0), "z_loss"),
])
def test_bad_arguments_are_named(kwargs, match):
    hidden, w, targets, mask = _random_inputs(1, 8, 4, 10)
    with pytest.raises(ValueError, match=match):
        lm_loss(hidden, w, targets, mask, num_targets=3.0, **kwargs)


def test_bad_shapes_are_named():
    hidden, w, targets, mask = _random_inputs(1, 8, 4, 10)
    with pytest.raises(ValueError, match="w_EV"):
        lm_loss(hidden, w.T, targets, mask, num_targets=3.0)
    with pytest.raises(ValueError, match="loss_mask_BT"):
        lm_loss(hidden, w, targets, mask[:, :3], num_targets=3.0)


def _compiled_bytes(fn, B, T, E, V):
    args = (jax.ShapeDtypeStruct((B, T, E), jnp.float32), jax.ShapeDtypeStruct((E, V), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.bool_))
    step = jax.jit(jax.value_and_grad(lambda h, w, t, m: fn(h, w, t, m, num_targets=1000.0), argnums=(0, 1)))
    ma = step.lower(*args).compile().memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


def test_compiled_memory_at_least_4x_below_naive():
    """T=4096, vocab 32K (compile only): temp + argument + output bytes of value_and_grad."""
    tiled = _compiled_bytes(lm_loss, 1, 4096, 256, 32768)
    naive = _compiled_bytes(lm_loss_reference, 1, 4096, 256, 32768)
    assert naive >= 4 * tiled, (naive, tiled)
