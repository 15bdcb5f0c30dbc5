"""Context-parallel attention throughput on GPUs: tokens/s and TFLOP/s per strategy (forward+backward, causal).

Runs only when GPUs are present (all visible GPUs form the context axis); on any other platform it says so and
exits 0. FLOPs count only the unmasked causal half: forward 2·2·B·Hq·D·N²/2, backward 2.5x forward.
Run: python benchmarks/context_gpu.py [--seq 65536] [--heads 32 --kv-heads 8 --head-dim 128] [--iters 5]
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from longtrain.parallel import STRATEGIES, context_attention, make_mesh


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    platform = jax.devices()[0].platform
    if platform not in ("gpu", "cuda", "rocm"):
        print(f"context_gpu.py: no GPU present (platform is {platform!r}); nothing measured. "
              "Run it on a machine with GPUs.")
        return 0
    P = len(jax.devices())
    mesh = make_mesh(data=1, context=P)
    spec = NamedSharding(mesh, PartitionSpec(None, "context", None, None))
    B, N, Hq, Hkv, D = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    key = jax.random.split(jax.random.PRNGKey(0), 4)
    mk = lambda k, H: jax.device_put(jax.random.normal(k, (B, N, H, D), jnp.bfloat16), spec)
    q, k, v, dout = mk(key[0], Hq), mk(key[1], Hkv), mk(key[2], Hkv), mk(key[3], Hq)
    flops = 2 * 2 * B * Hq * D * N * N / 2 * 3.5
    print(f"# {P} x {jax.devices()[0].device_kind}, B={B}, N={N}, Hq={Hq}, Hkv={Hkv}, D={D}, bf16, causal, "
          f"{args.layout}, fwd+bwd")
    print("| strategy | ms/step | tokens/s | TFLOP/s per GPU |")
    print("|---|---:|---:|---:|")
    for strategy in STRATEGIES:
        u = 2 if strategy == "ulysses_ring" else None
        if strategy == "ulysses_ring" and P % 2:
            continue

        @jax.jit
        def step(q, k, v, dout):
            out, vjp = jax.vjp(lambda q, k, v: context_attention(
                q, k, v, mesh=mesh, strategy=strategy, layout=args.layout, causal=True, ulysses_degree=u), q, k, v)
            return out, vjp(dout)

        try:
            jax.block_until_ready(step(q, k, v, dout))
        except ValueError as e:  # a strategy that cannot serve this shape says why
            print(f"| {strategy} | n/a: {e} | | |")
            continue
        t0 = time.perf_counter()
        for _ in range(args.iters):
            jax.block_until_ready(step(q, k, v, dout))
        dt = (time.perf_counter() - t0) / args.iters
        print(f"| {strategy} | {dt * 1e3:.2f} | {B * N / dt:,.0f} | {flops / dt / P / 1e12:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
