"""Random-access document sources: JSON lines, plain text, Parquet, ArrayRecord (grain data sources).

Each source has `__len__` and `__getitem__(i) -> RawDoc(text, origin, error)`: `origin` is "file:line" (1-based
line / row / record number) and `error` says why the record is unusable (malformed JSON, missing text field,
non-UTF-8 bytes, empty document), in which case `text` is None. Sources never raise on bad records, so the
loader can skip and count them (or raise in strict mode); a missing or unreadable file fails when the source is
built, naming the file.

Formats: `.jsonl` (one JSON object per line, text in `text_field`), `.txt` (one document per file), `.parquet`
(a string/binary column `text_field`, one document per row), `.array_record` (one UTF-8 document per record).
"""
from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
import threading

import numpy as np

from longtrain.errors import DataError

KINDS = ("jsonl", "text", "parquet", "arrayrecord")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".text": "text", ".parquet": "parquet",
               ".array_record": "arrayrecord", ".arrayrecord": "arrayrecord"}


@dataclasses.dataclass(frozen=True)
class RawDoc:
    text: str | None
    origin: str
    error: str | None = None


def expand_paths(patterns: list[str], key: str = "data.paths") -> list[str]:
    """Files named by `patterns` (paths or glob patterns), in order, sorted within a pattern; each must be readable."""
    if not patterns:
        raise DataError(f"{key} is empty: give files or glob patterns")
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched:
                raise FileNotFoundError(f"{key}: pattern {pattern!r} matches no file")
            files.extend(matched)
        else:
            if not os.path.isfile(pattern):
                raise FileNotFoundError(f"{key}: file {pattern!r} does not exist")
            files.append(pattern)
    for path in files:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise DataError(f"{key}: cannot read {path!r}: {e}") from e
    return files


def kind_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise DataError(f"cannot tell the format of {path!r} from its extension; use one of {sorted(_EXTENSIONS)}")
    return _EXTENSIONS[ext]


def _check_text(raw: bytes | str, origin: str) -> RawDoc:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return RawDoc(None, origin, f"not UTF-8 ({e.reason} at byte {e.start})")
    if not raw.strip():
        return RawDoc(None, origin, "empty document")
    return RawDoc(raw, origin)


class JsonlSource:
    """One JSON object per line; the document is `record[text_field]`. Line offsets are indexed at start-up."""

    def __init__(self, path: str, text_field: str = "text"):
        self.path, self.text_field = path, text_field
        ends, size = [], 0
        with open(path, "rb") as f:  # index newlines in 64 MiB chunks: memory stays flat for large files
            while chunk := f.read(64 << 20):
                ends.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n")) + size)
                size += len(chunk)
        ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        starts = np.concatenate([[0], ends + 1]).astype(np.int64)
        stops = np.concatenate([ends, [size]]).astype(np.int64)
        if stops[-1] == starts[-1]:  # empty file, or a final newline: no empty last record
            starts, stops = starts[:-1], stops[:-1]
        self._starts, self._stops = starts, stops
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> RawDoc:
        origin = f"{self.path}:{i + 1}"
        line = os.pread(self._fd, int(self._stops[i] - self._starts[i]), int(self._starts[i]))
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return RawDoc(None, origin, f"not UTF-8 ({e.reason} at byte {e.start})")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            return RawDoc(None, origin, f"malformed JSON ({e.msg})")
        if not isinstance(record, dict) or self.text_field not in record:
            return RawDoc(None, origin, f"no text field {self.text_field!r}")
        value = record[self.text_field]
        if not isinstance(value, str):
            return RawDoc(None, origin, f"text field {self.text_field!r} is {type(value).__name__}, not a string")
        return _check_text(value, origin)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class TextSource:
    """A plain text file is one document."""

    def __init__(self, path: str):
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> RawDoc:
        if i != 0:
            raise IndexError(i)
        with open(self.path, "rb") as f:
            return _check_text(f.read(), f"{self.path}:1")


class ParquetSource:
    """One document per row of column `text_field` (string or binary); row groups are read on demand."""

    def __init__(self, path: str, text_field: str = "text"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError("Parquet sources need pyarrow: pip install pyarrow") from e
        self.path, self.text_field = path, text_field
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid for a file that is not Parquet
            raise DataError(f"data.paths: {path!r} is not a readable Parquet file: {e}") from e
        names = self._file.schema_arrow.names
        if text_field not in names:
            raise DataError(f"data.text_field={text_field!r} is not a column of {path!r} (columns: {names})")
        meta = self._file.metadata
        self._group_starts = list(np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]))
        self._lock = threading.Lock()
        self._cached: tuple[int, list] | None = None

    def __len__(self) -> int:
        return int(self._group_starts[-1])

    def __getitem__(self, i: int) -> RawDoc:
        g = bisect.bisect_right(self._group_starts, i) - 1
        with self._lock:
            if self._cached is None or self._cached[0] != g:
                column = self._file.read_row_group(g, columns=[self.text_field]).column(0)
                self._cached = (g, column.to_pylist())
            value = self._cached[1][i - self._group_starts[g]]
        origin = f"{self.path}:{i + 1}"
        if value is None:
            return RawDoc(None, origin, "empty document")
        return _check_text(value, origin)


class ArrayRecordSource:
    """One UTF-8 document per ArrayRecord record (grain's ArrayRecordDataSource)."""

    def __init__(self, path: str):
        import grain

        self.path = path
        try:
            self._source = grain.sources.ArrayRecordDataSource([path])
            self._len = len(self._source)
        except Exception as e:  # array_record raises a bare RuntimeError/ValueError on a corrupt file
            raise DataError(f"data.paths: {path!r} is not a readable ArrayRecord file: {e}") from e

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> RawDoc:
        return _check_text(self._source[i], f"{self.path}:{i + 1}")


class ConcatSource:
    """Several sources read as one, in order."""

    def __init__(self, sources: list):
        self.sources = sources
        self._starts = list(np.cumsum([0] + [len(s) for s in sources]))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> RawDoc:
        k = bisect.bisect_right(self._starts, i) - 1
        return self.sources[k][i - self._starts[k]]


def open_files(files: list[str], kind: str | None, text_field: str):
    """A source over `files`; `kind` None infers each file's format from its extension."""
    sources = []
    for path in files:
        k = kind or kind_of(path)
        if k == "jsonl":
            sources.append(JsonlSource(path, text_field))
        elif k == "text":
            sources.append(TextSource(path))
        elif k == "parquet":
            sources.append(ParquetSource(path, text_field))
        elif k == "arrayrecord":
            sources.append(ArrayRecordSource(path))
        else:
            raise ValueError(f"data.source={k!r} is not one of {KINDS}")
    source = sources[0] if len(sources) == 1 else ConcatSource(sources)
    if len(source) == 0:
        raise DataError(f"data.paths: {files} hold no records")
    return source
