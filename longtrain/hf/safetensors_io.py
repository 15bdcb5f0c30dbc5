"""Streaming safetensors reader and sharded writer: one tensor in host memory at a time.

We read and write the format ourselves (8-byte little-endian header length, JSON header with dtype / shape /
data_offsets per tensor, then the raw little-endian bytes) because the `safetensors` numpy API has no bfloat16 and
its writer needs every tensor of a file in memory at once. Reads use seek + read (no mmap), so pages of tensors
already converted do not stay resident.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointFormatError(ValueError):
    """A safetensors checkpoint that is missing, malformed, or lacks / mismatches a tensor (names file + tensor)."""


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointFormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise CheckpointFormatError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsReader:
    """All tensors of a HF folder (`model.safetensors` or shards listed in `model.safetensors.index.json`)."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_FILE)
        single_path = os.path.join(folder, SINGLE_FILE)
        if os.path.exists(index_path) and os.path.exists(single_path):
            raise CheckpointFormatError(
                f"{folder} holds both {SINGLE_FILE} and {INDEX_FILE}: one is left over from an earlier export "
                f"(transformers reads {SINGLE_FILE}); remove the stale one")
        weight_map = None
        if os.path.exists(index_path):
            with open(index_path) as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointFormatError(f"{index_path}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
            self.described_as = index_path
        elif os.path.exists(single_path):
            files = [SINGLE_FILE]
            self.described_as = single_path
        else:
            raise CheckpointFormatError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints "
                                        f"are supported)")
        self.entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise CheckpointFormatError(f"{self.described_as} lists {name}, which does not exist in {folder}")
            header, data_start = _read_header(path)
            if weight_map is not None:  # the index must describe exactly what each shard holds
                listed = {t for t, f in weight_map.items() if f == name}
                if listed != set(header):
                    extra, missing = sorted(set(header) - listed), sorted(listed - set(header))
                    raise CheckpointFormatError(
                        f"{index_path} does not match {path}: the file holds {len(header)} tensors, the index "
                        f"lists {len(listed)} for it (not listed: {extra[:3]}, not in the file: {missing[:3]}); "
                        "the index or the shard is stale")
            for tensor_name, info in header.items():
                self.entries[tensor_name] = (path, info, data_start)

    def names(self) -> set[str]:
        return set(self.entries)

    def file_of(self, name: str) -> str:
        return self.entries[name][0] if name in self.entries else self.described_as

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise CheckpointFormatError(f"{self.described_as}: missing tensor {name!r}")
        path, info, data_start = self.entries[name]
        if info["dtype"] not in DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has {end - begin} bytes; shape {shape} of "
                                        f"{info['dtype']} needs {count * dtype.itemsize}")
        with open(path, "rb") as fh:
            fh.seek(data_start + begin)
            data = np.fromfile(fh, dtype=dtype, count=count)
        return data.reshape(shape)


def _write_file(path: str, items: list[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in items:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer pads it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, dtype, produce in items:
            array = np.ascontiguousarray(produce())
            if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
                raise ValueError(f"{path}: tensor {name!r} came out as {array.dtype}{list(array.shape)}, "
                                 f"expected {dtype}{list(shape)}")
            array.tofile(fh)  # raw little-endian bytes, no extra copy


def write_sharded(folder: str, items: Iterable[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
                  max_shard_bytes: int) -> list[str]:
    """Write `(name, shape, dtype, produce)` items, producing each tensor only when its bytes are written.

    One `model.safetensors` when the total fits in `max_shard_bytes`, else `model-0000i-of-0000n.safetensors`
    shards plus `model.safetensors.index.json`. Returns the written file names.
    """
    items = list(items)
    shards, current, current_bytes = [], [], 0
    for item in items:
        nbytes = int(np.prod(item[1], dtype=np.int64)) * item[2].itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += nbytes
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        _write_file(os.path.join(folder, SINGLE_FILE), shards[0])
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        _write_file(os.path.join(folder, name), shard)
        for tensor_name, shape, dtype, _ in shard:
            weight_map[tensor_name] = name
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    with open(os.path.join(folder, INDEX_FILE), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return names + [INDEX_FILE]
