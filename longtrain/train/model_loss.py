"""Glue from the config to the per-micro-batch (loss sum, gradient) that `step.py` accumulates, and the eval pass.

mode `full`: `models.forward_hidden` + `loss.lm_loss` (never forms fp32 [B,T,V] logits), differentiated by
`jax.value_and_grad`. Modes `seco` / `spaco`: `longtrain.chunkwise.chunkwise_value_and_grad`, which returns the
loss normalised by the micro-batch's own target count; it is turned back into a sum so accumulation normalises
globally.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from longtrain.config import Config, ConfigError


def _hidden_and_head(config: Config, params: Any, batch: dict, runtime: Any):
    from longtrain import models

    hidden_BTE = models.forward_hidden(config.model, params, batch["tokens"], positions=batch["positions"],
                                       segment_ids=batch["segment_ids"], runtime=runtime)
    return hidden_BTE, models.lm_head_weight(config.model, params)


def loss_sum(config: Config, params: Any, batch: dict, runtime: Any) -> jax.Array:
    """Sum over target tokens of the token cross-entropy (+ z-loss) of one micro-batch, fp32 scalar."""
    from longtrain.loss import lm_loss

    hidden_BTE, w_EV = _hidden_and_head(config, params, batch, runtime)
    mesh = getattr(runtime, "mesh", None)
    if mesh is None or mesh.size == 1:
        return lm_loss(hidden_BTE, w_EV, batch["targets"], batch["loss_mask"], num_targets=1.0,
                       z_loss=config.optim.z_loss)
    return _sharded_loss_sum(config, mesh, hidden_BTE, w_EV, batch["targets"], batch["loss_mask"])


def _sharded_loss_sum(config: Config, mesh, hidden_BTE, w_EV, targets_BT, loss_mask_BT) -> jax.Array:
    """lm_loss on each device's own rows and sequence block, then one psum. Called on the global arrays, lm_loss's
    tile loops slice the context-sharded sequence and XLA all-gathers the hidden states (and an FSDP-sharded head)
    in every tile iteration (`longtrain plan`: terabytes per step at 256K tokens); here the head is gathered once
    and the hidden states never move. The tensor axis holds identical copies, so it is not summed over."""
    from jax.sharding import PartitionSpec as P

    from longtrain import parallel
    from longtrain.loss import lm_loss

    spec_BT = parallel.batch_sharding(mesh).spec
    spec_BTE = P(*spec_BT, None)
    split_axes = tuple(a for a in ("data", "fsdp", "context") if a in mesh.axis_names)

    def local(h_BTE, w, t_BT, m_BT):
        part = lm_loss(h_BTE, w, t_BT, m_BT, num_targets=1.0, z_loss=config.optim.z_loss)
        return jax.lax.psum(part, split_axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec_BTE, P(), spec_BT, spec_BT), out_specs=P(),
                         check_vma=False)(hidden_BTE, w_EV, targets_BT, loss_mask_BT)


def _reduce_once_over_data(micro, mesh):
    """Chunk-wise gradients under data parallelism with replicated parameters: every device runs SeCO/SpaCO on its
    own rows and keeps its gradient sum over all chunks, then ONE psum over `data` per micro-batch. Left to GSPMD,
    the chunk loop's accumulator carries the parameters' replicated sharding, so XLA all-reduced every chunk's
    gradient: the bytes grew with the number of chunks (tiny model, data=8: 898 KiB full, 3.51 MiB at 4 chunks)."""
    from jax.sharding import PartitionSpec as P

    from longtrain import parallel

    def local(params, batch, rng):
        loss_sum, grads = micro(params, batch, rng)  # this device's rows: sums, not means, so psum is exact
        return jax.lax.psum((loss_sum, grads), "data")

    batch_spec = parallel.batch_sharding(mesh).spec
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch_spec, P()), out_specs=(P(), P()),
                         check_vma=False)


def make_micro_value_and_grad(config: Config, runtime: Any, *, mesh_shape: dict | None = None,
                              grad_shardings: Any = None, mesh: Any = None):
    """(params, micro_batch, rng) -> (loss_sum, grads of loss_sum) for `config.optim.mode`. `runtime`: the models'
    runtime, or (mode full) a function of the micro-batch that builds it (balance mode: each micro-batch's ring
    takes its token indices from the batch). `mesh`: with chunk-wise modes, data parallelism and unsharded
    parameters (fsdp = tensor = 1), the gradient is reduced once per micro-batch instead of once per chunk
    (`_reduce_once_over_data`)."""
    mode = config.optim.mode
    if mode == "full":
        runtime_for = runtime if callable(runtime) else (lambda _: runtime)  # runtimes are not callable
        return jax.value_and_grad(lambda params, batch, rng: loss_sum(config, params, batch, runtime_for(batch)))
    if mode in ("seco", "spaco"):
        try:
            from longtrain.chunkwise import chunkwise_value_and_grad
        except ImportError as e:
            raise ConfigError(f"optim.mode={mode!r} needs longtrain.chunkwise, which is not available: {e}") from None
        shape = mesh_shape or {}
        if shape.get("tensor", 1) > 1:
            raise ConfigError(f"optim.mode={mode!r} (chunk-wise training) supports data, fsdp and context "
                              f"parallelism; got mesh.tensor={shape.get('tensor')}. Use mesh.tensor=1, or "
                              "optim.mode=full")
        context = shape.get("context", 1) > 1
        if context and mesh is None:
            raise ConfigError(f"optim.mode={mode!r} with mesh.context={shape['context']} needs the device mesh")
        # context: the chunks are split over the context axis and the gradient reduced once inside (chunkwise/
        # context.py); data only: each device runs its rows, one psum per micro-batch (_reduce_once_over_data)
        local = not context and mesh is not None and shape.get("data", 1) > 1 and shape.get("fsdp", 1) == 1

        # under context parallelism the chunk loop holds the parameters as these shardings say
        held = grad_shardings
        if context and config.optim.seco_params == "replicated":
            from jax.sharding import NamedSharding, PartitionSpec

            held = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), grad_shardings)

        def micro(params, batch, rng):  # chunk-wise runs the local kernels; XLA partitions the batch axis
            mean_loss, grads = chunkwise_value_and_grad(config, params, batch, rng,
                                                        grad_shardings=None if local else held,
                                                        mesh=mesh if context else None)
            n = jnp.sum(batch["loss_mask"].astype(jnp.float32))
            return mean_loss * n, jax.tree.map(lambda g: g * n.astype(g.dtype), grads)

        return _reduce_once_over_data(micro, mesh) if local else micro
    raise ConfigError(f"optim.mode={mode!r} is not one of 'full', 'seco', 'spaco'")


def make_eval_step(config: Config, runtime: Any):
    """(params, batch) -> {"loss_sum", "num_targets", "predictions" [B,T] argmax of the logits}. Predictions are
    computed tile-free here (eval batches are small); they feed the synthetic task's retrieval scorer."""
    from longtrain.loss import lm_loss

    def eval_step(params, batch):
        hidden_BTE, w_EV = _hidden_and_head(config, params, batch, runtime)
        total = lm_loss(hidden_BTE, w_EV, batch["targets"], batch["loss_mask"], num_targets=1.0)
        logits_BTV = jnp.einsum("bte,ev->btv", hidden_BTE, w_EV.astype(hidden_BTE.dtype))
        return {"loss_sum": total, "num_targets": jnp.sum(batch["loss_mask"].astype(jnp.float32)),
                "predictions": jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)}

    return eval_step
