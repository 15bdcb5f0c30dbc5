"""Chunk-wise optimization: SeCO (exact) and SpaCO (sparse, unbiased) gradients for sequences far beyond
activation memory (issue 8; algorithm and verification notes in shared/notes/lightning-seco-balance.md part B).

    seco_grad(config, params, batch, chunk_size) -> (loss, grads)                exact, equal to jax.grad
    spaco_grad(config, params, batch, chunk_size, keep_prob, rng) -> (loss, grads)   unbiased estimate
    spaco_fixed_count_grad(config, params, batch, chunk_size, num_selected, rng)  the paper's estimator (BIASED)
    chunk_weighted_grad(config, params, batch, chunk_size, chunk_weights)        the engine, explicit weights
    chunkwise_value_and_grad(config, params, batch, rng)                          dispatch on optim.mode
    sequence_loss(config, params, batch)                                           full-sequence loss (mode full)

`config` is either the full `longtrain.config.Config` (then z_loss comes from `optim.z_loss`; with mesh.context > 1
pass the `mesh`) or a bare `ModelConfig` (z_loss defaults to 0).
The loss is always sum of masked token losses / number of target tokens of the WHOLE batch (never a mean of
per-chunk means). Batches are DESIGN.md §3 dicts; `targets` and `loss_mask` are required.

Data parallel / FSDP: every function is a pure jit-able function of (params, batch); shard them as usual and the
chunk loop runs on the sharded arrays. Context parallelism: pass `mesh=` (every chunk is split over its context
axis, `context.py`). Host offload: `offload=True` (K/V buffers and accumulator in host memory, `engine.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain import models
from longtrain.chunkwise.engine import ChunkProgram, forward_fill, reverse_accumulate
from longtrain.chunkwise.layout import (chunk_and_padded_len, chunk_batch, check_batch, check_chunk_size,
                                       global_num_targets, num_chunks)
from longtrain.chunkwise.selection import bernoulli_weights, fixed_count_weights
from longtrain.loss import lm_loss

MODES = ("full", "seco", "spaco")


def _model_and_z_loss(config, z_loss, mesh=None):
    """(ModelConfig, z_loss) from a full Config or a ModelConfig. A Config with mesh.context > 1 needs the `mesh`
    (the chunks are split over its context axis)."""
    from longtrain.config import Config, ModelConfig

    if isinstance(config, Config):
        if config.mesh.context != 1 and (mesh is None or mesh.shape.get("context", 1) != config.mesh.context):
            raise ValueError(f"chunk-wise training with mesh.context={config.mesh.context} splits every chunk over "
                             f"the context axis: pass the device mesh (mesh=...) whose context axis has that size")
        return config.model, (config.optim.z_loss if z_loss is None else z_loss)
    if isinstance(config, ModelConfig):
        return config, (0.0 if z_loss is None else z_loss)
    raise TypeError(f"config must be a longtrain.config.Config or ModelConfig; got {type(config).__name__}")


def _acc_dtype(model_config):
    return jnp.promote_types(jnp.dtype(model_config.dtype), jnp.float32)


def sequence_loss(config, params, batch, *, z_loss=None, runtime=None):
    """Full-sequence loss (mode `full`, and the SeCO oracle): masked token losses / number of target tokens."""
    model_config, z_loss = _model_and_z_loss(config, z_loss)
    check_batch(batch)
    hidden = models.forward_hidden(model_config, params, batch["tokens"], positions=batch.get("positions"),
                                   segment_ids=batch.get("segment_ids"), runtime=runtime)
    mask = batch["loss_mask"].astype(_acc_dtype(model_config))
    return lm_loss(hidden, models.lm_head_weight(model_config, params), batch["targets"], mask,
                   num_targets=global_num_targets(mask), z_loss=z_loss)


def chunk_weighted_grad(config, params, batch, chunk_size, chunk_weights=None, *, z_loss=None,
                        loss_from_forward=False, kv_grad_dtype=None, grad_shardings=None, mesh=None,
                        batch_layout="contiguous", offload=False):
    """(loss, grads) where chunk i's local backward is scaled by `chunk_weights[i]` ([num_chunks] array; None = all
    ones = SeCO, exact). A zero weight skips that chunk's recompute and backward (`lax.cond`). The weight multiplies
    both the chunk's own loss and the cache cotangent it passes on, so a gradient path through chunks i1..in gets
    w_i1...w_in. `loss_from_forward=True` computes the (exact) loss in the forward pass, needed when chunks are
    skipped; otherwise the loss is the sum of the recomputed chunk losses. `kv_grad_dtype`: dtype of the K/V
    cotangent accumulator (default fp32, or fp64 for fp64 models). `grad_shardings`: optional pytree like params
    of shardings for the gradient accumulator (under FSDP pass the parameter shardings, else XLA may replicate it).
    `mesh` with a context axis > 1: every chunk is split over it (`context.py`: K/V buffers and accumulator
    sharded along the sequence; parameters held as `grad_shardings` say, default the ZeRO-3 rules); `batch_layout`
    names the sequence layout the batch arrives in (the trainer's `mesh.layout`). `offload=True` keeps the K/V
    buffers and their cotangent accumulator in host memory, streamed to the device one layer slice at a time (the
    same arithmetic: results equal offload off bitwise).
    """
    model_config, z_loss = _model_and_z_loss(config, z_loss, mesh)
    acc_dtype = _acc_dtype(model_config)

    def engine(p, b, chunk, runtime=None, num_targets=None, shardings=grad_shardings):
        cb = chunk_batch(b, chunk, acc_dtype, num_targets=num_targets)
        if chunk_weights is not None and tuple(jnp.shape(chunk_weights)) != (cb.num_chunks,):
            raise ValueError(f"chunk_weights must have shape [num_chunks]=({cb.num_chunks},); got "
                             f"{tuple(jnp.shape(chunk_weights))}")
        prog = ChunkProgram(model_config, p, cb, z_loss=float(z_loss), kv_grad_dtype=kv_grad_dtype, runtime=runtime,
                            offload=offload)
        buffers, entering, forward_loss = forward_fill(prog, p, with_loss=loss_from_forward)
        recomputed_loss, grads = reverse_accumulate(prog, p, buffers, entering, chunk_weights, shardings)
        return (forward_loss if loss_from_forward else recomputed_loss), grads

    if mesh is not None and mesh.shape.get("context", 1) > 1:
        from longtrain.chunkwise.context import context_parallel_chunkwise

        # each rank sums its tokens' losses (num_targets=1); the sums are reduced and normalised once
        return context_parallel_chunkwise(
            model_config, params, batch, chunk_size, mesh,
            lambda p, b, chunk, runtime: engine(p, b, chunk, runtime, num_targets=1.0, shardings=None),
            acc_dtype=acc_dtype, batch_layout=batch_layout,
            param_specs=None if grad_shardings is None else jax.tree.map(lambda s: s.spec, grad_shardings))
    return engine(params, batch, chunk_size)


def seco_grad(config, params, batch, chunk_size, **options):
    """Exact (loss, grads) of the full-sequence loss, computed chunk by chunk (SeCO). Memory: the per-layer K/V
    (or lightning state) caches and their cotangents, O(T), plus one chunk's activations. `options`: z_loss,
    kv_grad_dtype, grad_shardings, mesh, batch_layout, offload (see `chunk_weighted_grad`)."""
    return chunk_weighted_grad(config, params, batch, chunk_size, None, **options)


def spaco_grad(config, params, batch, chunk_size, keep_prob, rng, **options):
    """SpaCO with independent Bernoulli(keep_prob) chunk selection and 1/keep_prob per hop: an exactly UNBIASED
    estimate of the SeCO/full gradient. Dropped chunks (the last one included, same rule) skip their recompute and
    backward. The returned loss is exact (computed in the forward pass)."""
    cb_len = check_batch(batch)[1]
    weights = bernoulli_weights(rng, num_chunks(cb_len, chunk_size), keep_prob)
    return chunk_weighted_grad(config, params, batch, chunk_size, weights, loss_from_forward=True, **options)


def spaco_fixed_count_grad(config, params, batch, chunk_size, num_selected, rng, **options):
    """The published SpaCO estimator: exactly `num_selected` of the k chunks, chosen uniformly, each scaled by
    k/num_selected per hop. BIASED: a path through n chunks survives with probability t(t-1).../(k(k-1)...), not
    (t/k)^n, so E[grads] != the exact gradient (tests measure it). For comparison only; use `spaco_grad`."""
    cb_len = check_batch(batch)[1]
    weights = fixed_count_weights(rng, num_chunks(cb_len, chunk_size), num_selected)
    return chunk_weighted_grad(config, params, batch, chunk_size, weights, loss_from_forward=True, **options)


def offloaded_bytes_per_device(config, mesh_shape: dict | None = None) -> int:
    """Bytes of host memory per device that `optim.seco_offload=host` uses for a step of `config` (a full Config):
    the softmax layers' K/V buffers (model dtype) and their cotangent accumulator (fp32, fp64 for fp64 models), for
    this device's rows and its 1/context share of the padded sequence. 0 when nothing is offloaded."""
    if config.optim.mode not in ("seco", "spaco") or config.optim.seco_offload != "host":
        return 0
    shape = mesh_shape or {}
    P = shape.get("context", 1)
    # rows of one micro-batch on one device (the step's batch is cut into optim.grad_accum micro-batches)
    rows = max(1, config.data.batch_size // (config.optim.grad_accum * shape.get("data", 1) * shape.get("fsdp", 1)))
    _, padded = chunk_and_padded_len(config.data.seq_len, config.optim.chunk_size, P)
    return offloaded_kv_bytes(config.model, rows, padded // P)


def offloaded_kv_bytes(model_config, rows: int, tokens: int, kv_grad_dtype=None) -> int:
    """Bytes of the softmax layers' K/V buffers (model dtype) plus their cotangent accumulator (`kv_grad_dtype`,
    default fp32, fp64 for fp64 models) for `rows` x `tokens` tokens: what offload keeps in host memory."""
    m = model_config
    tokens_in = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    caches = jax.eval_shape(lambda p, t: models.forward_hidden(m, p, t, return_kv=True)[1],
                            jax.eval_shape(lambda: models.init(m, jax.random.PRNGKey(0))), tokens_in)
    kv = [c for c in caches if "k" in c and "v" in c]
    if not kv:
        return 0
    value = jnp.dtype(m.dtype).itemsize
    acc = jnp.dtype(kv_grad_dtype or _acc_dtype(m)).itemsize
    per_token = sum((c["k"].shape[-2] * c["k"].shape[-1] + c["v"].shape[-2] * c["v"].shape[-1]) for c in kv)
    return rows * tokens * per_token * (value + acc)


def chunkwise_value_and_grad(config, params, batch, rng=None, *, grad_shardings=None, mesh=None):
    """The trainer's single call: (loss, grads) by `config.optim.mode` (full | seco | spaco), using
    `optim.chunk_size`, `optim.spaco_keep_prob` and `optim.z_loss`. `config` is the full Config; `rng` is only
    used by spaco; `grad_shardings` (optional, pytree like params) keeps the seco/spaco gradient accumulator sharded
    like the parameters under FSDP; `mesh` (needed when mesh.context > 1) splits every chunk over its context
    axis, the batch arriving in the `mesh.layout` order."""
    mode = config.optim.mode
    if mode == "full":
        return jax.value_and_grad(lambda p: sequence_loss(config, p, batch))(params)
    if mode == "seco":
        return seco_grad(config, params, batch, config.optim.chunk_size, grad_shardings=grad_shardings, mesh=mesh,
                         batch_layout=config.mesh.layout, offload=config.optim.seco_offload == "host")
    if mode == "spaco":
        if rng is None:
            raise ValueError("optim.mode='spaco' needs an rng key (chunkwise_value_and_grad(..., rng=key))")
        return spaco_grad(config, params, batch, config.optim.chunk_size, config.optim.spaco_keep_prob, rng,
                          grad_shardings=grad_shardings, mesh=mesh, batch_layout=config.mesh.layout,
                          offload=config.optim.seco_offload == "host")
    raise ValueError(f"optim.mode={mode!r} is not a training mode; expected one of {MODES}")


__all__ = ["MODES", "check_chunk_size", "chunk_weighted_grad", "chunkwise_value_and_grad", "num_chunks",
           "offloaded_bytes_per_device", "offloaded_kv_bytes",
           "seco_grad", "sequence_loss", "spaco_fixed_count_grad", "spaco_grad"]
