"""Tokenized documents for the loader: sources -> this process's share -> seeded shuffle -> repeat -> tokenize.

`document_dataset(data_config, ...)` is a grain `MapDataset` (random access, deterministic for a seed) whose items
are `packing.Document`s, or `BadDoc`s for records that cannot be used (counted and skipped by the iterators
through `BadDataLog`, or raised in strict mode). The arrangement of records (share, shuffle, repeat, mix) is
`arrange`, shared with the token-length index (`length_index.lengths_dataset`), so item i of one describes item i
of the other.
"""
from __future__ import annotations

import dataclasses
import logging

import grain

from longtrain.data import sources, synthetic
from longtrain.data.packing import Document
from longtrain.data.tokenizers import make_tokenizer
from longtrain.errors import DataError

log = logging.getLogger(__name__)
_EVAL_SEED_OFFSET = 1_000_003


@dataclasses.dataclass(frozen=True)
class BadDoc:
    origin: str
    error: str


class Tokenize:
    """Record (RawDoc / SyntheticDoc) -> Document with BOS/EOS, or BadDoc. Picklable, stateless."""

    def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
        if add_bos and tokenizer.bos_id is None:
            raise ValueError(f"data.add_bos=true but tokenizer {tokenizer.name!r} has no BOS; set data.bos_token")
        if add_eos and tokenizer.eos_id is None:
            raise ValueError(f"data.add_eos=true but tokenizer {tokenizer.name!r} has no EOS; set data.eos_token")
        self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

    def __call__(self, record):
        if isinstance(record, synthetic.SyntheticDoc):
            ids, answer = [], []
            for text, role in record.segments:
                piece = self.tokenizer.encode(text)
                ids += piece
                answer += [int(role)] * len(piece)
        elif record.error is not None:
            return BadDoc(record.origin, record.error)
        else:
            ids = self.tokenizer.encode(record.text)
            answer = None
        if not ids:
            return BadDoc(record.origin, "empty document")
        if self.add_bos:
            ids = [self.tokenizer.bos_id] + ids
            answer = None if answer is None else [0] + answer
        if self.add_eos:
            ids = ids + [self.tokenizer.eos_id]
            answer = None if answer is None else answer + [0]
        doc = Document.from_tokens(ids, answer)
        doc.origin = record.origin
        return doc


def source_files(cfg, *, eval: bool = False) -> list[list[str]]:
    """The files of each part of a file source: one part (every file of data.paths), or one per data.paths entry
    of a mixture (a pattern's files read as one). Files are expanded and checked (missing ones fail, named)."""
    paths = cfg.eval_paths if eval else cfg.paths
    key = "data.eval_paths" if eval else "data.paths"
    if cfg.source == "mixture":
        return [sources.expand_paths([p], key) for p in paths]
    return [sources.expand_paths(paths, key)]


def open_part(files: list[str], cfg):
    """The random-access record source over one part's files (in order)."""
    return sources.open_files(files, cfg.source if cfg.source in sources.KINDS else None, cfg.text_field)


def make_tokenize(cfg) -> Tokenize:
    """The record -> Document map of data.tokenizer / bos / eos settings."""
    tokenizer = make_tokenizer(cfg.tokenizer, bos_token=cfg.bos_token, eos_token=cfg.eos_token)
    return Tokenize(tokenizer, cfg.add_bos, cfg.add_eos)


def arrange(parts: list, *, weights, shuffle_seed: int, process_index: int, process_count: int
            ) -> tuple[grain.MapDataset, int]:
    """Parts (random-access sources, one per mixture component) -> this process's share of each, shuffled with a
    per-part seed, repeated forever, mixed by `weights`. Documents and their token lengths (the length index) both
    go through this one function, so item i of one is item i of the other. -> (dataset, records per epoch)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    shards = []
    for k, part in enumerate(parts):
        part = grain.MapDataset.source(part)
        if len(part) < process_count:
            raise ValueError(f"a data source has {len(part)} records, fewer than process_count={process_count}")
        shard = part[process_index::process_count]
        shards.append(shard.shuffle(seed=shuffle_seed + k).repeat(None))
    mixed = shards[0] if len(shards) == 1 else grain.MapDataset.mix(shards, weights)
    # records per epoch of this share: a run of bad records that long means the data has nothing usable
    return mixed, sum(len(part) // process_count + 1 for part in parts)


def train_weights(cfg) -> list[float] | None:
    """Mixture weights of the training stream (eval mixes its parts evenly)."""
    return cfg.weights if cfg.source == "mixture" else None


def document_dataset(cfg, *, seed: int, process_index: int = 0, process_count: int = 1, seq_len: int | None = None,
                     eval: bool = False) -> grain.MapDataset:
    """Endless, shuffled, tokenized documents of this process's share (see the module docstring)."""
    seq_len = seq_len or cfg.seq_len
    paths = cfg.eval_paths if eval else cfg.paths
    curriculum = None
    if cfg.source == "synthetic" or (eval and not paths):
        source = synthetic.SyntheticSource(
            cfg.synthetic_task, min_len=min(cfg.synthetic_min_len, cfg.synthetic_max_len or seq_len),
            max_len=cfg.synthetic_max_len or seq_len, lengths="fixed" if eval else cfg.synthetic_lengths,
            seed=seed + (_EVAL_SEED_OFFSET if eval else 0), needle_depth=tuple(cfg.synthetic_needle_depth),
            filler=cfg.synthetic_filler)
        parts, weights = [source], None
        if cfg.synthetic_curriculum_docs and not eval:
            curriculum = synthetic.LengthCurriculum(source, cfg.synthetic_curriculum_docs, process_index,
                                                    process_count)
    else:
        parts = [open_part(files, cfg) for files in source_files(cfg, eval=eval)]
        weights = None if eval else train_weights(cfg)
    if curriculum is not None:  # the stream position sets the length, so no shuffle (examples are independent)
        epoch_length = len(parts[0]) // process_count
        docs = grain.MapDataset.range(epoch_length).map(curriculum)
    else:
        docs, epoch_length = arrange(parts, weights=weights, shuffle_seed=seed + (_EVAL_SEED_OFFSET if eval else 0),
                                     process_index=process_index, process_count=process_count)
    docs = docs.map(make_tokenize(cfg))
    docs.epoch_length = epoch_length
    return docs


class BadDataLog:
    """Skipped records: a count per reason and the first offender ("file:line: reason"); strict mode raises.

    `good()` marks a usable record; `max_run` bad records in a row (e.g. a whole epoch: a corpus with nothing
    usable) raise instead of looping forever."""

    def __init__(self, strict: bool, state: dict | None = None, max_run: int = 10_000):
        self.strict, self.max_run, self.run = strict, max_run, 0
        state = state or {"skipped": 0, "first_bad": None, "by_reason": {}}
        self.skipped, self.first_bad = state["skipped"], state["first_bad"]
        self.by_reason = dict(state["by_reason"])

    def good(self) -> None:
        self.run = 0

    def record(self, bad: BadDoc) -> None:
        if self.strict:
            raise DataError(f"bad record {bad.origin}: {bad.error} (data.strict=true; false skips and counts)")
        self.run += 1
        if self.run >= self.max_run:
            raise DataError(f"{self.run} bad records in a row (last {bad.origin}: {bad.error}; first "
                             f"{self.first_bad}): the data has nothing usable")
        self.skipped += 1
        reason = bad.error.split(" (")[0]
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if self.first_bad is None:
            self.first_bad = f"{bad.origin}: {bad.error}"
            log.warning("skipping bad record %s (further ones are only counted; see it.stats())", self.first_bad)

    def state(self) -> dict:
        return {"skipped": self.skipped, "first_bad": self.first_bad, "by_reason": dict(self.by_reason)}


def piece_spans(length: int, origin: str, max_doc_len: int, split_long: bool, bad: "BadDataLog | None"
                ) -> list[tuple[int, int]]:
    """(start, length) of the pieces of a document of `length` tokens: itself, cut at `max_doc_len` (split_long),
    or none when it is too long (logged in `bad` when given, naming `origin`)."""
    if length <= max_doc_len:
        return [(0, length)]
    if split_long:
        return [(s, min(max_doc_len, length - s)) for s in range(0, length, max_doc_len)]
    if bad is not None:
        bad.record(BadDoc(origin, f"too long ({length} tokens > max_doc_len={max_doc_len}, split_long=false)"))
    return []


def pieces_of(doc: Document, max_doc_len: int, split_long: bool, bad: "BadDataLog | None") -> list[Document]:
    """The document as pieces (see `piece_spans`)."""
    return [doc.slice(s, n) for s, n in piece_spans(len(doc), doc.origin, max_doc_len, split_long, bad)]
