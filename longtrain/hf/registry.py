"""Hugging Face converter registry: `model_type` -> converter.

Contract (the MiniMax engineer adds "minimax" here with one line):
- `CONVERTERS: dict[str, str]` maps an HF `model_type` (== our `ModelConfig.architecture`) to "module:attribute";
  the converter object is imported lazily by `get_converter(model_type)`.
- A converter has
    `model_type: str` and `architecture_class: str` (e.g. "LlamaForCausalLM", written to config.json),
    `config_from_hf(hf_config: dict) -> ModelConfig`: raises `UnsupportedConfigError` naming every key it does not
        understand or whose value it cannot represent (never a silent drop),
    `config_to_hf(config: ModelConfig) -> dict`: the config.json content (without `architectures`/`model_type`,
        which the exporter adds),
    `tensor_specs(config) -> list[TensorSpec]`: one entry per HF tensor, saying where it lives in our params and
        how to transform it, so import/export stream tensor by tensor.
- `TensorSpec.to_params(hf_array) -> param slice` and `TensorSpec.to_hf(param slice) -> hf_array` are exact
  inverses (reshapes/transposes only), so import -> export -> import is bitwise.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import numpy as np

CONVERTERS: dict[str, str] = {
    "llama": "longtrain.hf.llama_family:LLAMA",
    "mistral": "longtrain.hf.llama_family:MISTRAL",
    "qwen2": "longtrain.hf.llama_family:QWEN2",
    "qwen3": "longtrain.hf.llama_family:QWEN3",
    "minimax": "longtrain.hf.minimax:MINIMAX",
}


class UnsupportedConfigError(ValueError):
    """An HF config (or a longtrain config on export) that the converter cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor <-> one params leaf (or one layer slice of a stacked leaf)."""

    hf_name: str                      # e.g. "model.layers.3.self_attn.q_proj.weight"
    path: tuple[str, ...]             # e.g. ("layers", "attn", "q_proj", "kernel")
    layer: int | tuple[int, ...] | None  # index into the leading axes (layers[, experts]); None if not stacked
    hf_shape: tuple[int, ...]
    to_params: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def get_converter(model_type: str, *, source: str = "config.json"):
    """The converter for `model_type`; an error naming the type, the source file and the supported types."""
    if model_type not in CONVERTERS:
        raise UnsupportedConfigError(f"{source}: model_type={model_type!r} is not supported; supported model "
                                     f"types: {sorted(CONVERTERS)}")
    module_name, attr = CONVERTERS[model_type].split(":")
    return getattr(importlib.import_module(module_name), attr)
