"""The SeCO engine: a no-gradient forward over chunks that fills fixed-size caches, then a reverse `lax.scan` that
rebuilds one chunk's graph at a time with `jax.vjp` and sends cache cotangents back to earlier chunks.

Caches (what a later chunk needs of an earlier one, `models.forward_hidden(..., kv_prefix, return_kv)`):
- softmax layers: K and V of every token in ONE stacked buffer per name, `kv = {"k","v": [Ls, B, Tp, Hkv, D]}`
  (Ls softmax layers, Tp = padded length, model dtype). Chunk i sees the whole buffer with the segment ids of
  tokens >= i*C set to 0 (padding), so one compiled chunk function serves every chunk. The K/V cotangent
  accumulator (fp32 by default, `kv_grad_dtype`) has the same layout and collects what later chunks send back.
- lightning layers: the fp32 state `[B, H, Dk, Dv]` at the end of the previous chunk; the state entering each chunk
  is kept (k of them per layer, O(T/C)). A chunk's input-state cotangent is the previous chunk's output-state one.

Memory (the point of SeCO): the caches and the accumulator, O(T), plus one chunk's activations. A model with
softmax layers takes them as a `StackedCaches` (its architecture declares `ACCEPTS_STACKED_CACHES`: the Llama
family and the MiniMax hybrid): the stacked buffers go straight into the layer scan (no per-step copy), and the
accumulator rides along as `grad_sink`, so each layer's K/V cotangent is added into it in place: the reverse pass
holds cache (bf16) + accumulator (fp32) and no third O(T) array. Lightning states (hybrid) travel beside the stack
as its `side` caches, one per lightning layer; a model with no softmax layer gets them as a per-layer list.

Reverse pass for chunk i (from k-1 down to 0), with weight w_i (1 for SeCO, z_i/p for SpaCO):
    (loss_i, own_cache_i), vjp = jax.vjp(chunk_fn_i, params, prefix_i)
    d_params, d_prefix = vjp(w_i * (1, d_own_cache_i))       # skipped entirely (lax.cond) when w_i == 0
    grads += d_params;  kv_cotangent += d_prefix (softmax);  state_cotangent = d_prefix (lightning)
Never `jax.grad` of a checkpointed forward scan (which would keep every step's growing cache).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain import models
from longtrain.chunkwise.layout import ChunkedBatch
from longtrain.loss import lm_loss
from longtrain.models.layer_stack import StackedCaches, bit_storage_dtype, in_host_memory
from longtrain.models.registry import get_architecture

SOFTMAX, LIGHTNING = "softmax", "lightning"
KV = ("k", "v")


def to_device(x):
    """A slice of a host-memory buffer, moved to the device (a no-op for device arrays)."""
    return jax.device_put(x, jax.memory.Space.Device) if in_host_memory(x) else x


def cache_kinds(own_cache_shapes) -> list[str]:
    """Per layer, which kind of cache `forward_hidden(..., return_kv=True)` returns."""
    kinds = []
    for layer, entry in enumerate(own_cache_shapes):
        if "k" in entry and "v" in entry:
            kinds.append(SOFTMAX)
        elif "state" in entry:
            kinds.append(LIGHTNING)
        else:
            raise ValueError(f"layer {layer}: forward_hidden(return_kv=True) returned a cache with keys "
                             f"{sorted(entry)}; chunk-wise training knows softmax {{k, v, ...}} and lightning "
                             f"{{state}} caches")
    return kinds


class ChunkProgram:
    """One model + one chunked batch: the chunk function and the cache layout both passes share.

    Differentiable cache pytree `caches = {"kv": {"k","v": [Ls,B,Tp,Hkv,D]} or None, "states": [per lightning layer
    [B,H,Dk,Dv]]}`; a chunk's own cache has the same structure with C tokens instead of Tp.
    """

    def __init__(self, model_config, params, cb: ChunkedBatch, *, z_loss: float, kv_grad_dtype=None, runtime=None,
                 offload: bool = False):
        """`runtime`: what the model's attention runs on (None: one device; `context.ContextChunkRuntime` inside
        the context-parallel shard_map). `offload`: the K/V buffers and their cotangent accumulator live in host
        memory and stream to the device one layer slice at a time."""
        self.offload = offload
        self.config, self.cb, self.z_loss, self.runtime = model_config, cb, z_loss, None
        # the caches' shapes, from a local run without a prefix on whole parameters (the same on every runtime)
        whole = getattr(runtime, "gather_all_params", lambda p: p)
        own_shapes = jax.eval_shape(lambda p: self._run_chunk(whole(p), None, 0, with_loss=False)[1], params)
        self.runtime = runtime
        self.kinds = cache_kinds(own_shapes)
        self.softmax_layers = [l for l, kind in enumerate(self.kinds) if kind == SOFTMAX]
        self.lightning_layers = [l for l, kind in enumerate(self.kinds) if kind == LIGHTNING]
        self.kv_shapes = ({n: own_shapes[self.softmax_layers[0]][n] for n in KV} if self.softmax_layers else None)
        # K/V buffers of 2-byte floats hold raw uint16 words: XLA:CPU would otherwise convert the whole buffer to
        # f32 to take a dynamic slice of it (a hidden fp32 copy of the cache); free on GPU/TPU
        self.kv_dtype = self.kv_shapes["k"].dtype if self.softmax_layers else None
        self.kv_storage = (bit_storage_dtype(self.kv_dtype) or self.kv_dtype) if self.softmax_layers else None
        self.state_shapes = [own_shapes[l]["state"] for l in self.lightning_layers]
        # softmax K/V reach the model only as a StackedCaches (no per-layer copies of the cache)
        self.stacked = bool(self.softmax_layers)
        if self.stacked and not getattr(get_architecture(model_config.architecture), "ACCEPTS_STACKED_CACHES", False):
            raise NotImplementedError(f"chunk-wise training (SeCO/SpaCO) needs architecture "
                                      f"{model_config.architecture!r} to take layer_stack.StackedCaches as kv_prefix "
                                      f"(ACCEPTS_STACKED_CACHES); it does not")
        self.kv_grad_dtype = kv_grad_dtype

    # ----------------------------------------------------------------------------------- the chunk function
    def _run_chunk(self, params, prefix, i, with_loss=True):
        """(loss_sum_i / N or None, own cache list as the model returns it) of chunk i given `kv_prefix`. A runtime
        holding parameter shards gathers the ones outside the layer stacks here (embedding, final norm, head), the
        layers' as each layer runs, so their gradients come back reduce-scattered into the shards."""
        cb = self.cb
        gather_outer = getattr(self.runtime, "gather_outer_params", None)
        if gather_outer is not None:
            params = gather_outer(params)
        hidden, own = models.forward_hidden(
            self.config, params, cb.slice("tokens", i), positions=cb.slice("positions", i),
            segment_ids=cb.slice("segment_ids", i), token_index=cb.slice("token_index", i), kv_prefix=prefix,
            return_kv=True, runtime=self.runtime)
        if not with_loss:
            return None, own
        loss = lm_loss(hidden, models.lm_head_weight(self.config, params), cb.slice("targets", i),
                       cb.slice("loss_mask", i), num_targets=cb.num_targets, z_loss=self.z_loss)
        return loss, own

    def _prefix(self, kv, states, i, grad_sink=None):
        """The model's kv_prefix for chunk i: a StackedCaches over the stored K/V buffers with the lightning states
        as its side caches, or (no softmax layer) the list of lightning states. The states are differentiable."""
        cb = self.cb
        last_seg = cb.last_prefix_segment_id(i) if self.lightning_layers else None
        side = [{"state": s, "last_segment_id": last_seg} for s in states]  # lightning layers, in layer order
        if not self.stacked:
            return side
        dtype = None if self.kv_storage == self.kv_dtype else self.kv_dtype
        shared = {"segment_ids": cb.prefix_segment_ids(i), "token_index": cb.token_index}
        return StackedCaches(kv, shared, grad_sink, dtype=dtype, side=side, fetch=to_device if self.offload else None)

    def _own(self, own):
        """The model's per-layer own caches -> {"kv": stacked [Ls,B,C,..] or None, "states": [...]}."""
        kv = ({n: jnp.stack([own[l][n] for l in self.softmax_layers]) for n in KV} if self.softmax_layers else None)
        return {"kv": kv, "states": [own[l]["state"] for l in self.lightning_layers]}

    def chunk_fn(self, params, kv, states, i, with_loss=True):
        """(loss_i, own cache {"kv", "states"}) of chunk i given the stored K/V buffers `kv` (or None),
        differentiable in params and states (the K/V cotangent goes through `chunk_fn_sink`)."""
        loss, own = self._run_chunk(params, self._prefix(kv, states, i), i, with_loss)
        return loss, self._own(own)

    def chunk_fn_sink(self, params, kv, sink, states, i):
        """Stacked layout: (loss_i, own cache, carried sink). `kv` is read without gradient; the cotangent of the
        returned sink, seeded with the accumulator, comes back as accumulator + this chunk's K/V cotangent."""
        prefix = self._prefix(jax.lax.stop_gradient(kv), states, i, grad_sink=sink)
        loss, own = self._run_chunk(params, prefix, i)
        if prefix.grad_sink_out is None:
            raise RuntimeError(f"architecture {self.config.architecture!r} declares ACCEPTS_STACKED_CACHES but did "
                               f"not run its layers through layer_stack.run_layers with the StackedCaches prefix")
        return loss, self._own(own), prefix.grad_sink_out

    # -------------------------------------------------------------------------------------- cache buffers
    def to_storage(self, x):
        """K/V values -> the buffers' storage dtype (raw words for 2-byte floats, see __init__), in the buffers'
        memory (host when offloading)."""
        x = x if self.kv_storage == self.kv_dtype else jax.lax.bitcast_convert_type(x, self.kv_storage)
        return self.placed(x)

    def placed(self, x):
        """An O(T) buffer where it lives: host memory when offloading, else as is."""
        return jax.device_put(x, jax.memory.Space.Host) if self.offload else x

    def empty_caches(self):
        """Zero caches entering chunk 0: softmax [Ls,B,Tp,Hkv,D] buffers (storage dtype), lightning zero states."""
        kv = None
        if self.softmax_layers:
            Ls, Tp = len(self.softmax_layers), self.cb.padded_len
            kv = {n: self.placed(jnp.zeros((Ls, s.shape[0], Tp, *s.shape[2:]), self.kv_storage))
                  for n, s in self.kv_shapes.items()}
        return {"kv": kv, "states": [jnp.zeros(s.shape, s.dtype) for s in self.state_shapes]}

    def kv_grad_dtype_of(self, dtype):
        return self.kv_grad_dtype or jnp.promote_types(dtype, jnp.float32)


def forward_fill(prog: ChunkProgram, params, *, with_loss: bool):
    """Pass 1 (no gradient): run chunks in order. Returns (softmax K/V buffers {"k","v": [Ls,B,Tp,Hkv,D]} filled
    for all chunks or None, per lightning layer the state entering each chunk [k, ...], total loss or None)."""
    cb = prog.cb
    params = jax.lax.stop_gradient(params)

    def step(caches, i):
        kv, states = caches["kv"], caches["states"]
        loss, own = prog.chunk_fn(params, kv, states, i, with_loss)
        if kv is not None:  # write this chunk's K/V at its offset (in place: the buffer is the loop carry)
            kv = {n: jax.lax.dynamic_update_slice_in_dim(kv[n], prog.to_storage(own["kv"][n]), i * cb.chunk, axis=2)
                  for n in KV}
        return {"kv": kv, "states": own["states"]}, (states, jnp.zeros(()) if loss is None else loss)

    caches, (entering, losses) = jax.lax.scan(step, prog.empty_caches(), jnp.arange(cb.num_chunks))
    return caches["kv"], entering, (jnp.sum(losses) if with_loss else None)


def reverse_accumulate(prog: ChunkProgram, params, kv, entering, chunk_weights, grad_shardings=None):
    """Pass 2: reverse scan over chunks. `chunk_weights` [k] (None = all 1, no skipping). Returns (sum of the
    recomputed chunk losses, parameter gradients). `grad_shardings`: optional pytree like params of shardings
    for the gradient accumulator (pass the parameter shardings under FSDP so it stays sharded)."""

    def constrain(grads):
        if grad_shardings is None:
            return grads
        return jax.tree.map(jax.lax.with_sharding_constraint, grads, grad_shardings)

    cb = prog.cb
    params = jax.lax.stop_gradient(params)
    kv = jax.lax.stop_gradient(kv)

    def own_kv_cotangent(kv_ct, i, w):
        """This chunk's own K/V slice of the accumulated cotangent, scaled by w, in the K/V dtype."""
        if kv_ct is None:
            return None
        return {n: (w * to_device(jax.lax.dynamic_slice_in_dim(kv_ct[n], i * cb.chunk, cb.chunk, axis=2))
                    ).astype(prog.kv_dtype) for n in KV}

    def local_grads(kv_ct, state_cts, i, w):
        """(loss_i, d_params, new K/V accumulator, state cotangents entering chunk i) of chunk i, weight w."""
        states = [jax.lax.stop_gradient(e[i]) for e in entering]
        own_ct = {"kv": own_kv_cotangent(kv_ct, i, w), "states": [(w * c).astype(c.dtype) for c in state_cts]}
        if prog.stacked:  # the sink's primal value is unused; passing the accumulator itself costs no buffer
            (loss, _, _), vjp = jax.vjp(lambda p, sink, s: prog.chunk_fn_sink(p, kv, sink, s, i),
                                        params, kv_ct, states)
            d_params, new_kv_ct, d_states = vjp(((w * jnp.ones_like(loss)).astype(loss.dtype), own_ct, kv_ct))
        else:  # lightning layers only: no K/V
            (loss, _), vjp = jax.vjp(lambda p, s: prog.chunk_fn(p, None, s, i), params, states)
            d_params, d_states = vjp(((w * jnp.ones_like(loss)).astype(loss.dtype), own_ct))
            new_kv_ct = None
        # the state entering chunk i is the state leaving chunk i-1
        return loss, d_params, new_kv_ct, [d.astype(c.dtype) for d, c in zip(d_states, state_cts)]

    def skipped(kv_ct, state_cts, i, w):
        """A dropped SpaCO chunk: no compute; no gradient passes through it (K/V cotangents of earlier chunks
        are unchanged, the state path through it is cut)."""
        loss, d_params = jax.eval_shape(lambda: local_grads(kv_ct, state_cts, i, w)[:2])
        zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
        return zeros(loss), jax.tree.map(zeros, d_params), kv_ct, [jnp.zeros_like(c) for c in state_cts]

    def step(carry, i):
        grads, kv_ct, state_cts = carry
        if chunk_weights is None:
            loss, d_params, kv_ct, state_cts = local_grads(kv_ct, state_cts, i, 1.0)
        else:
            w = chunk_weights[i]
            loss, d_params, kv_ct, state_cts = jax.lax.cond(w != 0, local_grads, skipped, kv_ct, state_cts, i, w)
        grads = constrain(jax.tree.map(lambda g, d: g + d.astype(g.dtype), grads, d_params))
        return (grads, kv_ct, state_cts), loss

    empty = prog.empty_caches()
    kv_ct = (None if empty["kv"] is None
             else {n: prog.placed(jnp.zeros(empty["kv"][n].shape, prog.kv_grad_dtype_of(prog.kv_dtype))) for n in KV})
    state_cts = [jnp.zeros_like(s) for s in empty["states"]]
    # gradients accumulate over chunks in fp32 at least (bf16 params would lose ~sqrt(k) ulps), cast back at the end
    acc_zeros = lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32))  # noqa: E731
    init = (constrain(jax.tree.map(acc_zeros, params)), kv_ct, state_cts)
    (grads, _, _), losses = jax.lax.scan(step, init, jnp.arange(cb.num_chunks), reverse=True)
    return jnp.sum(losses), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
