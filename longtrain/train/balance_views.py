"""Balance mode's views of the devices: a context degree c per micro-batch (`executor.StepExecutor` runs the plan).

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
of the gradient (never a replicated copy). The executor (`executor.py`) runs the plan as for every mode: one
program per micro-batch key (c, C, S, K), then the update program (`step.apply_gradients`: the global target count
divides once; clipping, AdamW, NaN skip).

Lightning layers (the MiniMax hybrid) pass their decayed states between the pieces of a split document across the
group's ranks, in the document's position order (`parallel/lightning_pieces.py`); MoE layers run unchanged.

Restrictions (checked in `check_balance_config`, each refused naming its key): mesh.tensor = 1 (the views split only
data and context), mesh.context_strategy ring (or auto), mesh.layout zigzag, mesh.lightning_variant all_gather,
optim.mode = full and optim.grad_accum = 1.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from longtrain.config import Config, ConfigError
from longtrain.parallel.sharding import POOL_AXES
from longtrain.train.model_loss import make_micro_value_and_grad
from longtrain.train.step import BATCH_KEYS


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


class ContextGroupViews:
    """Balance mode's views for `executor.StepExecutor`: micro-batch of degree c on the mesh data=R/c x context=c
    over the same devices (one Mesh per c, cached), parameters ZeRO-3 over the pool (the same blocks on every
    view), its [R, C] rank buffers placed as [R/c, c*C] group rows. Program key (c, C, S, K)."""

    def __init__(self, config: Config, devices=None):
        from longtrain import models
        from longtrain.models.minimax import LINEAR, resolved_layer_types
        from longtrain.parallel import pool_param_shardings

        check_balance_config(config)
        self.config = config
        self.devices = list(jax.devices() if devices is None else devices)
        self._meshes: dict[int, Any] = {}
        self.abstract_params = jax.eval_shape(lambda: models.init(config.model, jax.random.PRNGKey(0)))
        pool = pool_param_shardings(self.abstract_params, models.param_logical_axes(config.model), self.mesh(1))
        self._param_specs = jax.tree.map(lambda s: s.spec, pool)  # the same specs serve every view
        self._lightning = (config.model.architecture == "minimax"
                           and LINEAR in resolved_layer_types(config.model))  # lightning layers pass states

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

    # ------------------------------------------------------------------------------ the executor's view API
    def program_key(self, mb: dict) -> tuple[int, int, int, int]:
        """(c, C, S, K): context degree, rank capacity, split region, lightning pieces."""
        return (int(mb["context"]), int(np.shape(mb["tokens"])[1]), int(mb["split_region"]), self.pieces(mb))

    def shardings(self, key: tuple):
        mesh = self.mesh(key[0])
        return self.param_shardings(key[0]), NamedSharding(mesh, P()), NamedSharding(mesh, P("data", "context"))

    def micro_value_and_grad(self, key: tuple) -> Callable:
        """The plain step's micro-batch function, with this micro-batch's runtime: the first S tokens of each rank
        buffer ring over the c ranks of a group (causality from the pieces' positions), the rest attend locally;
        lightning layers pass states between the first K runs (the split pieces) of the group's buffers."""
        from longtrain.parallel import ParallelRuntime

        c, _, S, K = key
        config, mesh = self.config, self.mesh(c)

        def runtime_for(batch):
            return ParallelRuntime(mesh, strategy="ring", layout="contiguous",
                                   attention_impl=config.model.attention_impl,
                                   lightning_impl=config.model.lightning_impl,
                                   lightning_block_size=config.model.lightning_block_size,
                                   token_index=batch["positions"], ring_region=S, param_axes=POOL_AXES,
                                   lightning_pieces=K)

        return make_micro_value_and_grad(config, runtime_for)

    def batch_shape(self, key: tuple) -> tuple[int, int]:
        """The device batch of a program: [R/c, c*C] group rows."""
        c, C = key[:2]
        return len(self.devices) // c, c * C

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

    def largest_micro_key(self) -> tuple[int, int, int, int]:
        """(c, C, S, K) of the largest micro-batch program the scheduler can emit: one group of every rank,
        capacity C, split region S = C; for lightning layers K = 2, one split document filling the region (more
        split documents make shorter pieces in the same region: K grows, the pieces' buffers [S, K, H, D] too)."""
        C = self.config.data.balance.capacity or self.config.data.seq_len
        return len(self.devices), C, C, 2 if self._lightning else 0

    def put(self, mb: dict) -> dict:
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
