"""`longtrain plan CONFIG [key=value ...] [--devices N] [--memory-limit 80GiB]`: compile the train step for the
configured mesh ahead of time, without data and without running it, and print per-device memory (parameters,
optimizer state, temporaries) and the bytes each device sends per step by collective.

On a laptop, `--devices N` simulates N CPU devices (the command re-executes itself with XLA_FLAGS set), so a user
can check an 8B model at 128K tokens on 8 GPUs before booking them. Memory comes from XLA's compiled memory
analysis for the host platform; the collectives from the compiled HLO with loop trip counts. Exit 1 (with the
numbers) when the per-device total exceeds --memory-limit. `--lower-for cuda|tpu` also lowers the step for that
platform (no compile), which catches kernels or collectives that have no lowering there.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

from longtrain.commands.config import add_config_arguments
from longtrain.train.process_env import add_process_arguments, init_distributed, simulate_devices

# source lines in --explain are shown relative to the checkout (longtrain/, models/, parallel/, kernels/)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '512MiB', '1e10' -> bytes."""
    from longtrain.config import ConfigError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--memory-limit={text!r} is not a size; use e.g. 80GiB, 40GB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_process_arguments(parser)
    parser.add_argument("--memory-limit", default=None, help="per-device memory to fit in, e.g. 80GiB")
    parser.add_argument("--explain", type=int, nargs="?", const=10, default=0, metavar="N",
                        help="also list the N (default 10) largest buffers live at the peak of temp memory, with the "
                             "op, layer and source line that make them (from XLA's buffer assignment)")
    parser.add_argument("--lower-for", choices=["cuda", "tpu"], default=None,
                        help="also lower the train step for this platform from this machine (checks that every "
                             "kernel and collective has a lowering there; no compile, so no temp-memory numbers)")


def plan(config, explain: int = 0) -> dict:
    """Compile the train step for `config` on the visible devices; -> report dict (bytes per device). `explain`:
    also the `explain` largest buffers live at the peak of temp memory (`report["peak"]`, a PeakReport)."""
    import tempfile

    import jax

    from longtrain.parallel.hlo_comm import bytes_per_collective
    from longtrain.parallel.hlo_memory import peak_from_dump
    from longtrain.parallel.xla_warnings import capture_compile_warnings
    from longtrain.train.program import build_program, per_device_bytes
    from longtrain.train.setup import build_session

    if config.data.balance.enabled and explain:
        from longtrain.config import ConfigError

        raise ConfigError("plan --explain reads the static train step's buffer assignment; balance mode "
                          "(data.balance.enabled=true) runs per-micro-batch programs it does not dump yet: "
                          "drop --explain")
    session = build_session(config, with_data=False)
    program = build_program(config, session)
    t0 = time.perf_counter()
    if config.data.balance.enabled:
        return _plan_balanced(config, session, program, t0)
    lowered = program.fused_step.lower(program.abstract_state, session.abstract_batch())
    peak = None
    # one compile, with XLA's dump of the HLO around two passes: SPMD partitioning (to find the all-reduces that
    # XLA:GPU makes reduce-scatters) and XLA:CPU's all-reduce combiner (the same all-reduces, uncombined, in the
    # final loop structure); with --explain, also the buffer assignment, which says what fills temp memory
    options = {"xla_dump_hlo_pass_re": f"{SPMD_PASS}|{CPU_COMBINER_PASS}", "xla_dump_hlo_as_text": True}
    with capture_compile_warnings() as warnings, tempfile.TemporaryDirectory(prefix="longtrain_plan_") as dump:
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump, **options})
        if explain:
            peak = peak_from_dump(dump, module="step_fn", top=explain, repo_root=REPO_ROOT)
        scattered = scattered_all_reduce_bytes(dump, "step_fn", jax.device_count())
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    params = per_device_bytes(program.abstract_state["params"])
    opt = per_device_bytes(program.abstract_state["opt_state"])
    args = int(mem.argument_size_in_bytes)
    outs = int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    from longtrain.chunkwise import offloaded_bytes_per_device

    # XLA:CPU lumps host and device buffers together and drops the in-program host placements; the offloaded
    # buffers' sizes are exact, and the cuda lowering carries their placement (tests/test_chunkwise_offload.py)
    host = offloaded_bytes_per_device(config, dict(session.mesh.shape))
    return {
        "mesh": dict(session.mesh.shape),
        "devices": jax.device_count(),
        "params": params,
        "optimizer": opt,
        "batch_and_other_args": args - params - opt - per_device_bytes(
            {k: program.abstract_state[k] for k in ("step", "rng", "nonfinite_run", "nonfinite_total")}),
        "temp": temp,
        "outputs_not_aliased": max(outs - alias, 0),
        "total": args + max(outs - alias, 0) + temp - host,
        "host": host,
        "collectives": bytes_per_collective(compiled.as_text(), jax.device_count()),
        "all_reduce_scattered": scattered,
        "compile_s": compile_s,
        "peak": peak,
        "involuntary_rematerializations": len(warnings.involuntary_rematerializations),
    }


SPMD_PASS, CPU_COMBINER_PASS = "spmd-partitioning", "cpu-all-reduce-combiner"


def scattered_all_reduce_bytes(dump_dir: str, module: str, num_devices: int) -> float | None:
    """All-reduce bytes per device (as counted on this machine) that are an all-reduce + dynamic-slice, i.e. a
    reduce-scatter on GPU; None where the dump lacks the two modules (a compile that is not XLA:CPU's)."""
    import glob

    from longtrain.parallel.hlo_comm import SCATTERED_ALL_REDUCE, collective_bytes, reduce_scatter_candidates

    def dumped(pattern):
        found = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*{pattern}*.txt")), key=os.path.getsize)
        return open(found[-1]).read() if found else None

    partitioned, uncombined = dumped(f"after_{SPMD_PASS}"), dumped(f"before_{CPU_COMBINER_PASS}")
    if partitioned is None or uncombined is None:
        return None
    counts = collective_bytes(uncombined, num_devices, scattered=reduce_scatter_candidates(partitioned))
    return float(counts.get(SCATTERED_ALL_REDUCE, 0.0))


def _plan_balanced(config, session, program, t0) -> dict:
    """Balance mode: the largest micro-batch program the scheduler can emit (one group of all R devices, c = R,
    capacity C, split region S = C, one split document: 2 pieces per rank) and the update program. While a
    micro-batch runs, a device holds the optimizer state (idle) plus that program's arguments, outputs and temps;
    the update holds the state and the gradient. The total is the larger of the two."""
    import jax

    from longtrain.parallel.hlo_comm import bytes_per_collective
    from longtrain.parallel.xla_warnings import capture_compile_warnings
    from longtrain.train.program import per_device_bytes

    step = program.step
    R, C, S, K = key = step.view.largest_micro_key()
    with capture_compile_warnings() as warnings:
        micro = step.trace_micro(key, step.view.abstract_params).lower().compile()
        update = step.trace_update(program.abstract_state).lower().compile()
    compile_s = time.perf_counter() - t0

    def footprint(compiled):
        m = compiled.memory_analysis()
        return (int(m.argument_size_in_bytes), max(int(m.output_size_in_bytes) - int(m.alias_size_in_bytes), 0),
                int(m.temp_size_in_bytes))

    params = per_device_bytes(program.abstract_state["params"])
    opt = per_device_bytes(program.abstract_state["opt_state"])
    m_args, m_outs, m_temp = footprint(micro)
    u_args, u_outs, u_temp = footprint(update)
    during_micro, during_update = opt + m_args + m_outs + m_temp, u_args + u_outs + u_temp
    comm = bytes_per_collective(micro.as_text(), R)
    return {
        "mesh": {"data": 1, "context": R},
        "devices": R,
        "balance": {"context": R, "capacity": C, "split_region": S, "pieces": K},
        "params": params,
        "optimizer": opt,
        "batch_and_other_args": m_args - 2 * params,  # the micro program takes params and the grad accumulator
        "temp": max(m_temp, u_temp),
        "outputs_not_aliased": max(m_outs, u_outs),
        "total": max(during_micro, during_update),
        "collectives": comm,
        "all_reduce_scattered": None,
        "compile_s": compile_s,
        "peak": None,
        "involuntary_rematerializations": len(warnings.involuntary_rematerializations),
    }


def lower_for(config, platform: str) -> int:
    """Lower (not compile) the train step for `platform` on the simulated mesh; -> size of the lowered module."""
    from longtrain.train.program import build_program
    from longtrain.train.setup import build_session

    session = build_session(config, with_data=False)
    program = build_program(config, session)
    if config.data.balance.enabled:  # the largest micro-batch program (the one with the ring over every rank)
        step = program.step
        traced = step.trace_micro(step.view.largest_micro_key(), step.view.abstract_params)
    else:
        traced = program.fused_step.trace(program.abstract_state, session.abstract_batch())
    return len(traced.lower(lowering_platforms=(platform,)).as_text())


def print_report(config, report: dict, out=sys.stdout) -> None:
    m = config.mesh
    mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
    balance = report.get("balance")
    if balance:
        print(f"plan: {report['devices']} devices, balance mode (ZeRO-3 state over the pool): the largest "
              f"micro-batch program, one context group of c={balance['context']} ranks x {balance['capacity']} "
              f"tokens, split region {balance['split_region']}"
              + (f", {balance['pieces']} lightning pieces per rank" if balance["pieces"] else "")
              + "; ring attention; compiled in "
              + f"{report['compile_s']:.1f}s", file=out)
    else:
        print(f"plan: {report['devices']} devices, mesh {mesh}, context strategy {m.context_strategy}, layout "
              f"{m.layout}; compiled in {report['compile_s']:.1f}s", file=out)
    print(f"  sequence {config.data.seq_len} tokens x {config.data.batch_size} rows, "
          f"optim.mode={config.optim.mode}, model.remat={config.model.remat}", file=out)
    print("per-device memory:", file=out)
    host = report.get("host", 0)
    for key in ("params", "optimizer", "batch_and_other_args", "temp", "outputs_not_aliased", "total"):
        label = "temp (device + host)" if key == "temp" and host else key
        print(f"  {label:<22}{fmt_bytes(report[key]):>14}" + ("  (device)" if key == "total" and host else ""),
              file=out)
    if host:
        print(f"  {'host (offloaded)':<22}{fmt_bytes(host):>14}  (SeCO K/V buffers + accumulator, "
              "optim.seco_offload=host; not counted in the device total)", file=out)
    print("communication per " + ("micro-batch" if balance else "step") + ", bytes sent per device:", file=out)
    for op, n in report["collectives"].items():
        print(f"  {op:<22}{fmt_bytes(n):>14}", file=out)
    total = sum(report["collectives"].values())
    print(f"  {'total':<22}{fmt_bytes(total):>14}", file=out)
    scattered = report.get("all_reduce_scattered")
    if scattered:
        print(f"  of the all-reduce, {fmt_bytes(scattered)} is an all-reduce + dynamic-slice (a sharded gradient's "
              "reduction, as XLA:CPU lowers it); XLA:GPU rewrites that into a reduce-scatter, which sends "
              f"{fmt_bytes(scattered / 2)}: about {fmt_bytes(total - scattered / 2)} in all on GPU", file=out)
    remats = report.get("involuntary_rematerializations", 0)
    print(f"XLA partitioner: {remats or 'no'} involuntary full rematerialization{'s' if remats != 1 else ''}"
          + (" (a tensor replicated on every device, then re-partitioned: see XLA's warnings above)" if remats
             else ""), file=out)
    peak = report.get("peak")
    if peak is not None:
        print(f"largest buffers live at the peak of temp memory ({fmt_bytes(peak.peak_bytes)} live of "
              f"{fmt_bytes(peak.temp_bytes)} temp; XLA buffer assignment):", file=out)
        for b in peak.buffers:
            tags = ", ".join(t for t in (f"layer {b.layer}" if b.layer is not None else "",
                                         "backward" if b.backward else "") if t)
            op = "/".join(b.op_name.split("/")[-2:])
            print(f"  {fmt_bytes(b.bytes):>12}  {b.shape.split('{')[0]:<30} {tags:<18} {b.source}  [{op}]",
                  file=out)


def run(args: argparse.Namespace) -> int:
    simulate_devices(args.devices)
    init_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed_auto)
    import jax

    from longtrain.config import load_config

    limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    config = load_config(args.config, args.overrides, num_devices=jax.device_count())
    report = plan(config, explain=args.explain)
    print_report(config, report)
    if args.lower_for:
        t0 = time.perf_counter()
        size = lower_for(config, args.lower_for)
        print(f"lowered the train step for {args.lower_for} in {time.perf_counter() - t0:.1f}s "
              f"({size / 2**20:.1f} MiB of StableHLO): every op has a {args.lower_for} lowering")
    if limit is not None and report["total"] > limit:
        print(f"longtrain plan: does NOT fit: needs {fmt_bytes(report['total'])} per device (params "
              f"{fmt_bytes(report['params'])}, optimizer {fmt_bytes(report['optimizer'])}, temp "
              f"{fmt_bytes(report['temp'])}) > --memory-limit {args.memory_limit} ({fmt_bytes(limit)})",
              file=sys.stderr)
        return 1
    if limit is not None:
        print(f"fits: {fmt_bytes(report['total'])} <= {fmt_bytes(limit)} per device")
    return 0
