"""Bytes sent per device, read from compiled HLO text: every collective's size times the known trip counts of
the while loops that enclose it (DESIGN.md §5). Used by `longtrain plan`, benchmarks/context_comm.py and tests.

Per-device bytes sent, with G the replica-group size:
  collective-permute: the operand (= result) size      all-gather:   (G-1)/G of the gathered result
  all-to-all:         (G-1)/G of the result             reduce-scatter: (G-1) x the scattered result
  all-reduce:         2(G-1)/G of the result

XLA:CPU has no reduce-scatter pass: the SPMD partitioner emits an FSDP gradient's reduction as an all-reduce
whose one user is a dynamic-slice (each device keeps its shard), and the CPU pipeline combines those all-reduces
as they are. XLA:GPU's `ReduceScatterCreator` (run in `RunCollectiveOptimizationPasses`, before the collective
combiners; xla/service/gpu/gpu_compiler.cc) rewrites exactly that pattern into a reduce-scatter, which sends half
the bytes. `reduce_scatter_candidates` finds the pattern in the partitioned HLO, so `longtrain plan` can say how
much of its all-reduce traffic is a reduce-scatter on GPU.
"""
from __future__ import annotations

import collections
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}
COLLECTIVES = ("collective-permute", "all-gather", "all-to-all", "reduce-scatter", "all-reduce")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def shape_bytes(type_text: str) -> int:
    """Total bytes of every array shape in an HLO type string (tuples summed)."""
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * DTYPE_BYTES[dtype]
    return total


def group_size(attrs: str, num_devices: int) -> int:
    """Devices per replica group: explicit groups {{0,1,..},..}, iota groups [n,G]<=[..], or mesh groups
    mesh['axis_0'=8,'axis_1'=8] {'axis_1'} (the product of the listed axes' sizes)."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = {name: int(n) for name, n in re.findall(r"'?([\w.]+)'?=(\d+)", m.group(1))}
        size = 1
        for axis in re.findall(r"'?([\w.]+)'?", m.group(2)):
            size *= sizes[axis]
        return size
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)
    if m:
        return int(m.group(2))
    return num_devices


def parse_computations(hlo_text: str):
    """{name: [instruction lines]} and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("{")[0].split("(")[0]:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


SCATTERED_ALL_REDUCE = "all-reduce+dynamic-slice"  # key for the part of the all-reduce bytes in that pattern


def collective_bytes(hlo_text: str, num_devices: int, scattered: frozenset = frozenset()) -> dict:
    """{collective kind: bytes sent per device} and {'count': number of collective launches} for the program.

    `scattered`: keys of all-reduces (`collective_key`, from `reduce_scatter_candidates`) whose bytes are also
    summed under SCATTERED_ALL_REDUCE (a part of the all-reduce total, not an extra kind)."""
    comps, entry = parse_computations(hlo_text)

    def visit(name, mult, totals, depth=0):
        if depth > 50 or name not in comps:
            return
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            name, type_text, op, rest = m.groups()
            base = op[:-6] if op.endswith("-start") else op
            if base in COLLECTIVES and not op.endswith("-done"):
                g = group_size(rest, num_devices)
                if op == "all-gather-start":  # async result: (operands..., gathered outputs...)
                    shapes = [shape_bytes(f"{t}[{d}]") for t, d in _SHAPE.findall(type_text)]
                    size = sum(shapes[len(shapes) // 2:])
                else:
                    size = shape_bytes(type_text if not op.endswith("-start") else type_text.split(")")[0])
                factor = {"collective-permute": 1.0, "all-gather": (g - 1) / g, "all-to-all": (g - 1) / g,
                          "reduce-scatter": float(g - 1), "all-reduce": 2 * (g - 1) / g}[base]
                if op.endswith("-start") and base in ("collective-permute",):
                    size //= 2  # start returns (operand, result) tuples
                totals[base] += mult * size * factor
                totals["count"] += mult
                channel = re.search(r"channel_id=(\d+)", rest)
                if base == "all-reduce" and collective_key(name, channel and channel.group(1)) in scattered:
                    totals[SCATTERED_ALL_REDUCE] += mult * size * factor
            trip = 1
            if op == "while":
                tc = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                if tc:
                    trip = int(tc.group(1))
                elif any(_has_collective(comps, body) for body in re.findall(r"body=%?([\w.\-]+)", rest)):
                    # a data-dependent loop around a collective: bytes per step cannot be read off the HLO
                    raise ValueError(f"while loop without known_trip_count around a collective: {line.strip()[:200]}")
            for attr in ("body", "calls", "to_apply"):
                for callee in re.findall(attr + r"=%?([\w.\-]+)", rest):
                    visit(callee, mult * (trip if attr == "body" else 1), totals, depth + 1)
            br = re.search(r"branch_computations=\{([^}]*)\}", rest)
            if br:  # a conditional runs one branch: count the one that sends the most
                branches = []
                for callee in br.group(1).split(","):
                    branch = collections.Counter()
                    visit(callee.strip().lstrip("%"), mult, branch, depth + 1)
                    branches.append(branch)
                totals.update(max(branches, key=lambda c: (total_bytes(c), c["count"])))

    totals = collections.Counter()
    visit(entry, 1, totals)
    return dict(totals)


def _has_collective(comps: dict, name: str, depth: int = 0) -> bool:
    """Does computation `name`, or anything it calls, launch a collective?"""
    if depth > 50 or name not in comps:
        return False
    for line in comps[name]:
        m = _INSTR.match(line)
        if m and (m.group(3)[:-6] if m.group(3).endswith("-start") else m.group(3)) in COLLECTIVES:
            return True
        for callee in re.findall(r"(?:body|calls|to_apply|condition)=%?([\w.\-]+)", line):
            if _has_collective(comps, callee, depth + 1):
                return True
    return False


def reduce_scatter_candidates(hlo_text: str) -> frozenset:
    """Keys (`collective_key`) of the array-shaped all-reduces in `hlo_text` (HLO after SPMD partitioning, before
    fusion) whose one user is a dynamic-slice, directly or through one reshape/bitcast that has one user: the
    pattern XLA:GPU's ReduceScatterCreator turns into a reduce-scatter (its matcher also checks that the slice
    offsets are the device's shard, which is how the partitioner writes them). Anything else between the two (a
    copy, a second all-reduce, a second user) keeps it an all-reduce on GPU too."""
    ops, users, channels = {}, collections.defaultdict(list), {}
    for lines in parse_computations(hlo_text)[0].values():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, type_text, op, rest = m.groups()
            ops[name] = (op, type_text)
            channel = re.search(r"channel_id=(\d+)", rest)
            if channel:
                channels[name] = channel.group(1)
            for operand in re.findall(r"%([\w.\-]+)", rest.split("), ")[0]):
                users[operand].append(name)

    def only_user(name):
        return users[name][0] if len(users[name]) == 1 else None

    found = set()
    for name, (op, type_text) in ops.items():
        if op != "all-reduce" or type_text.startswith("("):
            continue
        user = only_user(name)
        if user and ops[user][0] in ("reshape", "bitcast"):
            user = only_user(user)
        if user and ops[user][0] == "dynamic-slice":
            found.add(collective_key(name, channels.get(name)))
    return frozenset(found)


def collective_key(name: str, channel_id: str | None) -> str:
    """How a collective is recognised between two dumps of one compile: its channel id (later passes clone loop
    bodies and rename instructions, but keep the channel), else its name."""
    return f"channel {channel_id}" if channel_id else name


def bytes_per_collective(hlo_text: str, num_devices: int) -> dict:
    """{kind: bytes sent per device} for each of the five collective kinds (zero when absent), in a fixed order."""
    counts = collective_bytes(hlo_text, num_devices)
    return {kind: float(counts.get(kind, 0.0)) for kind in COLLECTIVES}


def total_bytes(counts: dict) -> float:
    return sum(v for k, v in counts.items() if k in COLLECTIVES)
