"""Token-length index of a file corpus: what the balance scheduler needs, without reading the documents.

Balance mode plans every step over all ranks, so every process needs the token length of every document of the
step; with an index a process reads and tokenizes only the documents placed on its own ranks (ByteScale: the
metadata first, then each worker loads its data).

    build_index(data_config, "idx/")                  # once: `longtrain index-lengths CONFIG --out idx/`
    index = LengthIndex.load("idx/", data_config)     # checks the index against the config, naming what differs
    lengths = lengths_dataset(data_config, index, seed=0)
    lengths[i]   # DocLength(length, origin) or BadDoc, and len(document_dataset(cfg, seed=0)[i]) == lengths[i].length

On disk: `lengths.npy` (int64, one entry per record: its length after `documents.Tokenize`, BOS/EOS included; 0
for a bad record), parts after each other, files in order within a part; and `meta.json` (written last, so a
half-built index has none) with what the lengths depend on: data.source, text_field, tokenizer, bos/eos tokens,
add_bos/add_eos, each file's path/size/mtime (and the tokenizer's files), the record count of every file, and the
bad records (part, record, error).

A mismatch between an index and the config (a setting, a file changed, added or removed) raises `ConfigError`
naming the key or file, so the trainer exits with code 2 and that line. `build_index(..., workers=N)` tokenizes in
N spawned processes (a script that calls it needs the usual `if __name__ == "__main__":` guard).
"""
from __future__ import annotations

import bisect
import json
import multiprocessing
import os
import time
from typing import Callable, NamedTuple

import grain
import numpy as np

from longtrain.config import ConfigError
from longtrain.data import sources
from longtrain.data.documents import BadDoc, arrange, make_tokenize, open_part, source_files, train_weights

FORMAT = "longtrain-length-index"
VERSION = 1
META_FILE = "meta.json"
LENGTHS_FILE = "lengths.npy"
BUILD_COMMAND = "longtrain index-lengths CONFIG [key=value ...] --out DIR"
_CONFIG_KEYS = ("source", "text_field", "tokenizer", "bos_token", "eos_token", "add_bos", "add_eos")


class DocLength(NamedTuple):
    """A usable record of the length index: its token count (BOS/EOS included) and "file:line"."""

    length: int
    origin: str


def _fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _tokenizer_files(spec: str) -> list[dict]:
    """The files a tokenizer spec reads ("byte": none; a JSON file; every file of a folder)."""
    if os.path.isfile(spec):
        return [_fingerprint(spec)]
    if os.path.isdir(spec):
        return [_fingerprint(os.path.join(spec, n)) for n in sorted(os.listdir(spec))
                if os.path.isfile(os.path.join(spec, n))]
    return []


def _records_per_file(source) -> list[int]:
    return [len(s) for s in source.sources] if isinstance(source, sources.ConcatSource) else [len(source)]


def _check_file_source(cfg) -> None:
    if cfg.source == "synthetic":
        raise ConfigError("data.source=synthetic has no files: a length index is for file sources "
                         "(unset data.balance.length_index)")


# ------------------------------------------------------------------------------------------------- build
_CHUNK = 2048  # records per task: progress granularity and worker load balance
_WORKER: tuple | None = None  # (tokenize, part sources) of a worker process, opened once by `_open_worker`


def _open_worker(cfg, part_files: list[list[str]]) -> None:
    global _WORKER
    _WORKER = (make_tokenize(cfg), [open_part(files, cfg) for files in part_files])


def _chunk_lengths(task: tuple[int, int, int]) -> tuple[int, int, np.ndarray, list]:
    """Lengths of records [start, stop) of part k (0 for a bad record) and the bad ones [k, i, error]."""
    k, start, stop = task
    tokenize, parts = _WORKER
    lengths, bad = np.zeros(stop - start, np.int64), []
    for i in range(start, stop):
        doc = tokenize(parts[k][i])
        if isinstance(doc, BadDoc):
            bad.append([k, i, doc.error])
        else:
            lengths[i - start] = len(doc)
    return k, start, lengths, bad


def build_index(cfg, out_dir: str, *, workers: int = 1, progress: Callable[[str], None] | None = None,
                progress_every: float = 5.0) -> dict:
    """Tokenize every record of the file source of `cfg` (a DataConfig) once and write the index to `out_dir`.

    `workers` > 1 tokenizes in that many processes (each opens the files itself). `progress(line)` is called
    about every `progress_every` seconds (records done, rate, time left). -> the meta written."""
    global _WORKER
    _check_file_source(cfg)
    part_files = source_files(cfg)
    _open_worker(cfg, part_files)  # this process too: it counts the records (and checks files and tokenizer)
    parts = _WORKER[1]
    offsets = np.cumsum([0] + [len(src) for src in parts]).tolist()
    total = offsets[-1]
    fingerprints = [[_fingerprint(f) for f in files] for files in part_files]  # before reading: what was read
    tasks = [(k, a, min(a + _CHUNK, len(src))) for k, src in enumerate(parts) for a in range(0, len(src), _CHUNK)]
    lengths = np.zeros(total, np.int64)
    bad: list[list] = []
    t0 = last = time.monotonic()
    done = 0
    pool = None
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # not fork: the parent may hold pyarrow / grain threads
        pool = ctx.Pool(workers, initializer=_open_worker, initargs=(cfg, part_files))
        results = pool.imap_unordered(_chunk_lengths, tasks)
    else:
        results = map(_chunk_lengths, tasks)
    try:
        for k, start, got, got_bad in results:
            lengths[offsets[k] + start:offsets[k] + start + len(got)] = got
            bad += got_bad
            done += len(got)
            now = time.monotonic()
            if progress is not None and now - last >= progress_every:
                last = now
                rate = done / (now - t0)
                progress(f"indexed {done}/{total} records ({100 * done / total:.1f}%), {rate:,.0f} records/s, "
                         f"{(total - done) / rate:,.0f} s left")
    finally:
        _WORKER = None
        if pool is not None:
            pool.terminate()
    bad.sort()
    for entries in fingerprints:
        for entry in entries:
            _check_unchanged(entry, "while it was being indexed", "index it again when the data is final",
                             what="file")
    parts_meta = [{"files": [dict(e, records=n) for e, n in zip(entries, _records_per_file(src))],
                   "offset": offsets[k], "records": len(src)}
                  for k, (entries, src) in enumerate(zip(fingerprints, parts))]
    meta = {"format": FORMAT, "version": VERSION, "config": {f"data.{k}": getattr(cfg, k) for k in _CONFIG_KEYS},
            "tokenizer_files": _tokenizer_files(cfg.tokenizer), "parts": parts_meta, "bad": bad,
            "num_records": int(total), "num_tokens": int(lengths.sum()), "seconds": round(time.monotonic() - t0, 3)}
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, META_FILE)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the meta goes last: an interrupted rebuild leaves no valid-looking index behind
    np.save(os.path.join(out_dir, LENGTHS_FILE), lengths)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return meta


# ------------------------------------------------------------------------------------------------- load
def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


class LengthIndex:
    """A loaded index whose meta matched the config; `part(k)` is the random-access length source of part k."""

    def __init__(self, directory: str, meta: dict, lengths: np.ndarray, files: list[list[str]]):
        self.directory, self.meta, self.lengths, self._files = directory, meta, lengths, files
        self._bad = {(k, i): error for k, i, error in meta["bad"]}

    @classmethod
    def load(cls, directory: str, cfg) -> "LengthIndex":
        """Read the index at `directory` and check it against `cfg` (a DataConfig): every setting the lengths
        depend on, and every file (same list, size and mtime). A mismatch raises naming the key or file."""
        _check_file_source(cfg)
        meta_path = os.path.join(directory, META_FILE)
        hint = f"rebuild it: {BUILD_COMMAND.replace('DIR', directory)}"
        since = f"since the length index {directory!r} was built"
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"data.balance.length_index={directory!r}: no {META_FILE} there (missing or "
                                    f"half-built index); {hint}")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (ValueError, OSError) as e:
            raise ConfigError(f"length index {directory!r}: cannot read {meta_path}: {e}; {hint}") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ConfigError(f"length index {directory!r} has format {meta.get('format')!r} version "
                             f"{meta.get('version')!r}, this longtrain reads {FORMAT!r} version {VERSION}; {hint}")
        for key in _CONFIG_KEYS:
            built, now = meta["config"][f"data.{key}"], getattr(cfg, key)
            if built != now:
                raise ConfigError(f"length index {directory!r} was built with data.{key}={_show(built)}, config has "
                                 f"{_show(now)}; {hint}")
        for entry in meta["tokenizer_files"]:
            _check_unchanged(entry, since, hint, what="tokenizer file")
        files = source_files(cfg)
        built_parts = meta["parts"]
        if len(files) != len(built_parts):
            raise ConfigError(f"length index {directory!r} has {len(built_parts)} part(s), data.paths gives "
                             f"{len(files)} (data.source={cfg.source}); {hint}")
        for k, (part_files, built) in enumerate(zip(files, built_parts)):
            now = [os.path.abspath(p) for p in part_files]
            was = [e["path"] for e in built["files"]]
            if now != was:
                extra = [p for p in now if p not in was]
                gone = [p for p in was if p not in now]
                what = (f"file {extra[0]} (data.paths) is not in the index" if extra else
                        f"file {gone[0]} is in the index but not in data.paths" if gone else
                        "the files are in another order")
                raise ConfigError(f"length index {directory!r}, part {k}: {what}; {hint}")
            for entry in built["files"]:
                _check_unchanged(entry, since, hint, what="file")
        lengths_path = os.path.join(directory, LENGTHS_FILE)
        try:
            lengths = np.load(lengths_path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ConfigError(f"length index {directory!r}: cannot read {lengths_path}: {e}; {hint}") from None
        if len(lengths) != meta["num_records"]:
            raise ConfigError(f"length index {directory!r}: {LENGTHS_FILE} has {len(lengths)} entries, {META_FILE} "
                             f"says {meta['num_records']}; {hint}")
        return cls(directory, meta, lengths, files)

    def part(self, k: int) -> "PartLengths":
        return PartLengths(self, k)

    def bad_error(self, k: int, i: int) -> str | None:
        return self._bad.get((k, i))


def _check_unchanged(entry: dict, when: str, hint: str, *, what: str) -> None:
    """`entry` (a fingerprint) still describes its file; else raise naming it, `when` it changed and what to do."""
    path = entry["path"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} no longer exists ({when}); {hint}")
    st = os.stat(path)
    if st.st_size != entry["size"] or st.st_mtime_ns != entry["mtime_ns"]:
        raise ConfigError(f"{what} {path} changed {when} (size {entry['size']} -> {st.st_size}, mtime_ns "
                          f"{entry['mtime_ns']} -> {st.st_mtime_ns}); {hint}")


class PartLengths:
    """Random access over one part's records: DocLength(length, origin), or BadDoc(origin, error)."""

    def __init__(self, index: LengthIndex, k: int):
        part = index.meta["parts"][k]
        self._index, self._k = index, k
        self._lengths = index.lengths[part["offset"]:part["offset"] + part["records"]]
        starts = np.cumsum([0] + [e["records"] for e in part["files"]])
        self._file_starts = starts.tolist()
        self._files = index._files[k]

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: int):
        f = bisect.bisect_right(self._file_starts, i) - 1
        origin = f"{self._files[f]}:{i - self._file_starts[f] + 1}"
        length = int(self._lengths[i])
        if length == 0:
            return BadDoc(origin, self._index.bad_error(self._k, i))
        return DocLength(length, origin)


def lengths_dataset(cfg, index: LengthIndex, *, seed: int, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """The token lengths of `document_dataset(cfg, seed=seed, ...)`, item for item (the same `arrange`)."""
    parts = [index.part(k) for k in range(len(index.meta["parts"]))]
    lengths, epoch_length = arrange(parts, weights=train_weights(cfg), shuffle_seed=seed,
                                    process_index=process_index, process_count=process_count)
    lengths.epoch_length = epoch_length
    return lengths
