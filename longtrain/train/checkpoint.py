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
"""
from __future__ import annotations

import base64
import os
from typing import Any

import orbax.checkpoint as ocp


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


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with our three items. The caller decides when to save."""

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

    def save(self, step: int, state: Any, data_state: Any, config_dict: dict) -> None:
        """Start saving `step` (returns once device arrays are copied; the write finishes in the background)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(_to_json(data_state)),
                config=ocp.args.JsonSave(config_dict),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
        """-> (state, data_state, config_dict). `abstract_state` leaves are `jax.ShapeDtypeStruct`s carrying the
        target shardings (e.g. from `jax.eval_shape` + the current mesh's shardings)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], _from_json(restored["data"]), restored["config"]

    def wait(self) -> None:
        """Block until the last async save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

