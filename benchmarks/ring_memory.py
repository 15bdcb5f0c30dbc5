"""Our ring attention against the RingAttention authors' JAX code (`ringattention` 0.1.2), side by side: compiled
forward+backward temp memory per device and CPU time, same shapes, same run, 8 simulated devices.

Both run inside a `shard_map` over a context axis of 8, causal, fp32, one sequence of N tokens split 8 ways,
H heads of D=64 (no GQA: the peer has none). Ours: `parallel.context_attention(strategy="ring")` with its default
kernel and blocks; the peer: `ringattention.ring_attention` at each of `--peer-chunks` query/key chunk sizes (its
blockwise loop), and the ratios are against its best chunk size for memory and for time separately. Memory is
XLA's compiled `temp_size_in_bytes` of `jax.grad` of sum(out * cotangent) w.r.t. q, k, v; time is the best of a
few runs.

The peer is an optional benchmark dependency, never a runtime one. Install it beside this checkout, e.g.:
    python -m venv --system-site-packages /tmp/peer && /tmp/peer/bin/pip install --no-deps ringattention==0.1.2 einops
    /tmp/peer/bin/python benchmarks/ring_memory.py [--lengths 8192 16384 32768] [--heads 8]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

D, P_CTX = 64, 8


def _ours(mesh):
    from longtrain.parallel import context_attention

    def attend(q, k, v):
        return context_attention(q, k, v, mesh=mesh, strategy="ring", layout="contiguous")

    return attend


def _import_peer():
    """ringattention 0.1.2's __init__ reads `jax.lib.xla_bridge`, which newer jax no longer exposes there; point
    it at the module it moved to, then import the peer's JAX implementation."""
    import jax.lib

    if not hasattr(jax.lib, "xla_bridge"):
        from jax._src import xla_bridge

        jax.lib.xla_bridge = xla_bridge
    from ringattention.ringattention_jax import ring_attention

    return ring_attention


def _peer(mesh, chunk):
    ring_attention = _import_peer()

    kwargs = dict(causal_block_size=1, query_chunk_size=chunk, key_chunk_size=chunk, deterministic=True,
                  dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32, policy=jax.checkpoint_policies.nothing_saveable,
                  precision=None, prevent_cse=True)

    def local(q, k, v):
        return ring_attention(q, k, v, None, None, None, "context", True, kwargs)

    spec = P(None, "context", None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)


def _grad(attend):
    return jax.jit(jax.grad(lambda q, k, v, ct: jnp.sum(attend(q, k, v) * ct), argnums=(0, 1, 2)))


def measure(attend, N, heads, mesh, repeats):
    sharding = NamedSharding(mesh, P(None, "context", None, None))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, ct = (jax.device_put(0.3 * jax.random.normal(key, (1, N, heads, D), jnp.float32), sharding)
                   for key in keys)
    compiled = _grad(attend).lower(q, k, v, ct).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(q, k, v, ct))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, ct))
        best = min(best, time.perf_counter() - t0)
    return temp, best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--peer-chunks", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        _import_peer()
    except ImportError as e:
        print(f"ring_memory.py: the peer `ringattention` is not installed ({e}); install it in a separate venv "
              "(see this file's docstring). Nothing measured.")
        return 0
    from longtrain.kernels.attention import xla_flash
    from longtrain.parallel import make_mesh

    mesh = make_mesh(data=1, context=P_CTX, devices=jax.devices()[:P_CTX])
    chunks = args.peer_chunks
    print(f"# ring attention fwd+bwd per device, {P_CTX} simulated devices, causal, fp32, H={args.heads} D={D}, "
          f"jax {jax.__version__}; ours: xla kernel, blocks (q, k) {xla_flash.DEFAULT_BLOCKS} forward, "
          f"{xla_flash.DEFAULT_BLOCKS_BWD} backward; peer at chunk sizes {chunks}")
    peer_cols = [f"peer temp c={c}" for c in chunks] + [f"peer s c={c}" for c in chunks]
    cols = ["N", "ours temp"] + peer_cols[:len(chunks)] + ["ours / best peer"] + ["ours s"] + \
        peer_cols[len(chunks):] + ["time ours / best peer"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for N in args.lengths:
        ours_temp, ours_s = measure(_ours(mesh), N, args.heads, mesh, args.repeats)
        peers = [measure(_peer(mesh, c), N, args.heads, mesh, args.repeats) for c in chunks]
        best_temp, best_s = min(t for t, _ in peers), min(s for _, s in peers)
        row = [f"{N:,}", f"{ours_temp / 2**20:.1f} MiB"] + [f"{t / 2**20:.1f} MiB" for t, _ in peers] + \
            [f"{ours_temp / best_temp:.2f}", f"{ours_s:.3f}"] + [f"{s:.3f}" for _, s in peers] + \
            [f"{ours_s / best_s:.2f}"]
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
