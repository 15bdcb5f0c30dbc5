"""Peak host memory (RSS) of Hugging Face import and export of a ~300M-parameter Llama, against the model size.

A random Llama checkpoint is written straight with our streaming safetensors writer (fp32, no torch). Each phase
then runs in a fresh subprocess that records its RSS after imports (baseline) and its peak RSS (VmHWM, reset via
/proc/self/clear_refs before the measured call); the table shows peak - baseline next to the model's fp32 size.
`naive import` (safetensors `load_file` of everything, then convert) is the two-copy baseline for contrast.

Usage: python benchmarks/hf_convert_memory.py [--layers 20] [--hidden 1024] [--vocab 32000] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

GIB = 1024 ** 3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS


def _measure(fn) -> dict:
    """Run fn() and return {'baseline': bytes, 'peak': bytes} of this process."""
    import gc

    gc.collect()
    _reset_peak()
    baseline = _status_kib("VmRSS") * 1024
    result = fn()
    peak = _status_kib("VmHWM") * 1024
    return {"baseline": baseline, "peak": peak, "result": result}


# ----------------------------------------------------------------------------------------------- phases (child)
def phase_write(args) -> dict:
    import numpy as np

    from longtrain.config import ModelConfig
    from longtrain.hf.llama_family import LLAMA
    from longtrain.hf.safetensors_io import write_sharded

    config = ModelConfig(architecture="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, max_position_embeddings=4096)
    os.makedirs(args.hf_dir, exist_ok=True)
    with open(os.path.join(args.hf_dir, "config.json"), "w") as fh:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA.config_to_hf(config)}, fh)
    rng = np.random.default_rng(0)
    items = [(s.hf_name, s.hf_shape, np.dtype("float32"),
              lambda s=s: (0.02 * rng.standard_normal(s.hf_shape, dtype=np.float32)))
             for s in LLAMA.tensor_specs(config)]
    write_sharded(args.hf_dir, items, max_shard_bytes=2 * GIB)
    n = sum(int(np.prod(s.hf_shape)) for s in LLAMA.tensor_specs(config))
    return {"params": n}


def phase_import(args) -> dict:
    from longtrain.hf import import_hf

    m = _measure(lambda: import_hf(args.hf_dir))
    return {"baseline": m["baseline"], "peak": m["peak"]}


def phase_naive_import(args) -> dict:
    """Load every tensor at once (safetensors.numpy.load_file), then convert: two copies at the peak."""
    import glob

    import jax
    import numpy as np
    from safetensors.numpy import load_file

    from longtrain.hf.convert import _get_leaf, _param_shapes, config_from_hf_dir

    def run():
        converter, config = config_from_hf_dir(args.hf_dir)
        tensors = {}
        for path in sorted(glob.glob(os.path.join(args.hf_dir, "*.safetensors"))):
            tensors.update(load_file(path))
        params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), _param_shapes(config))
        for spec in converter.tensor_specs(config):
            leaf = _get_leaf(params, spec.path)
            value = spec.to_params(tensors[spec.hf_name])
            if spec.layer is None:
                leaf[...] = value
            else:
                leaf[spec.layer] = value
        return params

    m = _measure(run)
    return {"baseline": m["baseline"], "peak": m["peak"]}


def phase_export(args) -> dict:
    from longtrain.hf import export_hf, import_hf

    config, params = import_hf(args.hf_dir)
    out = args.hf_dir + f"_export_{args.dtype}"
    m = _measure(lambda: export_hf(config, params, out, dtype=args.dtype, max_shard_bytes=2 * GIB))
    shutil.rmtree(out, ignore_errors=True)
    return {"baseline": m["baseline"], "peak": m["peak"]}


PHASES = {"write": phase_write, "import": phase_import, "naive_import": phase_naive_import, "export": phase_export}


# --------------------------------------------------------------------------------------------------- driver
def _run_child(phase: str, args, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, "--hf-dir", args.hf_dir, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="where the random checkpoint goes (default: a temp dir)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--child", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(PHASES[args.child](args)))
        return

    workdir = tempfile.mkdtemp(prefix="hf_convert_memory_", dir=args.workdir)
    args.hf_dir = os.path.join(workdir, "llama")
    try:
        n = _run_child("write", args)["params"]
        size = 4 * n
        rows = [("import (streamed)", _run_child("import", args))]
        if not args.skip_naive:
            rows.append(("naive import (load all, then convert)", _run_child("naive_import", args)))
        rows.append(("export fp32 (streamed)", _run_child("export", args, ["--dtype", "float32"])))
        rows.append(("export bf16 (streamed)", _run_child("export", args, ["--dtype", "bfloat16"])))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"Llama {n / 1e6:.0f}M params ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}); "
          f"fp32 model size {size / GIB:.2f} GiB; checkpoint fp32 safetensors")
    print()
    print("| phase | RSS before (GiB) | peak RSS (GiB) | peak - before (GiB) | (peak - before) / model size |")
    print("|---|---|---|---|---|")
    for name, m in rows:
        delta = m["peak"] - m["baseline"]
        print(f"| {name} | {m['baseline'] / GIB:.2f} | {m['peak'] / GIB:.2f} | {delta / GIB:.2f} | "
              f"{delta / size:.2f} |")
    print()
    print("import: the result (one fp32 copy) is part of the peak; export: the params are already in memory "
          "before the call, so peak - before is the writer's own overhead.")


if __name__ == "__main__":
    main()
