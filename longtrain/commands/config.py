"""`longtrain config CONFIG [key=value ...]`: resolve and validate a config, print it as YAML."""
from __future__ import annotations

import argparse

from longtrain.config import load_config, to_yaml


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The CONFIG + overrides arguments shared by every command that reads a config."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.learning_rate=1e-4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--devices", type=int, default=None,
        help="check the mesh against this many devices instead of the ones JAX sees",
    )


def visible_device_count() -> int:
    import jax

    return jax.device_count()


def run(args: argparse.Namespace) -> int:
    num_devices = args.devices if args.devices is not None else visible_device_count()
    config = load_config(args.config, args.overrides, num_devices=num_devices)
    print(to_yaml(config), end="")
    return 0
