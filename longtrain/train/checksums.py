"""Checksums of sharded arrays and of JSON items, for checkpoints that verify themselves.

An array's checksum is computed on the devices, where the array lives: its bits as uint32 words, summed twice
modulo 2^32, once plainly and once weighted by an odd number that depends on the word's position. Modular sums do
not depend on the order of the reduction, so the checksum is the same whatever the mesh, sharding or process
count (a checkpoint written on 8 devices verifies on 4), and no array is ever gathered to one host. One flipped
bit or byte always changes the weighted sum (an odd weight times a nonzero difference below 2^32 is nonzero mod
2^32); a moved block of words changes it too. It is a fingerprint against disk and transfer corruption, not a
cryptographic hash.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp

_GOLDEN = 0x9E3779B1  # odd multipliers from Knuth's multiplicative hashing: nearby positions get distant weights
_PRIME = 0x85EBCA77


def _words_u32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (shape of x, plus a trailing 2 for 64-bit dtypes)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise TypeError(f"checksum: unsupported dtype {x.dtype}")


def _position_weights(shape: tuple[int, ...]) -> jax.Array:
    """An odd uint32 weight per element from its row-major position, built from per-axis iotas (no reshape, so a
    sharded array keeps its sharding)."""
    position = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return (position * jnp.uint32(_GOLDEN) + jnp.uint32(_PRIME)) | jnp.uint32(1)


def _array_checksum(x: jax.Array) -> jax.Array:
    words = _words_u32(x)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * _position_weights(words.shape), dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda leaves: [_array_checksum(x) for x in leaves])


def tree_checksums(tree: Any) -> dict[str, str]:
    """{"path/to/leaf": "xxxxxxxx-xxxxxxxx"} for every array leaf of `tree` (computed where the arrays live; the
    result is identical for any sharding of the same values)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    groups: dict = {}  # one program per set of devices (a jit's arguments must share them); usually one in all
    for path, x in leaves:
        devices = frozenset(x.sharding.device_set) if hasattr(x, "sharding") else None
        groups.setdefault(devices, []).append((path, x))
    out = {}
    for group in groups.values():
        sums = jax.device_get(_checksums_jit([x for _, x in group]))
        out.update({path_name(path): f"{int(s[0]):08x}-{int(s[1]):08x}" for (path, _), s in zip(group, sums)})
    return out


def path_name(path) -> str:
    """A pytree key path as 'params/layers/attn/q_proj/kernel' (what a user recognises, and what we print)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def json_checksum(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys), so a re-read equal value has the same checksum."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def mismatches(saved: dict[str, str], found: dict[str, str]) -> list[str]:
    """Names of leaves whose checksum differs or that exist on one side only, in a stable order."""
    return sorted(k for k in set(saved) | set(found) if saved.get(k) != found.get(k))

