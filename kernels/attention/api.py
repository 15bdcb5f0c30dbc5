"""Dispatch for softmax attention: validate arguments, resolve `impl`, call the impl's module.

impls: `reference` (naive, the oracle), `xla` (blockwise flash, pure JAX), `pallas` (Triton on GPU, splash on
TPU; `interpret=True` runs it on CPU), `cudnn` (`jax.nn.dot_product_attention` on GPU), `auto` (pallas on
GPU/TPU, xla on CPU; on TPU the cases splash cannot serve -- the block API, return_lse, T != S -- use xla).
An explicitly named impl that cannot serve a case raises NotImplementedError naming the case.
"""
from __future__ import annotations

import jax

from longtrain.kernels.attention import reference, validate, xla_flash

IMPLS = validate.IMPLS
XLA_KWARGS = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
PALLAS_KWARGS = ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps", "num_stages", "interpret",
                 "backend")


def platform():
    """'gpu', 'tpu' or 'cpu' for the default device."""
    p = jax.devices()[0].platform
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def resolve_impl(impl, *, splash_can_serve=True):
    """The concrete impl for `impl` on this platform. `auto`: pallas on GPU; on TPU pallas (splash) where it can
    serve the call (`splash_can_serve`: not the block API, return_lse or T != S) and xla otherwise; xla on CPU."""
    validate.check_impl(impl)
    if impl != "auto":
        return impl
    p = platform()
    if p == "gpu" or (p == "tpu" and splash_can_serve):
        return "pallas"
    return "xla"


def _pallas_module(block_kwargs):
    backend = block_kwargs.get("backend") or platform()
    if backend == "gpu":
        from longtrain.kernels.attention import pallas_gpu as mod
    elif backend == "tpu":
        from longtrain.kernels.attention import pallas_tpu as mod
    elif block_kwargs.get("interpret"):
        from longtrain.kernels.attention import pallas_gpu as mod  # interpret mode on CPU: the Triton kernel
    else:
        raise NotImplementedError(
            f"impl='pallas' needs a GPU or TPU (this platform is {backend!r}); pass interpret=True to run the "
            "kernel in interpret mode (tests), backend='gpu'/'tpu' to lower for another platform, or use impl='xla'")
    return mod


def attention(q, k, v, *, segment_ids=None, causal=True, sliding_window=None, scale=None, impl="auto",
              return_lse=False, **block_kwargs):
    """out [B,T,Hq,D] in q.dtype (, lse fp32 [B,Hq,T]); see the package docstring for the contract."""
    validate.check_attention(q, k, v, segment_ids, causal, sliding_window, scale, impl)
    impl = resolve_impl(impl, splash_can_serve=not return_lse and q.shape[1] == k.shape[1])
    mask_kwargs = dict(segment_ids=segment_ids, causal=bool(causal), scale=scale, return_lse=return_lse,
                       sliding_window=None if sliding_window is None else int(sliding_window))
    if impl == "reference":
        validate.check_block_kwargs(impl, block_kwargs, ())
        return reference.attention_reference(q, k, v, **mask_kwargs)
    if impl == "xla":
        validate.check_block_kwargs(impl, block_kwargs, XLA_KWARGS)
        return xla_flash.flash_attention(q, k, v, **mask_kwargs, **block_kwargs)
    if impl == "pallas":
        validate.check_block_kwargs(impl, block_kwargs, PALLAS_KWARGS)
        return _pallas_module(block_kwargs).attention(q, k, v, **mask_kwargs, **block_kwargs)
    from longtrain.kernels.attention import cudnn
    validate.check_block_kwargs(impl, block_kwargs, ())
    return cudnn.attention(q, k, v, **mask_kwargs)


def _block_call(fn_name, args, q_index, kv_index, q_segment_ids, kv_segment_ids, causal, sliding_window, scale,
                impl, block_kwargs, xla_extra=None):
    q, k, v = args[:3]
    validate.check_block(q, k, v, q_index, kv_index, q_segment_ids, kv_segment_ids, causal, sliding_window, scale,
                         impl)
    impl = resolve_impl(impl, splash_can_serve=False)
    mask_kwargs = dict(q_index=q_index, kv_index=kv_index, q_segment_ids=q_segment_ids,
                       kv_segment_ids=kv_segment_ids, causal=bool(causal), scale=scale,
                       sliding_window=None if sliding_window is None else int(sliding_window))
    if impl == "reference":
        validate.check_block_kwargs(impl, block_kwargs, ())
        return getattr(reference, f"{fn_name}_reference")(*args, **mask_kwargs)
    if impl == "xla":
        validate.check_block_kwargs(impl, block_kwargs, XLA_KWARGS)
        return getattr(xla_flash, f"flash_{fn_name}")(*args, **mask_kwargs, **block_kwargs, **(xla_extra or {}))
    if impl == "pallas":
        validate.check_block_kwargs(impl, block_kwargs, PALLAS_KWARGS)
        return getattr(_pallas_module(block_kwargs), fn_name)(*args, **mask_kwargs, **block_kwargs)
    raise NotImplementedError(f"{fn_name} with impl='cudnn': cuDNN's public API takes no global token indices; "
                              "use impl='pallas' (GPU/TPU) or impl='xla'")


def attention_block(q, k, v, *, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None, causal=True,
                    sliding_window=None, scale=None, impl="auto", merge_into=None, **block_kwargs):
    """(out fp32 [B,T,Hq,D], lse fp32 [B,Hq,T]) of q against one key block; indices are global token positions.

    Rows with no visible key give out 0 and lse -inf. `merge_into` (optional (out fp32, lse) of the same queries
    over other keys): returns the merge of that partial and this block's. The xla impl merges in place, block by
    block, for callers that fold many blocks into one running pair under their own VJP (ring strategies' forward);
    that form is not differentiable on the xla impl.
    """
    if merge_into is not None:
        want = ((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), (q.shape[0], q.shape[2], q.shape[1]))
        for name, x, shape in zip(("out", "lse"), merge_into, want):
            if getattr(x, "shape", None) != shape:
                raise ValueError(f"merge_into's {name} must have shape {shape}; got {getattr(x, 'shape', x)}")
    into_here = merge_into is not None and resolve_impl(impl, splash_can_serve=False) == "xla"
    part = _block_call("attention_block", (q, k, v), q_index, kv_index, q_segment_ids, kv_segment_ids, causal,
                       sliding_window, scale, impl, block_kwargs,
                       xla_extra=dict(merge_into=merge_into) if into_here else None)
    if merge_into is None or into_here:
        return part
    return reference.merge_partials(merge_into[0], merge_into[1], part[0], part[1])


def attention_block_bwd(q, k, v, out, lse, dout, *, q_index, kv_index, q_segment_ids=None, kv_segment_ids=None,
                        causal=True, sliding_window=None, scale=None, impl="auto", grads_into=None, **block_kwargs):
    """(dq, dk, dv) fp32 of one block given the GLOBAL (merged) out [B,T,Hq,D] and lse [B,Hq,T].

    `grads_into` (optional fp32 (dq, dk, dv) of the shapes of q, k, v): returns them plus this block's gradients.
    The xla impl adds block by block into these buffers (in place inside a loop), so a caller that sums many
    blocks, like a ring, holds one set of accumulators instead of those plus a fresh set per block."""
    if getattr(lse, "shape", None) != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"lse must have shape [B,Hq,T] = {(q.shape[0], q.shape[2], q.shape[1])}; got "
                         f"{getattr(lse, 'shape', lse)}")
    for name, x in (("out", out), ("dout", dout)):
        if getattr(x, "shape", None) != q.shape:
            raise ValueError(f"{name} must have the shape of q {q.shape}; got {getattr(x, 'shape', x)}")
    if grads_into is not None:
        for name, g, like in zip(("dq", "dk", "dv"), grads_into, (q, k, v)):
            if getattr(g, "shape", None) != like.shape:
                raise ValueError(f"grads_into's {name} must have shape {like.shape}; got {getattr(g, 'shape', g)}")
    into_here = grads_into is not None and resolve_impl(impl, splash_can_serve=False) == "xla"
    grads = _block_call("attention_block_bwd", (q, k, v, out, lse, dout), q_index, kv_index, q_segment_ids,
                        kv_segment_ids, causal, sliding_window, scale, impl, block_kwargs,
                        xla_extra=dict(grads_into=grads_into) if into_here else None)
    if grads_into is None or into_here:
        return grads
    return tuple(acc + g for acc, g in zip(grads_into, grads))


__all__ = ["attention", "attention_block", "attention_block_bwd", "platform", "resolve_impl"]
