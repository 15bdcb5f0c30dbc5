"""Balance scheduler benchmark on the Wikipedia length distribution (FlexSP's `wikipedia.txt`, 1M documents).

Each step's documents are drawn from a seeded shuffle of the length file and gathered the way the loader gathers
them in balance mode (`longtrain.data.step_filler.StepFiller`: oldest pending documents first, first fit in a
lookahead window, to `fill` x R x C tokens; documents longer than R x C are cut). Every scheduler gets the same
steps. Reported per scheduler: mean and worst step over the run of the simulated makespan over the ideal, per-
rank work imbalance (max/mean), makespan over the communication-free ideal, padding, split fraction, exposed ring
time, micro-batches, distinct (c, S) program shapes over the whole run, and scheduling time per step.

    python benchmarks/balance.py [--ranks 64] [--capacity 16384] [--steps 20] [--seed 0] [--fill 0.98]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from longtrain.data.balance import CostModel, ShapeMenu, metrics, schedule
from longtrain.data.step_filler import StepFiller

DEFAULT_LENGTHS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                               "wikipedia_lengths.txt")
METHODS = ("balanced", "static", "first_fit", "best_fit")


def make_steps(lengths: np.ndarray, num_ranks: int, capacity: int, steps: int, seed: int, fill: float,
               window: int = 256) -> list[np.ndarray]:
    """Seeded steps of documents gathered by the loader's StepFiller."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    budget = int(fill * num_ranks * capacity)
    filler = StepFiller(budget, window=window)

    def stream():  # documents longer than the step budget are cut into budget-long pieces, like the loader does
        for i in order:
            n = int(lengths[i])
            while n > budget:
                yield budget
                n -= budget
            yield n
    stream = stream()
    out = []
    for _ in range(steps):
        out.append(np.asarray(filler.next_step(stream), dtype=np.int64))
    return out


def run(lengths: np.ndarray, *, num_ranks: int, capacity: int, steps: int, seed: int, fill: float,
        cost: CostModel, max_shapes: int) -> dict[str, dict]:
    step_lengths = make_steps(lengths, num_ranks, capacity, steps, seed, fill)
    static_c = 1
    while static_c * capacity < max(int(s.max()) for s in step_lengths):
        static_c *= 2
    results = {}
    for method in METHODS:
        rows, times, shapes = [], [], set()
        menu = ShapeMenu(max_shapes) if method == "balanced" else None
        for lens in step_lengths:
            t0 = time.process_time()  # CPU time of this process: one core, robust to a busy machine
            plan = schedule(lens, num_ranks, capacity, method, cost, context=static_c if method == "static" else None,
                            menu=menu)
            times.append(time.process_time() - t0)
            rows.append(metrics(plan))
            shapes.update(plan.shapes)
        results[method] = {"rows": rows, "times": times, "shapes": len(shapes), "static_c": static_c}
    return results


def table(results: dict[str, dict]) -> str:
    head = ("| scheduler | makespan/ideal mean (max) | imbalance mean | makespan/compute-ideal | padding | "
            "split tokens | exposed ring | micro-batches | shapes | CPU ms/step mean (max) |")
    lines = [head, "|" + "|".join(["---"] * 10) + "|"]
    for method, res in results.items():
        rows = res["rows"]

        def mean(key):
            return float(np.mean([r[key] for r in rows]))

        name = {"static": f"static (c={res['static_c']})", "balanced": "balanced (ours)"}.get(method, method)
        lines.append(
            f"| {name} | {mean('makespan_ratio'):.3f} ({max(r['makespan_ratio'] for r in rows):.3f}) | "
            f"{mean('imbalance'):.3f} | {mean('makespan_vs_compute'):.3f} | {100 * mean('padding'):.1f}% | "
            f"{100 * mean('split_fraction'):.1f}% | {100 * mean('comm_fraction'):.1f}% | "
            f"{mean('num_micro_batches'):.2f} | {res['shapes']} | "
            f"{1000 * np.mean(res['times']):.1f} ({1000 * max(res['times']):.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help="one document length per line")
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fill", type=float, default=0.98, help="step tokens as a fraction of ranks x capacity")
    ap.add_argument("--max-shapes", type=int, default=8)
    ap.add_argument("--attention-coef", type=float, default=CostModel.attention)
    ap.add_argument("--linear-coef", type=float, default=CostModel.linear)
    ap.add_argument("--comm-coef", type=float, default=CostModel.comm)
    ap.add_argument("--no-overlap", action="store_true", help="ring traffic adds to attention time")
    args = ap.parse_args(argv)
    if not os.path.exists(args.lengths):
        print(f"error: length file {args.lengths} not found (pass --lengths)", file=sys.stderr)
        return 2
    lengths = np.loadtxt(args.lengths, dtype=np.int64)
    cost = CostModel(args.attention_coef, args.linear_coef, args.comm_coef, overlap=not args.no_overlap)
    results = run(lengths, num_ranks=args.ranks, capacity=args.capacity, steps=args.steps, seed=args.seed,
                  fill=args.fill, cost=cost, max_shapes=args.max_shapes)
    print(f"R={args.ranks} C={args.capacity} steps={args.steps} seed={args.seed} fill={args.fill} "
          f"tokens/step~{int(args.fill * args.ranks * args.capacity)} cost={cost}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
