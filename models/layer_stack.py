"""A stack of identical layers: built once with every parameter stacked on a leading `layers` axis (`stack_layers`,
an `nnx.vmap` over the layer's constructor), run unrolled or with `lax.scan` (`scan_layers`) under a `remat`
policy. A layer function sees one layer as a module again: `nnx.merge(graphdef, state_l)` of its slice.

Layer params are always stored stacked (leading `layers` axis of length L), whichever way they run, so checkpoints
do not depend on `scan_layers`. Per-layer chunk caches (SeCO `kv_prefix` / `return_kv`) are Python lists indexed by
layer at the API; inside a scan they travel stacked. A `StackedCaches` prefix is already stacked (no copy into the
scan) and can route its cotangent into a caller-owned accumulator in place (`grad_sink`, see its docstring).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longtrain.models import attention_site
from longtrain.models.attention import ATTENTION_OUTPUT

REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_output")


def stack_layers(make_layer, count: int, key=None) -> nnx.Module:
    """`count` layers made by `make_layer(key_l)` (layer l gets `jax.random.split(key, count)[l]`; None when `key`
    is None, for layers without random parameters), as ONE module whose parameters are stacked on a leading axis
    named `layers` in their metadata."""
    keys = jnp.arange(count) if key is None else jax.random.split(key, count)

    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(key_l):
        return make_layer(None if key is None else key_l)

    return make(keys)


def layer_function(stack: nnx.Module, apply, runtime=None):
    """(state [L, ...], `fn(x, state_l, prefix_l) -> (x, kv_l)`) of a stack: `fn` merges layer l's slice of the
    state into a module and returns `apply(layer_module, x, prefix_l)`. Pure, so `run_layers` can scan and remat
    it. The runtime may gather a sharded slice first (`attention_site.gather_layer`)."""
    graphdef, state = nnx.split(stack)

    def fn(x, state_l, prefix_l):
        return apply(nnx.merge(graphdef, attention_site.gather_layer(runtime, state_l)), x, prefix_l)

    return state, fn


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


class StackedCaches:
    """A chunk-wise (SeCO) `kv_prefix` whose per-layer caches are already stacked on a leading layer axis.

    `stacked`: dict of [L, ...] arrays (layer l sees `a[l]`, e.g. k/v [L,B,S,Hkv,D]); `shared`: dict of arrays every
    layer sees unchanged (e.g. segment_ids/token_index [B,S]). Layer l's prefix is `{**shared, **stacked[l]}`.
    A list of per-layer dicts would be stacked into a second O(L*S) copy inside `run_layers`; this is not.

    `grad_sink` (optional, dict like `stacked`, any float dtype, e.g. an fp32 accumulator): the cotangent of
    `stacked` is ADDED into it, one layer slice at a time, instead of being returned as a new [L, ...] array. The
    sink rides along as a loop carry (its value is unused by the forward); after `run_layers`, `grad_sink_out`
    holds the carried sink. Differentiate a function that returns `grad_sink_out` and seed its cotangent with the
    running accumulator: the cotangent of `grad_sink` is then accumulator + d(stacked), updated in place. The
    cotangent of `stacked` itself is zero (pass it through `stop_gradient`).

    `dtype` (optional): the `stacked` leaves hold raw bits (an unsigned int type of the same width, see
    `bit_storage_dtype`) and each layer slice is reinterpreted as `dtype`. Why: XLA:CPU has no bf16/f16
    dynamic-slice, so slicing a bf16 [L, ...] stack converts the WHOLE stack to f32 (and hoists that copy out of the
    loop); integer words slice natively. On GPU/TPU the bitcast is free.

    `side` (optional, hybrid models): the caches of the layers that are NOT in the stack, one dict per such layer in
    layer order (e.g. the lightning states of MiniMax, whose softmax layers are the stack, also in layer order).
    They are ordinary differentiable arrays (small, O(layers)); `run_layers` takes no side caches.
    """

    def __init__(self, stacked: dict, shared: dict, grad_sink: dict | None = None, dtype=None,
                 side: list | None = None, fetch=None):
        """`fetch` (optional): applied to each layer slice before use, e.g. a move from host memory to the device
        when the stack lives in host memory (chunk-wise offload)."""
        self.stacked, self.shared, self.grad_sink, self.dtype = stacked, shared, grad_sink, dtype
        self.side, self.fetch = side, fetch
        self.grad_sink_out = None
        if grad_sink is not None and set(grad_sink) != set(stacked):
            raise ValueError(f"grad_sink keys {sorted(grad_sink)} must equal the stacked cache keys {sorted(stacked)}")

    def __len__(self) -> int:
        return num_stacked(self.stacked)

    def read(self, stacked_l: dict) -> dict:
        """One layer's slice of `stacked` as arrays of the cache dtype (on the device)."""
        if self.fetch is not None:
            stacked_l = {name: self.fetch(a) for name, a in stacked_l.items()}
        if self.dtype is None:
            return stacked_l
        return {name: jax.lax.bitcast_convert_type(a, self.dtype) for name, a in stacked_l.items()}

    def layer(self, stacked_l: dict) -> dict:
        return {**self.shared, **stacked_l}


def bit_storage_dtype(dtype):
    """The unsigned int type holding a 2-byte float's bits (bf16/f16 -> uint16), or None for other dtypes (XLA:CPU
    slices f32/f64 natively, no reinterpretation needed)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
        return jnp.dtype(jnp.uint16)
    return None


def in_host_memory(x) -> bool:
    """Whether a traced array lives in host memory (`jax.memory.Space.Host`)."""
    return getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host


def _add_into_layer(sink, l, g):
    """sink with g added to its layer-l slice: one in-place scatter-add (XLA:CPU does not fuse a dynamic-slice +
    add + dynamic-update-slice, and would write out an fp32 copy of the layer slice). A sink in host memory (chunk-
    wise offload) streams the slice: read it to the device, add, write it back (the same additions, bitwise)."""
    if in_host_memory(sink):
        layer = jax.device_put(jax.lax.dynamic_index_in_dim(sink, l, keepdims=False), jax.memory.Space.Device)
        layer = layer + g.astype(sink.dtype)
        return jax.lax.dynamic_update_index_in_dim(sink, jax.device_put(layer, jax.memory.Space.Host), l, 0)
    return sink.at[l].add(g.astype(sink.dtype), mode="promise_in_bounds")


@jax.custom_vjp
def sink_read(sink: dict, stacked_l: dict, l):
    """(stacked_l, sink) unchanged; backward adds the cotangent of stacked_l into layer l of the sink's cotangent."""
    return stacked_l, sink


def _sink_read_fwd(sink, stacked_l, l):
    return (stacked_l, sink), l


def _sink_read_bwd(l, cotangents):
    g_stacked_l, g_sink = cotangents
    g_sink = {name: _add_into_layer(g_sink[name], l, g_stacked_l[name]) for name in g_sink}
    return g_sink, None, None


sink_read.defvjp(_sink_read_fwd, _sink_read_bwd)


def stacked_layer_fn(layer_fn, prefix: StackedCaches, remat_policy: str, pick: int | None = None):
    """The remat'ed `one_layer(x, sink, layer_params, stored, l) -> (x, sink, kv)` of a stacked-prefix layer loop.

    `layer_fn(x, layer_params, prefix_l) -> (x, kv_l)` (not remat'ed); `stored`: this layer's slice of
    `prefix.stacked` (storage dtype) or, with `pick` (a static int), a group [n, ...] of slices of which this layer
    reads slice `pick`; `l`: the layer's index in the stack (where its cotangent lands in the sink); `sink`: the
    carried `grad_sink` or None. The pick, the read and the sink hook sit INSIDE the remat: the saved residual is
    then the stored array passed in (a forwarded scan input, never re-stacked) and the sink value is not saved.
    """
    def one_layer(x, sink, layer_params, stored, l):
        stacked_l = prefix.read(stored if pick is None else layer_slice(stored, pick))
        if sink is not None:
            stacked_l, sink = sink_read(sink, stacked_l, l)
        x, kv = layer_fn(x, layer_params, prefix.layer(stacked_l))
        return x, sink, kv

    return remat(one_layer, remat_policy)


def _run_stacked_prefix(layer_fn, remat_policy, stacked_params, x, prefix: StackedCaches, *, scan: bool,
                        return_kv: bool):
    """`run_layers` for a `StackedCaches` prefix; sets `prefix.grad_sink_out`."""
    L = num_stacked(stacked_params)
    if len(prefix) != L:
        raise ValueError(f"kv_prefix stacks {len(prefix)} layers; the model has {L} layers (one cache per layer)")
    if prefix.side:
        raise ValueError(f"kv_prefix has {len(prefix.side)} side caches; every layer of this model is in the stack")
    one_layer = stacked_layer_fn(layer_fn, prefix, remat_policy)
    sink = prefix.grad_sink
    if not scan:
        kvs = []
        for l in range(L):
            x, sink, kv = one_layer(x, sink, layer_slice(stacked_params, l), layer_slice(prefix.stacked, l), l)
            kvs.append(kv)
        prefix.grad_sink_out = sink
        return x, (kvs if return_kv else None)

    def body(carry, xs):
        x, sink = carry
        layer_params, stored_l, l = xs
        x, sink, kv = one_layer(x, sink, layer_params, stored_l, l)
        return (x, sink), (kv if return_kv else None)

    (x, sink), kv_stacked = jax.lax.scan(body, (x, sink), (stacked_params, prefix.stacked, jnp.arange(L)))
    prefix.grad_sink_out = sink
    if not return_kv:
        return x, None
    return x, [layer_slice(kv_stacked, i) for i in range(L)]


def run_layers(layer_fn, stacked_params, x, *, scan: bool, remat_policy: str, kv_prefix=None, return_kv=False):
    """Apply `layer_fn(x, layer_params, prefix_l) -> (x, kv_l)` for every layer.

    `kv_prefix`: None, a list with one cache per layer, or a `StackedCaches`; returns `(x, kv_list or None)`.
    """
    L = num_stacked(stacked_params)
    if isinstance(kv_prefix, StackedCaches):
        return _run_stacked_prefix(layer_fn, remat_policy, stacked_params, x, kv_prefix, scan=scan,
                                   return_kv=return_kv)
    fn = remat(layer_fn, remat_policy)
    if kv_prefix is not None and len(kv_prefix) != L:
        raise ValueError(f"kv_prefix has {len(kv_prefix)} entries; the model has {L} layers (one cache per layer)")
    if not scan:
        kvs = []
        for i in range(L):
            with jax.named_scope(f"layer_{i}"):  # op names say which layer (`plan --explain`, profiles)
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
