"""Architecture registry: `config.architecture` -> the NNX module class that implements it.

Contract (the MiniMax engineer and others plug into it):
- `ARCHITECTURES: dict[str, str]` maps an architecture name to "module:Class", imported lazily by
  `get_architecture(name)` so one missing or broken module does not break the others.
- The class is an `nnx.Module` (subclass `decoder.CausalLM` for the shared embedding, final norm, LM head and
  logits call) built as `Class(config, rngs=...)`, with
    `model(tokens, *, positions, segment_ids, runtime) -> logits [B,T,V]` fp32,
    `model.hidden(tokens, *, positions, segment_ids, runtime, token_index, kv_prefix, return_kv)`
        -> hidden [B,T,E] (final-norm output), or (hidden, per-layer kv list) when return_kv,
    `model.lm_head_weight() -> [E, V]`,
  and every `nnx.Param` created with metadata `out_sharding=(logical axis names)` (`layers.param` does it).
- Add an architecture with one line here (plus its name in `ModelConfig.architecture`).
"""
from __future__ import annotations

import importlib

ARCHITECTURES: dict[str, str] = {
    "llama": "longtrain.models.decoder:Decoder",
    "mistral": "longtrain.models.decoder:Decoder",
    "qwen2": "longtrain.models.decoder:Decoder",
    "qwen3": "longtrain.models.decoder:Decoder",
    "minimax": "longtrain.models.minimax:MiniMax",
}


def get_architecture(name: str) -> type:
    """The module class implementing architecture `name`; a clear error for an unknown name."""
    if name not in ARCHITECTURES:
        raise ValueError(f"model.architecture={name!r} is not registered; known: {sorted(ARCHITECTURES)}")
    module, cls = ARCHITECTURES[name].split(":")
    return getattr(importlib.import_module(module), cls)
