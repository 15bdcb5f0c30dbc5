"""Chunk-wise training API: argument errors, the optim.mode dispatch, data-parallel + FSDP sharding, and that SpaCO
really skips dropped chunks. (Exactness in fp64, llama and hybrid: test_chunkwise_exact.py.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longtrain import models
from longtrain.chunkwise import (chunk_weighted_grad, chunkwise_value_and_grad, num_chunks, seco_grad,
                                 sequence_loss, spaco_grad)
from longtrain.config import Config, ModelConfig
from longtrain.models.layer_stack import StackedCaches

LLAMA = ModelConfig(architecture="llama", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2,
                    num_heads=4, num_kv_heads=2)


def _batch(B, T, vocab, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 3:] = 2  # two documents per row, positions restart
    pos = np.concatenate([np.arange(T // 3), np.arange(T - T // 3)])[None].repeat(B, 0)
    return {"tokens": jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32),
            "loss_mask": jnp.asarray(rng.random((B, T)) < 0.8), "positions": jnp.asarray(pos, jnp.int32),
            "segment_ids": jnp.asarray(seg)}


def _rel_err(tree, ref):
    num = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)))
    return num / max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref))


def test_bad_arguments_are_named():
    params = models.init(LLAMA, jax.random.PRNGKey(0))
    batch = _batch(1, 8, LLAMA.vocab_size)
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            seco_grad(LLAMA, params, batch, bad)
    for key in ("targets", "loss_mask"):
        with pytest.raises(KeyError, match=key):
            seco_grad(LLAMA, params, {k: v for k, v in batch.items() if k != key}, 4)
    with pytest.raises(ValueError, match="keep_prob"):
        spaco_grad(LLAMA, params, batch, 4, 1.5, jax.random.PRNGKey(0))
    cp = Config(model=LLAMA)
    cp.mesh.context = 4
    with pytest.raises(ValueError, match="mesh.context"):
        seco_grad(cp, params, batch, 4)
    assert num_chunks(8, 8) == num_chunks(8, 100) == 1 and num_chunks(9, 4) == 3


def _sharded(mesh, params, batch):
    """Batch rows over `data`; embedding / LM head vocab axis over `fsdp` (FSDP-style), the rest replicated."""
    def spec(path, leaf):
        name = jax.tree_util.keystr(path)
        if "embedding" in name:
            return P("fsdp", None)
        if "lm_head" in name:
            return P(None, "fsdp")
        return P()
    params = jax.tree_util.tree_map_with_path(lambda pth, x: jax.device_put(x, NamedSharding(mesh, spec(pth, x))),
                                              params)
    batch = {k: jax.device_put(v, NamedSharding(mesh, P("data", None))) for k, v in batch.items()}
    return params, batch


def test_dispatch_and_data_fsdp_sharding_match_full_backprop():
    """optim.mode=seco on a data=2 x fsdp=4 mesh equals optim.mode=full on one device (fp32)."""
    config = Config(model=LLAMA)
    config.optim.chunk_size, config.optim.z_loss = 5, 1e-3
    params = models.init(LLAMA, jax.random.PRNGKey(0))
    batch = _batch(2, 16, LLAMA.vocab_size)
    config.optim.mode = "full"
    loss, grads = jax.jit(lambda p, b: chunkwise_value_and_grad(config, p, b))(params, batch)
    seco_config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, mode="seco"))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    s_params, s_batch = _sharded(mesh, params, batch)
    shardings = jax.tree.map(lambda x: x.sharding, s_params)
    s_loss, s_grads = jax.jit(lambda p, b: chunkwise_value_and_grad(seco_config, p, b, grad_shardings=shardings))(
        s_params, s_batch)
    assert abs(float(s_loss) - float(loss)) <= 1e-5 * abs(float(loss))
    assert _rel_err(s_grads, grads) <= 1e-4
    assert s_grads["embed"]["embedding"].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)


def test_spaco_skips_dropped_chunks_with_cond_and_keeps_exact_loss():
    params = models.init(LLAMA, jax.random.PRNGKey(0))
    batch = _batch(1, 12, LLAMA.vocab_size)
    jaxpr = str(jax.make_jaxpr(lambda p, r: spaco_grad(LLAMA, p, batch, 4, 0.5, r))(params, jax.random.PRNGKey(0)))
    assert " cond[" in jaxpr
    # all chunks dropped: zero gradient, but the reported loss is still the exact full-sequence loss
    loss, grads = jax.jit(lambda p: chunk_weighted_grad(LLAMA, p, batch, 4, jnp.zeros(3), loss_from_forward=True))(
        params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
    assert abs(float(loss) - float(sequence_loss(LLAMA, params, batch))) <= 1e-5 * float(loss)


def test_stacked_caches_layer_counts_are_named():
    """A StackedCaches prefix must stack one K/V cache per softmax layer and carry one side cache per lightning
    layer (MiniMax); a model whose every layer is in the stack (Llama) refuses side caches. (Shapes only.)"""
    hybrid = ModelConfig(architecture="minimax", vocab_size=48, hidden_size=16, intermediate_size=16, num_layers=2,
                         num_heads=2, num_kv_heads=1, layer_types=["linear_attention", "full_attention"],
                         num_experts=1, experts_per_token=1, moe_impl="dense")
    shared = {"segment_ids": jnp.ones((1, 4), jnp.int32), "token_index": jnp.arange(4)[None]}
    state = {"state": jnp.ones((1, 2, 8, 8)), "last_segment_id": jnp.ones((1,), jnp.int32)}

    def forward(config, stacked_layers, kv_heads, side):
        kv = {n: jnp.ones((stacked_layers, 1, 4, kv_heads, 8)) for n in ("k", "v")}
        params = jax.eval_shape(lambda: models.init(config, jax.random.PRNGKey(0)))
        jax.eval_shape(lambda p: models.forward_hidden(config, p, jnp.zeros((1, 4), jnp.int32),
                                                       kv_prefix=StackedCaches(kv, shared, side=side)), params)

    with pytest.raises(ValueError, match="1 softmax and 1 lightning"):
        forward(hybrid, 1, 1, [])
    with pytest.raises(ValueError, match="1 softmax and 1 lightning"):
        forward(hybrid, 2, 1, [state])
    forward(hybrid, 1, 1, [state])  # the right counts pass
    with pytest.raises(ValueError, match="side caches"):
        forward(LLAMA, LLAMA.num_layers, 2, [state])
