"""Dispatch for lightning attention. (Skeleton: reference and scan so far; the kernel issue adds the rest.)"""
from __future__ import annotations

from longtrain.kernels.lightning import reference

IMPLS = ("reference", "scan", "xla", "pallas", "auto")


def lightning_attention(q, k, v, slope, *, segment_ids=None, initial_state=None, return_state=False, impl="auto",
                        block_size=64):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not a lightning attention implementation; expected one of {IMPLS}")
    if impl == "scan":
        fn = reference.lightning_scan
    elif impl in ("reference", "auto"):
        fn = reference.lightning_reference
    else:
        raise NotImplementedError(f"lightning impl={impl!r} is not implemented yet")
    return fn(q, k, v, slope, segment_ids=segment_ids, initial_state=initial_state, return_state=return_state)
