"""`longtrain export CKPT_DIR OUT_HF_DIR [--dtype bf16]`: a longtrain checkpoint -> a Hugging Face folder.

CKPT_DIR is either
- a `longtrain import` folder (see `longtrain.commands.import_hf`): `config.yaml` (its `model:` section),
  `params/` (orbax StandardCheckpointer), optional `hf_assets/` (tokenizer / generation config, copied through); or
- a trainer checkpoint: the checkpoint directory (its latest step is used) or one step folder `<dir>/<step>`
  holding the `state` and `config` items; only `state["params"]` is read (partial restore, no optimizer state).
"""
from __future__ import annotations

import argparse
import os

from longtrain.commands.import_hf import ASSETS_DIR, CONFIG_FILE, PARAMS_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR",
                        help="a `longtrain import` folder (config.yaml + params/) or a trainer checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_HF_DIR", help="Hugging Face folder to write")
    parser.add_argument("--dtype", default=None, choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                        help="storage dtype of the exported weights (default: the checkpoint's, fp32)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="shard safetensors above this size")


def _abstract_params(model_config):
    import jax

    from longtrain import models

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: models.init(model_config, jax.random.key(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def load_yaml(path: str) -> dict:
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def _model_section(tree: dict, where: str):
    """The validated ModelConfig of a saved config tree; only its `model:` section is read."""
    from longtrain.config import ConfigError, from_dict

    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ConfigError(f"{where} has no `model:` section")
    try:
        return from_dict({"model": tree["model"]}).model
    except ConfigError as e:
        raise ConfigError(f"{e} (in {where})") from None


def load_import_folder(ckpt_dir: str):
    """(model_config, params) of a `longtrain import` folder."""
    import orbax.checkpoint as ocp

    model_config = _model_section(load_yaml(os.path.join(ckpt_dir, CONFIG_FILE)), os.path.join(ckpt_dir, CONFIG_FILE))
    params = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(ckpt_dir, PARAMS_DIR)),
                                                _abstract_params(model_config))
    return model_config, params


def _trainer_step(ckpt_dir: str) -> tuple[str, int] | None:
    """(manager directory, step) when `ckpt_dir` is a trainer checkpoint directory or one of its step folders."""
    name = os.path.basename(os.path.normpath(ckpt_dir))
    if name.isdigit() and os.path.isdir(os.path.join(ckpt_dir, "state")):
        return os.path.dirname(os.path.normpath(ckpt_dir)), int(name)
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state"))]
    return (ckpt_dir, max(steps)) if steps else None


def load_trainer_checkpoint(manager_dir: str, step: int):
    """(model_config, params) of one trainer checkpoint step; reads only the params of the train state."""
    import jax
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.abspath(manager_dir))
    config_dict = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    model_config = _model_section(config_dict, f"{manager_dir}/{step}/config")
    target = {"params": _abstract_params(model_config)}
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))["state"]
    manager.close()
    return model_config, state["params"]


def run(args: argparse.Namespace) -> int:
    from longtrain.config import ConfigError
    from longtrain.hf import UnsupportedConfigError, export_hf

    ckpt_dir = args.ckpt_dir
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"CKPT_DIR {ckpt_dir} does not exist")
    assets = None
    if os.path.exists(os.path.join(ckpt_dir, CONFIG_FILE)) and os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)):
        model_config, params = load_import_folder(ckpt_dir)
        if os.path.isdir(os.path.join(ckpt_dir, ASSETS_DIR)):
            assets = os.path.join(ckpt_dir, ASSETS_DIR)
    elif (found := _trainer_step(ckpt_dir)) is not None:
        model_config, params = load_trainer_checkpoint(*found)
    else:
        raise ConfigError(f"CKPT_DIR {ckpt_dir} is neither a `longtrain import` folder ({CONFIG_FILE} + "
                          f"{PARAMS_DIR}/) nor a trainer checkpoint (numbered step folders with a state item)")
    try:
        written = export_hf(model_config, params, args.out_dir, dtype=args.dtype, source_dir=assets,
                            max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    except (UnsupportedConfigError, FileExistsError) as e:
        raise ConfigError(str(e)) from None
    print(f"exported {model_config.architecture} from {ckpt_dir} -> {args.out_dir}: {', '.join(written)}")
    return 0
