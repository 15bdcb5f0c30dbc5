"""Process set-up before JAX starts: simulated CPU device counts and multi-process `jax.distributed`.

`simulate_devices(n)`: JAX reads the CPU device count once, when its backend starts, from XLA_FLAGS. If this
process was not started with that count, it re-executes itself with the flag set (and JAX_PLATFORMS=cpu), which is
correct whether or not jax has already been imported or initialised.

`init_distributed(...)`: one JAX process per host (or per GPU). On CPU the cross-process collectives use gloo.
Without arguments, `jax.distributed.initialize()` auto-detects SLURM, Open MPI and TPU pod environments.
"""
from __future__ import annotations

import os
import re
import sys

_COUNT_FLAG = "--xla_force_host_platform_device_count"
_REEXEC_GUARD = "LONGTRAIN_REEXEC_DEVICES"


def _with_device_count(xla_flags: str, n: int) -> str:
    flags = re.sub(rf"{_COUNT_FLAG}=\d+", "", xla_flags).split()
    return " ".join(flags + [f"{_COUNT_FLAG}={n}"])


def simulate_devices(n: int | None) -> None:
    """Make this process see `n` CPU devices, re-executing `python -m longtrain ...` if needed."""
    if n is None:
        return
    if n < 1:
        from longtrain.config import ConfigError

        raise ConfigError(f"--devices={n} must be >= 1")
    current = re.search(rf"{_COUNT_FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if current and int(current.group(1)) == n and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        return
    if os.environ.get(_REEXEC_GUARD) == str(n):
        raise RuntimeError(f"could not make JAX see {n} CPU devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    env = dict(os.environ)
    env["XLA_FLAGS"] = _with_device_count(env.get("XLA_FLAGS", ""), n)
    env["JAX_PLATFORMS"] = "cpu"
    env[_REEXEC_GUARD] = str(n)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "longtrain", *sys.argv[1:]], env)


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                     auto: bool = False) -> None:
    """Start jax.distributed. Explicit (coordinator, num_processes, process_id), or `auto` for cluster
    auto-detection (SLURM, Open MPI, TPU pods). No-op when neither is given (single process)."""
    import jax

    if coordinator is None and not auto:
        return
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
        return
    if num_processes is None or process_id is None:
        from longtrain.config import ConfigError

        raise ConfigError("--coordinator needs --num-processes and --process-id "
                          "(or LONGTRAIN_NUM_PROCESSES / LONGTRAIN_PROCESS_ID)")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def add_process_arguments(parser) -> None:
    """--devices and the distributed flags shared by `train` and `plan`."""
    parser.add_argument("--devices", type=int, default=None,
                        help="simulate this many CPU devices (re-executes with XLA_FLAGS set)")
    env = os.environ.get
    parser.add_argument("--coordinator", default=env("LONGTRAIN_COORDINATOR"),
                        help="host:port of process 0 for jax.distributed (env LONGTRAIN_COORDINATOR)")
    parser.add_argument("--num-processes", type=int,
                        default=int(env("LONGTRAIN_NUM_PROCESSES")) if env("LONGTRAIN_NUM_PROCESSES") else None)
    parser.add_argument("--process-id", type=int,
                        default=int(env("LONGTRAIN_PROCESS_ID")) if env("LONGTRAIN_PROCESS_ID") else None)
    parser.add_argument("--distributed-auto", action="store_true",
                        help="jax.distributed.initialize() with cluster auto-detection (SLURM, TPU pods)")
