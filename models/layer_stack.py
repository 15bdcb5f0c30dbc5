"""Running a stack of identical layers: unrolled or `lax.scan` (`scan_layers`), with a `remat` policy.

Layer params are always stored stacked (leading `layers` axis of length L), whichever way they run, so checkpoints
do not depend on `scan_layers`. Per-layer chunk caches (SeCO `kv_prefix` / `return_kv`) are Python lists indexed by
layer at the API; inside a scan they travel stacked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain.models.attention import ATTENTION_OUTPUT

REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_output")


def remat(fn, policy: str):
    """Wrap a layer function with the configured rematerialisation policy."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    if policy == "save_dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots)
    if policy == "save_attention_output":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(ATTENTION_OUTPUT))
    raise ValueError(f"model.remat={policy!r} is not a remat policy; expected one of {REMAT_POLICIES}")


def layer_slice(stacked, i):
    return jax.tree.map(lambda a: a[i], stacked)


def num_stacked(stacked) -> int:
    return jax.tree.leaves(stacked)[0].shape[0]


def run_layers(layer_fn, stacked_params, x, *, scan: bool, remat_policy: str, kv_prefix=None, return_kv=False):
    """Apply `layer_fn(x, layer_params, prefix_l) -> (x, kv_l)` for every layer.

    `kv_prefix`: None or a list with one cache per layer; returns `(x, kv_list or None)`.
    """
    L = num_stacked(stacked_params)
    if kv_prefix is not None and len(kv_prefix) != L:
        raise ValueError(f"kv_prefix has {len(kv_prefix)} entries; the model has {L} layers (one cache per layer)")
    fn = remat(layer_fn, remat_policy)
    if not scan:
        kvs = []
        for i in range(L):
            x, kv = fn(x, layer_slice(stacked_params, i), None if kv_prefix is None else kv_prefix[i])
            kvs.append(kv)
        return x, (kvs if return_kv else None)

    prefix_stacked = None if kv_prefix is None else jax.tree.map(lambda *a: jnp.stack(a), *kv_prefix)

    def body(carry, xs):
        layer_params, prefix_l = xs
        carry, kv = fn(carry, layer_params, prefix_l)
        return carry, (kv if return_kv else None)

    x, kv_stacked = jax.lax.scan(body, x, (stacked_params, prefix_stacked))
    if not return_kv:
        return x, None
    return x, [layer_slice(kv_stacked, i) for i in range(L)]
