"""Dispatch for lightning attention: validates the arguments once, then calls the chosen impl.

impls: `reference` (quadratic, oracle), `scan` (token recurrence, oracle), `xla` (chunked, Lightning-2 custom VJP),
`pallas` (the GPU Triton kernel, or the TPU Mosaic kernel on a TPU backend; on CPU only with interpret=True,
which interprets the GPU kernel), `auto` (pallas on GPU, xla elsewhere).
The slope is never differentiated by the fast impls (its cotangent is zero): it is a fixed decay schedule.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longtrain.kernels.lightning import reference

IMPLS = ("reference", "scan", "xla", "pallas", "auto")


def resolve_impl(impl: str) -> str:
    """The concrete impl `auto` stands for on this backend (pallas on GPU, xla elsewhere)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not a lightning attention implementation; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def _validate(q, k, v, slope, segment_ids, initial_state, block_size):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a [B,T,H,D] array; got shape {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point; got dtype {x.dtype}")
    B, T, H, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape} ([B,T,H,Dk]); got {k.shape}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B,T,H,Dv] with (B,T,H)={(B, T, H)} like q; got {v.shape}")
    Dv = v.shape[3]
    if getattr(slope, "shape", None) != (H,):
        raise ValueError(f"slope must have shape [H]=({H},) (one decay rate per head); "
                         f"got {getattr(slope, 'shape', None)}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must have shape [B,T]=({B}, {T}); got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array (int32, 0 = padding); "
                             f"got dtype {segment_ids.dtype}")
    if initial_state is not None:
        if initial_state.shape != (B, H, Dk, Dv):
            raise ValueError(f"initial_state must have shape [B,H,Dk,Dv]=({B}, {H}, {Dk}, {Dv}); "
                             f"got {initial_state.shape}")
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise ValueError(f"initial_state must be floating point (fp32); got dtype {initial_state.dtype}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")


def lightning_attention(q, k, v, slope, *, segment_ids=None, initial_state=None, return_state=False, impl="auto",
                        block_size=64, interpret=None):
    """Decayed linear attention. q, k: [B,T,H,Dk]; v: [B,T,H,Dv]; slope: [H] (lambda_h = exp(-slope_h)).

    Returns out [B,T,H,Dv] in q.dtype, and with return_state=True also the state at the last token
    [B,H,Dk,Dv] fp32. segment_ids int [B,T] (0 = padding) reset the state at run boundaries; initial_state
    [B,H,Dk,Dv] feeds the first run. `interpret` is for impl="pallas" only (True: Pallas interpreter, for CPU).
    """
    concrete = resolve_impl(impl)
    _validate(q, k, v, slope, segment_ids, initial_state, block_size)
    if interpret is not None and concrete != "pallas":
        raise ValueError(f"interpret={interpret!r} only applies to impl='pallas'; "
                         f"impl={impl!r} resolved to {concrete!r}")
    if concrete in ("reference", "scan"):
        fn = reference.lightning_scan if concrete == "scan" else reference.lightning_reference
        return fn(q, k, v, slope, segment_ids=segment_ids, initial_state=initial_state, return_state=return_state)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if concrete == "xla":
        from longtrain.kernels.lightning.xla_chunked import lightning_xla

        return lightning_xla(q, k, v, slope, segment_ids=segment_ids, initial_state=initial_state,
                             return_state=return_state, block_size=block_size)
    if jax.default_backend() == "tpu":
        from longtrain.kernels.lightning.pallas_tpu import lightning_pallas_tpu as pallas_fn
    else:  # the GPU (Triton) kernel; on CPU it needs interpret=True
        from longtrain.kernels.lightning.pallas_gpu import lightning_pallas as pallas_fn
    return pallas_fn(q, k, v, slope, segment_ids=segment_ids, initial_state=initial_state,
                     return_state=return_state, block_size=block_size, interpret=interpret)
