"""`longtrain train CONFIG [key=value ...]`: train, resuming from the latest checkpoint automatically.

Exit codes: 0 finished or stopped cleanly by SIGTERM/SIGINT (checkpoint saved), 2 config error, 3 too many
NaN/inf steps in a row.
"""
from __future__ import annotations

import argparse

from longtrain.commands.config import add_config_arguments
from longtrain.train.process_env import add_process_arguments, init_distributed, simulate_devices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_process_arguments(parser)


def run(args: argparse.Namespace) -> int:
    simulate_devices(args.devices)
    init_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed_auto)
    import jax

    from longtrain.config import load_config
    from longtrain.train.trainer import train

    config = load_config(args.config, args.overrides, num_devices=jax.device_count())
    return train(config).exit_code
