"""Plans of the balance scheduler: the cost model, micro-batches, `Plan`, the shape menu and the metrics.

See `longtrain.data.balance` for the scheduler and the layout of a micro-batch (split region + local region).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np

METHODS = ("balanced", "static", "first_fit", "best_fit")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Work of documents on ranks: attention `attention*L^2`, linear layers `linear*L`, ring traffic `comm` per token.

    A whole document costs `attention*L^2 + linear*L` on its rank. A group of c ranks running a split region of S
    tokens per rank spends, per rank, `linear_sum/c` plus the attention share `attention_sum/c` and the ring
    traffic `comm*S*(c-1)` (each rank receives the other c-1 shards). With `overlap=True` (ring attention sends the
    next KV block while it computes the current one) the exposed time of those two is their max, else their sum.
    """

    attention: float = 1.0
    linear: float = 4096.0
    comm: float = 512.0
    overlap: bool = True

    def attn(self, length):
        length = np.asarray(length, dtype=np.float64)
        return self.attention * length * length

    def doc(self, length):
        """Compute work of one whole document (numpy-vectorised over `length`)."""
        length = np.asarray(length, dtype=np.float64)
        return self.attention * length * length + self.linear * length

    def ring(self, region_tokens: int, context: int) -> float:
        """Per-rank communication of a split region of `region_tokens` tokens per rank over `context` ranks."""
        return self.comm * region_tokens * (context - 1)

    def region(self, attn_sum: float, linear_sum: float, region_tokens: int, context: int) -> float:
        """Per-rank time of a group's split region (whole-document attention/linear work sums of its documents)."""
        ring = self.ring(region_tokens, context)
        a = attn_sum / context
        return linear_sum / context + (max(a, ring) if self.overlap else a + ring)

    @classmethod
    def from_config(cls, balance_config) -> "CostModel":
        return cls(balance_config.attention_coef, balance_config.linear_coef, balance_config.comm_coef,
                   balance_config.comm_overlap)


@dataclasses.dataclass
class MicroBatch:
    """One compiled program run on all R ranks.

    `group_docs[g]`: split documents of group g (ranks g*c .. g*c+c-1), in buffer order.
    `rank_docs[r]`: whole documents of rank r, in buffer order, after the split shards.
    `split_region`: S, tokens per rank of the ring region (>= every group's split tokens per rank).
    """

    context: int
    split_region: int
    group_docs: list[list[int]]
    rank_docs: list[list[int]]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.context, self.split_region)


def zigzag_chunks(length: int, context: int) -> list[tuple[int, int]]:
    """The 2c chunks `(start, length)` of a document split over `context` ranks; sizes differ by at most one."""
    pieces = 2 * context
    base, extra = divmod(length, pieces)
    out, start = [], 0
    for j in range(pieces):
        size = base + (1 if j < extra else 0)
        out.append((start, size))
        start += size
    return out


def shard_tokens(length: int, context: int) -> int:
    """Most tokens any rank holds of a document split zigzag over `context` ranks (the per-rank room it needs)."""
    if context == 1:
        return length
    base, extra = divmod(length, 2 * context)
    # rank i holds chunks i and 2c-1-i; chunk j has one extra token when j < extra, both do when extra > c
    return 2 * base + (1 if extra > 0 else 0) + (1 if extra > context else 0)


@dataclasses.dataclass
class Plan:
    """A step's schedule: micro-batches in execution order, over `num_ranks` ranks of `capacity` tokens each."""

    method: str
    num_ranks: int
    capacity: int
    lengths: np.ndarray
    cost: CostModel
    micro_batches: list[MicroBatch]

    def placements(self) -> Iterator[tuple[int, int, int, int, int]]:
        """Yield `(doc, start, length, micro_batch, rank)` for every piece, in each rank's buffer order."""
        for m, mb in enumerate(self.micro_batches):
            c = mb.context
            for r in range(self.num_ranks):
                g, i = divmod(r, c)
                for d in mb.group_docs[g]:
                    chunks = zigzag_chunks(int(self.lengths[d]), c)
                    for j in (i, 2 * c - 1 - i):
                        start, size = chunks[j]
                        if size:
                            yield (d, start, size, m, r)
                for d in mb.rank_docs[r]:
                    yield (d, 0, int(self.lengths[d]), m, r)

    @property
    def context_degrees(self) -> list[int]:
        return [mb.context for mb in self.micro_batches]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return sorted({mb.shape for mb in self.micro_batches})

    def describe(self) -> str:
        """One line for the training log: c and split region per micro-batch."""
        parts = [f"c={mb.context} S={mb.split_region}" for mb in self.micro_batches]
        return f"{self.method}: {len(self.micro_batches)} micro-batch(es) [" + ", ".join(parts) + "]"


class ShapeMenu:
    """The (c, S) program shapes a run has used, each one compiled program, within a budget of `max_shapes`.

    Keep one menu for a whole run and pass it to every `schedule(..., menu=menu)` call; it is part of the
    loader state (`get_state`/`set_state`) so a resumed run makes the same plans. A split region first reuses
    the smallest known S for that c that is large enough or, while the menu has room, a new tighter one (both
    are offered to the scheduler). `max_shapes` is the budget the scheduler keeps to; when a step fits no plan
    within it, `balanced_micro_batches` raises it by one with a warning (a new compile) rather than failing.
    """

    def __init__(self, max_shapes: int = 8, shapes=()):
        if max_shapes < 1:
            raise ValueError(f"ShapeMenu: max_shapes={max_shapes} must be >= 1")
        self.max_shapes = max_shapes
        self.shapes: set[tuple[int, int]] = {tuple(x) for x in shapes}

    def regions(self, context: int, tokens: int, min_region: int, capacity: int) -> list[int]:
        """Candidate S for a split region of `tokens` per rank at degree `context` (empty: no shape may hold it):
        the smallest known S that holds it, and a fresh, tighter S while the menu has room. Both are offered
        because a larger reused S costs ring time (comm * S * (c-1)) and a fresh one costs a compile and a menu
        slot; the scheduler keeps whichever plan simulates faster."""
        room = len(self.shapes) < self.max_shapes
        if context == 1:
            return [0] if (1, 0) in self.shapes or room else []
        fresh = _region_size(tokens, min_region, capacity)
        # (a shape from a run with a larger capacity, restored into this one, must not be reused)
        known = [S for (c, S) in self.shapes if c == context and tokens <= S <= capacity]
        out = [min(known)] if known else []
        if room and (not out or fresh < out[0]):
            out.append(fresh)
        return out

    def add(self, shapes) -> None:
        self.shapes.update(shapes)
        if len(self.shapes) > self.max_shapes:
            raise AssertionError(f"ShapeMenu: {len(self.shapes)} shapes exceed max_shapes={self.max_shapes}")

    def get_state(self) -> dict:
        return {"max_shapes": self.max_shapes, "shapes": sorted(self.shapes)}

    @classmethod
    def from_state(cls, state: dict) -> "ShapeMenu":
        return cls(state["max_shapes"], [tuple(x) for x in state["shapes"]])


# ------------------------------------------------------------------------------------------------- work model
def _rank_work(plan: Plan, mb: MicroBatch, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-rank (region time, local work) of one micro-batch, and its exposed ring time summed over ranks."""
    c, R, cost = mb.context, plan.num_ranks, plan.cost
    region = np.zeros(R)
    local = np.zeros(R)
    exposed = 0.0
    if c > 1:
        for g, docs in enumerate(mb.group_docs):
            ls = lengths[docs]
            attn, lin = float(cost.attn(ls).sum()), float(cost.linear * ls.sum())
            region[g * c:(g + 1) * c] = t = cost.region(attn, lin, mb.split_region, c)
            exposed += c * (t - (attn + lin) / c)
    for r, docs in enumerate(mb.rank_docs):
        local[r] = float(cost.doc(lengths[docs]).sum())
    return region, local, exposed


def _simulate(plan: Plan, lengths: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Discrete-event makespan: a group's split region starts when all its ranks are free; local docs follow."""
    R = plan.num_ranks
    free = np.zeros(R)
    busy = np.zeros(R)
    exposed_total = 0.0
    for mb in plan.micro_batches:
        c = mb.context
        region, local, exposed = _rank_work(plan, mb, lengths)
        if c > 1:
            start = np.repeat(free.reshape(R // c, c).max(axis=1), c)
            free = start + region
        free = free + local
        busy += region + local
        exposed_total += exposed
    return float(free.max()), busy, exposed_total


def metrics(plan: Plan, lengths: Sequence[int] | None = None) -> dict:
    """Balance metrics of a plan (see the module docstring). `lengths` defaults to the plan's own."""
    lengths = plan.lengths if lengths is None else np.asarray(lengths, dtype=np.int64)
    if len(lengths) != len(plan.lengths) or np.any(lengths != plan.lengths):
        raise ValueError("metrics: `lengths` differ from the lengths the plan was made for")
    doc_cost = plan.cost.doc(lengths)
    makespan, busy, comm_total = _simulate(plan, lengths)
    R = plan.num_ranks
    ideal = busy.sum() / R
    compute_ideal = doc_cost.sum() / R
    slots = len(plan.micro_batches) * R * plan.capacity
    split_tokens = sum(int(lengths[d]) for mb in plan.micro_batches if mb.context > 1
                       for docs in mb.group_docs for d in docs)
    total = int(lengths.sum())
    return {
        "imbalance": float(busy.max() / busy.mean()) if busy.mean() > 0 else 1.0,
        "makespan_ratio": float(makespan / ideal) if ideal > 0 else 1.0,
        # against the communication-free ideal: what exposed ring traffic costs on top of imbalance
        "makespan_vs_compute": float(makespan / compute_ideal) if compute_ideal > 0 else 1.0,
        "padding": 1.0 - total / slots if slots else 0.0,
        "split_fraction": split_tokens / total if total else 0.0,
        "comm_fraction": comm_total / busy.sum() if busy.sum() > 0 else 0.0,
        "num_shapes": len(plan.shapes),
        "num_micro_batches": len(plan.micro_batches),
    }


# ------------------------------------------------------------------------------------------------- helpers
def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _min_context(length: int, capacity: int, num_ranks: int, what: str) -> int:
    """Smallest power-of-two c with the document's largest zigzag shard within capacity."""
    c = 1
    while shard_tokens(length, c) > capacity:
        c *= 2
        if c > num_ranks:
            raise ValueError(
                f"schedule: document {what} of {length} tokens does not fit {num_ranks} ranks x capacity "
                f"{capacity}; split documents at max length <= num_ranks*capacity in the loader"
            )
    return c


def _region_size(tokens: int, min_region: int, capacity: int) -> int:
    """Split region S from the menu {1, 1.5} x 2^k (>= min_region, at most the capacity): at most 1.5x the need."""
    if tokens == 0:
        return 0
    size = max(min_region, _next_pow2(tokens))
    if size * 3 // 4 >= max(tokens, min_region) and size % 4 == 0:
        size = size * 3 // 4
    return min(capacity, size)
