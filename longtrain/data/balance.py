"""Variable-length balance scheduler: one global step's documents -> micro-batches over hybrid data/context groups.

    plan = schedule(lengths, num_ranks=R, capacity=C, method="balanced", cost=CostModel(...), menu=run_menu)
    for doc, start, length, micro_batch, rank in plan.placements(): ...
    metrics(plan, lengths) -> {"imbalance", "makespan_ratio", "padding", "split_fraction", "num_shapes", ...}

A step's documents (their token lengths) are placed on R ranks, each with a buffer of C tokens per micro-batch.
Every micro-batch has one context degree `c` (a power of two dividing R): the ranks are viewed as R/c groups of c
consecutive ranks (data = R/c x context = c). Inside a micro-batch each rank's buffer holds

* first, its shards of the group's *split* documents: a split document is cut into 2c chunks and rank i of the
  group holds chunks i and 2c-1-i (zigzag), so causal attention work is even over the group. The first `S` tokens
  of every buffer (the split region, S >= the largest group's shard tokens) are the only part in ring traffic;
* then whole short documents, attended locally. Short documents are never split (no communication for them).

`(c, S)` is the compiled-program shape of a micro-batch. S comes from the menu {1, 1.5} x 2^k, and a run-wide
`ShapeMenu` caps the number of distinct shapes (8 by default).

Cost model (`CostModel`, coefficients from `BalanceConfig`): a whole document costs `a*L^2 + b*L` on its rank; a
group's split region costs each of its ranks `b*sum(L)/c` plus the attention share `a*sum(L^2)/c` and the ring
traffic `comm*S*(c-1)`, overlapped (max) by default or added (`comm_overlap=false`).

Methods (all return a `Plan`; baselines as in the issue):
* `balanced` (ours, `balance_search.py`): per micro-batch, try every c and a range of split sets (the k heaviest
  documents), estimate each candidate's makespan cheaply, pack the best few for real (greedy on projected loads,
  then a move/swap local search) and keep the one with the smallest simulated makespan. Micro-batches are added
  only when the step does not fit one.
* `static`: a fixed context degree fitting the longest document (a static mesh); documents first-fit in arrival
  order into rows of c ranks; every document of a row is sharded over the row's c ranks (the whole buffer rings).
* `first_fit`: naive packing: documents longer than C are split over the fewest ranks that hold them, everything
  else first-fit in arrival order into rank buffers.
* `best_fit`: token-balanced best-fit decreasing: the same, with documents sorted by length, each placed where it
  fits tightest. Balances tokens, ignores FLOPs.

`metrics` (in `balance_plan.py`) works from the plan alone (deterministic, CPU): imbalance = max/mean per-rank work;
makespan_ratio = discrete-event makespan (a split region starts when all ranks of its group are free) over the
ideal sum(work)/R; makespan_vs_compute = the same over the communication-free ideal; padding = 1 - tokens /
(micro-batches x R x C); split_fraction = tokens in split documents / tokens; comm_fraction = exposed ring time /
work; num_shapes = distinct (c, S).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from longtrain.data.balance_plan import (  # noqa: F401  (re-exported: the public API lives here)
    METHODS,
    CostModel,
    MicroBatch,
    Plan,
    ShapeMenu,
    _min_context,
    _region_size,
    metrics,
    shard_tokens,
    zigzag_chunks,
)
from longtrain.data.balance_search import balanced_micro_batches

__all__ = ["METHODS", "CostModel", "MicroBatch", "Plan", "ShapeMenu", "metrics", "schedule", "shard_tokens",
           "zigzag_chunks"]


# ------------------------------------------------------------------------------------------------- baselines
def _static(lengths, R, C, context) -> list[MicroBatch]:
    c = context or _min_context(int(lengths.max()), C, R, "longest")
    if R % c:
        raise ValueError(f"schedule(static): context={c} must divide num_ranks={R}")
    rows: list[list[int]] = []
    room: list[int] = []  # per rank of the row: every document is sharded zigzag over the row's c ranks
    for d, length in enumerate(lengths):
        need = shard_tokens(int(length), c)
        if need > C:
            raise ValueError(f"schedule(static): document {d} of {int(length)} tokens does not fit c={c} ranks x {C}")
        for k in range(len(rows)):
            if room[k] >= need:
                rows[k].append(d)
                room[k] -= need
                break
        else:
            rows.append([d])
            room.append(C - need)
    G = R // c
    mbs = []
    for m0 in range(0, len(rows), G):
        chunk = rows[m0:m0 + G]
        chunk += [[] for _ in range(G - len(chunk))]
        if c == 1:
            mbs.append(MicroBatch(1, 0, [[] for _ in range(R)], chunk))
        else:
            mbs.append(MicroBatch(c, C, chunk, [[] for _ in range(R)]))
    return mbs


def _greedy(lengths, R, C, quantum, *, sort: bool) -> list[MicroBatch]:
    """first_fit (arrival order, first rank with room) / best_fit (longest first, tightest rank)."""
    long_docs = [d for d in range(len(lengths)) if lengths[d] > C]
    c = max([_min_context(int(lengths[d]), C, R, str(d)) for d in long_docs], default=1)
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    G = R // c
    mbs: list[dict] = []

    def new_mb():
        mbs.append({"group": [[] for _ in range(G)], "gtok": [0] * G, "rank": [[] for _ in range(R)],
                    "room": [C] * R})
        return mbs[-1]

    for d in order:
        d = int(d)
        length = int(lengths[d])
        if length > C:
            need = shard_tokens(length, c)
            spot = None
            for mb in mbs:
                for g in range(G):
                    ranks = range(g * c, (g + 1) * c)
                    if all(mb["room"][r] >= need for r in ranks):
                        spot = (mb, g)
                        break
                if spot:
                    break
            mb, g = spot or (new_mb(), 0)
            mb["group"][g].append(d)
            mb["gtok"][g] += need
            for r in range(g * c, (g + 1) * c):
                mb["room"][r] -= need
            continue
        spot = None
        for mb in mbs:
            fits = [r for r in range(R) if mb["room"][r] >= length]
            if fits:
                r = min(fits, key=lambda k: mb["room"][k]) if sort else fits[0]
                spot = (mb, r)
                break
        mb, r = spot or (new_mb(), 0)
        mb["rank"][r].append(d)
        mb["room"][r] -= length
    out = []
    for mb in mbs:
        has_split = any(mb["group"])
        if c > 1 and has_split:
            out.append(MicroBatch(c, _region_size(max(mb["gtok"]), quantum, C), mb["group"], mb["rank"]))
        else:
            out.append(MicroBatch(1, 0, [[] for _ in range(R)], mb["rank"]))
    return out


# ------------------------------------------------------------------------------------------------- entry point
def schedule(lengths: Sequence[int], num_ranks: int, capacity: int, method: str = "balanced",
             cost: CostModel | None = None,
             *, region_quantum: int | None = None, context: int | None = None, menu: ShapeMenu | None = None) -> Plan:
    """Schedule one step's documents (token `lengths`) onto `num_ranks` ranks of `capacity` tokens.

    `region_quantum`: the smallest split region (default capacity // 64); regions come from the menu
    {1, 1.5} x 2^k. `menu`: the run's `ShapeMenu` (balanced only; default a fresh one of 8 shapes), updated with
    the shapes this plan uses. `context`: the fixed degree of `method="static"` (default: the smallest power of
    two fitting the longest document).
    """
    if method not in METHODS:
        raise ValueError(f"schedule: method={method!r} is not one of {METHODS}")
    if num_ranks < 1 or num_ranks & (num_ranks - 1):
        raise ValueError(f"schedule: num_ranks={num_ranks} must be a power of two (context degrees divide it)")
    if capacity < 1:
        raise ValueError(f"schedule: capacity={capacity} must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError(f"schedule: lengths must be a non-empty 1-D sequence, got shape {lengths.shape}")
    if lengths.min() < 1:
        raise ValueError(f"schedule: document {int(np.argmin(lengths))} has length {int(lengths.min())} (< 1)")
    longest = int(np.argmax(lengths))
    _min_context(int(lengths[longest]), capacity, num_ranks, str(longest))  # raises, naming it, if it cannot fit
    cost = cost or CostModel()
    quantum = region_quantum or max(1, capacity // 64)
    if method == "balanced":
        mbs = balanced_micro_batches(lengths, num_ranks, capacity, cost, quantum,
                                     menu if menu is not None else ShapeMenu())
    elif method == "static":
        mbs = _static(lengths, num_ranks, capacity, context)
    else:
        mbs = _greedy(lengths, num_ranks, capacity, quantum, sort=(method == "best_fit"))
    return Plan(method, num_ranks, capacity, lengths, cost, mbs)
