"""Communication and balance of the context-parallel strategies (deterministic, CPU).

For each strategy at P context ranks: compile forward and forward+backward of one attention layer, read the
bytes each device sends from the compiled HLO collectives x while-loop trip counts (longtrain.parallel.hlo_comm),
and print them next to the analytic formula. Then the per-rank useful causal attention work (max/mean) for each
layout. Run: python benchmarks/context_comm.py [--P 8] [--seq 1024] [--heads 8 --kv-heads 2 --head-dim 64]
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from longtrain.parallel import causal_work_per_rank, context_attention, imbalance, make_mesh  # noqa: E402
from longtrain.parallel.hlo_comm import collective_bytes, total_bytes  # noqa: E402

STRATEGIES = ("ring", "token_ring", "all_gather", "ulysses", "ulysses_ring")


def formula_bytes(strategy, *, P, B, N, Hq, Hkv, D, b, u=2):
    """(forward, forward+backward) bytes sent per device per layer; b = bytes per input element, fp32 = 4.

    forward+backward is one program (a training step): XLA merges the backward's collectives that repeat the
    forward's exactly (the first K/V hop of the ring, TokenRing's first Q hop, all_gather's re-gather), so they
    are counted once, as they run. The ring and TokenRing loops are scanned (memory flat in P), so their later
    hops run again in the backward."""
    n = N // P
    h, hkv = Hq * D, Hkv * D
    if strategy == "ring":
        fwd = 2 * (P - 1) * B * n * hkv * b                                # K, V: P-1 hops
        bwd = 2 * (P - 2) * B * n * hkv * b + 2 * P * B * n * hkv * 4       # K, V again (hop 1 shared); fp32 dK, dV
    elif strategy == "token_ring":
        fwd = (P - 1) * B * n * (h * b + (h + Hq) * 4)                     # Q one way, fp32 (out, lse) back
        bwd = ((P - 1) * B * n * (h * b + (h + Hq) * 4) + (P - 1) * B * n * h * 4  # dout, out, lse with Q; fp32 dQ
               + (P - 2) * B * n * h * b)  # Q again: the scanned loop keeps no forward hop (hop 1 is shared)
    elif strategy == "all_gather":
        fwd = (P - 1) * B * n * 2 * hkv * b
        bwd = (P - 1) * B * n * 2 * hkv * 4                                # reduce-scatter of fp32 dK, dV
    elif strategy == "ulysses":
        hkv = max(Hkv, P) * D                                               # kv heads replicated up to P when fewer
        fwd = (P - 1) / P * B * n * (2 * h + 2 * hkv) * b                   # q, k, v in; out back
        bwd = fwd                                                           # dout in; dq, dk, dv back
    elif strategy == "ulysses_ring":
        r = P // u
        a2a = (u - 1) / u * B * n * (2 * h + 2 * hkv) * b
        fwd = a2a + 2 * (r - 1) * B * n * hkv * b
        bwd = a2a + 2 * (r - 2) * B * n * hkv * b + 2 * r * B * n * hkv * 4
    else:
        raise ValueError(f"strategy={strategy!r} has no formula")
    return fwd, fwd + bwd


def measure(strategy, *, P, B, N, Hq, Hkv, D, dtype=jnp.float32, layout="zigzag", u=2, impl="reference"):
    """(forward bytes, forward+backward bytes, collective launches fwd, fwd+bwd) per device from compiled HLO."""
    mesh = make_mesh(data=1, context=P, devices=jax.devices()[:P])
    spec = NamedSharding(mesh, PartitionSpec(None, "context", None, None))
    q = jax.ShapeDtypeStruct((B, N, Hq, D), dtype, sharding=spec)
    kv = jax.ShapeDtypeStruct((B, N, Hkv, D), dtype, sharding=spec)
    attend = lambda q, k, v: context_attention(q, k, v, mesh=mesh, strategy=strategy, layout=layout, causal=True,
                                               impl=impl, ulysses_degree=u if strategy == "ulysses_ring" else None)

    def fwd_bwd(q, k, v, dout):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(dout)  # a training step needs both

    counts_f = collective_bytes(jax.jit(attend).lower(q, kv, kv).compile().as_text(), P)
    counts_fb = collective_bytes(jax.jit(fwd_bwd).lower(q, kv, kv, q).compile().as_text(), P)
    return total_bytes(counts_f), total_bytes(counts_fb), counts_f.get("count", 0), counts_fb.get("count", 0)


def comm_rows(*, P=8, B=1, N=1024, Hq=8, Hkv=2, D=64, dtype=jnp.float32, strategies=STRATEGIES):
    rows = []
    b = jnp.dtype(dtype).itemsize
    for s in strategies:
        f_hlo, fb_hlo, nf, nfb = measure(s, P=P, B=B, N=N, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype)
        f_formula, fb_formula = formula_bytes(s, P=P, B=B, N=N, Hq=Hq, Hkv=Hkv, D=D, b=b)
        rows.append(dict(strategy=s, fwd_hlo=f_hlo, fwd_formula=f_formula, fwdbwd_hlo=fb_hlo,
                         fwdbwd_formula=fb_formula, launches_fwd=nf, launches_fwdbwd=nfb))
    return rows


def balance_rows(*, P=8, N=1024):
    rows = []
    for layout in ("contiguous", "zigzag", "striped"):
        work = causal_work_per_rank(layout, N, P)
        rows.append(dict(layout=layout, max_over_mean=imbalance(work)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args(argv)
    if len(jax.devices()) < args.P:
        print(f"need {args.P} devices, have {len(jax.devices())}")
        return 1
    kib = lambda x: f"{x / 1024:,.1f}"
    print(f"# bytes sent per device per layer (KiB), P={args.P}, B=1, N={args.seq}, Hq={args.heads}, "
          f"Hkv={args.kv_heads}, D={args.head_dim}, fp32 inputs (XLA:CPU widens bf16 collectives to f32), causal, zigzag (ulysses_ring: u=2)")
    print("| strategy | fwd HLO | fwd formula | fwd+bwd HLO | fwd+bwd formula | collectives fwd / fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in comm_rows(P=args.P, N=args.seq, Hq=args.heads, Hkv=args.kv_heads, D=args.head_dim):
        print(f"| {r['strategy']} | {kib(r['fwd_hlo'])} | {kib(r['fwd_formula'])} | {kib(r['fwdbwd_hlo'])} | "
              f"{kib(r['fwdbwd_formula'])} | {r['launches_fwd']} / {r['launches_fwdbwd']} |")
    print(f"\n# useful causal attention work per rank, max/mean, P={args.P}, N={args.seq}")
    print("| layout | max/mean |")
    print("|---|---:|")
    for r in balance_rows(P=args.P, N=args.seq):
        print(f"| {r['layout']} | {r['max_over_mean']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
