"""Where a compiled program's temp memory goes, read from XLA's own buffer assignment (DESIGN.md §5 measures
memory from the compiled program; this says what fills it).

`explain_peak(lowered)` compiles `lowered` once more with XLA's dump switched on, then reads three of the dumped
files: the buffer assignment (every temp value with its size and offset), the live ranges (the scheduled interval
of every value) and the optimized HLO (each instruction's `op_name` and innermost source frame). A sweep over the
schedule finds the step where the live temp values add up to the most; the report lists the largest values live
there, with the jax op and the source line that made them (and the layer, when the model names its layers with
`jax.named_scope("layer_N")`). Works for any backend XLA dumps buffer assignments for; tested on XLA:CPU.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile

_ALLOC = re.compile(r"^allocation (\d+): size (\d+)(.*)$")
_VALUE = re.compile(r"^ value: <\d+ ([^ >]+) @\d+> \(size=(\d+),offset=\d+\): (.*)$")
_RANGE = re.compile(r"^\s+(\S+):(\d+)-(\d+)$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")


@dataclasses.dataclass(frozen=True)
class LiveBuffer:
    name: str        # the HLO value, e.g. "fusion.12{}" or "all-reduce.3{1}"
    bytes: int
    shape: str       # e.g. "f32[8,4096,2048]{2,1,0}"
    op_name: str     # jax's op path, e.g. "jit(step_fn)/transpose(jvp())/layer_3/.../dot_general"
    source: str      # "models/lightning_block.py:42 (intra_block)" or "?"

    @property
    def layer(self) -> str | None:
        m = re.search(r"layer_(\d+)", self.op_name)
        return m.group(1) if m else None

    @property
    def backward(self) -> bool:
        return "transpose(" in self.op_name


@dataclasses.dataclass(frozen=True)
class PeakReport:
    peak_bytes: int            # live temp bytes at the peak (<= the temp allocation: XLA packs values into it)
    temp_bytes: int            # size of the temp allocation(s)
    buffers: list[LiveBuffer]  # live at the peak, largest first


def _normalise(value_name: str) -> str:
    return value_name if "{" in value_name else value_name + "{}"


def _temp_values(assignment_text: str) -> tuple[dict[str, tuple[int, str]], int]:
    """{value name: (bytes, shape)} of the values in temp allocations, and the temp allocations' total size."""
    values, temp_total, in_temp = {}, 0, False
    for line in assignment_text.splitlines():
        m = _ALLOC.match(line)
        if m:
            attrs = m.group(3)
            in_temp = "preallocated-temp" in attrs or not any(
                w in attrs for w in ("parameter", "constant", "live-out", "thread-local"))
            temp_total += int(m.group(2)) if in_temp else 0
            continue
        m = _VALUE.match(line)
        if m and in_temp:
            values[_normalise(m.group(1))] = (int(m.group(2)), m.group(3).strip())
    return values, temp_total


def _live_ranges(range_text: str) -> dict[str, tuple[int, int]]:
    start = range_text.find("BufferLiveRange:")
    out = {}
    for line in range_text[start:].splitlines()[1:]:
        m = _RANGE.match(line)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def _table(text: str, name: str) -> dict[int, str]:
    m = re.search(rf"^{name}\n((?:\d+ .*\n)+)", text, re.M)
    if not m:
        return {}
    return {int(line.split(" ", 1)[0]): line.split(" ", 1)[1] for line in m.group(1).splitlines()}


def _sources(hlo_text: str, repo_root: str | None) -> dict[str, tuple[str, str]]:
    """{instruction name: (op_name, "file:line (function)")} from the optimized HLO's metadata and frame tables."""
    files, funcs = _table(hlo_text, "FileNames"), _table(hlo_text, "FunctionNames")
    locations, frames = _table(hlo_text, "FileLocations"), _table(hlo_text, "StackFrames")

    def frame_source(frame_id: int) -> str:
        frame = frames.get(frame_id, "")
        loc = re.search(r"file_location_id=(\d+)", frame)
        where = locations.get(int(loc.group(1)), "") if loc else ""
        f, fn, line = (re.search(rf"{k}=(\d+)", where) for k in ("file_name_id", "function_name_id", "line"))
        if not (f and line):
            return "?"
        path = files.get(int(f.group(1)), "?").strip('"')
        if repo_root and path.startswith(repo_root.rstrip("/") + "/"):
            path = path[len(repo_root.rstrip("/")) + 1:]
        function = funcs.get(int(fn.group(1)), "").strip('"') if fn else ""
        return f"{path}:{line.group(1)}" + (f" ({function})" if function else "")

    out, operands = {}, {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        meta = re.search(r"metadata=\{([^}]*)\}", rest)
        op = re.search(r'op_name="([^"]*)"', meta.group(1)) if meta else None
        frame = re.search(r"stack_frame_id=(\d+)", meta.group(1)) if meta else None
        if op or frame:
            out[name] = (op.group(1) if op else "", frame_source(int(frame.group(1))) if frame else "?")
        else:  # fusions XLA made (converts, copies) carry no metadata: they belong to what they consume
            call = re.search(r"\w\(([^)]*)\)", rest)
            operands[name] = re.findall(r"%([\w.\-]+)", call.group(1)) if call else []

    def resolve(name, depth=0):
        if name in out or depth > 4:
            return out.get(name)
        for operand in operands.get(name, []):
            found = resolve(operand, depth + 1)
            if found:
                return found
        return None

    for name in operands:
        found = resolve(name)
        if found:
            out[name] = found
    return out


def peak_from_dump(dump_dir: str, module: str = "", top: int = 10, repo_root: str | None = None) -> PeakReport:
    """The peak of temp memory of the (largest) dumped module whose name contains `module`."""
    pattern = os.path.join(dump_dir, f"*{module}*after_optimizations-buffer-assignment.txt")
    candidates = sorted(glob.glob(pattern), key=os.path.getsize)
    if not candidates:
        raise FileNotFoundError(f"no XLA buffer assignment matching {pattern!r} (was the program compiled with "
                                "xla_dump_to?)")
    assignment = candidates[-1]
    prefix = assignment[:-len("-buffer-assignment.txt")]
    values, temp_total = _temp_values(open(assignment).read())
    ranges = _live_ranges(open(prefix + "-live-range.txt").read())
    sources = _sources(open(prefix + ".txt").read(), repo_root)
    # a value is live over [start, end): the instruction at `end` may write its output over its last use (an
    # in-place sort, a fusion reusing its operand's buffer), as the buffer assignment allows
    span = {name: (start, max(end, start + 1)) for name, (start, end) in ranges.items()}
    events: dict[int, int] = {}
    for name, (size, _) in values.items():
        if name in span:
            start, end = span[name]
            events[start] = events.get(start, 0) + size
            events[end] = events.get(end, 0) - size
    live, peak, at = 0, 0, 0
    for t in sorted(events):
        live += events[t]
        if live > peak:
            peak, at = live, t
    buffers = []
    for name, (size, shape) in values.items():
        start, end = span.get(name, (1, 0))
        if start <= at < end:
            op_name, source = sources.get(name.split("{")[0], ("", "?"))
            buffers.append(LiveBuffer(name, size, shape, op_name, source))
    buffers.sort(key=lambda b: -b.bytes)
    return PeakReport(peak, temp_total, buffers[:top])


def explain_peak(lowered, top: int = 10, repo_root: str | None = None) -> PeakReport:
    """Compile `lowered` (a `jax.stages.Lowered`) with XLA's dump on and read where its temp memory peaks."""
    with tempfile.TemporaryDirectory(prefix="longtrain_xla_dump_") as directory:
        lowered.compile(compiler_options={"xla_dump_to": directory, "xla_dump_hlo_as_text": True})
        return peak_from_dump(directory, top=top, repo_root=repo_root)
