"""The train step: gradient accumulation, globally normalised loss, clipping + AdamW, NaN/inf skip.

`make_train_step(micro_value_and_grad, optimizer, schedule, ...)` returns `step(state, batch) -> (state, metrics)`:
  * the batch `[B, T]` is cut into `grad_accum` micro-batches of B/A rows (row i*A + j belongs to micro-batch j,
    so a data-sharded batch axis stays sharded and no rows move between devices);
  * every micro-batch returns (loss SUM over its target tokens, gradient of that sum); the sums are accumulated
    and divided once by the number of target tokens in the whole global batch, so the loss is the global token
    mean whatever the accumulation or data-parallel split;
  * if the loss or the gradient norm is NaN/inf the update is skipped (params and optimizer state kept), the
    step is counted in `nonfinite_run` (consecutive) and `nonfinite_total`; the trainer stops after K in a row.

The state is a plain dict pytree so orbax saves and restores it directly:
  {"params", "opt_state", "step" int32, "rng" uint32[2], "nonfinite_run" int32, "nonfinite_total" int32}.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from longtrain.data.packing import BATCH_KEYS  # noqa: F401 -- the arrays of every (micro-)batch, re-exported

Batch = dict[str, jax.Array]
# (params, micro_batch, rng) -> (loss_sum fp32 scalar, grads of loss_sum)
MicroValueAndGrad = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Any]]


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> dict:
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed),
        "nonfinite_run": jnp.zeros((), jnp.int32),
        "nonfinite_total": jnp.zeros((), jnp.int32),
    }


def accumulate_micro(micro_value_and_grad: MicroValueAndGrad, params: Any, batch: Batch, rng, acc=None):
    """(loss sum, gradient sum) after one more micro-batch: `acc` (None for the first) plus this micro-batch's.
    Every step accumulates through here: the fused step's loop inside its program, and the executor's programs of
    one micro-batch each (`executor.py`)."""
    loss_sum, grads = micro_value_and_grad(params, batch, rng)
    if acc is None:
        return loss_sum, grads
    return acc[0] + loss_sum, jax.tree.map(jnp.add, acc[1], grads)


def require_batch_keys(batch: dict) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"data batch lacks {missing}; a batch needs {BATCH_KEYS}")


def micro_rng(step_rng, index, count: int):
    """The key of micro-batch `index` of `count` in a step whose key is `step_rng` (every execution path)."""
    return step_rng if count == 1 else jax.random.fold_in(step_rng, index)


def _micro_batch(batch: Batch, index, accum: int) -> Batch:
    def take(x):
        b = x.shape[0]
        return jax.lax.dynamic_index_in_dim(x.reshape(b // accum, accum, *x.shape[1:]), index, axis=1,
                                            keepdims=False)
    return {k: take(v) for k, v in batch.items()}


def make_train_step(
    micro_value_and_grad: MicroValueAndGrad,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    *,
    grad_accum: int = 1,
) -> Callable[[dict, Batch], tuple[dict, dict]]:
    """Build the (un-jitted) train step."""

    def step_fn(state: dict, batch: Batch) -> tuple[dict, dict]:
        params = state["params"]
        rng = jax.random.fold_in(state["rng"], state["step"])
        num_targets = jnp.sum(batch["loss_mask"].astype(jnp.float32))

        if grad_accum == 1:
            loss_sum, grads = accumulate_micro(micro_value_and_grad, params, batch, rng)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)

            def body(j, carry):
                return accumulate_micro(micro_value_and_grad, params, _micro_batch(batch, j, grad_accum),
                                        micro_rng(rng, j, grad_accum), carry)

            loss_sum, grads = jax.lax.fori_loop(0, grad_accum, body, (jnp.zeros((), jnp.float32), zeros))

        return apply_gradients(state, loss_sum, grads, num_targets, optimizer, schedule)

    return step_fn


def apply_gradients(state: dict, loss_sum, grads: Any, num_targets, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array]) -> tuple[dict, dict]:
    """Second half of every step (normal and balance mode): divide the accumulated loss/gradient SUMS by the
    global target count, one optimizer update, NaN/inf skip. -> (new state, metrics)."""
    params = state["params"]
    denom = jnp.maximum(num_targets, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    applied = state["step"] - state["nonfinite_total"]  # updates applied so far = the schedule's position
    new_state = {
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
        "nonfinite_run": jnp.where(finite, 0, state["nonfinite_run"] + 1).astype(jnp.int32),
        "nonfinite_total": (state["nonfinite_total"] + jnp.where(finite, 0, 1)).astype(jnp.int32),
    }
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(applied),
        "finite": finite,
        "num_targets": num_targets,
        "nonfinite_run": new_state["nonfinite_run"],
        "nonfinite_total": new_state["nonfinite_total"],
    }
    return new_state, metrics
