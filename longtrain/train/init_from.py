"""`train.init_from`: start training (fine-tuning) from existing weights instead of a random init.

Accepted folders: one written by `longtrain import` (`config.yaml` + `params/`, an orbax StandardCheckpointer
tree, restored straight into the parameter shardings so no host holds the full model), or a Hugging Face model
folder (`config.json` + safetensors, converted by `longtrain.hf.import_hf` and placed with the shardings).
The config's `model:` section must describe the same network; every differing field is named.
"""
from __future__ import annotations

import os
from typing import Any

import jax

from longtrain.config import ConfigError, ModelConfig

# Fields that change parameter shapes or meaning; compute-only knobs (dtype, impls, remat, scan) may differ.
_STRUCTURAL = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "resolved_head_dim", "tie_embeddings", "attention_bias", "attention_out_bias",
               "mlp_bias", "qk_norm", "layer_types", "num_experts")


def check_same_model(wanted: ModelConfig, found: ModelConfig, where: str) -> None:
    diffs = [f"model.{f}: config has {getattr(wanted, f)!r}, {where} has {getattr(found, f)!r}"
             for f in _STRUCTURAL if getattr(wanted, f) != getattr(found, f)]
    if diffs:
        raise ConfigError(f"train.init_from={where} is a different model: " + "; ".join(diffs))


def check_init_from(path: str | None) -> None:
    """Fail early (before compiling) when the folder is missing or of an unknown kind."""
    if path is None:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"train.init_from={path!r} does not exist (expected a `longtrain import` folder or a "
                          "Hugging Face model folder)")
    if not (os.path.isdir(os.path.join(path, "params")) or os.path.exists(os.path.join(path, "config.json"))):
        raise ConfigError(f"train.init_from={path!r} has neither params/ (a `longtrain import` folder) nor "
                          "config.json (a Hugging Face folder)")


def load_params(path: str, model: ModelConfig, abstract_params: Any) -> Any:
    """Parameters from `path`, sharded like `abstract_params` (ShapeDtypeStructs with shardings)."""
    check_init_from(path)
    if os.path.isdir(os.path.join(path, "params")):
        import orbax.checkpoint as ocp

        from longtrain.config import load_config

        found = load_config(os.path.join(path, "config.yaml")).model
        check_same_model(model, found, path)
        return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")), abstract_params)
    from longtrain.hf import import_hf

    found, host_params = import_hf(path)
    check_same_model(model, found, path)
    return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), host_params, abstract_params)
