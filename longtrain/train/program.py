"""The compiled-program half of training, shared by `train` and `plan`: optimizer, state shardings, the abstract
(shape-only) train state, and the jitted train step with donated state buffers."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from longtrain.config import Config
from longtrain.train.executor import MainView, StepExecutor, build_fused_step
from longtrain.train.optim import make_optimizer
from longtrain.train.step import init_state


@dataclasses.dataclass
class TrainProgram:
    optimizer: optax.GradientTransformation
    schedule: Callable
    state_shardings: dict
    abstract_state: dict          # ShapeDtypeStructs carrying the state shardings (restore target, AOT input)
    init: Callable                # jitted key -> sharded fresh state (each device builds only its shards)
    init_with_params: Callable    # jitted params -> fresh state around given (sharded) params
    step: StepExecutor            # (state, step plan) -> (state, metrics), state donated: every mode's step
    fused_step: Callable | None   # the jitted one-program step of uniform plans (None in balance mode)


def build_program(config: Config, session) -> TrainProgram:
    abstract_params = jax.eval_shape(session.init_params, jax.random.PRNGKey(0))
    optimizer, schedule = make_optimizer(config.optim, config.train.steps, abstract_params, session.logical_axes)
    state_shardings = session.state_shardings(optimizer, abstract_params)

    def fresh_state(key):
        return init_state(session.init_params(key), optimizer, config.train.seed)

    shapes = jax.eval_shape(fresh_state, jax.random.PRNGKey(config.train.seed))
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                                  state_shardings)
    if config.data.balance.enabled:  # micro-batches of their own context degree on views of the pool
        from longtrain.train.balance_views import ContextGroupViews

        view, fused_step = ContextGroupViews(config), None
    else:  # grad_accum micro-batches on the session's mesh: the fused one-program step
        view = MainView(config, session, state_shardings)
        fused_step = build_fused_step(view.value_and_grad, optimizer, schedule, config.optim.grad_accum,
                                      state_shardings, session.batch_sharding)
    step = StepExecutor(view, optimizer, schedule, state_shardings, fused_step)
    init = jax.jit(fresh_state, out_shardings=state_shardings)
    init_with_params = jax.jit(lambda params: init_state(params, optimizer, config.train.seed),
                               in_shardings=(state_shardings["params"],), out_shardings=state_shardings)
    return TrainProgram(optimizer, schedule, state_shardings, abstract_state, init, init_with_params, step,
                        fused_step)


def per_device_bytes(abstract_tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        n = 1
        for d in shape:
            n *= d
        total += n * leaf.dtype.itemsize
    return total
