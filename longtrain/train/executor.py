"""Every train step executes a plan: a list of micro-batches, each run on a view of the devices, then ONE update.

A step plan (what `Session.step_plan` and the balance loader hand the trainer):
    {"micro_batches": [mb, ...],   host arrays (BATCH_KEYS) of one micro-batch each, plus its context degree
                                   "context" (balance mode also "split_region" and "split_pieces")
     "num_targets": float,         target tokens of the whole step: loss and gradient are divided by it once
     "stacked": {...},             optional: a uniform plan's micro-batches as one [A*b, T] batch, row i*A + j
                                   of micro-batch j (the cut `step.make_train_step` makes)
     "plan": BalancePlan}          optional: the scheduler's plan (lengths, describe())

Where a micro-batch runs is its view's business (`MainView` here: the session's mesh, layout and runtime;
`balance_views.ContextGroupViews`: balance mode's data=R/c x context=c views of the pool). The executor owns
the rest, the same for every mode:
  * per micro-batch: one program per (view, shape) adds the micro-batch's (loss sum, gradient sum) into
    accumulators it takes donated (`step.accumulate_micro`); then the update program (`step.apply_gradients`:
    division by the global target count, clipping, AdamW, NaN/inf skip, metrics);
  * fused fast path: a plan that carries "stacked" runs as ONE program, the accumulation loop and the update
    together (`step.make_train_step`): no host round trip between micro-batches and the gradient never leaves the
    program. That is the plain step (grad_accum micro-batches at c = mesh.context). A test proves it equal to the
    per-micro-batch path on the same plan.
Micro-batch j of an A-micro-batch step draws its randomness from fold_in(fold_in(state rng, step), j) (no j when
A = 1) on both paths, so SpaCO's selections do not depend on the path.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from longtrain.train.step import (BATCH_KEYS, accumulate_micro, apply_gradients, make_train_step, micro_rng,
                                  require_batch_keys)


class MainView:
    """Micro-batches on the session's mesh (data x fsdp x context x tensor) in its sequence layout, with the
    session's runtime and parameter shardings: the plain step's micro-batches."""

    def __init__(self, config, session, state_shardings: dict):
        from longtrain.train.model_loss import make_micro_value_and_grad

        self.session = session
        self.param_shardings = state_shardings["params"]
        self.replicated = NamedSharding(session.mesh, P())
        self.value_and_grad = make_micro_value_and_grad(config, session.runtime, mesh_shape=dict(session.mesh.shape),
                                                        grad_shardings=self.param_shardings, mesh=session.mesh)

    def program_key(self, mb: dict) -> tuple:
        return ("main", np.shape(mb["tokens"]))

    def shardings(self, key: tuple) -> tuple[Any, NamedSharding, NamedSharding]:
        """(parameter shardings, replicated scalar sharding, batch sharding) of the programs of `key`."""
        return self.param_shardings, self.replicated, self.session.batch_sharding

    def micro_value_and_grad(self, key: tuple) -> Callable:
        return self.value_and_grad

    def batch_shape(self, key: tuple) -> tuple[int, int]:
        return key[1]

    def put(self, mb: dict) -> dict:
        return self.session.put_batch(mb)


class StepExecutor:
    """`executor(state, step_plan) -> (state, metrics)`. `state` lives in `state_shardings` (the main mesh).
    Without optimizer/schedule only `loss_and_grad_sums` is available (tests, planning)."""

    def __init__(self, view, optimizer=None, schedule: Callable | None = None, state_shardings: dict | None = None,
                 fused_step: Callable | None = None):
        """`fused_step`: the jitted one-program step (`make_train_step`) for plans that carry "stacked"."""
        self.view = view
        self.state_shardings = state_shardings
        self._fused = fused_step
        self._fused_compiled: dict = {}
        self._micro: dict[tuple, Callable] = {}
        self._update = None if optimizer is None else jax.jit(
            lambda state, loss, grads, n: apply_gradients(state, loss, grads, n, optimizer, schedule),
            in_shardings=(state_shardings, None, state_shardings["params"], None),
            out_shardings=(state_shardings, None), donate_argnums=(0,))

    # ------------------------------------------------------------------------------------------ programs
    def micro_program(self, key: tuple) -> Callable:
        """jit of (params, acc_loss, acc_grads, batch, rng) -> the accumulators plus this micro-batch's sums."""
        if key not in self._micro:
            params_sh, replicated, batch_sh = self.view.shardings(key)
            value_and_grad = self.view.micro_value_and_grad(key)

            def micro(params, acc_loss, acc_grads, batch, rng):
                return accumulate_micro(value_and_grad, params, batch, rng, (acc_loss, acc_grads))

            self._micro[key] = jax.jit(micro, in_shardings=(params_sh, replicated, params_sh, batch_sh, replicated),
                                       out_shardings=(replicated, params_sh), donate_argnums=(1, 2))
        return self._micro[key]

    def trace_micro(self, key: tuple, abstract_params: Any):
        """The micro-batch program of `key` traced on abstract inputs (`longtrain plan`)."""
        params_sh, replicated, batch_sh = self.view.shardings(key)
        batch_shape = self.view.batch_shape(key)
        params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_params,
                              params_sh)
        loss = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
        batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=batch_sh) for k in BATCH_KEYS}
        return self.micro_program(key).trace(params, loss, params, batch, rng)

    def trace_update(self, abstract_state: dict):
        """The update program (one optimizer step on the summed gradient) traced on abstract inputs."""
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return self._update.trace(abstract_state, scalar, abstract_state["params"], scalar)

    def compile_fused(self, abstract_state: dict, abstract_batch: dict) -> bool:
        """Compile the fused program ahead of time for stacked batches of this shape (so logged step times are
        step times). -> False when there is no fused program (balance mode: the shapes come with the data)."""
        if self._fused is None:
            return False
        shape = abstract_batch["tokens"].shape
        self._fused_compiled[shape] = self._fused.lower(abstract_state, abstract_batch).compile()
        return True

    # ------------------------------------------------------------------------------------------ execution
    def loss_and_grad_sums(self, params: Any, micro_batches: list, rng=None) -> tuple[jax.Array, Any]:
        """(sum of masked token losses, its gradient) over the micro-batches, each run on its view; the gradient
        sums stay in the parameters' shardings (views of the same devices with equivalent shardings: moving the
        accumulators between them copies nothing). `rng`: the step's key (None: a fixed one)."""
        if not micro_batches:
            raise ValueError("train step plan has no micro-batches")
        rng = jax.random.PRNGKey(0) if rng is None else rng
        acc_loss, acc_grads, current = None, None, None
        for j, mb in enumerate(micro_batches):
            key = self.view.program_key(mb)
            params_sh, replicated, _ = self.view.shardings(key)
            p = jax.device_put(params, params_sh)  # already there: the same blocks on the same devices
            if acc_grads is None:
                acc_loss = jax.device_put(jnp.zeros((), jnp.float32), replicated)
                acc_grads = jax.tree.map(lambda a, sh: jnp.zeros(a.shape, a.dtype, device=sh), p, params_sh)
            elif current != key:
                acc_loss, acc_grads = jax.device_put((acc_loss, acc_grads), (replicated, params_sh))
            current = key
            rng_j = jax.device_put(micro_rng(rng, j, len(micro_batches)), replicated)
            acc_loss, acc_grads = self.micro_program(key)(p, acc_loss, acc_grads, self.view.put(mb), rng_j)
        return acc_loss, acc_grads

    def __call__(self, state: dict, step_plan: dict, *, fused: bool = True) -> tuple[dict, dict]:
        """One train step. `fused=False` runs a stacked plan micro-batch by micro-batch (the proof of the fast
        path: tests compare the two)."""
        if fused and self._fused is not None and "stacked" in step_plan:
            batch = self.view.put(step_plan["stacked"])
            program = self._fused_compiled.get(batch["tokens"].shape, self._fused)
            return program(state, batch)
        if self._update is None:
            raise ValueError("StepExecutor was built without optimizer/schedule/state_shardings: no update step")
        rng = jax.random.fold_in(state["rng"], state["step"])
        loss, grads = self.loss_and_grad_sums(state["params"], step_plan["micro_batches"], rng)
        main = self.state_shardings
        grads = jax.device_put(grads, main["params"])  # the same blocks, on the main mesh
        loss = jax.device_put(loss, main["step"])
        n = jax.device_put(jnp.float32(step_plan["num_targets"]), main["step"])
        return self._update(state, loss, grads, n)


def uniform_plan(batch: dict, grad_accum: int, context: int) -> dict:
    """The plain step's plan: `grad_accum` micro-batches of B/A rows at c = `context`, row i*A + j in micro-batch
    j, carried stacked (the fused program cuts them) and as host views (the per-micro-batch path)."""
    require_batch_keys(batch)
    B = np.shape(batch["tokens"])[0]
    if B % grad_accum:
        raise ValueError(f"batch of {B} rows does not split into optim.grad_accum={grad_accum} micro-batches")
    stacked = {k: batch[k] for k in BATCH_KEYS}
    micro = [dict({k: np.asarray(v)[j::grad_accum] for k, v in stacked.items()}, context=context)
             for j in range(grad_accum)]
    return {"micro_batches": micro, "stacked": stacked,
            "num_targets": float(np.sum(np.asarray(batch["loss_mask"], np.float32)))}


def build_fused_step(micro_value_and_grad, optimizer, schedule, grad_accum: int, state_shardings: dict,
                     batch_sharding) -> Callable:
    """The jitted one-program step with donated state (the fused path)."""
    step_fn = make_train_step(micro_value_and_grad, optimizer, schedule, grad_accum=grad_accum)
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))
