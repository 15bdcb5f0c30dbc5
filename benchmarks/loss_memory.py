"""Compiled memory of the LM loss + its gradient: tiled `lm_loss` vs the naive full-logits loss (compile only).

Bytes per device = temp + argument + output of `jax.jit(jax.value_and_grad(loss, argnums=(hidden, w)))`, read from
`compile().memory_analysis()`; nothing is executed. Run: `python benchmarks/loss_memory.py`.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from longtrain.loss import lm_loss, lm_loss_reference


def compiled_bytes(loss_fn, B, T, E, V, dtype):
    args = (jax.ShapeDtypeStruct((B, T, E), dtype), jax.ShapeDtypeStruct((E, V), dtype),
            jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.bool_))
    step = jax.jit(jax.value_and_grad(lambda h, w, t, m: loss_fn(h, w, t, m, num_targets=1.0), argnums=(0, 1)))
    ma = step.lower(*args).compile().memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes, ma.temp_size_in_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="E")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    cases = [(4096, 32768), (8192, 32768), (4096, 131072), (16384, 131072)]
    print(f"LM loss + grad, B=1, E={args.hidden}, {args.dtype} inputs; MiB = temp + args + outputs (temp)")
    print(f"| {'T':>6} | {'vocab':>7} | {'naive MiB':>16} | {'tiled MiB':>14} | {'ratio':>6} |")
    print(f"|{'-' * 8}|{'-' * 9}|{'-' * 18}|{'-' * 16}|{'-' * 8}|")
    for T, V in cases:
        naive, naive_tmp = compiled_bytes(lm_loss_reference, 1, T, args.hidden, V, dtype)
        tiled, tiled_tmp = compiled_bytes(lm_loss, 1, T, args.hidden, V, dtype)
        mib = 2 ** 20
        print(f"| {T:>6} | {V:>7} | {naive / mib:>7.0f} ({naive_tmp / mib:>6.0f}) | {tiled / mib:>6.0f} "
              f"({tiled_tmp / mib:>5.0f}) | {naive / tiled:>5.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
