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

from longtrain.config import Config, ConfigError, ModelConfig

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


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def source_model(path: str) -> ModelConfig:
    """The model config of an init_from folder (its config.yaml, or the HF config.json), without its weights."""
    if os.path.isdir(os.path.join(path, "params")):
        from longtrain.config import load_config

        return load_config(os.path.join(path, "config.yaml")).model
    from longtrain.hf.convert import config_from_hf_dir

    return config_from_hf_dir(path)[1]


def inherit_token_ids(config: Config) -> list[str]:
    """Fill the model's special token ids that the config leaves unset from the `train.init_from` model, so a
    fine-tune's HF export carries them (generation needs eos). -> "model.x=value" for each one filled."""
    if config.train.init_from is None:
        return []
    found = source_model(config.train.init_from)
    filled = []
    for name in TOKEN_ID_FIELDS:
        if getattr(config.model, name) is None and getattr(found, name) is not None:
            setattr(config.model, name, getattr(found, name))
            filled.append(f"model.{name}={getattr(found, name)}")
    return filled


def load_params(path: str, model: ModelConfig, abstract_params: Any) -> Any:
    """Parameters from `path`, sharded like `abstract_params` (ShapeDtypeStructs with shardings)."""
    check_init_from(path)
    if os.path.isdir(os.path.join(path, "params")):
        import orbax.checkpoint as ocp

        check_same_model(model, source_model(path), path)
        return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")), abstract_params)
    from longtrain.hf import import_hf

    found, host_params = import_hf(path)
    check_same_model(model, found, path)
    return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), host_params, abstract_params)
