"""What may change between a checkpoint's config and the config that resumes it.

The model's parameters and the data loader's saved position only mean something for the model and the data
stream they were made with: a changed `model.*` key (shapes, RoPE, architecture) or `data.*` key (source, paths,
tokenizer, seq_len, batch size, seed, synthetic task) would restore into the wrong shapes or continue a different
stream silently. Everything else (optimizer, schedule, steps, mesh, eval, logging, checkpointing) and the few
model/data keys that change only how the same computation runs may change; the trainer then says what changed.
"""
from __future__ import annotations

from typing import Any

FIXED_SECTIONS = ("model", "data")
# Keys of the fixed sections that do not change the parameters' shapes or the data stream.
FREE_KEYS = frozenset({
    "model.dtype", "model.attention_impl", "model.lightning_impl", "model.remat", "model.scan_layers",
    "model.moe_impl", "model.init_std", "model.router_aux_loss_coef", "model.bos_token_id", "model.eos_token_id",
    "model.pad_token_id", "data.strict", "data.prefetch", "data.eval_paths",
})


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def resume_changes(saved: dict, current: dict, defaults: dict | None = None) -> tuple[list[str], list[str]]:
    """-> (refused, allowed): "key: old -> new" for every key that differs between the checkpoint's config and
    the current one, split into changes a resume must refuse and changes it may make. A key the checkpoint does
    not have (added to longtrain after it was written) counts as its value in `defaults`."""
    old, new = {**flatten(defaults or {}), **flatten(saved)}, flatten(current)
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        line = f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
        fixed = key.split(".", 1)[0] in FIXED_SECTIONS and key not in FREE_KEYS
        (refused if fixed else allowed).append(line)
    return refused, allowed
