"""SeCO vs full backprop: compiled per-device memory of one training step vs T, the longest T within a budget, and
CPU step-time ratios (SeCO / full, SpaCO p=0.25 / SeCO) measured in the same run.

Memory is compile-only (`jax.jit(step).lower(...).compile().memory_analysis()`: temp + argument + output bytes;
nothing runs) on a fixed ~150M-parameter bf16 Llama-style model (GQA). Full backprop takes its best remat policy
(the remat policy / layer-scan variant with the least memory at the probe length; SeCO likewise). Memory is linear
in T for both, so the longest T is solved from two probe lengths and then confirmed by compiling at that T. Run: `python benchmarks/chunkwise_memory.py`.

`--context P` adds SeCO across the context axis (every chunk split over P of the 8 simulated devices, K/V buffers
and accumulator T/P per device; per-device memory of the SPMD program) and times SeCO at P = 8 against P = 1 on the
same total T.

`--kv-grad-dtype bfloat16` measures SeCO with a bf16 K/V cotangent accumulator (default fp32). XLA:CPU caveat: it
has no bf16 dynamic-slice and converts a sliced bf16 array to f32 whole; full backprop's scanned residual stack
[L,T,E] gets such an f32 copy (42 of its 127 KiB/token for the llama model), SeCO keeps its cache as uint16 words
and does not (a bf16 accumulator does get one, so on CPU it saves 3 of the 7 KiB/token it saves on GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax: --context P meshes

import jax
import jax.numpy as jnp

from longtrain import models
from longtrain.chunkwise import seco_grad, sequence_loss, spaco_grad
from longtrain.config import ModelConfig

GIB = 2 ** 30
# MiniMax-style hybrid of the same size: 6 lightning layers per softmax layer (x2), dense MLP (one expert)
HYBRID_150M = ModelConfig(architecture="minimax", vocab_size=32000, hidden_size=768, intermediate_size=2560,
                          num_layers=14, num_heads=12, num_kv_heads=2, num_experts=1, experts_per_token=1,
                          moe_impl="dense", layer_types=(["linear_attention"] * 6 + ["full_attention"]) * 2,
                          dtype="bfloat16", param_dtype="bfloat16", attention_impl="xla")
MODEL_150M = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=768, intermediate_size=2560,
                         num_layers=14, num_heads=12, num_kv_heads=2, dtype="bfloat16", param_dtype="bfloat16",
                         attention_impl="xla")


def _abstract_batch(T, sharding=None):
    i32 = jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=sharding)
    return {"tokens": i32, "targets": i32, "loss_mask": jax.ShapeDtypeStruct((1, T), jnp.bool_, sharding=sharding),
            "positions": i32, "segment_ids": i32}


def context_mesh(context):
    from longtrain import parallel

    return parallel.make_mesh(data=1, context=context, devices=jax.devices()[:context])


def step_bytes(config, T, mode, chunk_size=None, kv_grad_dtype=None, context=1, offload=False):
    """temp + argument + output bytes of one (loss, grads) step per device, compile only. `context` > 1: SeCO with
    every chunk split over that many devices (the batch sharded along the sequence, parameters replicated).
    `offload`: SeCO with its K/V buffers and accumulator in host memory; the bytes returned are the device's, i.e.
    the compiled total less those buffers (XLA:CPU lumps host and device memory; the buffers' sizes are exact)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    params = jax.eval_shape(lambda: models.init(config, jax.random.PRNGKey(0)))
    batch = _abstract_batch(T)
    if mode == "full":
        fn = jax.value_and_grad(lambda p, b: sequence_loss(config, p, b))
    elif context > 1:
        mesh = context_mesh(context)
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
                              params)
        batch = _abstract_batch(T, NamedSharding(mesh, P(None, "context")))
        fn = lambda p, b: seco_grad(config, p, b, chunk_size, kv_grad_dtype=kv_grad_dtype, mesh=mesh)  # noqa: E731
    else:
        fn = lambda p, b: seco_grad(config, p, b, chunk_size, kv_grad_dtype=kv_grad_dtype,  # noqa: E731
                                    offload=offload)
    ma = jax.jit(fn).lower(params, batch).compile().memory_analysis()
    host = 0
    if offload:
        from longtrain.chunkwise import offloaded_kv_bytes
        from longtrain.chunkwise.layout import chunk_and_padded_len

        host = offloaded_kv_bytes(config, 1, chunk_and_padded_len(T, chunk_size)[1], kv_grad_dtype)
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - host


def longest_T(measure, budget, probe, multiple, measured):
    """Largest T (a multiple of `multiple`) with measure(T) <= budget, from a linear fit through two probes, then
    confirmed by compiling at the answer. Every (T, bytes) compiled is appended to `measured`."""
    def m(T):
        b = measure(T)
        measured.append((T, b))
        return b
    (t1, b1), (t2, b2) = (probe, m(probe)), (2 * probe, m(2 * probe))
    per_token = (b2 - b1) / (t2 - t1)
    for _ in range(4):  # secant steps: refit through the two longest points until the answer fits
        T = int(t2 + (budget - b2) / per_token) // multiple * multiple
        bT = m(T)
        if bT <= budget:
            return T, per_token
        (t1, b1), (t2, b2) = (t2, b2), (T, bT)
        per_token = (b2 - b1) / (t2 - t1)
    while T > multiple and m(T) > budget:
        T -= multiple
    return T, per_token


def best_variant(config, T, mode, chunk_size, variants):
    """The (remat, scan_layers) variant with the least step memory at T, and the bytes of every variant."""
    sizes = {v: step_bytes(dataclasses.replace(config, remat=v[0], scan_layers=v[1]), T, mode, chunk_size)
             for v in variants}
    return min(sizes, key=sizes.get), sizes


def memory_table(budget_gib, chunk_size, probe, search=True, hybrid=False, kv_grad_dtype=None, context=1,
                 offload=False):
    config = HYBRID_150M if hybrid else MODEL_150M
    n_params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: models.init(config, jax.random.PRNGKey(0)))))
    print(f"model: {'minimax hybrid (12 lightning + 2 softmax layers)' if hybrid else 'llama-style'}, {n_params / 1e6:.0f}M params, bf16, E={config.hidden_size}, L={config.num_layers}, "
          f"heads {config.num_heads}/{config.num_kv_heads} (q/kv), vocab {config.vocab_size}; B=1 per device")
    # (remat policy, scan_layers). On the XLA CPU compiler remat only pays off with scanned layers.
    full_variants = [("none", False), ("full", True), ("save_attention_output", True), ("save_dots", True)]
    seco_variants = [("none", False), ("full", True)]
    if not search:  # the winners of the search (see README): skip the extra compiles
        full_variants, seco_variants = [("full", True)], [("full", True)]
    best_full, sizes = best_variant(config, probe, "full", None, full_variants)
    print(f"full backprop at T={probe}: " + ", ".join(f"remat={r}{' scanned' if sc else ''}: {b / GIB:.2f} GiB"
                                                     for (r, sc), b in sizes.items()))
    best_seco, sizes = best_variant(config, 4 * probe, "seco", chunk_size, seco_variants)
    print(f"SeCO at T={4 * probe}: " + ", ".join(f"remat={r}{' scanned' if sc else ''}: {b / GIB:.2f} GiB"
                                               for (r, sc), b in sizes.items()))
    budget, measured_full, measured_seco = budget_gib * GIB, [], []
    full_cfg = dataclasses.replace(config, remat=best_full[0], scan_layers=best_full[1])
    seco_cfg = dataclasses.replace(config, remat=best_seco[0], scan_layers=best_seco[1])
    full_T, full_per_tok = longest_T(lambda T: step_bytes(full_cfg, T, "full"), budget, probe, 1024, measured_full)
    seco_T, seco_per_tok = longest_T(lambda T: step_bytes(seco_cfg, T, "seco", chunk_size, kv_grad_dtype), budget,
                                     4 * probe, chunk_size, measured_seco)
    if offload:
        off_T, off_per_tok = longest_T(lambda T: step_bytes(seco_cfg, T, "seco", chunk_size, kv_grad_dtype,
                                                            offload=True), budget, 16 * probe, chunk_size, [])
    if context > 1:
        measured_cp = []
        cp_T, cp_per_tok = longest_T(lambda T: step_bytes(seco_cfg, T, "seco", chunk_size, kv_grad_dtype, context),
                                     budget, 4 * context * probe, chunk_size, measured_cp)
    name = lambda v: f"remat={v[0]}{', scanned layers' if v[1] else ''}"  # noqa: E731
    print(f"\n| method | bytes/token | longest T in {budget_gib:g} GiB | vs full |")
    print("|---|---|---|---|")
    print(f"| full backprop ({name(best_full)}) | {full_per_tok / 1024:.1f} KiB | {full_T:,} | 1.0x |")
    acc = f", {jnp.dtype(kv_grad_dtype).name} K/V grad accumulator" if kv_grad_dtype else ""
    print(f"| SeCO (chunk {chunk_size}, {name(best_seco)}{acc}) | {seco_per_tok / 1024:.1f} KiB | {seco_T:,} | "
          f"{seco_T / full_T:.1f}x |")
    if offload:
        print(f"| SeCO, K/V buffers + accumulator in host memory (device bytes) | {off_per_tok / 1024:.2f} KiB | "
              f"{off_T:,} | {off_T / full_T:.1f}x |")
    if context > 1:
        print(f"| SeCO across context={context} (per device; T is the whole sequence) | {cp_per_tok / 1024:.2f} KiB | "
              f"{cp_T:,} | {cp_T / full_T:.1f}x ({cp_T / seco_T:.2f}x SeCO on one device, "
              f"{cp_T / seco_T / context:.2f} of {context}x) |")
    print("\nGiB per step vs T (every compiled point):")
    print("| T | full | SeCO |")
    print("|---|---|---|")
    rows = {}
    for T, b in measured_full:
        rows.setdefault(T, [None, None])[0] = b
    for T, b in measured_seco:
        rows.setdefault(T, [None, None])[1] = b
    for T in sorted(rows):
        f, sc = (f"{x / GIB:.2f}" if x is not None else "" for x in rows[T])
        print(f"| {T:,} | {f} | {sc} |")


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def timing_table(T, chunk_size, repeats, context=1):
    config = ModelConfig(architecture="llama", vocab_size=4096, hidden_size=256, intermediate_size=768,
                         num_layers=4, num_heads=8, num_kv_heads=2, remat="full", attention_impl="xla")
    params = models.init(config, jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    tokens = jax.random.randint(key, (1, T), 0, config.vocab_size)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones((1, T), bool)}
    full = jax.jit(jax.value_and_grad(lambda p, b: sequence_loss(config, p, b)))
    seco = jax.jit(lambda p, b: seco_grad(config, p, b, chunk_size))
    spaco = jax.jit(lambda p, b, r: spaco_grad(config, p, b, chunk_size, 0.25, r))
    t_full = _time(full, params, batch, repeats=repeats)
    t_seco = _time(seco, params, batch, repeats=repeats)
    # SpaCO's cost depends on how many chunks are kept: average over keys (expected cost)
    keys = jax.random.split(jax.random.PRNGKey(2), 4 * repeats)
    jax.block_until_ready(spaco(params, batch, keys[0]))
    t0 = time.perf_counter()
    for k in keys:
        jax.block_until_ready(spaco(params, batch, k))
    t_spaco = (time.perf_counter() - t0) / len(keys)
    print(f"\nCPU step time, T={T}, chunk {chunk_size} ({T // chunk_size} chunks), small model "
          f"(E={config.hidden_size}, L={config.num_layers}), same run:")
    print("| step | seconds | ratio |")
    print("|---|---|---|")
    print(f"| full backprop (remat=full) | {t_full:.3f} | 1.00 (vs full) |")
    print(f"| SeCO | {t_seco:.3f} | {t_seco / t_full:.2f} (vs full) |")
    print(f"| SpaCO p=0.25 (mean over {len(keys)} keys) | {t_spaco:.3f} | {t_spaco / t_seco:.2f} (vs SeCO) |")
    if context > 1:  # the same total T and chunk, every chunk split over `context` simulated devices
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = context_mesh(context)
        placed = jax.device_put(batch, NamedSharding(mesh, P(None, "context")))
        seco_cp = jax.jit(lambda p, b: seco_grad(config, p, b, chunk_size, mesh=mesh))
        t_cp = _time(seco_cp, jax.device_put(params, NamedSharding(mesh, P())), placed, repeats=repeats)
        print(f"| SeCO across context={context} ({context} simulated devices on this CPU) | {t_cp:.3f} | "
              f"{t_cp / t_seco:.2f} (vs SeCO) |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--probe", type=int, default=4096, help="probe length for the linear memory fit")
    parser.add_argument("--time-T", type=int, default=2048)
    parser.add_argument("--time-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--hybrid", action="store_true", help="memory table for the MiniMax-style hybrid model")
    parser.add_argument("--kv-grad-dtype", choices=["float32", "bfloat16"], default=None,
                        help="SeCO's K/V cotangent accumulator dtype (default fp32; bf16 halves it, less exact)")
    parser.add_argument("--context", type=int, default=1,
                        help="also SeCO with every chunk split over this many of the 8 simulated devices")
    parser.add_argument("--offload", action="store_true",
                        help="also SeCO with optim.seco_offload=host (device bytes: compiled total less the buffers)")
    parser.add_argument("--no-search", action="store_true",
                        help="use remat=full with scanned layers for both instead of searching the variants")
    args = parser.parse_args(argv)
    if not args.skip_memory:
        memory_table(args.budget_gib, args.chunk_size, args.probe, search=not args.no_search, hybrid=args.hybrid,
                     kv_grad_dtype=args.kv_grad_dtype, context=args.context, offload=args.offload)
    if not args.skip_timing:
        timing_table(args.time_T, args.time_chunk, args.repeats, context=args.context)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
