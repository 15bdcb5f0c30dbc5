"""Balance mode: execute one step's plan (`data.balance`), a context degree c per micro-batch, then ONE update.

The balance loader returns per step {"micro_batches": [...], "plan", "num_targets", "num_tokens"}; each
micro-batch holds numpy [R, C] rank buffers (R = devices) and its degree `context` = c. Ranks c*g .. c*g+c-1 form
context group g, so the micro-batch runs on the same devices viewed as a mesh data=R/c x context=c (one Mesh,
cached, per c) with the [R, C] buffers reshaped to [R/c, c*C] group rows: the context axis then hands each
device exactly its own rank buffer. Split documents lie zigzag in those buffers, so attention takes its causal
index from `positions` (restarting per document) through the ring's explicit `token_index`, never from buffer
offsets. Only the split region (the first `split_region` = S tokens of every rank buffer, which holds the split
documents' shards) takes part in ring traffic; the whole documents after it attend locally (`ring_region=S`). Every micro-batch adds (sum of masked token losses, its gradient) to replicated accumulators; the
global target count divides once, in `step.apply_gradients`, like the normal step (same clipping, AdamW, NaN
skip). Programs: one jit per (c, C, S) for the micro-batch and one for the update.

Restrictions (checked in `check_balance_config`): parameters replicated (mesh.fsdp = mesh.tensor = 1) and
optim.mode = full, because the per-c meshes would otherwise need their own parameter shardings.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from longtrain.config import Config, ConfigError
from longtrain.train.model_loss import loss_sum
from longtrain.train.step import apply_gradients

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def check_balance_config(config: Config) -> None:
    """ConfigError naming the keys balance mode cannot run with."""
    if config.mesh.fsdp != 1 or config.mesh.tensor != 1:
        raise ConfigError(f"data.balance.enabled=true needs replicated parameters: mesh.fsdp=1 and mesh.tensor=1 "
                          f"(got mesh.fsdp={config.mesh.fsdp}, mesh.tensor={config.mesh.tensor})")
    if config.model.architecture == "minimax":
        from longtrain.models.minimax import resolved_layer_types

        if "linear_attention" in resolved_layer_types(config.model):
            raise ConfigError("data.balance.enabled=true does not support lightning (linear_attention) layers yet: "
                              "their state cannot pass between the ranks of a split document; use "
                              "data.balance.enabled=false for model.architecture='minimax' with linear_attention "
                              "layers in model.layer_types")
    if config.optim.mode != "full":
        raise ConfigError(f"data.balance.enabled=true supports optim.mode=full only; got "
                          f"optim.mode={config.optim.mode!r}")
    if config.optim.grad_accum != 1:
        raise ConfigError(f"data.balance.enabled=true: the plan sets the micro-batches; set optim.grad_accum=1 "
                          f"(got {config.optim.grad_accum})")


class BalancedStep:
    """`step(state, step_batch) -> (state, metrics)` for balance-mode steps. `state` lives in `state_shardings`
    (the trainer's main mesh); the micro-batch programs run on per-c meshes over the same devices."""

    def __init__(self, config: Config, optimizer=None, schedule: Callable | None = None,
                 state_shardings: dict | None = None, devices=None):
        """Without optimizer/schedule/state_shardings only `loss_and_grad_sums` is available (tests, planning)."""
        check_balance_config(config)
        self.config = config
        self.devices = list(jax.devices() if devices is None else devices)
        self.state_shardings = state_shardings
        self._meshes: dict[int, Any] = {}
        self._micro: dict[tuple[int, int], Callable] = {}
        self._update = None if optimizer is None else jax.jit(
            lambda state, loss, grads, n: apply_gradients(state, loss, grads, n, optimizer, schedule),
            in_shardings=(state_shardings, None, state_shardings["params"], None),
            out_shardings=(state_shardings, None), donate_argnums=(0,))

    def mesh(self, c: int):
        if c not in self._meshes:
            from longtrain.parallel import make_mesh

            R = len(self.devices)
            if c < 1 or R % c:
                raise ValueError(f"micro-batch context degree c={c} must divide the {R} devices")
            self._meshes[c] = make_mesh(data=R // c, fsdp=1, context=c, tensor=1, devices=self.devices)
        return self._meshes[c]

    def _micro_program(self, c: int, C: int, S: int):
        """jit of (params, acc_loss, acc_grads, group batch) -> accumulators + this micro-batch's sums; the first
        S tokens of each rank buffer ring over the c ranks of a group, the rest attend locally."""
        key = (c, C, S)
        if key not in self._micro:
            from longtrain.parallel import ParallelRuntime

            config, mesh = self.config, self.mesh(c)
            replicated = NamedSharding(mesh, P())
            batch_sharding = NamedSharding(mesh, P("data", "context"))

            def micro(params, acc_loss, acc_grads, batch):
                def f(p):
                    runtime = ParallelRuntime(mesh, strategy="ring", layout="contiguous",
                                              attention_impl=config.model.attention_impl,
                                              lightning_impl=config.model.lightning_impl,
                                              lightning_block_size=config.model.lightning_block_size,
                                              token_index=batch["positions"], ring_region=S)
                    return loss_sum(config, p, batch, runtime)

                loss, grads = jax.value_and_grad(f)(params)
                return acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads)

            self._micro[key] = jax.jit(micro, in_shardings=(replicated, replicated, replicated, batch_sharding),
                                       out_shardings=(replicated, replicated), donate_argnums=(1, 2))
        return self._micro[key]

    def put_micro_batch(self, mb: dict) -> dict:
        """Host rank buffers -> device [R/c, c*C] group rows sharded data x context on the per-c mesh.

        `mb` holds [R, C] arrays, or (multi-process, each process reading only its share) the rows of this
        process's ranks [lo, lo + R/processes) with lo = process_index * R/processes. Rank r is device r of
        `self.devices` (process-major), so a process only ever reads its own rows."""
        c = int(mb["context"])
        mesh = self.mesh(c)
        sharding = NamedSharding(mesh, P("data", "context"))
        R = len(self.devices)
        rows = np.asarray(mb["tokens"]).shape[0]
        lo = 0 if rows == R else jax.process_index() * rows
        if rows != R:
            mine = [r for r, d in enumerate(self.devices) if d.process_index == jax.process_index()]
            if R % rows or mine != list(range(lo, lo + rows)):
                raise ValueError(f"balance micro-batch holds {rows} of {R} rank rows, but this process "
                                 f"(index {jax.process_index()}) owns ranks {mine[:1]}..{mine[-1:]}: the loader's "
                                 f"process_index/process_count must match jax.process_index()/process_count()")
        C = np.asarray(mb["tokens"]).shape[1]

        def rank_buffer(index, x):
            # each device's block of the [R/c, c*C] group rows is exactly one rank buffer: group g, member i
            g, i = index[0].start or 0, (index[1].start or 0) // C
            return x[g * c + i - lo][None]

        out = {}
        for k in BATCH_KEYS:
            x = np.asarray(mb[k])
            out[k] = jax.make_array_from_callback((R // c, c * C), sharding,
                                                  lambda index, x=x: rank_buffer(index, x))
        return out

    def loss_and_grad_sums(self, params: Any, micro_batches: list) -> tuple[jax.Array, Any]:
        """(sum of masked token losses, its gradient) over all micro-batches; grads replicated on the last
        micro-batch's mesh (moved between per-c meshes as replicated arrays: same devices, no reshard)."""
        acc_loss, acc_grads, cur, on_mesh = None, None, None, {}
        for mb in micro_batches:
            c = int(mb["context"])
            replicated = NamedSharding(self.mesh(c), P())
            if c not in on_mesh:  # the parameters once per degree per step
                on_mesh[c] = jax.device_put(params, replicated)
            p = on_mesh[c]
            if acc_grads is None:
                acc_loss = jax.device_put(jnp.zeros((), jnp.float32), replicated)
                acc_grads = jax.device_put(jax.tree.map(jnp.zeros_like, params), replicated)
            elif cur != c:
                acc_loss, acc_grads = jax.device_put((acc_loss, acc_grads), replicated)
            cur = c
            batch = self.put_micro_batch(mb)
            program = self._micro_program(c, batch["tokens"].shape[1] // c, int(mb["split_region"]))
            acc_loss, acc_grads = program(p, acc_loss, acc_grads, batch)
        if acc_grads is None:
            raise ValueError("balance-mode step has no micro-batches")
        return acc_loss, acc_grads

    def __call__(self, state: dict, step_batch: dict) -> tuple[dict, dict]:
        loss, grads = self.loss_and_grad_sums(state["params"], step_batch["micro_batches"])
        if self._update is None:
            raise ValueError("BalancedStep was built without optimizer/schedule/state_shardings: no update step")
        grads = jax.device_put(grads, self.state_shardings["params"])  # replicated on the main mesh
        loss = jax.device_put(loss, self.state_shardings["step"])
        n = jax.device_put(jnp.float32(step_batch["num_targets"]), self.state_shardings["step"])
        return self._update(state, loss, grads, n)
