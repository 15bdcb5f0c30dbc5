"""`longtrain import HF_DIR OUT_DIR`: a Hugging Face folder -> a longtrain parameter checkpoint.

Layout written (the trainer restores from it; `longtrain export` reads it back):
    OUT_DIR/config.yaml    a longtrain config with only the `model:` section (the imported architecture); load with
                           `longtrain.config.load_config(OUT_DIR/config.yaml).model` (other sections default)
    OUT_DIR/params/        the parameter pytree (nested dicts of fp32 arrays, the layout of
                           `longtrain.models.init`) saved with `orbax.checkpoint.StandardCheckpointer`;
                           restore with `StandardCheckpointer().restore(os.path.abspath(OUT_DIR/params))`
    OUT_DIR/hf_assets/     tokenizer files and generation_config.json copied from HF_DIR (when present), so
                           `longtrain export` can write them back
"""
from __future__ import annotations

import argparse
import os

PARAMS_DIR = "params"
CONFIG_FILE = "config.yaml"
ASSETS_DIR = "hf_assets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write config.yaml, params/ and hf_assets/")


def save_params(params, path: str) -> None:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), params)
    checkpointer.wait_until_finished()


def model_config_yaml(model_config) -> str:
    """YAML with only the `model:` section: other sections keep their defaults when loaded, and schema changes
    elsewhere never invalidate an imported checkpoint."""
    import dataclasses

    import yaml

    return yaml.safe_dump({"model": dataclasses.asdict(model_config)}, sort_keys=False, default_flow_style=False)


def run(args: argparse.Namespace) -> int:
    import jax

    from longtrain.config import ConfigError
    from longtrain.hf import CheckpointFormatError, UnsupportedConfigError, copy_assets, import_hf

    if os.path.exists(os.path.join(args.out_dir, PARAMS_DIR)):
        raise ConfigError(f"{os.path.join(args.out_dir, PARAMS_DIR)} already exists; choose an empty OUT_DIR")
    try:
        model_config, params = import_hf(args.hf_dir)
    except (UnsupportedConfigError, CheckpointFormatError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    os.makedirs(args.out_dir, exist_ok=True)
    save_params(params, os.path.join(args.out_dir, PARAMS_DIR))
    with open(os.path.join(args.out_dir, CONFIG_FILE), "w") as fh:
        fh.write(model_config_yaml(model_config))
    copied = copy_assets(args.hf_dir, os.path.join(args.out_dir, ASSETS_DIR))
    n_params = sum(int(a.size) for a in jax.tree.leaves(params))
    print(f"imported {model_config.architecture} ({n_params:,} parameters) from {args.hf_dir} -> {args.out_dir}"
          f" (assets: {', '.join(copied) or 'none'})")
    return 0
