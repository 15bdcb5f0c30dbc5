"""Balance-mode loader: gather each global step's documents, plan them with the balance scheduler, lay them out.

`BalancedStepIterator` reads the token lengths of the document stream in order (cut at `max_doc_len`), gathers a
step of `fill` x R x C tokens with `StepFiller`, calls `balance.schedule` (one `ShapeMenu` for the whole run) and
`plan_to_batches` for this process's ranks only. The plan needs every length of the step; the rows need only the
documents placed on this process's ranks:

* with a length index (`lengths`, see `length_index.py`) the lengths come from the index and a process reads and
  tokenizes only the documents with a piece on its ranks;
* without one, every document of the step is tokenized to learn its length (every process reads everything:
  right for the synthetic source and single-process runs).

Its state is the position of the next unread document piece, the pieces still waiting (by index), the shape menu
and the bad-data counts, so a restore makes the same plans from the same documents.
"""
from __future__ import annotations

from typing import NamedTuple

import grain

from longtrain.config import ConfigError
from longtrain.data import packing
from longtrain.data.balance import CostModel, ShapeMenu, schedule
from longtrain.data.documents import BadDataLog, BadDoc, piece_spans
from longtrain.data.length_index import DocLength
from longtrain.data.packing import Document
from longtrain.data.step_filler import StepFiller


class _Piece(NamedTuple):
    index: int  # of the document in the stream
    piece: int  # number of the piece in its document
    start: int
    length: int
    last: bool  # the document's last piece: its last token has no target


class _IndexedLengths:
    """Lengths from the length index; a document is read (and tokenized) only when a row needs it."""

    def __init__(self, lengths: grain.MapDataset, docs: grain.MapDataset):
        self._lengths, self._docs = lengths, docs

    def length(self, index: int) -> DocLength | BadDoc:
        return self._lengths[index]

    def document(self, index: int) -> Document:
        doc = self._docs[index]
        want = self._lengths[index]
        got = len(doc) if isinstance(doc, Document) else doc.error
        if isinstance(want, BadDoc) or got != want.length:
            raise ValueError(f"record {want.origin}: the length index says "
                             f"{want.error if isinstance(want, BadDoc) else want.length}, reading it gives {got}: "
                             f"the index does not match the data; rebuild it with `longtrain index-lengths`")
        return doc

    def keep_only(self, indices: set[int]) -> None:
        """Nothing is cached: a document is read when a step lays it out."""


class _TokenizedLengths:
    """Lengths by tokenizing each document; documents stay cached until their last piece is laid out."""

    def __init__(self, docs: grain.MapDataset):
        self._docs, self._cache = docs, {}

    def length(self, index: int) -> DocLength | BadDoc:
        doc = self._cache.get(index)
        if doc is None:
            doc = self._cache[index] = self._docs[index]
        return doc if isinstance(doc, BadDoc) else DocLength(len(doc), doc.origin)

    def document(self, index: int) -> Document:
        doc = self._cache.get(index)
        return self._docs[index] if doc is None else doc

    def keep_only(self, indices: set[int]) -> None:
        self._cache = {i: d for i, d in self._cache.items() if i in indices}


class _PieceStream:
    """Document pieces (`_Piece`) from position (index, piece); bad and too-long documents are logged once."""

    def __init__(self, lengths, index: int, piece: int, max_doc_len: int, split_long: bool, bad: BadDataLog):
        self._lengths, self.index, self.piece = lengths, index, piece
        self._max_len, self._split, self._bad = max_doc_len, split_long, bad
        self._cache: tuple[int, list] | None = None

    def pieces(self, index: int, log_bad: bool) -> list[_Piece]:
        if self._cache is None or self._cache[0] != index:
            rec = self._lengths.length(index)
            if isinstance(rec, BadDoc):
                if log_bad:
                    self._bad.record(rec)
                spans = []
            else:
                self._bad.good()
                spans = piece_spans(rec.length, rec.origin, self._max_len, self._split, self._bad if log_bad else None)
            got = [_Piece(index, p, start, n, p == len(spans) - 1) for p, (start, n) in enumerate(spans)]
            self._cache = (index, got)
        return self._cache[1]

    def __iter__(self):
        return self

    def __next__(self) -> _Piece:
        while True:
            got = self.pieces(self.index, log_bad=self.piece == 0)
            if self.piece < len(got):
                item = got[self.piece]
                self.piece += 1
                return item
            self.index, self.piece = self.index + 1, 0


class BalancedStepIterator(grain.DatasetIterator):
    """One global step per `next`: {"micro_batches", "plan", "num_targets", "num_tokens"} (see pipeline.py).

    `docs`: the tokenized document stream, the same (global) one in every process. `lengths`: its token lengths
    from a length index (`length_index.lengths_dataset`, item i describes `docs[i]`); then only the documents
    placed on this process's ranks are read."""

    def __init__(self, docs: grain.MapDataset, balance_cfg, *, num_ranks: int, capacity: int, process_index: int,
                 process_count: int, split_long: bool, strict: bool, window: int = 256,
                 lengths: grain.MapDataset | None = None):
        super().__init__()
        if num_ranks < 1 or num_ranks & (num_ranks - 1) or num_ranks % process_count:
            raise ValueError(f"balance mode: num_ranks={num_ranks} must be a power of two divisible by "
                             f"process_count={process_count}")
        self._lengths = _TokenizedLengths(docs) if lengths is None else _IndexedLengths(lengths, docs)
        self._R, self._C = num_ranks, capacity
        self._cfg, self._split, self._strict = balance_cfg, split_long, strict
        per = num_ranks // process_count
        self._ranks = range(process_index * per, (process_index + 1) * per)
        self._cost = CostModel.from_config(balance_cfg)
        budget = int(balance_cfg.fill * num_ranks * capacity)
        self._max_len = min(balance_cfg.max_doc_len or budget, budget)
        self._filler = StepFiller(budget, window=window, size=lambda piece: piece.length)
        self._menu = ShapeMenu(balance_cfg.max_shapes)
        epoch = getattr(lengths if lengths is not None else docs, "epoch_length", 10_000)
        self._max_run = min(10_000, 2 * epoch)  # 2x: a run then spans an epoch
        self._bad = BadDataLog(strict, max_run=self._max_run)
        self._next = (0, 0)

    def __next__(self) -> dict:
        stream = _PieceStream(self._lengths, *self._next, self._max_len, self._split, self._bad)
        pieces = self._filler.next_step(stream)
        self._next = (stream.index, stream.piece)
        plan = schedule([p.length for p in pieces], self._R, self._C, self._cfg.method, self._cost,
                        region_quantum=self._cfg.region_quantum,
                        menu=self._menu if self._cfg.method == "balanced" else None)
        needed = packing.docs_on_ranks(plan, self._ranks)
        whole: dict[int, Document] = {}  # several pieces of one document in a step: read it once
        local = {}
        for d in needed:
            p = pieces[d]
            if p.index not in whole:
                whole[p.index] = self._lengths.document(p.index)
            local[d] = whole[p.index].slice(p.start, p.length)
        micro = packing.plan_to_batches(plan, local, ranks=self._ranks)
        # documents with pieces still to come stay cached (tokenizing path): the waiting ones and the current one
        self._lengths.keep_only({p.index for p in self._filler.pending} | {stream.index})
        return {"micro_batches": micro, "plan": plan,
                "num_targets": sum(p.length - 1 if p.last else p.length for p in pieces),
                "num_tokens": sum(p.length for p in pieces)}

    def get_state(self) -> dict:
        return {"next": list(self._next), "pending": [[p.index, p.piece] for p in self._filler.pending],
                "max_doc_len": self._max_len, "menu": self._menu.get_state(), "bad": self._bad.state()}

    def set_state(self, state: dict) -> None:
        # pieces are saved as (document, piece number): they only mean the same tokens if documents are cut at
        # the same length (it depends on the device count, capacity and fill unless max_doc_len fixes it)
        saved = state.get("max_doc_len", self._max_len)
        if saved != self._max_len:
            raise ConfigError(
                f"balance loader state cuts documents at {saved} tokens, this run at {self._max_len} "
                f"(min(data.balance.max_doc_len, fill x num_ranks x capacity) with num_ranks={self._R}, "
                f"capacity={self._C}): the saved document pieces would not carry over; set "
                f"data.balance.max_doc_len={saved} to resume")
        self._next = tuple(state["next"])
        self._menu = ShapeMenu.from_state(state["menu"])
        self._bad = BadDataLog(self._strict, state["bad"], max_run=self._max_run)
        stream = _PieceStream(self._lengths, 0, 0, self._max_len, self._split, self._bad)
        self._filler.pending = [stream.pieces(i, log_bad=False)[p] for i, p in state["pending"]]

    def stats(self) -> dict:
        return self._bad.state()
