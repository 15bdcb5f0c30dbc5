"""Errors the user must act on. The CLI prints them as one line, `longtrain: <kind> error: <message>`, and exits
with code 2 (a traceback only with `--debug`); anything else is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us (config, data, checkpoint), not with longtrain."""

    kind = "input"


class DataError(UserError, ValueError):
    """Data that cannot be trained on: no usable record, a bad record under data.strict, a run of bad records."""

    kind = "data"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed (every step corrupt, or written by another model)."""

    kind = "checkpoint"
