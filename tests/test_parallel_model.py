"""A full model on a mesh (data x context, fsdp x tensor x context) equals the same model on one device:
logits, loss and parameter gradients (softmax Llama and the MiniMax lightning/softmax hybrid)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain import models
from longtrain.config import ModelConfig
from longtrain.parallel import (ParallelRuntime, batch_sharding, from_layout, make_mesh, shard_params,
                                to_layout)


def packed_batch(rng, B, T, vocab):
    """Random tokens, packed documents (incl. padding at the end) with positions restarting per document."""
    tokens = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc = 0, 1
        while t < T - 3:
            length = int(rng.integers(1, T // 2))
            length = min(length, T - 3 - t)
            seg[b, t:t + length] = doc
            pos[b, t:t + length] = np.arange(length)
            t, doc = t + length, doc + 1
    targets = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    return tokens, pos, seg, targets


def loss_fn(logits, targets, seg):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = (seg != 0).astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.sum(mask)


def run_model(config, params, tokens, pos, seg, targets, runtime):
    def f(p):
        logits = models.forward(config, p, tokens, positions=pos, segment_ids=seg, runtime=runtime)
        return loss_fn(logits, targets, seg), logits
    (loss, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return loss, logits, grads


CONFIGS = {
    "llama": dict(architecture="llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                  intermediate_size=64, vocab_size=64),
    "minimax": dict(architecture="minimax", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, vocab_size=64, layer_types=["linear_attention", "full_attention"],
                    lightning_block_size=8),
    "minimax_moe": dict(architecture="minimax", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, vocab_size=64, layer_types=["linear_attention", "full_attention"],
                        lightning_block_size=8, num_experts=4, experts_per_token=2, moe_impl="ragged"),
}
MESHES = {"dp2_cp4": dict(data=2, context=4), "fsdp2_tp2_cp2": dict(data=1, fsdp=2, tensor=2, context=2)}


CASES = [("llama", "dp2_cp4", "ring", "zigzag"), ("minimax", "fsdp2_tp2_cp2", "token_ring", "contiguous"),
         ("minimax_moe", "dp2_cp4", "ring", "zigzag"),  # ragged MoE routed per device
         pytest.param("minimax", "dp2_cp4", "all_gather", "zigzag", marks=pytest.mark.slow),
         pytest.param("llama", "fsdp2_tp2_cp2", "ulysses", "contiguous", marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch,mesh_name,strategy,layout", CASES)
def test_model_on_mesh_matches_single_device(arch, mesh_name, strategy, layout):
    config = ModelConfig(**CONFIGS[arch], attention_impl="reference", lightning_impl="reference")
    rng = np.random.default_rng(0)
    B, T = 4, 32
    tokens, pos, seg, targets = packed_batch(rng, B, T, config.vocab_size)
    params = models.init(config, jax.random.PRNGKey(1))
    ref_loss, ref_logits, ref_grads = run_model(config, params, tokens, pos, seg, targets, None)

    mesh = make_mesh(**MESHES[mesh_name])
    P = mesh.shape["context"]
    runtime = ParallelRuntime(mesh, strategy=strategy, layout=layout, attention_impl="reference",
                              lightning_impl="reference", lightning_block_size=8)
    sharded = shard_params(params, models.param_logical_axes(config), mesh)
    put = lambda x: jax.device_put(to_layout(jnp.asarray(x), layout, P), batch_sharding(mesh, x.shape))
    loss, logits, grads = run_model(config, sharded, put(tokens), put(pos), put(seg), put(targets), runtime)

    scale = float(jnp.abs(ref_logits).max())
    np.testing.assert_allclose(from_layout(logits, layout, P), ref_logits, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for path, g, g_ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                              jax.tree.leaves(ref_grads)):
        gscale = float(jnp.abs(g_ref).max()) + 1e-12
        np.testing.assert_allclose(g, g_ref, atol=1e-4 * gscale, rtol=0, err_msg=str(path[0]))


def test_ragged_moe_routes_each_devices_tokens_locally():
    """Issue 17, item 3: with several experts and ragged dispatch on a data x context mesh, the MoE layer's
    forward+backward sends no token-sized data: its collective bytes do not grow with the number of tokens (only
    the expert weights' gradient is reduced). The global sort it replaced all-reduced every token."""
    from jax.sharding import NamedSharding

    from flax import nnx

    from longtrain.models.moe import MoE
    from longtrain.parallel.hlo_comm import collective_bytes, total_bytes
    from longtrain.parallel.sharding import activation_spec

    config = ModelConfig(**CONFIGS["minimax_moe"])
    graphdef, params = nnx.split(MoE(config, rngs=nnx.Rngs(0)))
    mesh = make_mesh(data=2, context=4)
    runtime = ParallelRuntime(mesh, strategy="ring", layout="zigzag", attention_impl="reference")

    def comm(T):
        shape = (4, T, config.hidden_size)
        x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(
            mesh, activation_spec(("batch", "seq", "embed"), shape, mesh)))
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, runtime=runtime) ** 2)  # noqa: E731
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
        return total_bytes(collective_bytes(hlo, mesh.size))

    weights = sum(a.size * 4 for a in jax.tree.leaves(params))
    assert comm(64) == comm(256)
    assert comm(256) <= 2 * weights  # an all-reduce of the weight gradients, nothing per token
