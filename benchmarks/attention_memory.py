"""Compiled memory of attention forward+backward vs sequence length (CPU, compile only, nothing executed).

For each T, `jax.jit(grad(loss)).lower(...).compile().memory_analysis()` gives the temp bytes XLA plans for
one forward+backward of softmax attention (reference: naive, materialises [T, T] scores; xla: blockwise flash
with a custom VJP) and of lightning attention (impl='xla'). Flash and lightning should grow linearly in T
(temp(32K)/temp(4K) <= 9), the reference quadratically (x64).

Usage: python benchmarks/attention_memory.py [--max-t 65536] [--skip-reference-above 32768]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

B, HQ, HKV, D = 1, 2, 1, 64  # small heads so each compile takes seconds; memory scales with B*H*D anyway


def _softmax_loss(impl, **kw):
    from longtrain.kernels import attention

    def loss(q, k, v):
        return attention(q, k, v, causal=True, impl=impl, **kw).astype(jnp.float32).sum()

    return loss


def _lightning_loss():
    from longtrain.kernels import lightning_attention

    def loss(q, k, v):
        slope = jnp.linspace(0.1, 1.0, q.shape[2])
        return lightning_attention(q, k, v, slope, impl="xla").astype(jnp.float32).sum()

    return loss


def compiled_memory(kind: str, T: int, dtype=jnp.float32, **kw) -> dict:
    """{'temp', 'argument', 'output'} bytes of the compiled fwd+bwd of `kind` in reference | xla | lightning."""
    hkv = HQ if kind == "lightning" else HKV
    q = jax.ShapeDtypeStruct((B, T, HQ, D), dtype)
    k = jax.ShapeDtypeStruct((B, T, hkv, D), dtype)
    loss = _lightning_loss() if kind == "lightning" else _softmax_loss(kind, **kw)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k).compile()
    m = compiled.memory_analysis()
    return {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-t", type=int, default=65536)
    parser.add_argument("--skip-reference-above", type=int, default=32768,
                        help="the naive reference's [T,T] scores at 64K are ~100 GiB: skip compiling it above this")
    args = parser.parse_args(argv)
    lengths = [t for t in (2048, 4096, 8192, 16384, 32768, 65536) if t <= args.max_t]
    kinds = ("reference", "xla", "lightning")
    temp = {kind: {} for kind in kinds}
    notes = {}
    print(f"# attention fwd+bwd compiled temp memory, B={B} Hq={HQ} Hkv={HKV} D={D} fp32, causal, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| T | reference (MiB) | xla flash (MiB) | lightning xla (MiB) |")
    print("|---|---|---|---|")
    for T in lengths:
        row = []
        for kind in kinds:
            if kind == "reference" and T > args.skip_reference_above:
                row.append("skipped (too big)")
                continue
            t0 = time.perf_counter()
            try:
                temp[kind][T] = compiled_memory(kind, T)["temp"]
                row.append(f"{temp[kind][T] / 2**20:,.1f}")
            except (ImportError, NotImplementedError) as e:  # lightning xla is another engineer's; say so
                notes[kind] = f"{type(e).__name__}: {e}"
                row.append("n/a")
            notes.setdefault(f"{kind}_seconds", 0.0)
            notes[f"{kind}_seconds"] += time.perf_counter() - t0
        print(f"| {T:,} | " + " | ".join(row) + " |", flush=True)
    print()
    for kind in kinds:
        t = temp[kind]
        if 4096 in t and 32768 in t:
            print(f"{kind}: temp(32K)/temp(4K) = {t[32768] / t[4096]:.2f}")
        elif 4096 in t and 2048 in t:
            print(f"{kind}: temp(4K)/temp(2K) = {t[4096] / t[2048]:.2f}")
    for key, note in notes.items():
        if not key.endswith("_seconds"):
            print(f"note: {key}: {note}")
    print("compile seconds: " + ", ".join(f"{k[:-8]} {v:.1f}" for k, v in notes.items() if k.endswith("_seconds")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
