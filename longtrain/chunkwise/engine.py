"""The SeCO engine: a no-gradient forward over chunks that fills fixed-size caches, then a reverse `lax.scan` that
rebuilds one chunk's graph at a time with `jax.vjp` and sends cache cotangents back to earlier chunks.

Per-layer caches (what a later chunk needs of an earlier one, `models.forward_hidden(..., kv_prefix, return_kv)`):
- softmax layer: K and V of every token, kept in fixed-size buffers `[B, Tp, Hkv, D]` (Tp = padded length). Chunk i
  sees the whole buffer with the segment ids of tokens >= i*C set to 0 (padding), so one compiled chunk function
  serves every chunk. Its K/V cotangent buffer (fp32, same shape) collects what later chunks send back.
- lightning layer: the fp32 state `[B, H, Dk, Dv]` at the end of the previous chunk; the state entering each chunk
  is kept (k of them, O(1) in T). A chunk's input-state cotangent is the previous chunk's output-state cotangent.

Reverse pass for chunk i (from k-1 down to 0), with weight w_i (1 for SeCO, z_i/p for SpaCO):
    (loss_i, own_cache_i), vjp = jax.vjp(chunk_fn_i, params, prefix_cache_i)
    d_params, d_prefix = vjp(w_i * (1, d_own_cache_i))       # skipped entirely (lax.cond) when w_i == 0
    grads += d_params;  kv_cotangent += d_prefix (softmax);  state_cotangent = d_prefix (lightning)
Memory: the caches and their cotangents, O(T), plus one chunk's activations; never `jax.grad` of a checkpointed
forward scan (which would keep every step's growing cache).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain import models
from longtrain.chunkwise.layout import ChunkedBatch
from longtrain.loss import lm_loss

SOFTMAX, LIGHTNING = "softmax", "lightning"


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
    """One model + one chunked batch: the chunk function and the cache layout both passes share."""

    def __init__(self, model_config, params, cb: ChunkedBatch, *, z_loss: float, kv_grad_dtype=None):
        self.config, self.cb, self.z_loss = model_config, cb, z_loss
        own_shapes = jax.eval_shape(lambda p: self._run_chunk(p, None, 0)[1], params)
        self.kinds = cache_kinds(own_shapes)
        self.own_shapes = own_shapes
        self.kv_grad_dtype = kv_grad_dtype

    # ----------------------------------------------------------------------------------- the chunk function
    def _run_chunk(self, params, prefix, i, with_loss=True):
        """(loss_sum_i / N, own cache list) of chunk i given the `prefix` list (None: no earlier chunks)."""
        cb = self.cb
        hidden, own = models.forward_hidden(
            self.config, params, cb.slice("tokens", i), positions=cb.slice("positions", i),
            segment_ids=cb.slice("segment_ids", i), token_index=cb.slice("token_index", i), kv_prefix=prefix,
            return_kv=True)
        if not with_loss:
            return None, own
        loss = lm_loss(hidden, models.lm_head_weight(self.config, params), cb.slice("targets", i),
                       cb.slice("loss_mask", i), num_targets=cb.num_targets, z_loss=self.z_loss)
        return loss, own

    def _prefix(self, caches, i):
        """The kv_prefix list for chunk i from the differentiable `caches` (buffers / incoming states)."""
        cb, prefix = self.cb, []
        seg = cb.prefix_segment_ids(i)
        last_seg = cb.last_prefix_segment_id(i)
        for kind, cache in zip(self.kinds, caches):
            if kind == SOFTMAX:
                prefix.append({"k": cache["k"], "v": cache["v"], "segment_ids": seg, "token_index": cb.token_index})
            else:
                prefix.append({"state": cache["state"], "last_segment_id": last_seg})
        return prefix

    def chunk_fn(self, params, caches, i, with_loss=True):
        """(loss_i, own differentiable cache list: {"k","v"} [B,C,..] or {"state"}) of chunk i."""
        loss, own = self._run_chunk(params, self._prefix(caches, i), i, with_loss)
        return loss, [{"k": o["k"], "v": o["v"]} if kind == SOFTMAX else {"state": o["state"]}
                      for kind, o in zip(self.kinds, own)]

    # -------------------------------------------------------------------------------------- cache buffers
    def empty_caches(self):
        """Zero caches entering chunk 0: softmax [B,Tp,Hkv,D] buffers, lightning zero states."""
        Tp, caches = self.cb.padded_len, []
        for kind, s in zip(self.kinds, self.own_shapes):
            if kind == SOFTMAX:
                caches.append({n: jnp.zeros((s[n].shape[0], Tp, *s[n].shape[2:]), s[n].dtype) for n in ("k", "v")})
            else:
                caches.append({"state": jnp.zeros(s["state"].shape, s["state"].dtype)})
        return caches

    def kv_grad_dtype_of(self, dtype):
        return self.kv_grad_dtype or jnp.promote_types(dtype, jnp.float32)


def forward_fill(prog: ChunkProgram, params, *, with_loss: bool):
    """Pass 1 (no gradient): run chunks in order. Returns (softmax buffers filled for all chunks, per lightning
    layer the state entering each chunk [k, ...], total loss or None)."""
    cb = prog.cb
    params = jax.lax.stop_gradient(params)

    def step(caches, i):
        loss, own = prog.chunk_fn(params, caches, i, with_loss)
        entering = [c["state"] for kind, c in zip(prog.kinds, caches) if kind == LIGHTNING]
        new = []
        for kind, cache, o in zip(prog.kinds, caches, own):
            if kind == SOFTMAX:
                new.append({n: jax.lax.dynamic_update_slice_in_dim(cache[n], o[n], i * cb.chunk, axis=1)
                            for n in ("k", "v")})
            else:
                new.append({"state": o["state"]})
        return new, (entering, jnp.zeros(()) if loss is None else loss)

    caches, (entering, losses) = jax.lax.scan(step, prog.empty_caches(), jnp.arange(cb.num_chunks))
    buffers = [c if kind == SOFTMAX else None for kind, c in zip(prog.kinds, caches)]
    return buffers, entering, (jnp.sum(losses) if with_loss else None)


def reverse_accumulate(prog: ChunkProgram, params, buffers, entering, chunk_weights, grad_shardings=None):
    """Pass 2: reverse scan over chunks. `chunk_weights` [k] (None = all 1, no skipping). Returns (sum of the
    recomputed chunk losses, parameter gradients). `grad_shardings`: optional pytree like params of shardings
    for the gradient accumulator (pass the parameter shardings under FSDP so it stays sharded)."""

    def constrain(grads):
        if grad_shardings is None:
            return grads
        return jax.tree.map(jax.lax.with_sharding_constraint, grads, grad_shardings)

    cb, kinds = prog.cb, prog.kinds
    params = jax.lax.stop_gradient(params)
    buffers = jax.lax.stop_gradient(buffers)

    def caches_for(i):
        caches, li = [], 0
        for kind, buf in zip(kinds, buffers):
            if kind == SOFTMAX:
                caches.append(buf)
            else:
                caches.append({"state": jax.lax.stop_gradient(entering[li][i])})
                li += 1
        return caches

    def own_cotangent(carry_cts, i, w):
        cts = []
        for kind, ct, buf in zip(kinds, carry_cts, buffers):
            if kind == SOFTMAX:  # this chunk's own K/V slice of the accumulated cotangent, in the K/V dtype
                cts.append({n: (w * jax.lax.dynamic_slice_in_dim(ct[n], i * cb.chunk, cb.chunk, axis=1)
                                ).astype(buf[n].dtype) for n in ("k", "v")})
            else:
                cts.append({"state": (w * ct["state"]).astype(ct["state"].dtype)})
        return cts

    def local_grads(carry_cts, i, w):
        (loss, _), vjp = jax.vjp(lambda p, c: prog.chunk_fn(p, c, i), params, caches_for(i))
        d_params, d_caches = vjp((w * jnp.ones_like(loss), own_cotangent(carry_cts, i, w)))
        return loss, d_params, d_caches

    def zero_grads(carry_cts, i, w):  # a dropped SpaCO chunk: no compute at all
        return jax.tree.map(jnp.zeros_like, jax.eval_shape(local_grads, carry_cts, i, w))

    def step(carry, i):
        grads, cts = carry
        if chunk_weights is None:
            loss, d_params, d_caches = local_grads(cts, i, 1.0)
        else:
            w = chunk_weights[i]
            loss, d_params, d_caches = jax.lax.cond(w != 0, local_grads, zero_grads, cts, i, w)
        grads = constrain(jax.tree.map(lambda g, d: g + d.astype(g.dtype), grads, d_params))
        new_cts = []
        for kind, ct, d in zip(kinds, cts, d_caches):
            if kind == SOFTMAX:  # d holds the cotangent of tokens < i*C; this chunk's own slice was consumed
                new_cts.append({n: ct[n] + d[n].astype(ct[n].dtype) for n in ("k", "v")})
            else:  # the state entering chunk i is the state leaving chunk i-1
                new_cts.append({"state": d["state"].astype(ct["state"].dtype)})
        return (grads, new_cts), loss

    zero_cts = []
    for kind, cache in zip(kinds, prog.empty_caches()):
        if kind == SOFTMAX:
            zero_cts.append({n: jnp.zeros(cache[n].shape, prog.kv_grad_dtype_of(cache[n].dtype)) for n in ("k", "v")})
        else:
            zero_cts.append({"state": jnp.zeros_like(cache["state"])})
    # gradients accumulate over chunks in fp32 at least (bf16 params would lose ~sqrt(k) ulps), cast back at the end
    acc_zeros = lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32))  # noqa: E731
    init = (constrain(jax.tree.map(acc_zeros, params)), zero_cts)
    (grads, _), losses = jax.lax.scan(step, init, jnp.arange(cb.num_chunks), reverse=True)
    return jnp.sum(losses), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
