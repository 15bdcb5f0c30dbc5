"""Bytes each device sends per step, read from a compiled HLO module's collectives and loop trip counts.

`collective_bytes(hlo_text) -> {op: bytes_per_device}` for all-reduce, all-gather, reduce-scatter, all-to-all
and collective-permute (async `-start` forms counted once, `-done` ignored). Per-op cost for a group of n devices
and a payload of S bytes (ring algorithms, what NCCL and XLA's CPU/TPU collectives approach):
  all-reduce        2 (n-1)/n * S      (S = operand size)
  all-gather        (n-1)/n * S        (S = gathered output size)
  reduce-scatter    (n-1)/n * S        (S = operand size = n x the scattered output)
  all-to-all        (n-1)/n * S
  collective-permute  S                (every device sends its whole operand once)
A collective inside a while loop counts once per iteration: the loop's `known_trip_count` multiplies the
computation it calls (nested loops multiply), which `cost_analysis()` does not do.
"""
from __future__ import annotations

import re
from collections import defaultdict

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_COMP_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\([^)]*\))?.*\{\s*$")
_SHAPE = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(OPS) + r")(-start)?\(")
_CALLS = re.compile(r"\b(body|calls|to_apply|condition)=%?([\w.\-]+)|\bbranch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)')


def _bytes_of(shape_text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape_text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _group_size(line: str, default: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [groups, size]<=[N]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if m:
        return len(m.group(1).split(","))
    return default


def _split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_HEADER.match(line)
            # headers start at column 0 (instructions are indented); HloModule's line is not a computation
            if m and not line[:1].isspace() and not line.startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        comps[current].append(line)
    return comps, entry


def _multipliers(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation."""
    mult: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        mult[name] += times
        for line in comps[name]:
            trip = _TRIP.search(line)
            for kind, single, branches in _CALLS.findall(line):
                for target in ([single] if single else re.findall(r"[\w.\-]+", branches)):
                    if kind == "condition":
                        continue
                    factor = int(trip.group(1)) if (kind == "body" and trip) else 1
                    visit(target, times * factor, depth + 1)

    visit(entry, 1)
    return mult


def collective_bytes(hlo_text: str, num_devices: int = 1) -> dict[str, float]:
    """Bytes sent per device per execution, by collective kind (see module docstring for the cost model)."""
    comps, entry = _split_computations(hlo_text)
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    mult = _multipliers(comps, entry)
    out = {op: 0.0 for op in OPS}
    for name, lines in comps.items():
        times = mult.get(name, 0)
        if not times:
            continue
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            result_shape, op, is_async = m.group(1), m.group(2), bool(m.group(3))
            shapes = [_bytes_of(f"{t}[{d}]") for t, d in _SHAPE.findall(result_shape)]
            n = _group_size(line, num_devices)
            if op == "collective-permute":  # async result: (operand, output, contexts...)
                size = float(shapes[0] if is_async else sum(shapes))
            elif n <= 1:
                continue
            elif op == "all-reduce":
                size = 2.0 * (n - 1) / n * sum(shapes)
            elif op == "all-gather":  # async result: (operands..., outputs...)
                size = (n - 1) / n * (sum(shapes[len(shapes) // 2:]) if is_async else sum(shapes))
            elif op == "reduce-scatter":
                size = (n - 1) / n * n * sum(shapes)
            else:  # all-to-all
                size = (n - 1) / n * sum(shapes)
            out[op] += times * size
    return out
