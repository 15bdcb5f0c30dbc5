"""Gradient equivalence of a balance plan: the step's micro-batches (any c, split documents laid out zigzag),
each loss normalised by the step's global target count, give the loss and gradient of one big packed batch.

Single-device math on a tiny Llama: each context group's c rank buffers are read as one row in buffer (zigzag)
order, and causality comes from the token indices (= positions within the document) through the model's
`token_index` path with an empty KV prefix, as a ring over the group computes it. The distributed execution of
the same arrays (ring over `context`) is the trainer's and parallel's part.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longtrain.config import ModelConfig
from longtrain.data.balance import schedule
from longtrain.data.packing import Document, best_fit_rows, count_targets, pack_rows, plan_to_batches

KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def _loss_sum(config, params, rows, num_targets, *, index_causal):
    from longtrain import models
    from longtrain.loss import lm_loss_reference

    tokens = jnp.asarray(rows["tokens"])
    kwargs = {}
    if index_causal:  # causality by token index (zigzag order in the buffer), as a context group computes it
        B = tokens.shape[0]
        hd, hkv = config.resolved_head_dim, config.num_kv_heads
        empty = {"k": jnp.zeros((B, 0, hkv, hd)), "v": jnp.zeros((B, 0, hkv, hd)),
                 "segment_ids": jnp.zeros((B, 0), jnp.int32), "token_index": jnp.zeros((B, 0), jnp.int32)}
        kwargs = {"token_index": jnp.asarray(rows["positions"]), "kv_prefix": [empty] * config.num_layers}
    hidden = models.forward_hidden(config, params, tokens, positions=jnp.asarray(rows["positions"]),
                                   segment_ids=jnp.asarray(rows["segment_ids"]), **kwargs)
    return lm_loss_reference(hidden, models.lm_head_weight(config, params), jnp.asarray(rows["targets"]),
                             jnp.asarray(rows["loss_mask"]), num_targets=num_targets)


def _group_rows(batch, c):
    """[R, C] rank buffers -> [R/c, c*C] rows: the c buffers of a context group side by side."""
    return {k: batch[k].reshape(batch[k].shape[0] // c, -1) for k in KEYS}


@pytest.mark.parametrize("method", ["balanced", pytest.param("static", marks=pytest.mark.slow)])
def test_plan_gives_the_gradient_of_one_big_batch(method):
    pytest.importorskip("longtrain.models")
    from longtrain import models

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=1024, attention_impl="reference")
    params = jax.jit(lambda key: models.init(config, key))(jax.random.PRNGKey(0))  # eager init is slow
    rng = np.random.default_rng(0)
    R, C = 8, 48
    lengths = np.array([150, 70, 33, 20, 12, 9, 40, 25, 5, 17, 30, 8])  # 150 > C: split over >= 4 ranks
    docs = [Document.from_tokens(rng.integers(0, 64, n)) for n in lengths]
    n_targets = count_targets(docs)
    plan = schedule(lengths, R, C, method)
    assert max(plan.context_degrees) >= 4
    assert method != "balanced" or len(set(plan.context_degrees)) >= 2  # micro-batches of different c

    def plan_loss(p):
        total = 0.0
        for mb, arrays in zip(plan.micro_batches, plan_to_batches(plan, docs)):
            total += _loss_sum(config, p, _group_rows(arrays, mb.context), n_targets, index_causal=True)
        return total

    big_T = 256
    big = pack_rows(docs, best_fit_rows([len(d) for d in docs], big_T), big_T)

    def big_loss(p):
        return _loss_sum(config, p, big, n_targets, index_causal=False)

    loss_plan, grad_plan = jax.jit(jax.value_and_grad(plan_loss))(params)
    loss_big, grad_big = jax.jit(jax.value_and_grad(big_loss))(params)
    np.testing.assert_allclose(float(loss_plan), float(loss_big), rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(grad_plan), jax.tree_util.tree_leaves(grad_big)):
        scale = float(jnp.max(jnp.abs(want))) + 1e-12
        assert float(jnp.max(jnp.abs(got - want))) / scale < 1e-4
