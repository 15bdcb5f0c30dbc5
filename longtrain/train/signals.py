"""SIGTERM/SIGINT: ask the loop to stop after the current step, save a checkpoint and exit 0.

The handler only sets a flag; the loop polls `StopRequest.requested` between steps, so no step is interrupted
half-way and the checkpoint is always of a finished step. After the first SIGINT, SIGINT gets the operating
system's default action, so Ctrl-C twice kills at once, even while the main thread waits inside XLA (a Python
handler would only run when that call returns).
"""
from __future__ import annotations

import signal
import sys


class StopRequest:
    """Installs handlers on enter, restores the previous ones on exit."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._signals = signals
        self._previous = {}
        self.requested: str | None = None  # the name of the signal that asked to stop

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C terminates the process
        if self.requested is not None:
            return
        self.requested = name
        again = " (Ctrl-C again kills at once)" if signum == signal.SIGINT else ""
        print(f"longtrain: received {name}; finishing this step, saving a checkpoint, then exiting{again}",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        for s in self._signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
