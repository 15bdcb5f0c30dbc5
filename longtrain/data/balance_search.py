"""The `balanced` method of the balance scheduler (ours): choose c, the split documents and the placement.

For one micro-batch, candidates are every power-of-two context degree c (from the smallest that holds the longest
document up to R) times the number k of heaviest documents that are split. A candidate is estimated cheaply (split
documents placed on groups for real, whole documents water-filled, the heaviest whole document on the least
loaded rank); the best few are packed for real (greedy on projected loads, then a move/swap local search) and the
one with the smallest simulated makespan wins. Micro-batches are added only when the step does not fit one.
"""
from __future__ import annotations

import heapq
import logging
import math

import numpy as np

from longtrain.data.balance_plan import CostModel, MicroBatch, ShapeMenu, _min_context, shard_tokens

log = logging.getLogger(__name__)


# Why "projected" loads: a step is filled close to R x C tokens, so every rank ends near capacity and the linear
# work is nearly the same everywhere. What differs is the non-linear part (attention L^2, exposed ring time).
# Ranks are therefore compared by their work so far plus `rho` (the mean work per token of the whole documents
# still to come) for every token they will still take to reach the average fill. Greedy on that key, a rank that
# already holds heavy attention work takes fewer tokens instead of everybody being filled to the brim.


def _group_prefixes(by_cost: list[int], ks: list[int], c: int, lengths, doc_cost, R: int, C: int,
                    cost: CostModel, min_region: int, menu: ShapeMenu):
    """Split the k heaviest documents over the R/c groups, for every k in `ks` (ascending) in one greedy pass.

    Each document goes to the group with the least compute share that has room for its shard (ties: fewer
    tokens). Yields (k, group_docs, per-rank region time, per-rank region tokens, S) for every k and every
    region S the shape menu offers for it; stops at the first document that fits nowhere.
    """
    G = R // c
    group_docs: list[list[int]] = [[] for _ in range(G)]
    tokens = [0] * G
    whole = [0] * G
    attn = [0.0] * G
    share = [0.0] * G
    wanted = set(ks)
    for i in range(max(ks) + 1):
        for region in (menu.regions(c, max(tokens), min_region, C) if i in wanted else ()):
            times = [cost.region(attn[g], cost.linear * whole[g], region, c) for g in range(G)]
            yield (i, [list(x) for x in group_docs], [times[r // c] for r in range(R)],
                   [tokens[r // c] for r in range(R)], region)
        if i == len(by_cost):
            return
        d = by_cost[i]
        need = shard_tokens(lengths[d], c)
        best = -1
        for g in range(G):
            if tokens[g] + need <= C and (best < 0 or share[g] < share[best]
                                          or (share[g] == share[best] and tokens[g] < tokens[best])):
                best = g
        if best < 0:
            return
        group_docs[best].append(d)
        tokens[best] += need
        whole[best] += lengths[d]
        attn[best] += cost.attention * lengths[d] * lengths[d]
        share[best] += doc_cost[d] / c


def _water_level(work: np.ndarray, room: np.ndarray, local_work: float, rho: float) -> float:
    """Estimated makespan if the whole documents were fluid: fill ranks to a common level within their room.

    Rank r absorbs clip(level, work_r, work_r + rho*room_r) - work_r; the total is piecewise linear in the
    level, so it is solved exactly at the breakpoints. Returns inf when there is not enough room.
    """
    if local_work <= 0:
        return float(work.max())
    cap = work + rho * room
    points = np.sort(np.concatenate([work, cap]))
    absorbed = (np.clip(points[:, None], work[None, :], cap[None, :]) - work[None, :]).sum(axis=1)
    j = int(np.searchsorted(absorbed, local_work))
    if j >= len(points):
        return math.inf
    if j == 0:
        return max(float(points[0]), float(work.max()))
    a0, a1 = absorbed[j - 1], absorbed[j]
    level = points[j - 1] + (points[j] - points[j - 1]) * (local_work - a0) / max(a1 - a0, 1e-300)
    return max(float(level), float(work.max()))


def _fill_ranks(short: list[int], work: list[float], tokens: list[int], lengths, doc_cost, R: int, C: int):
    """Whole documents, heaviest first, each to the rank with the least projected load that has room.

    `rho` is the mean work per token of the documents not yet placed (they get lighter as the pass goes on), so
    the heap is re-keyed every R documents.
    """
    order = sorted(short, key=lambda k: -doc_cost[k])
    suffix_work = np.cumsum([doc_cost[d] for d in reversed(order)])[::-1].tolist() + [0.0]
    suffix_tokens = np.cumsum([lengths[d] for d in reversed(order)])[::-1].tolist() + [0]
    fill = (sum(tokens) + suffix_tokens[0]) / R
    work, tokens = list(work), list(tokens)
    rank_docs: list[list[int]] = [[] for _ in range(R)]
    heap: list = []
    rho = 0.0
    parked: list = []  # (-room, rank): ranks without room for the current document; lengths only decrease
    for i, d in enumerate(order):
        if i % R == 0:
            rho = suffix_work[i] / suffix_tokens[i]
            heap = [(work[r] + rho * max(0.0, fill - tokens[r]), r) for r in range(R) if tokens[r] < C]
            heapq.heapify(heap)
            parked = []
        need = lengths[d]
        while parked and -parked[0][0] >= need:
            r = heapq.heappop(parked)[1]
            heapq.heappush(heap, (work[r] + rho * max(0.0, fill - tokens[r]), r))
        while heap and tokens[heap[0][1]] + need > C:
            r = heapq.heappop(heap)[1]
            heapq.heappush(parked, (tokens[r] - C, r))
        if not heap:
            return None
        _, r = heapq.heappop(heap)
        rank_docs[r].append(d)
        tokens[r] += need
        work[r] += doc_cost[d]
        heapq.heappush(heap, (work[r] + rho * max(0.0, fill - tokens[r]), r))
    _refine(rank_docs, work, tokens, lengths, doc_cost, C)
    return rank_docs, max(work)


def _refine(rank_docs: list[list[int]], work: list[float], tokens: list[int], lengths, doc_cost, C: int,
            rounds: int = 64, partners: int = 4) -> None:
    """Local search on the greedy result: move one whole document, or swap two, between the most loaded rank
    and one of the least loaded ones, whenever that lowers the pair's maximum. In place."""
    for _ in range(rounds):
        hi = max(range(len(work)), key=work.__getitem__)
        if not rank_docs[hi]:
            return
        hi_cost = np.asarray([doc_cost[d] for d in rank_docs[hi]])
        hi_len = np.asarray([lengths[d] for d in rank_docs[hi]])
        improved = False
        for lo in sorted(range(len(work)), key=work.__getitem__)[:partners]:
            gap = work[hi] - work[lo]
            if gap <= 0:
                break
            lo_cost = np.asarray([doc_cost[d] for d in rank_docs[lo]] + [0.0])  # the extra entry = a plain move
            lo_len = np.asarray([lengths[d] for d in rank_docs[lo]] + [0])
            delta = hi_cost[:, None] - lo_cost[None, :]  # work leaving hi
            dtok = hi_len[:, None] - lo_len[None, :]
            ok = (delta > 0) & (delta < gap) & (tokens[lo] + dtok <= C) & (tokens[hi] - dtok <= C)
            if not ok.any():
                continue
            score = np.where(ok, np.abs(delta - gap / 2), np.inf)
            i, j = np.unravel_index(int(np.argmin(score)), score.shape)
            x = rank_docs[hi].pop(i)
            rank_docs[lo].append(x)
            if j < len(lo_cost) - 1:
                y = rank_docs[lo].pop(j)
                rank_docs[hi].append(y)
            work[hi] -= float(delta[i, j])
            work[lo] += float(delta[i, j])
            tokens[hi] -= int(dtok[i, j])
            tokens[lo] += int(dtok[i, j])
            improved = True
            break
        if not improved:
            return


def _split_counts(by_cost: list[int], lengths, C: int) -> list[int]:
    """Candidate numbers k of heaviest documents to split: those longer than C, then about 1.5x more each time."""
    k_min = sum(1 for d in by_cost if lengths[d] > C)
    ks = [k_min + extra for extra in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)]
    return [k for k in ks if k <= len(by_cost)]


def _best_micro_batch(docs: list[int], lengths: list[int], doc_cost: list[float], R, C, cost, min_region,
                      menu: ShapeMenu, keep=6):
    """Choose (c, split set) for one micro-batch; return (MicroBatch, makespan) or None.

    Candidates: every power-of-two c from the smallest that holds the longest document up to R, times the number
    k of heaviest documents split (the rest stay whole on one rank). Each candidate's makespan is first
    estimated cheaply (groups placed for real, whole documents water-filled, plus the heaviest whole document
    landing on the least loaded rank); the `keep` best are packed for real and the fastest kept.
    """
    if not docs:
        return MicroBatch(1, 0, [[] for _ in range(R)], [[] for _ in range(R)]), 0.0
    c_fit = _min_context(max(lengths[d] for d in docs), C, R, "in step")
    by_cost = sorted(docs, key=lambda k: -doc_cost[k])
    suffix_work = np.cumsum([doc_cost[d] for d in reversed(by_cost)])[::-1].tolist() + [0.0]
    suffix_tokens = np.cumsum([lengths[d] for d in reversed(by_cost)])[::-1].tolist() + [0]
    estimates = []
    c = c_fit
    while c <= R:
        ks = [k for k in _split_counts(by_cost, lengths, C) if k > 0] if c > 1 else [0]
        prefixes = _group_prefixes(by_cost, ks, c, lengths, doc_cost, R, C, cost, min_region, menu)
        for k, group_docs, work, tokens, region in prefixes:
            local_work, local_tokens = suffix_work[k], suffix_tokens[k]
            rho = local_work / local_tokens if local_tokens else 0.0
            level = _water_level(np.asarray(work), C - np.asarray(tokens, dtype=np.float64), local_work, rho)
            heaviest_local = doc_cost[by_cost[k]] if k < len(by_cost) else 0.0
            estimates.append((max(level, min(work) + heaviest_local), c, k, region, group_docs, work, tokens))
        c *= 2
    estimates.sort(key=lambda e: e[0])
    # the estimate can misrank degrees (it water-fills whole documents): the best candidate of every c is packed
    # too, not only the `keep` best overall
    first_of_c = {}
    for i, e in enumerate(estimates):
        first_of_c.setdefault(e[1], i)
    chosen = set(range(min(keep, len(estimates)))) | set(first_of_c.values())
    best = None
    for i, (est, c, k, region, group_docs, work, tokens) in enumerate(estimates):
        if i not in chosen or not math.isfinite(est):
            continue
        got = _fill_ranks(by_cost[k:], work, tokens, lengths, doc_cost, R, C)
        if got is None:  # the whole documents did not fit (fragmentation): try the next candidate
            chosen.add(i + 1)
            continue
        if best is None or got[1] < best[1]:
            best = (MicroBatch(c, region, group_docs, got[0]), got[1])
    return best


def _distribute(order: list[int], lengths: list[int], doc_cost: list[float], M: int, budget: int):
    """Spread documents (heaviest first) over M micro-batches: least work first, within a token budget each."""
    work = [0.0] * M
    tokens = [0] * M
    parts: list[list[int]] = [[] for _ in range(M)]
    for d in order:
        fits = [m for m in range(M) if tokens[m] + lengths[d] <= budget]
        if not fits:
            return None
        m = min(fits, key=lambda k: work[k])
        parts[m].append(d)
        tokens[m] += lengths[d]
        work[m] += doc_cost[d]
    return parts


def balanced_micro_batches(lengths: np.ndarray, R, C, cost, quantum, menu: ShapeMenu) -> list[MicroBatch]:
    """The balanced plan of one step: the fewest micro-batches (from ceil(tokens / (R*C))) that can be placed.

    When no plan fits the shape menu, the menu grows by one shape, with a warning (a new program compiles).
    """
    doc_cost = cost.doc(lengths).tolist()
    lens = lengths.tolist()
    order = sorted(range(len(lens)), key=lambda d: -doc_cost[d])
    total = sum(lens)
    m_min = max(1, -(-total // (R * C)))
    for attempt in range(2):
        for M in range(m_min, m_min + 4):
            parts = [order] if M == 1 else _distribute(order, lens, doc_cost, M, R * C)
            if parts is None:
                continue
            known = set(menu.shapes)
            mbs = []
            for part in parts:
                got = _best_micro_batch(part, lens, doc_cost, R, C, cost, quantum, menu)
                if got is None:
                    break
                menu.add([got[0].shape])  # later micro-batches of this step may reuse it
                mbs.append(got[0])
            else:
                return mbs
            menu.shapes = known  # this micro-batch count failed: forget the shapes it opened
        if attempt == 0 and len(menu.shapes) >= menu.max_shapes:
            log.warning("balance: no plan fits the %d shapes of the menu %s; allowing one more (a new compile)",
                        menu.max_shapes, sorted(menu.shapes))
            menu.max_shapes += 1
        else:
            break
    raise ValueError(f"schedule(balanced): could not place {len(lens)} documents ({total} tokens) on "
                     f"{R} ranks x {C} tokens in {m_min}..{m_min + 3} micro-batches")
