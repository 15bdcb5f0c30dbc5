"""This checkout against another revision: compiled memory of every shipped config's train step (`longtrain plan`
on 8 simulated devices), compiled temp memory of the chunk-wise benchmark models (full backprop and SeCO), and the
step-time ratio of the `tiny_cpu` train step, both trees measured in one run on this machine.

    python benchmarks/model_regression.py --against 0429b4f [--configs tiny_cpu llama_8b_128k] [--time-rounds 3]

The other revision is checked out into a temporary git worktree and installed (no dependencies, not editable) into a
throwaway venv that sees this interpreter's packages, so both trees run against the same jax/flax. Every measurement
runs in a fresh subprocess with 8 simulated CPU devices; step times alternate between the trees (A B A B ...) and the
table reports the median per tree. Memory is deterministic (XLA's compiled memory analysis); time is a ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CHUNKWISE_T = {"full": 8192, "seco": 32768}  # tokens per step of the chunk-wise benchmark models
CHUNK_SIZE = 2048
MiB = 2 ** 20


# ------------------------------------------------------------------------------------------ worker (one tree)
def _plan(config_path: str) -> dict:
    from longtrain.commands.plan import plan
    from longtrain.config import load_config

    import jax

    config = load_config(config_path, [], num_devices=jax.device_count())
    r = plan(config)
    return {k: r[k] for k in ("params", "optimizer", "temp", "total")} | {
        "comm": int(sum(r["collectives"].values()))}


def _chunkwise_temp() -> dict:
    import dataclasses
    import importlib.util

    import jax

    # the benchmark module of the tree under test (the working directory), not the one beside this file
    spec = importlib.util.spec_from_file_location("chunkwise_memory", os.path.join("benchmarks", "chunkwise_memory.py"))
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    from longtrain import models
    from longtrain.chunkwise import seco_grad, sequence_loss

    out = {}
    for name, base in (("llama_150m", cm.MODEL_150M), ("hybrid_150m", cm.HYBRID_150M)):
        config = dataclasses.replace(base, remat="full", scan_layers=True)
        params = jax.eval_shape(lambda c=config: models.init(c, jax.random.PRNGKey(0)))
        for mode, T in CHUNKWISE_T.items():
            if mode == "full":
                fn = jax.value_and_grad(lambda p, b, c=config: sequence_loss(c, p, b))
            else:
                fn = lambda p, b, c=config: seco_grad(c, p, b, CHUNK_SIZE)  # noqa: E731
            ma = jax.jit(fn).lower(params, cm._abstract_batch(T)).compile().memory_analysis()
            out[f"{name} {mode} T={T}"] = int(ma.temp_size_in_bytes)
    return out


def _step_seconds(config_path: str, steps: int) -> float:
    """Median wall time of one train step of `config_path` (real data, after compile and 3 warm-up steps)."""
    import time

    import jax

    from longtrain.config import load_config
    from longtrain.train.program import build_program
    from longtrain.train.setup import build_session

    config = load_config(config_path, [], num_devices=jax.device_count())
    session = build_session(config)
    program = build_program(config, session)
    state = program.init(jax.random.PRNGKey(config.train.seed))
    host_batch = next(session.dataset)
    if hasattr(program, "step"):  # what the trainer calls: the plan executor (fused path, compiled ahead)
        program.step.compile_fused(program.abstract_state, session.abstract_batch())
        step_plan = session.step_plan(host_batch)
        run = lambda state: program.step(state, step_plan)  # noqa: E731
    else:  # trees before the executor: the jitted step on the placed batch, as their trainer called it
        compiled = program.train_step.lower(program.abstract_state, session.abstract_batch()).compile()
        run = lambda state: compiled(state, session.put_batch(host_batch))  # noqa: E731
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        state, metrics = run(state)
        jax.block_until_ready(metrics)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args) -> None:
    if args.worker == "memory":
        result = {"plan": {}, "chunkwise": _chunkwise_temp()}
        for name in args.configs:
            try:
                result["plan"][name] = _plan(f"configs/{name}.yaml")
            except Exception as e:  # noqa: BLE001 -- a config `plan` refuses is reported, not fatal
                result["plan"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"}
    else:
        result = {"step_s": _step_seconds(f"configs/{args.time_config}.yaml", args.steps)}
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------------- driver
def _run_worker(python: str, tree: str, argv: list[str]) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, os.path.abspath(__file__), *argv], cwd=tree, env=env, capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {argv} in {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _install_revision(rev: str, workdir: str) -> tuple[str, str]:
    """-> (python of a venv holding `rev` of longtrain, the worktree of `rev`)."""
    tree, venv = os.path.join(workdir, "tree"), os.path.join(workdir, "venv")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    wheels = os.path.join(workdir, "wheels")  # this interpreter's setuptools builds it (the venv's may be older)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                    tree], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *(os.path.join(wheels, w)
                                                                        for w in os.listdir(wheels))], check=True)
    return python, tree


def _pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.2f}%" if old else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="git revision to compare this checkout with")
    parser.add_argument("--configs", nargs="*", default=None, help="config names in configs/ (default: all)")
    parser.add_argument("--time-config", default="tiny_cpu")
    parser.add_argument("--time-rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.configs is None:
        args.configs = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".yaml"))
    if args.worker:
        return worker(args)
    if not args.against:
        parser.error("--against REV is required")
    workdir = tempfile.mkdtemp(prefix="longtrain_regression_")
    try:
        old_python, old_tree = _install_revision(args.against, workdir)
        trees = {"before": (old_python, old_tree), "after": (sys.executable, REPO)}
        common = ["--configs", *args.configs, "--time-config", args.time_config, "--steps", str(args.steps)]
        memory = {k: _run_worker(py, tree, ["--worker", "memory", *common]) for k, (py, tree) in trees.items()}
        times = {k: [] for k in trees}
        for _ in range(args.time_rounds):
            for k, (py, tree) in trees.items():
                times[k].append(_run_worker(py, tree, ["--worker", "time", *common])["step_s"])
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", os.path.join(workdir, "tree")],
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)

    before, after = memory["before"], memory["after"]
    print(f"\nthis checkout vs {args.against}: 8 simulated CPU devices\n")
    print("| `plan` (per device) | temp before | temp after | change | total before | total after | change | "
          "comm change |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        b, a = before["plan"][name], after["plan"][name]
        if "error" in b or "error" in a:
            print(f"| {name} | {b.get('error', '')} | {a.get('error', '')} | | | | | |")
            continue
        print(f"| {name} | {b['temp'] / MiB:,.1f} MiB | {a['temp'] / MiB:,.1f} MiB | {_pct(a['temp'], b['temp'])} | "
              f"{b['total'] / MiB:,.1f} MiB | {a['total'] / MiB:,.1f} MiB | {_pct(a['total'], b['total'])} | "
              f"{_pct(a['comm'], b['comm'])} |")
    print("\n| chunk-wise benchmark model, compiled temp | before | after | change |")
    print("|---|---|---|---|")
    for name, b in before["chunkwise"].items():
        a = after["chunkwise"][name]
        print(f"| {name} | {b / MiB:,.1f} MiB | {a / MiB:,.1f} MiB | {_pct(a, b)} |")
    tb, ta = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"\n| {args.time_config} train step (median of {args.time_rounds} runs x {args.steps} steps) | before | "
          "after | speed ratio before/after |")
    print("|---|---|---|---|")
    print(f"| seconds per step | {tb * 1e3:.1f} ms | {ta * 1e3:.1f} ms | {tb / ta:.3f} |")


if __name__ == "__main__":
    main()
