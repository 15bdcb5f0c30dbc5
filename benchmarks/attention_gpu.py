"""TFLOP/s of softmax attention on a GPU: pallas (Triton) vs cudnn vs xla, forward and backward, bf16.

Cases: causal (one document per row) and packed (documents of random lengths, segment ids; FLOPs counted per
document, so block skipping shows up as speed, not as a smaller FLOP count), T = 2K..64K at a fixed
tokens-per-batch. FLOPs: forward 4*Hq*D*sum(visible pairs), backward 2.5x forward. Time: jit, warm-up, median
of --iters runs with block_until_ready; compile time excluded. cuDNN has no segment ids, so its packed row is
"n/a" (it raises rather than ignoring them).

On a machine without a GPU it prints "no GPU present" and exits 0.
Usage: python benchmarks/attention_gpu.py [--max-t 65536] [--tokens 131072] [--iters 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

HQ, HKV, D = 16, 4, 128


def _packed_segments(B, T, rng):
    """Documents with lengths drawn log-uniformly between 256 and T (a realistic packed mix)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        pos, doc = 0, 1
        while pos < T:
            n = int(min(T - pos, np.exp(rng.uniform(np.log(256), np.log(T)))))
            seg[b, pos:pos + n] = doc
            pos, doc = pos + n, doc + 1
    return seg


def _visible_pairs(seg):
    """Causal pairs inside documents: sum over documents of n(n+1)/2."""
    total = 0
    for row in seg:
        _, counts = np.unique(row, return_counts=True)
        total += int(np.sum(counts * (counts + 1) // 2))
    return total


def _time(f, *args, iters):
    jax.block_until_ready(f(*args))  # compile + warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(impl, T, tokens, packed, iters, rng):
    from longtrain.kernels import attention

    B = max(1, tokens // T)
    q = jnp.asarray(rng.standard_normal((B, T, HQ, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((B, T, HKV, D)), jnp.bfloat16)
    seg_np = _packed_segments(B, T, rng) if packed else np.ones((B, T), np.int32)
    seg = jnp.asarray(seg_np) if packed else None
    flops_fwd = 4.0 * HQ * D * _visible_pairs(seg_np)

    def fwd(q, k, v):
        return attention(q, k, v, segment_ids=seg, causal=True, impl=impl)

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(fwd, q, k, v)
        return vjp(out)

    t_fwd = _time(jax.jit(fwd), q, k, v, iters=iters)
    t_all = _time(jax.jit(fwd_bwd), q, k, v, iters=iters)
    t_bwd = max(t_all - t_fwd, 1e-9)
    return flops_fwd / t_fwd / 1e12, 2.5 * flops_fwd / t_bwd / 1e12


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-t", type=int, default=65536)
    parser.add_argument("--tokens", type=int, default=131072, help="tokens per batch (B = tokens // T)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", default="pallas,cudnn,xla")
    args = parser.parse_args(argv)
    if jax.devices()[0].platform not in ("gpu", "cuda"):
        print(f"no GPU present (platform {jax.devices()[0].platform!r}): nothing to measure")
        return 0
    rng = np.random.default_rng(0)
    impls = args.impls.split(",")
    print(f"# bf16 attention TFLOP/s on {jax.devices()[0].device_kind}, Hq={HQ} Hkv={HKV} D={D}, "
          f"{args.tokens} tokens per batch, jax {jax.__version__}")
    print("| case | T | " + " | ".join(f"{i} fwd | {i} bwd" for i in impls) + " |")
    print("|---|---|" + "---|---|" * len(impls))
    for packed in (False, True):
        for T in (t for t in (2048, 4096, 8192, 16384, 32768, 65536) if t <= args.max_t):
            cells = []
            for impl in impls:
                try:
                    f, b = bench_one(impl, T, args.tokens, packed, args.iters, rng)
                    cells += [f"{f:.0f}", f"{b:.0f}"]
                except NotImplementedError:
                    cells += ["n/a", "n/a"]
                except Exception as e:  # one failing cell (e.g. out of memory) must not hide the others
                    cells += [f"error: {type(e).__name__}", ""]
            print(f"| {'packed' if packed else 'causal'} | {T:,} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
