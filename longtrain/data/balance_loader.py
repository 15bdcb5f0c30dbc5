"""Balance-mode loader: gather each global step's documents, plan them with the balance scheduler, lay them out.

`BalancedStepIterator` reads tokenized documents in order (cut at `max_doc_len`), gathers a step of `fill` x R x C
tokens with `StepFiller`, calls `balance.schedule` (one `ShapeMenu` for the whole run) and `plan_to_batches`,
and returns this process's ranks of every micro-batch. Its state is the position of the next unread document
piece, the pieces still waiting (by index), the shape menu and the bad-data counts, so a restore makes the same
plans from the same documents.
"""
from __future__ import annotations

import grain
import numpy as np

from longtrain.data import packing
from longtrain.data.balance import CostModel, ShapeMenu, schedule
from longtrain.data.documents import BadDataLog, BadDoc, pieces_of
from longtrain.data.step_filler import StepFiller


class _PieceStream:
    """Document pieces (index, piece number, Document) from position (index, piece); bad documents are logged."""

    def __init__(self, docs, index: int, piece: int, max_doc_len: int, split_long: bool, bad: BadDataLog):
        self._docs, self.index, self.piece = docs, index, piece
        self._max_len, self._split, self._bad = max_doc_len, split_long, bad
        self._cache: tuple[int, list] | None = None

    def pieces(self, index: int, log_bad: bool) -> list:
        if self._cache is None or self._cache[0] != index:
            doc = self._docs[index]
            if isinstance(doc, BadDoc):
                if log_bad:
                    self._bad.record(doc)
                got = []
            else:
                self._bad.good()
                got = pieces_of(doc, self._max_len, self._split, self._bad if log_bad else None)
            self._cache = (index, got)
        return self._cache[1]

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            got = self.pieces(self.index, log_bad=self.piece == 0)
            if self.piece < len(got):
                item = (self.index, self.piece, got[self.piece])
                self.piece += 1
                return item
            self.index, self.piece = self.index + 1, 0


class BalancedStepIterator(grain.DatasetIterator):
    """One global step per `next`: {"micro_batches", "plan", "num_targets", "num_tokens"} (see pipeline.py)."""

    def __init__(self, docs: grain.MapDataset, balance_cfg, *, num_ranks: int, capacity: int, process_index: int,
                 process_count: int, split_long: bool, strict: bool, window: int = 256):
        super().__init__()
        if num_ranks < 1 or num_ranks & (num_ranks - 1) or num_ranks % process_count:
            raise ValueError(f"balance mode: num_ranks={num_ranks} must be a power of two divisible by "
                             f"process_count={process_count}")
        self._docs, self._R, self._C = docs, num_ranks, capacity
        self._cfg, self._split, self._strict = balance_cfg, split_long, strict
        self._pi, self._pc = process_index, process_count
        self._cost = CostModel.from_config(balance_cfg)
        budget = int(balance_cfg.fill * num_ranks * capacity)
        self._max_len = min(balance_cfg.max_doc_len or budget, budget)
        self._filler = StepFiller(budget, window=window, size=lambda item: len(item[2]))
        self._menu = ShapeMenu(balance_cfg.max_shapes)
        self._max_run = min(10_000, 2 * getattr(docs, "epoch_length", 10_000))  # 2x: a run then spans an epoch
        self._bad = BadDataLog(strict, max_run=self._max_run)
        self._next = (0, 0)

    def __next__(self) -> dict:
        stream = _PieceStream(self._docs, *self._next, self._max_len, self._split, self._bad)
        items = self._filler.next_step(stream)
        self._next = (stream.index, stream.piece)
        docs = [doc for _, _, doc in items]
        plan = schedule([len(d) for d in docs], self._R, self._C, self._cfg.method, self._cost,
                        region_quantum=self._cfg.region_quantum,
                        menu=self._menu if self._cfg.method == "balanced" else None)
        per = self._R // self._pc
        lo = self._pi * per
        micro = []
        for mb in packing.plan_to_batches(plan, docs):
            micro.append({k: (v[lo:lo + per] if isinstance(v, np.ndarray) else v) for k, v in mb.items()})
        return {"micro_batches": micro, "plan": plan, "num_targets": packing.count_targets(docs),
                "num_tokens": int(sum(len(d) for d in docs))}

    def get_state(self) -> dict:
        return {"next": list(self._next), "pending": [[i, p] for i, p, _ in self._filler.pending],
                "menu": self._menu.get_state(), "bad": self._bad.state()}

    def set_state(self, state: dict) -> None:
        self._next = tuple(state["next"])
        self._menu = ShapeMenu.from_state(state["menu"])
        self._bad = BadDataLog(self._strict, state["bad"], max_run=self._max_run)
        stream = _PieceStream(self._docs, 0, 0, self._max_len, self._split, self._bad)
        self._filler.pending = [(i, p, stream.pieces(i, log_bad=False)[p]) for i, p in state["pending"]]

    def stats(self) -> dict:
        return self._bad.state()
