"""Warnings XLA's C++ side writes straight to file descriptor 2 while compiling, caught so `plan` can count them.

The SPMD partitioner says "Involuntary full rematerialization" when it cannot go from one sharding of a tensor to
another efficiently: it replicates the whole tensor on every device, then re-partitions it (memory and bandwidth
no formula shows). `capture_compile_warnings()` redirects fd 2 for the duration, then writes everything it caught
back to the real stderr (the user still sees the warnings) and counts them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile

INVOLUNTARY_REMAT = "Involuntary full rematerialization"


@dataclasses.dataclass
class CompileWarnings:
    text: str = ""

    @property
    def involuntary_rematerializations(self) -> list[str]:
        return [line for line in self.text.splitlines() if INVOLUNTARY_REMAT in line]


@contextlib.contextmanager
def capture_compile_warnings():
    """`with capture_compile_warnings() as caught: compile...`; then `caught.text` holds what went to fd 2."""
    caught = CompileWarnings()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield caught
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            caught.text = sink.read().decode(errors="replace")
            sys.stderr.write(caught.text)
            sys.stderr.flush()
