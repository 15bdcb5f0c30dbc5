"""Packing documents into fixed-capacity rows, and turning balance plans into per-micro-batch arrays.

A row of capacity T holds whole documents (or pieces of long ones) back to back. Per token (DESIGN.md §3):
`tokens`, `targets` (the next token of the same document), `loss_mask` (1 where the target exists), `positions`
(restarting at 0 for every document) and `segment_ids` (1, 2, ... per document in the row, 0 = padding).
"""
from __future__ import annotations

import dataclasses

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


@dataclasses.dataclass
class Document:
    """Token ids of one document and their targets (`-1` where there is none, e.g. after the last token).

    `answer` (optional, aligned with `targets`) is the synthetic role of each position's target (`synthetic.TEXT`,
    `ANSWER` or `COPY`); eval batches carry the ANSWER positions as `answer_mask`.
    """

    tokens: np.ndarray  # int32 [L]
    targets: np.ndarray  # int32 [L]
    answer: np.ndarray | None = None  # int8 [L]: role of the target
    origin: str = ""  # "file:line" of the record, for messages

    @classmethod
    def from_tokens(cls, tokens, answer_tokens=None) -> "Document":
        """`answer_tokens` (a role per token, or bool: answer or not) is shifted onto the positions predicting them."""
        tokens = np.asarray(tokens, dtype=np.int32)
        answer = None
        if answer_tokens is not None:
            answer = np.append(np.asarray(answer_tokens, dtype=np.int8)[1:], np.int8(0))
        return cls(tokens, np.append(tokens[1:], np.int32(-1)).astype(np.int32), answer)

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, start: int, length: int) -> "Document":
        """Tokens [start, start+length) as a piece; its last token keeps its target from the whole document."""
        end = start + length
        return Document(self.tokens[start:end], self.targets[start:end],
                        None if self.answer is None else self.answer[start:end], self.origin)


def empty_rows(num_rows: int, capacity: int, *, answers: bool = False) -> dict[str, np.ndarray]:
    rows = {
        "tokens": np.zeros((num_rows, capacity), np.int32),
        "targets": np.zeros((num_rows, capacity), np.int32),
        "loss_mask": np.zeros((num_rows, capacity), np.float32),
        "positions": np.zeros((num_rows, capacity), np.int32),
        "segment_ids": np.zeros((num_rows, capacity), np.int32),
    }
    if answers:
        rows["answer_mask"] = np.zeros((num_rows, capacity), np.float32)
    return rows


def write_piece(rows: dict[str, np.ndarray], row: int, offset: int, doc: Document, start: int, length: int,
                segment_id: int) -> None:
    """Write tokens [start, start+length) of `doc` at `rows[...][row, offset:offset+length]`, positions = start.."""
    end = offset + length
    targets = doc.targets[start:start + length]
    rows["tokens"][row, offset:end] = doc.tokens[start:start + length]
    rows["targets"][row, offset:end] = np.maximum(targets, 0)
    rows["loss_mask"][row, offset:end] = targets >= 0
    rows["positions"][row, offset:end] = np.arange(start, start + length, dtype=np.int32)
    rows["segment_ids"][row, offset:end] = segment_id
    if "answer_mask" in rows and doc.answer is not None:
        rows["answer_mask"][row, offset:end] = doc.answer[start:start + length]


def best_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into rows of at most `capacity` tokens.

    Longest first, each into the open row it fills most tightly, else a new row; rows come back in the order they
    were opened, documents in each row in placement order. Deterministic (ties by index).
    """
    for i, n in enumerate(lengths):
        if n > capacity or n < 1:
            raise ValueError(f"best_fit_rows: document {i} has {n} tokens; each must be 1..capacity={capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        best = -1
        for r in range(len(rows)):
            if room[r] >= n and (best < 0 or room[r] < room[best]):
                best = r
        if best < 0:
            rows.append([])
            room.append(capacity)
            best = len(rows) - 1
        rows[best].append(i)
        room[best] -= n
    return rows


def pack_rows(docs: list[Document], rows: list[list[int]], capacity: int, *, answers: bool = False
              ) -> dict[str, np.ndarray]:
    """Arrays [len(rows), capacity] for documents grouped by `best_fit_rows` (whole documents, positions from 0)."""
    out = empty_rows(len(rows), capacity, answers=answers)
    for r, members in enumerate(rows):
        offset = 0
        for seg, i in enumerate(members, start=1):
            write_piece(out, r, offset, docs[i], 0, len(docs[i]), seg)
            offset += len(docs[i])
    return out


def plan_to_batches(plan, docs, ranks: range | None = None) -> list[dict]:
    """Arrays for running a balance `Plan`: one dict per micro-batch, each key an array [R, capacity] in rank order.

    Rank r's buffer holds, in `Plan.placements()` order, its zigzag shards of the group's split documents and then
    its whole documents. The first `split_region` tokens are the ring region (whole documents may start inside it
    when the rank's shards are shorter; segment ids keep them to themselves). Positions are the tokens' indices
    in their document (shards are not contiguous: attention must use positions and segment ids, not buffer
    offsets, for causality). Segment ids number the documents of a micro-batch 1, 2, ... (a split document has
    the same id on all ranks of its group). Extra keys: `context` (c), `split_region` (S) and `split_pieces` (the
    most split-document pieces any rank's buffer starts with: 2 per split document of its group; global, so every
    process agrees on it).

    `ranks` (a range of rank indices): build only those rows, arrays [len(ranks), capacity] equal to rows
    `ranks` of the all-ranks result (segment ids numbered as there). Then `docs` may be any mapping or sequence
    holding at least the documents `docs_on_ranks(plan, ranks)`: no other document is read.
    """
    R, C = plan.num_ranks, plan.capacity
    if ranks is None:
        if len(docs) != len(plan.lengths):
            raise ValueError(f"plan_to_batches: {len(docs)} documents given, the plan has {len(plan.lengths)}")
        ranks = range(R)
    elif ranks.step != 1 or not 0 <= ranks.start < ranks.stop <= R:
        raise ValueError(f"plan_to_batches: ranks={ranks} must be a non-empty contiguous range inside [0, {R})")
    lo = ranks.start
    out = []
    for mb in plan.micro_batches:
        rows = empty_rows(len(ranks), C)
        rows["context"] = mb.context
        rows["split_region"] = mb.split_region
        rows["split_pieces"] = 2 * max((len(g) for g in mb.group_docs), default=0)
        out.append(rows)
    offsets = np.zeros((len(out), len(ranks)), dtype=np.int64)
    segment: dict[tuple[int, int], int] = {}
    num_segments = [0] * len(out)
    checked: set[int] = set()
    for doc, start, length, m, r in plan.placements():  # every rank: segment ids count documents of all ranks
        seg = segment.get((m, doc))
        if seg is None:
            num_segments[m] += 1
            seg = segment[(m, doc)] = num_segments[m]
        if r not in ranks:
            continue
        if doc not in checked:
            if len(docs[doc]) != plan.lengths[doc]:
                raise ValueError(f"plan_to_batches: document {doc} has {len(docs[doc])} tokens, "
                                 f"the plan says {plan.lengths[doc]}")
            checked.add(doc)
        if offsets[m, r - lo] + length > C:
            raise ValueError(f"plan_to_batches: micro-batch {m} rank {r} overflows capacity {C}")
        write_piece(out[m], r - lo, int(offsets[m, r - lo]), docs[doc], start, length, seg)
        offsets[m, r - lo] += length
    return out


def docs_on_ranks(plan, ranks: range) -> list[int]:
    """The plan's documents with at least one piece on `ranks` (sorted): all `plan_to_batches(..., ranks)` reads."""
    return sorted({doc for doc, _, _, _, r in plan.placements() if r in ranks})


def count_targets(docs: list[Document]) -> int:
    """Number of target tokens in a step: the global normaliser of the loss, whatever the micro-batching."""
    return int(sum(int((d.targets >= 0).sum()) for d in docs))
