"""`longtrain config CONFIG [key=value ...]`: resolve and validate a config, print it as YAML."""
from __future__ import annotations

import argparse
import math

from longtrain.config import check_cross_fields, load_config, to_yaml


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The CONFIG + overrides arguments shared by every command that reads a config."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="optional dotted overrides, e.g. optim.learning_rate=1e-4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--devices", type=int, default=None,
        help="check the mesh against this many devices (default: the mesh's own product when no axis is -1, "
             "else the devices JAX sees)",
    )


def visible_device_count() -> int:
    import jax

    return jax.device_count()


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    num_devices = args.devices
    if num_devices is None:  # printing a config needs no devices unless a -1 axis must be filled from them
        sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.context, config.mesh.tensor]
        num_devices = visible_device_count() if -1 in sizes else math.prod(sizes)
    check_cross_fields(config, num_devices=num_devices)  # the mesh rules, against those devices
    print(to_yaml(config), end="")
    return 0
