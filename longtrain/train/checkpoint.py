"""Orbax checkpoints: async save, keep the last K, resume from the latest, restore onto any mesh.

One checkpoint step holds three items:
  state   the train state pytree (params, optimizer state, step, RNG, NaN counters) - sharded arrays
  data    the data loader's state (JSON), so the resumed run sees exactly the batches the old one would have
  config  the resolved config (JSON), for humans and for `export`

Crash safety comes from orbax's atomic commit: a step is written under `<step>.orbax-checkpoint-tmp-*` and
renamed to `<step>` only once every item (and every process) has finished. A crash or kill -9 during a save leaves
at most a tmp folder, which `latest_step()` never returns and which is deleted on the next start; the previous
step stays the latest good checkpoint. Restoring with an abstract target whose leaves carry the *new* shardings
re-shards on read, so a checkpoint written on 8 devices restores onto 4 (or another mesh shape).

Checkpoints verify themselves: a fourth item, `checksums`, holds a checksum of every state array (computed on the
devices, independent of the sharding: `checksums.py`) and of the data and config JSON. `restore_latest` checks
them on read; a step that cannot be read or does not match is reported in one line, moved aside to
`<dir>/corrupt/<step>` (never deleted), and the next older step is tried. Every process reaches the same verdict.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from longtrain.errors import CheckpointError
from longtrain.train import checksums
from longtrain.train.processes import all_processes, barrier


def _to_json(value: Any) -> Any:
    """JSON-safe copy of a data-loader state: bytes become {"__bytes__": base64}; numpy scalars become Python."""
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes__"}:
            return base64.b64decode(value["__bytes__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


class CheckpointCorrupt(CheckpointError):
    """One step failed verification or could not be read: `where` names the item/array/file, `what` the failure."""

    def __init__(self, step: int, where: str, what: str):
        self.step, self.where, self.what = step, where, what
        super().__init__(f"checkpoint step {step} is corrupt: {where}: {what}")


def _one_line(error: BaseException, step_dir: str, item: str) -> tuple[str, str]:
    """(where, what) from a read error of `item`: the file of the step it names (else the item), with the array
    when tensorstore names one, and the innermost cause's first line."""
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(x) for x in chain)
    where = item
    at = text.find(step_dir + os.sep)
    if at >= 0:
        tail = text[at + len(step_dir) + 1:]
        where = tail[:next((i for i, ch in enumerate(tail) if ch in "\"' ,:;\n)]}"), len(tail))]
    key = re.search(r'reading "([^"]+)"', text)
    if key:
        where = f"{where.rstrip('/')} (array {key.group(1)})"
    innermost = next((x for x in reversed(chain) if str(x).strip()), error)
    what = f"{type(innermost).__name__}: {str(innermost).strip().splitlines()[0]}" if str(innermost).strip() \
        else type(innermost).__name__
    return where, what[:240]


def _quiet_closed_loop_callbacks() -> None:
    """When a read fails, orbax closes its asyncio loop while other tensorstore reads are in flight; as they finish,
    tensorstore schedules their results on the closed loop, and each prints a "RuntimeError: Event loop is closed"
    traceback straight to stderr (no Python hook sees it), burying our one-line report. Nothing waits for those
    results any more, so scheduling on a closed loop becomes a no-op; open loops behave exactly as before."""
    import asyncio.base_events

    original = asyncio.base_events.BaseEventLoop.call_soon_threadsafe
    if getattr(original, "_longtrain_quiet", False):
        return

    def call_soon_threadsafe(self, *args, **kwargs):
        if self.is_closed():
            return None
        return original(self, *args, **kwargs)

    call_soon_threadsafe._longtrain_quiet = True
    asyncio.base_events.BaseEventLoop.call_soon_threadsafe = call_soon_threadsafe


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with our items. The caller decides when to save."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # partial saves of a crashed run are removed, never read
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def has_checksums(self, step: int) -> bool:
        """False for checkpoints written before checkpoints verified themselves (restored unverified)."""
        return os.path.isdir(os.path.join(self.step_dir(step), "checksums"))

    def save(self, step: int, state: Any, data_state: Any, config_dict: dict) -> None:
        """Start saving `step` (returns once device arrays are copied; the write finishes in the background).
        The checksums are computed first, on the devices, from the same state."""
        data_json = _to_json(data_state)
        sums = {"state": checksums.tree_checksums(state), "data": checksums.json_checksum(data_json),
                "config": checksums.json_checksum(config_dict)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_json),
                config=ocp.args.JsonSave(config_dict),
                checksums=ocp.args.JsonSave(sums),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, check_config: Callable[[int, dict], Any] | None = None
                ) -> tuple[Any, Any, dict]:
        """-> (state, data_state, config_dict), verified against the step's checksums. `abstract_state` leaves
        are `jax.ShapeDtypeStruct`s carrying the target shardings (e.g. from `jax.eval_shape` + the current mesh's
        shardings). `check_config(step, saved_config)` runs before the state is read (it may refuse a resume by
        raising CheckpointError). Raises CheckpointCorrupt naming what failed."""
        verified = self.has_checksums(step)
        meta_items = ("data", "config", "checksums") if verified else ("data", "config")
        meta = {name: self._read(step, name, ocp.args.JsonRestore()) for name in meta_items}
        saved = meta.get("checksums", {})
        for item in ("data", "config"):
            if verified and checksums.json_checksum(meta[item]) != saved.get(item):
                raise CheckpointCorrupt(step, f"{item}/metadata", "checksum mismatch")
        if check_config is not None:
            check_config(step, meta["config"])
        state = self._read(step, "state", ocp.args.StandardRestore(abstract_state))
        if verified:
            bad = checksums.mismatches(saved.get("state", {}), checksums.tree_checksums(state))
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise CheckpointCorrupt(step, f"state/{bad[0]}{more}", "checksum mismatch")
        return state, _from_json(meta["data"]), meta["config"]

    def _read(self, step: int, item: str, args) -> Any:
        """One item of a step, or CheckpointCorrupt naming the file (or at least the item) that failed."""
        _quiet_closed_loop_callbacks()
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
        except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable; say which file
            raise CheckpointCorrupt(step, *_one_line(e, self.step_dir(step), item)) from e

    def restore_latest(self, abstract_state: Any, report: Callable[[str], None] = print,
                       check_config: Callable[[int, dict], str | None] | None = None
                       ) -> tuple[int, Any, Any, dict] | None:
        """The newest step that reads and verifies -> (step, state, data_state, config_dict); None when there is
        no checkpoint. Each bad step is reported in one line and moved aside; when every step is bad, raises
        CheckpointError (the bad steps are then all in `<dir>/corrupt`, so a rerun starts from scratch).
        `check_config(step, saved_config)` may refuse a step (raising) or return a message, reported only for the
        step that is restored."""
        notes: dict[int, str | None] = {}

        def check(step: int, saved: dict) -> None:
            notes[step] = check_config(step, saved) if check_config is not None else None

        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        if not self.has_checksums(steps[0]):
            report(f"longtrain: checkpoint step {steps[0]} has no checksums (written before longtrain verified "
                   "checkpoints): restored unverified")
        moved = []
        for i, step in enumerate(steps):
            error = None
            try:
                restored = self.restore(step, abstract_state, check)
            except CheckpointCorrupt as e:
                error = e
            if all_processes(error is None):
                if notes.get(step):
                    report(notes[step])
                return (step, *restored)
            older = steps[i + 1] if i + 1 < len(steps) else None
            moved.append(self.move_aside(step))
            report(f"longtrain: {error or f'checkpoint step {step} failed verification on another process'}; "
                   f"moved to {moved[-1]}; "
                   + (f"falling back to step {older}" if older is not None else "no older checkpoint left"))
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored ({len(moved)} moved to "
                              f"{os.path.dirname(moved[-1])}); run again to start from scratch")

    def move_aside(self, step: int) -> str:
        """Move step's folder to `<dir>/corrupt/<step>` (`.1`, `.2`, ... if taken) on process 0; all wait."""
        dest = os.path.join(self.directory, "corrupt", str(step))
        n = 0
        while os.path.exists(dest if not n else f"{dest}.{n}"):
            n += 1
        dest = dest if not n else f"{dest}.{n}"
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(self.step_dir(step), dest)
        barrier(f"longtrain_move_aside_{step}")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        """Block until the last async save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
