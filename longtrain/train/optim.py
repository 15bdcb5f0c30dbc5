"""AdamW with warmup + cosine/linear/constant decay, global-norm clipping and a weight-decay mask.

The learning-rate schedule is indexed by the number of *applied* updates (optax's own counter), so a step skipped
for NaN/inf gradients does not advance it; `trainer` reports `schedule(step - skipped_total)` accordingly.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from longtrain.config import OptimConfig

# Logical axis names that stack copies of a parameter (scan over layers, experts) rather than being part of
# one matrix: a norm scale stacked over layers is still a vector and must not be decayed.
_STACKING_AXES = ("layers", "experts")


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup from 0 to `optim.learning_rate` over `warmup_steps`, then decay to `min_lr_ratio * lr` at
    `total_steps` (cosine or linear), or constant."""
    peak = optim.learning_rate
    floor = peak * optim.min_lr_ratio
    warmup = optim.warmup_steps
    decay_steps = max(total_steps - warmup, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum((count + 1.0) / max(warmup, 1), 1.0) if warmup > 0 else jnp.float32(peak)
        progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        if optim.schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif optim.schedule == "linear":
            decayed = peak + (floor - peak) * progress
        else:  # constant
            decayed = jnp.float32(peak)
        return jnp.where(count < warmup, warm, decayed)

    return schedule


def _is_matrix(logical_axes: tuple | None, ndim: int) -> bool:
    if logical_axes is None:
        return ndim >= 2
    core = [a for a in logical_axes if a not in _STACKING_AXES]
    return len(core) >= 2


def weight_decay_mask(params: Any, logical_axes: Any | None = None) -> Any:
    """True for leaves that get weight decay: weight matrices and embeddings. Norm scales and biases (vectors,
    possibly stacked over `layers`/`experts`) get none. With `logical_axes` (from `models.param_logical_axes`) the
    stacking axes are recognised by name; without it, any leaf with ndim >= 2 is decayed."""
    if logical_axes is None:
        return jax.tree.map(lambda p: _is_matrix(None, jnp.ndim(p)), params)
    return jax.tree.map(
        lambda p, axes: _is_matrix(tuple(axes), jnp.ndim(p)),
        params, logical_axes, is_leaf=lambda x: isinstance(x, tuple),
    )


def make_optimizer(optim: OptimConfig, total_steps: int, params: Any, logical_axes: Any | None = None):
    """-> (optax.GradientTransformation, schedule). `params` may be abstract (ShapeDtypeStruct leaves)."""
    schedule = learning_rate_schedule(optim, total_steps)
    mask = weight_decay_mask(params, logical_axes)
    parts = []
    if optim.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
            weight_decay=optim.weight_decay, mask=mask,
        )
    )
    return optax.chain(*parts), schedule
