"""Balance mode: execute one step's plan (`data.balance`), a context degree c per micro-batch, then ONE update.

The balance loader returns per step {"micro_batches": [...], "plan", "num_targets", "num_tokens"}; each
micro-batch holds numpy [R, C] rank buffers (R = devices) and its degree `context` = c. Ranks c*g .. c*g+c-1 form
context group g, so the micro-batch runs on the same devices viewed as a mesh data=R/c x context=c (one Mesh,
cached, per c) with the [R, C] buffers reshaped to [R/c, c*C] group rows: the context axis then hands each
device exactly its own rank buffer. Split documents lie zigzag in those buffers, so attention takes its causal
index from `positions` (restarting per document) through the ring's explicit `token_index`, never from buffer
offsets. Only the split region (the first `split_region` = S tokens of every rank buffer, which holds the split
documents' shards) takes part in ring traffic; the whole documents after it attend locally (`ring_region=S`).

State is ZeRO-3 over the whole pool (`parallel.sharding.pool_spec`): every parameter, gradient accumulator and
optimizer moment is split over data x fsdp x context as one flattened axis in device order, so each per-c view
gives every device the same block and changing c between micro-batches moves no bytes. A micro-batch gathers the
weights as it uses them and adds its gradient into the sharded accumulator, so each device keeps only its block
of the gradient (never a replicated copy); the global target count divides once, in `step.apply_gradients`, like the normal step (same
clipping, AdamW, NaN skip). Programs: one jit per (c, C, S, K) for the micro-batch and one for the update.

Lightning layers (the MiniMax hybrid) pass their decayed states between the pieces of a split document across the
group's ranks, in the document's position order (`parallel/lightning_pieces.py`); MoE layers run unchanged.

Restrictions (checked in `check_balance_config`, each refused naming its key): mesh.tensor = 1 (the views split only
data and context), mesh.context_strategy ring (or auto), mesh.layout zigzag, mesh.lightning_variant all_gather,
optim.mode = full and optim.grad_accum = 1.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from longtrain.config import Config, ConfigError
from longtrain.parallel.sharding import POOL_AXES
from longtrain.train.model_loss import make_micro_value_and_grad
from longtrain.train.step import accumulate_micro, apply_gradients

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def check_balance_config(config: Config) -> None:
    """ConfigError naming the keys balance mode cannot run with."""
    if config.mesh.tensor != 1:
        raise ConfigError(f"data.balance.enabled=true does not support tensor parallelism: set mesh.tensor=1 (got "
                          f"mesh.tensor={config.mesh.tensor}); the per-micro-batch views split the devices into "
                          f"data x context groups only, and shard the state ZeRO-3 over all of them")
    if config.mesh.context_strategy not in ("auto", "ring"):
        raise ConfigError(f"data.balance.enabled=true runs ring attention over each micro-batch's context group (it "
                          f"takes explicit per-token causal indices); mesh.context_strategy="
                          f"{config.mesh.context_strategy!r} is not served in balance mode: set "
                          f"mesh.context_strategy=ring (or auto)")
    if config.mesh.layout != "zigzag":
        raise ConfigError(f"data.balance.enabled=true lays every split document out zigzag over its group (the "
                          f"scheduler places the pieces); mesh.layout={config.mesh.layout!r} does not apply: set "
                          f"mesh.layout=zigzag")
    if config.mesh.lightning_variant != "all_gather":
        raise ConfigError(f"data.balance.enabled=true passes lightning states by all-gathering each group's piece "
                          f"summaries; mesh.lightning_variant={config.mesh.lightning_variant!r} does not apply: set "
                          f"mesh.lightning_variant=all_gather")
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
        from longtrain import models
        from longtrain.models.minimax import LINEAR, resolved_layer_types
        from longtrain.parallel import pool_param_shardings

        check_balance_config(config)
        self.config = config
        self.devices = list(jax.devices() if devices is None else devices)
        self.state_shardings = state_shardings
        self._meshes: dict[int, Any] = {}
        self._micro: dict[tuple[int, int, int, int], Callable] = {}
        self._abstract = jax.eval_shape(lambda: models.init(config.model, jax.random.PRNGKey(0)))
        pool = pool_param_shardings(self._abstract, models.param_logical_axes(config.model), self.mesh(1))
        self._param_specs = jax.tree.map(lambda s: s.spec, pool)  # the same specs serve every view
        self._lightning = (config.model.architecture == "minimax"
                           and LINEAR in resolved_layer_types(config.model))  # lightning layers pass states
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

    def param_shardings(self, c: int):
        """The parameters' ZeRO-3 shardings on the view of degree c (equivalent for every c)."""
        return jax.tree.map(lambda spec: NamedSharding(self.mesh(c), spec), self._param_specs)

    def _micro_program(self, c: int, C: int, S: int, K: int):
        """jit of (params, acc_loss, acc_grads, group batch) -> accumulators + this micro-batch's sums; the first
        S tokens of each rank buffer ring over the c ranks of a group, the rest attend locally; lightning layers
        pass states between the first K runs (the split pieces) of the group's buffers."""
        key = (c, C, S, K)
        if key not in self._micro:
            from longtrain.parallel import ParallelRuntime

            config, mesh, params_sh = self.config, self.mesh(c), self.param_shardings(c)
            replicated = NamedSharding(mesh, P())
            batch_sharding = NamedSharding(mesh, P("data", "context"))

            def runtime_for(batch):  # ring over the group, causality from the positions of the pieces
                return ParallelRuntime(mesh, strategy="ring", layout="contiguous",
                                       attention_impl=config.model.attention_impl,
                                       lightning_impl=config.model.lightning_impl,
                                       lightning_block_size=config.model.lightning_block_size,
                                       token_index=batch["positions"], ring_region=S, param_axes=POOL_AXES,
                                       lightning_pieces=K)

            # the plain step's micro-batch function and accumulation, with this micro-batch's runtime
            value_and_grad = make_micro_value_and_grad(config, runtime_for)

            def micro(params, acc_loss, acc_grads, batch):
                return accumulate_micro(value_and_grad, params, batch, None, (acc_loss, acc_grads))

            self._micro[key] = jax.jit(micro, in_shardings=(params_sh, replicated, params_sh, batch_sharding),
                                       out_shardings=(replicated, params_sh), donate_argnums=(1, 2))
        return self._micro[key]

    def trace_micro(self, c: int, C: int, S: int, K: int):
        """The micro-batch program of shape (c, C, S, K) traced on abstract inputs (`longtrain plan`)."""
        mesh, R = self.mesh(c), len(self.devices)
        params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), self._abstract,
                              self.param_shardings(c))
        loss = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
        rows = NamedSharding(mesh, P("data", "context"))
        batch = {k: jax.ShapeDtypeStruct((R // c, c * C), jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=rows) for k in BATCH_KEYS}
        return self._micro_program(c, C, S, K).trace(params, loss, params, batch)

    def trace_update(self, abstract_state: dict):
        """The update program (one optimizer step on the summed gradient) traced on abstract inputs."""
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return self._update.trace(abstract_state, scalar, abstract_state["params"], scalar)

    def pieces(self, mb: dict) -> int:
        """K of a micro-batch: 0 for softmax-only models (one program per (c, C, S)); for lightning layers the
        split pieces per rank buffer rounded up to a power of two, so a run compiles few K variants."""
        if not self._lightning or int(mb["context"]) == 1:
            return 0
        if "split_pieces" not in mb:
            raise ValueError("balance micro-batch lacks 'split_pieces' (packing.plan_to_batches sets it): lightning "
                             "layers need it to pass states between a split document's pieces")
        n = int(mb["split_pieces"])
        return 0 if n == 0 else 1 << (n - 1).bit_length()

    def largest_micro_shape(self) -> tuple[int, int, int, int]:
        """(c, C, S, K) of the largest micro-batch program the scheduler can emit: one group of every rank,
        capacity C, split region S = C; for lightning layers K = 2, one split document filling the region (more
        split documents make shorter pieces in the same region: K grows, the pieces' buffers [S, K, H, D] too)."""
        C = self.config.data.balance.capacity or self.config.data.seq_len
        return len(self.devices), C, C, 2 if self._lightning else 0

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
        """(sum of masked token losses, its gradient) over all micro-batches; grads ZeRO-3 sharded on the last
        micro-batch's view (views of the same devices with equivalent shardings: moving between them copies
        nothing)."""
        acc_loss, acc_grads, cur = None, None, None
        for mb in micro_batches:
            c = int(mb["context"])
            replicated, params_sh = NamedSharding(self.mesh(c), P()), self.param_shardings(c)
            p = jax.device_put(params, params_sh)  # already there: the same blocks on the same devices
            if acc_grads is None:
                acc_loss = jax.device_put(jnp.zeros((), jnp.float32), replicated)
                acc_grads = jax.tree.map(lambda a, sh: jnp.zeros(a.shape, a.dtype, device=sh), p, params_sh)
            elif cur != c:
                acc_loss, acc_grads = jax.device_put((acc_loss, acc_grads), (replicated, params_sh))
            cur = c
            batch = self.put_micro_batch(mb)
            K = self.pieces(mb)
            program = self._micro_program(c, batch["tokens"].shape[1] // c, int(mb["split_region"]), K)
            acc_loss, acc_grads = program(p, acc_loss, acc_grads, batch)
        if acc_grads is None:
            raise ValueError("balance-mode step has no micro-batches")
        return acc_loss, acc_grads

    def __call__(self, state: dict, step_batch: dict) -> tuple[dict, dict]:
        loss, grads = self.loss_and_grad_sums(state["params"], step_batch["micro_batches"])
        if self._update is None:
            raise ValueError("BalancedStep was built without optimizer/schedule/state_shardings: no update step")
        grads = jax.device_put(grads, self.state_shardings["params"])  # the same blocks, on the main mesh
        loss = jax.device_put(loss, self.state_shardings["step"])
        n = jax.device_put(jnp.float32(step_batch["num_targets"]), self.state_shardings["step"])
        return self._update(state, loss, grads, n)
