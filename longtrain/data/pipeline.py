"""The loader entry points the trainer calls: `make_dataset` and `make_eval_dataset` (built on grain).

    it = make_dataset(config.data, seq_len=T, global_batch=B, process_index=jax.process_index(),
                      process_count=jax.process_count(), seed=config.train.seed, num_ranks=jax.device_count())
    batch = next(it)            # dict of numpy [B / process_count, T]: tokens, targets, loss_mask, positions,
                                # segment_ids (DESIGN.md §3)
    state = it.get_state()      # a small JSON-able dict; save it with the checkpoint
    it.set_state(state)         # a restored iterator yields exactly the batches that would have come next
    it.stats()                  # bad-data counts: {"skipped", "first_bad" ("file:line: reason"), "by_reason"}

Documents: a grain `MapDataset` (random access, deterministic): the source (synthetic by default, or files, or
a weighted mixture), this process's share (`[process_index::process_count]`), a seeded shuffle re-seeded every
epoch, endless repetition, and tokenization (BOS/EOS per config) as a lazy `map`. A packing iterator then reads
documents in order: it cuts documents at `max_doc_len` (`split_long`), packs a window of `pack_window` rows
best-fit decreasing, and emits rows; its state is (first document of the window, rows already emitted), so a
restore re-reads and re-packs that window deterministically. Grain's thread prefetch runs it in the background.

Balance mode (`data.balance.enabled`): each step gathers documents to `fill` x R x C tokens (`StepFiller`),
`balance.schedule` plans them over R ranks and `plan_to_batches` lays them out; `next(it)` returns
`{"micro_batches": [dict of [R / process_count, C] arrays + "context", "split_region", "split_pieces"], "plan": Plan,
"num_targets": int}` with this process's ranks only. The scheduler needs the global view (every length of the
step, same seed in every process). With `data.balance.length_index` (built once by `longtrain index-lengths`) the
lengths come from the index and each process reads and tokenizes only the documents placed on its ranks; without
one every process tokenizes the whole step (fine for the synthetic source and one process; a multi-process run on
files warns).
"""
from __future__ import annotations

import logging

import grain
import grain.experimental
import numpy as np

from longtrain.data import packing, synthetic
from longtrain.data.balance_loader import BalancedStepIterator
from longtrain.data.documents import BadDataLog, BadDoc, document_dataset, pieces_of
from longtrain.data.length_index import BUILD_COMMAND, LengthIndex, lengths_dataset
from longtrain.data.packing import Document

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- packed rows
class PackedIterator(grain.DatasetIterator):
    """Batches of best-fit packed rows [rows_per_batch, seq_len]; state = (window start, rows emitted)."""

    def __init__(self, docs: grain.MapDataset, *, seq_len: int, rows_per_batch: int, window_rows: int,
                 max_doc_len: int, split_long: bool, strict: bool, answers: bool = False,
                 answer_weight: float | None = None):
        """`answers`: batches carry `answer_mask` (eval: the synthetic ANSWER targets). `answer_weight`: training
        batches weight the loss of synthetic ANSWER and COPY targets by this in `loss_mask` (no `answer_mask`)."""
        super().__init__()
        if max_doc_len > seq_len:
            raise ValueError(f"data.max_doc_len={max_doc_len} exceeds data.seq_len={seq_len}: a row cannot hold it")
        self._docs, self._T, self._B = docs, seq_len, rows_per_batch
        self._window_rows, self._max_len, self._split, self._strict = window_rows, max_doc_len, split_long, strict
        self._answers, self._answer_weight = answers, answer_weight
        self._start, self._done, self._bad_before = 0, 0, BadDataLog(strict).state()
        self._window = None  # (rows dict, end index, BadDataLog after the window)

    def _load(self):
        max_run = min(10_000, 2 * getattr(self._docs, "epoch_length", 10_000))  # 2x: a run then spans an epoch
        bad = BadDataLog(self._strict, self._bad_before, max_run=max_run)
        docs: list[Document] = []
        i, tokens = self._start, 0
        while tokens < self._window_rows * self._T:
            doc = self._docs[i]
            if isinstance(doc, BadDoc):
                bad.record(doc)
            else:
                bad.good()
                for piece in pieces_of(doc, self._max_len, self._split, bad):
                    docs.append(piece)
                    tokens += len(piece)
            i += 1
        rows = packing.best_fit_rows([len(d) for d in docs], self._T)
        packed = packing.pack_rows(docs, rows, self._T, answers=self._answers or self._answer_weight is not None)
        if "answer_mask" in packed:  # synthetic roles -> answer weights (training) / the scored answers (eval)
            role = packed.pop("answer_mask")
            if self._answer_weight is not None:
                packed["loss_mask"] = packed["loss_mask"] * np.where(role != synthetic.TEXT, self._answer_weight,
                                                                     1.0).astype(np.float32)
            if self._answers:
                packed["answer_mask"] = (role == synthetic.ANSWER).astype(np.float32)
        self._window = (packed, i, bad)

    def __next__(self) -> dict:
        parts, need = [], self._B
        while need:
            if self._window is None:
                self._load()
            rows, end, bad = self._window
            take = min(need, len(rows["tokens"]) - self._done)
            parts.append({k: v[self._done:self._done + take] for k, v in rows.items()})
            self._done += take
            need -= take
            if self._done == len(rows["tokens"]):
                self._start, self._done, self._bad_before, self._window = end, 0, bad.state(), None
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        """`bad`: counts before the current window (restored); `bad_seen`: including the window (reported)."""
        seen = self._window[2].state() if self._window else self._bad_before
        return {"window_start": self._start, "rows_done": self._done, "bad": self._bad_before, "bad_seen": seen}

    def set_state(self, state: dict) -> None:
        self._start, self._done, self._bad_before = state["window_start"], state["rows_done"], state["bad"]
        self._window = None


# ------------------------------------------------------------------------------------------------- entry points
class _IteratorDataset(grain.IterDataset):
    """An IterDataset around one of our iterators, so grain's thread prefetch can run it in the background."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __iter__(self):
        return self._make()


class DataIterator:
    """What `make_dataset` returns: `next`, `get_state` / `set_state` (checkpointable), `stats`, `close`."""

    def __init__(self, inner_factory, prefetch: int):
        dataset = _IteratorDataset(inner_factory)
        if prefetch > 0:
            dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
        self._it = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict:
        """The state after the last batch returned (prefetched batches are not counted)."""
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def stats(self) -> dict:
        """Bad-data counts of the documents read for the batches returned so far (packed mode: up to the end of
        the current packing window): skipped, first_bad ("file:line: reason"), by_reason."""
        state = self.get_state()
        return dict(state.get("bad_seen", state["bad"]))

    def close(self) -> None:
        """Stop the prefetch thread and drop the iterator (grain's own finalizer is noisy at interpreter exit)."""
        if self._it is not None:
            self._it.close()
            self._it = None


def _check_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"data.batch_size={global_batch} must be divisible by process_count={process_count}")
    return global_batch // process_count


def _data_section(config):
    """A full `Config` or its `DataConfig`: both are accepted, so the trainer can pass what it holds."""
    return config.data if hasattr(config, "data") else config


def make_dataset(config, *, seq_len: int | None = None, global_batch: int | None = None, process_index: int = 0,
                 process_count: int = 1, seed: int | None = None, num_ranks: int | None = None) -> DataIterator:
    """Training batches for this process (see the module docstring). `config`: a `Config` or a `DataConfig`;
    seq_len, global_batch and seed default to data.seq_len, data.batch_size and data.seed.

    Packed mode: batches of [global_batch / process_count, seq_len]. Balance mode (`data.balance.enabled`): one
    step per `next` planned over `num_ranks` ranks of `balance.capacity` (default seq_len) tokens; `num_ranks`
    defaults, when `config` is a full `Config`, to the devices that hold different tokens:
    jax.device_count() // mesh.tensor (data x fsdp x context).
    """
    cfg = _data_section(config)
    seq_len = seq_len or cfg.seq_len
    seed = cfg.seed if seed is None else seed
    if cfg.balance.enabled:
        if num_ranks is None and hasattr(config, "mesh"):
            import jax

            num_ranks = jax.device_count() // max(1, config.mesh.tensor)
        if num_ranks is None:
            raise ValueError("data.balance.enabled=true: make_dataset needs num_ranks (data x context devices)")
        # every process sees the global stream (the scheduler plans all ranks), then keeps its ranks' rows
        docs = document_dataset(cfg, seed=seed, process_index=0, process_count=1, seq_len=seq_len)
        lengths = None
        if cfg.balance.length_index:
            lengths = lengths_dataset(cfg, LengthIndex.load(cfg.balance.length_index, cfg), seed=seed)
        elif cfg.source != "synthetic" and process_count > 1:
            log.warning("balance mode without data.balance.length_index: each of the %d processes reads and "
                        "tokenizes every document of every step to learn its length; build an index once with "
                        "`%s` and set data.balance.length_index=DIR so each reads only its ranks' documents",
                        process_count, BUILD_COMMAND)

        def factory():
            return BalancedStepIterator(docs, cfg.balance, num_ranks=num_ranks,
                                        capacity=cfg.balance.capacity or seq_len, process_index=process_index,
                                        process_count=process_count, split_long=cfg.split_long, strict=cfg.strict,
                                        lengths=lengths)
        return DataIterator(factory, cfg.prefetch)
    rows = _check_batch(global_batch or cfg.batch_size, process_count)
    docs = document_dataset(cfg, seed=seed, process_index=process_index, process_count=process_count, seq_len=seq_len)
    weighted = cfg.source == "synthetic" and cfg.synthetic_answer_weight != 1.0

    def factory():
        return PackedIterator(docs, seq_len=seq_len, rows_per_batch=rows, window_rows=max(cfg.pack_window, rows),
                              max_doc_len=cfg.max_doc_len or seq_len, split_long=cfg.split_long, strict=cfg.strict,
                              answer_weight=cfg.synthetic_answer_weight if weighted else None)
    return DataIterator(factory, cfg.prefetch)


def make_eval_dataset(config, *, seq_len: int | None = None, global_batch: int | None = None,
                      process_index: int = 0, process_count: int = 1, seed: int | None = None) -> PackedIterator:
    """Eval batches, the same sequence on every call: `data.eval_paths`, else the synthetic task (another seed
    than training). Batches also carry `answer_mask` (1 where the target is a synthetic answer token) for
    `score_answers` / `score_retrieval`. Eval never uses the balance scheduler."""
    cfg = _data_section(config)
    seq_len = seq_len or cfg.seq_len
    seed = cfg.seed if seed is None else seed
    rows = _check_batch(global_batch or cfg.batch_size, process_count)
    docs = document_dataset(cfg, seed=seed, process_index=process_index, process_count=process_count,
                            seq_len=seq_len, eval=True)
    return PackedIterator(docs, seq_len=seq_len, rows_per_batch=rows, window_rows=max(cfg.pack_window, rows),
                          max_doc_len=cfg.max_doc_len or seq_len, split_long=cfg.split_long, strict=cfg.strict,
                          answers=True)
