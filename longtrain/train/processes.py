"""Agreement between the processes of a multi-process run: every process must take the same branch (stop after
the same step, fall back past the same checkpoint), or the others wait forever in the next collective."""
from __future__ import annotations

import jax
import numpy as np


def _gathered_flags(flag: bool) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.int32(flag)))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a signal that reached only some processes)."""
    return flag if jax.process_count() == 1 else bool(np.max(_gathered_flags(flag)))


def all_processes(flag: bool) -> bool:
    """True on every process iff `flag` is true on all of them (e.g. every process read a checkpoint)."""
    return flag if jax.process_count() == 1 else bool(np.min(_gathered_flags(flag)))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
