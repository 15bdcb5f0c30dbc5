"""Logical axis names -> mesh axes (MaxText-style rules, kept small).

Models name array dimensions logically (`models.param_logical_axes(config)` for parameters, and
`runtime.constrain(x, ("batch", "seq", "embed"))` for activations). Parameters are sharded FSDP-style over
`fsdp` and `context` (the embed dimension) and Megatron-style over `tensor` (heads, kv_heads, mlp, vocab); activations are
sharded batch over data+fsdp, sequence over context, heads/mlp over tensor. A mesh axis is dropped for a dimension it does
not divide (the dimension is replicated over that axis), and a mesh axis is used at most once per array.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

PARAM_RULES = {
    "vocab": ("tensor",),
    # ZeRO-3 over fsdp AND context: context ranks hold different tokens but the same weights, so replicating
    # params and Adam state over them wastes memory (8B at context=8 would not fit 80 GiB otherwise)
    "embed": ("fsdp", "context"),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
    "experts": (),
}
ACTIVATION_RULES = {
    "batch": ("data", "fsdp"),
    "seq": ("context",),
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "head_dim": (),
    "experts": (),
}


def logical_to_spec(logical_axes, shape, mesh, rules) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes` (names or None)."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match array rank {len(shape)} (shape {shape})")
    used, spec = set(), []
    for name, dim in zip(logical_axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        candidates = [a for a in (rules.get(name, ()) if name else ())
                      if a in mesh.axis_names and mesh.shape[a] > 1 and a not in used]
        chosen, size = [], 1
        for a in candidates:  # keep the axes whose running product divides the dimension; replicate over the rest
            if dim % (size * mesh.shape[a]) == 0:
                chosen.append(a)
                size *= mesh.shape[a]
        axes = tuple(chosen)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes if axes else None))
    return PartitionSpec(*spec)


def is_axes_leaf(x):
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(params, logical_axes_tree, mesh):
    """Pytree of NamedSharding for `params` (arrays or ShapeDtypeStructs) from the models' logical axes."""
    return jax.tree.map(lambda axes, p: NamedSharding(mesh, logical_to_spec(axes, p.shape, mesh, PARAM_RULES)),
                        logical_axes_tree, params, is_leaf=is_axes_leaf)


# Balance mode (ZeRO-3 over the whole device pool): one flattened axis over every non-tensor mesh axis, in mesh
# order, which is device order. Every view of the same device list as data=R/c x context=c then hands each device
# the same block of every parameter, so a micro-batch of any context degree c finds its shards where they are.
POOL_AXES = ("data", "fsdp", "context")


def pool_spec(logical_axes, shape, mesh) -> PartitionSpec:
    """Spec of a parameter split over the whole pool (`POOL_AXES` as one axis): on its `embed` dimension, or else
    its largest dimension, that the pool size divides; replicated when none does (tiny arrays, norms of odd
    sizes). All or nothing: a partial split would differ between views and move bytes when c changes."""
    if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1:
        raise ValueError(f"pool sharding spans data x fsdp x context; this mesh has tensor={mesh.shape['tensor']} "
                         f"(set mesh.tensor=1)")
    axes = tuple(a for a in POOL_AXES if a in mesh.axis_names)
    pool = math.prod(mesh.shape[a] for a in axes)
    fits = [i for i, dim in enumerate(shape) if dim % pool == 0]
    spec = [None] * len(shape)
    if pool > 1 and fits:
        embed = [i for i in fits if logical_axes[i] == "embed"]
        spec[embed[0] if embed else max(fits, key=lambda i: shape[i])] = axes
    return PartitionSpec(*spec)


def pool_param_shardings(params, logical_axes_tree, mesh):
    """`param_shardings` for balance mode: every parameter split over the whole device pool (`pool_spec`)."""
    return jax.tree.map(lambda axes, p: NamedSharding(mesh, pool_spec(axes, p.shape, mesh)),
                        logical_axes_tree, params, is_leaf=is_axes_leaf)


def shard_params(params, logical_axes_tree, mesh):
    """Place `params` on the mesh by the parameter rules."""
    return jax.device_put(params, param_shardings(params, logical_axes_tree, mesh))


def activation_spec(logical_axes, shape, mesh) -> PartitionSpec:
    return logical_to_spec(logical_axes, shape, mesh, ACTIVATION_RULES)


def batch_sharding(mesh, shape=None) -> NamedSharding:
    """Sharding of a [B, T] batch array: batch over data+fsdp, sequence over context."""
    spec = activation_spec(("batch", "seq"), shape, mesh) if shape is not None else PartitionSpec(
        tuple(a for a in ("data", "fsdp") if a in mesh.axis_names), "context")
    return NamedSharding(mesh, spec)


def constrain_activation(x, logical_axes, mesh):
    """`with_sharding_constraint` of an activation by logical names."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(logical_axes, x.shape, mesh)))
