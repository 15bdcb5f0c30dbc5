"""The README's `plan` tables, regenerated: every shipped config on 8 simulated devices, and the 8B Llama and the
hybrid at 8 / 64 / 256 devices with a mesh a user would pick at that size (tokens per device fixed).

Each plan runs in its own subprocess with that many simulated CPU devices (`longtrain plan`'s compile, nothing
runs); memory from XLA's compiled memory analysis, bytes per collective per step from the compiled HLO.

    python benchmarks/plan_table.py [--configs tiny_cpu llama_8b_128k ...] [--skip-cluster]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# (config, devices, mesh shown, overrides): tokens per device fixed as the cluster grows (batch grows with data x fsdp)
CLUSTER = [
    ("llama_8b_128k", 8, "context 8", []),
    ("llama_8b_128k", 64, "fsdp 8 x context 8, batch 8", ["mesh.fsdp=8", "mesh.context=8", "data.batch_size=8"]),
    ("llama_8b_128k", 256, "data 4 x fsdp 8 x context 8, batch 32",
     ["mesh.data=4", "mesh.fsdp=8", "mesh.context=8", "data.batch_size=32"]),
    ("hybrid_lightning_1b_256k", 8, "context 8", []),
    ("hybrid_lightning_1b_256k", 64, "fsdp 8 x context 8, batch 8",
     ["mesh.fsdp=8", "mesh.context=8", "data.batch_size=8"]),
    ("hybrid_lightning_1b_256k", 256, "data 4 x fsdp 8 x context 8, batch 32",
     ["mesh.data=4", "mesh.fsdp=8", "mesh.context=8", "data.batch_size=32"]),
]


def worker(config_name: str, overrides: list[str]) -> None:
    from longtrain.commands.plan import plan
    from longtrain.config import load_config

    import jax

    config = load_config(os.path.join(REPO, "configs", f"{config_name}.yaml"), overrides,
                         num_devices=jax.device_count())
    r = plan(config)
    keep = ("mesh", "params", "optimizer", "temp", "total", "collectives", "all_reduce_scattered",
            "involuntary_rematerializations")
    print("RESULT " + json.dumps({k: r[k] for k in keep} | {"host": r.get("host", 0)}))


def run_plan(config_name: str, devices: int, overrides: list[str]) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", config_name, *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"plan {config_name} on {devices} devices failed:\n{proc.stderr[-3000:]}")


def gib(n: float) -> str:
    from longtrain.commands.plan import fmt_bytes

    return fmt_bytes(n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=None, help="config names in configs/ (default: all)")
    parser.add_argument("--skip-cluster", action="store_true", help="only the 8-device table")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1:]) or 0
    names = args.configs or sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".yaml"))
    print("| config | mesh | params | optimizer | temp | total (device) | host | comm / step / device |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        r = run_plan(name, 8, [])
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        print(f"| {name} | {mesh} | {gib(r['params'])} | {gib(r['optimizer'])} | {gib(r['temp'])} | "
              f"{gib(r['total'])} | {gib(r['host']) if r['host'] else '-'} | "
              f"{gib(sum(r['collectives'].values()))} |", flush=True)
    if args.skip_cluster:
        return 0
    # "of which all-reduce + slice": the part of the all-reduce that XLA:GPU turns into a reduce-scatter (half the
    # bytes); "comm on GPU" counts it so
    print("\n| config | devices | mesh | params | optimizer | temp | total | permute | all-gather | all-reduce | "
          "of which all-reduce + slice | comm total | comm on GPU | involuntary remats |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, devices, mesh, overrides in CLUSTER:
        r = run_plan(name, devices, overrides)
        c, scattered = r["collectives"], r["all_reduce_scattered"] or 0.0
        print(f"| {name} | {devices} | {mesh} | {gib(r['params'])} | {gib(r['optimizer'])} | {gib(r['temp'])} | "
              f"{gib(r['total'])} | {gib(c.get('collective-permute', 0))} | {gib(c.get('all-gather', 0))} | "
              f"{gib(c.get('all-reduce', 0))} | {gib(scattered)} | {gib(sum(c.values()))} | "
              f"{gib(sum(c.values()) - scattered / 2)} | {r['involuntary_rematerializations']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
