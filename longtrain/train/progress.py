"""Progress display: a rich bar with ETA on a terminal, one plain line per logged step otherwise.

`progress: auto` picks the bar when stdout is a TTY. Only process 0 displays anything.
"""
from __future__ import annotations

import sys
import time
from typing import Any


def _fmt(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, fmt in (("loss", "{:.4f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.2e}"), ("tokens_per_s", "{:.0f}"),
                     ("step_time_s", "{:.3f}"), ("mfu", "{:.1%}")):
        value = record.get(key)
        if value is None:
            continue
        parts.append(f"{key}={fmt.format(value) if isinstance(value, (int, float)) else value}")
    if record.get("bad_records"):
        parts.append(f"bad_records={record['bad_records']}")
    if record.get("skipped"):
        parts.append(f"SKIPPED non-finite (total {record.get('nonfinite_total')})")
    return " ".join(parts)


class PlainProgress:
    def __init__(self, total: int, start: int, stream=None):
        self.total = total
        self.stream = stream or sys.stdout
        self._t0 = time.perf_counter()
        self._start = start

    def update(self, record: dict[str, Any]) -> None:
        done = record["step"] - self._start
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.total - record["step"]) if done > 0 else float("nan")
        print(f"{_fmt(record)} eta={eta:.0f}s", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """Counter, bar and ETA keep their width on any terminal (80 columns included); the status text after them
    (loss, throughput, ...) takes what is left and is cut with an ellipsis."""

    def __init__(self, total: int, start: int, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn
        from rich.table import Column

        def fixed():
            return Column(no_wrap=True)

        self._progress = Progress(
            TextColumn("[bold]train", table_column=fixed()), MofNCompleteColumn(table_column=fixed()),
            BarColumn(bar_width=20, table_column=fixed()), TimeElapsedColumn(table_column=fixed()),
            TextColumn("eta", table_column=fixed()), TimeRemainingColumn(table_column=fixed()),
            TextColumn("{task.fields[status]}", table_column=fixed()),
            console=console,
        )
        # what the columns before the status take: "train", "n/total", bar, elapsed, "eta", remaining, 7 gaps
        self._fixed_width = 5 + 2 * len(str(total)) + 1 + 20 + 7 + 3 + 7 + 7
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=start, status="")

    def update(self, record: dict[str, Any]) -> None:
        status = " ".join(_fmt(record).split(" ")[2:])
        room = max(0, self._progress.console.width - self._fixed_width - 1)
        if len(status) > room:
            status = status[:max(0, room - 1)] + "…"
        self._progress.update(self._task, completed=record["step"], status=status)

    def message(self, text: str) -> None:
        self._progress.console.print(text)

    def close(self) -> None:
        self._progress.stop()


class NoProgress:
    def update(self, record):
        pass

    def message(self, text):
        pass

    def close(self):
        pass


def make_progress(mode: str, total: int, start: int, is_main_process: bool):
    if not is_main_process or mode == "none":
        return NoProgress()
    if mode == "bar" or (mode == "auto" and sys.stdout.isatty()):
        return BarProgress(total, start)
    return PlainProgress(total, start)
