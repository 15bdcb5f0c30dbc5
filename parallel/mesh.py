"""Device mesh over the axes (data, fsdp, context, tensor).

`make_mesh(data=, fsdp=, context=, tensor=, devices=None)`: any size may be 1; one size may be -1 to take the
remaining devices. `devices` defaults to `jax.devices()`, which under `jax.distributed` lists every process's
devices (ordered by process), so one call builds the global mesh on every process. The device grid keeps
`context` and `tensor` innermost so their collectives stay on the fastest links (within a host when they fit).
Axis types are Auto so model code can use `with_sharding_constraint` and the strategies' `shard_map`.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "context", "tensor")


def resolve_axis_sizes(sizes: dict, num_devices: int, key_prefix: str = "") -> dict:
    """Fill a single -1 so the product equals num_devices; raise naming the axis when sizes do not fit.

    `key_prefix` names the axes in messages (the config loader passes "mesh." so errors name its keys)."""
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {key_prefix}{name}={size!r} must be a positive int or -1 (fill)")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1 (fill); got {', '.join(key_prefix + n for n in fill)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"{key_prefix}{fill[0]}=-1 cannot fill {num_devices} devices: the other axes multiply "
                             f"to {fixed}, which does not divide {num_devices}")
        sizes = {**sizes, fill[0]: num_devices // fixed}
    elif fixed != num_devices:
        shape = " x ".join(f"{n}={s}" for n, s in sizes.items())
        raise ValueError(f"mesh product must equal the device count: {shape} would use {fixed} devices but "
                         f"{num_devices} devices are visible; set one axis to -1 or change the sizes")
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, context: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp', 'context', 'tensor')."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes({"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # multi-process: keep each process's devices contiguous (jax.devices() is already process-major)
    grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_config, devices=None) -> Mesh:
    """`make_mesh` from a `longtrain.config.MeshConfig` (or any object with data/fsdp/context/tensor)."""
    return make_mesh(data=mesh_config.data, fsdp=mesh_config.fsdp, context=mesh_config.context,
                     tensor=mesh_config.tensor, devices=devices)
