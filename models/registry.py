"""Architecture registry: `config.architecture` -> the module that implements it.

Contract (the MiniMax engineer and others plug into it):
- `ARCHITECTURES: dict[str, str]` maps an architecture name to a module path, imported lazily by
  `get_architecture(name)` so one missing or broken module does not break the others.
- Each architecture module exposes
    `init(config, rng) -> params` (nested dict of arrays, `config.param_dtype`),
    `forward_hidden(config, params, tokens, *, positions, segment_ids, runtime, token_index, kv_prefix, return_kv)`
        -> hidden [B,T,E] (final-norm output), or (hidden, per-layer kv list) when return_kv,
    `param_logical_axes(config) -> pytree like params` of tuples of logical axis names,
  and optionally `lm_head_weight(config, params) -> [E, V]` (default: `decoder.lm_head_weight`, i.e. the transposed
  `embed.embedding` when `config.tie_embeddings`, else `lm_head.kernel`).
- Add an architecture with one line here (plus its name in `ModelConfig.architecture`).
"""
from __future__ import annotations

import importlib
from types import ModuleType

ARCHITECTURES: dict[str, str] = {
    "llama": "longtrain.models.decoder",
    "mistral": "longtrain.models.decoder",
    "qwen2": "longtrain.models.decoder",
    "qwen3": "longtrain.models.decoder",
    "minimax": "longtrain.models.minimax",
}


def get_architecture(name: str) -> ModuleType:
    """The module implementing architecture `name`; a clear error for an unknown name."""
    if name not in ARCHITECTURES:
        raise ValueError(f"model.architecture={name!r} is not registered; known: {sorted(ARCHITECTURES)}")
    return importlib.import_module(ARCHITECTURES[name])
