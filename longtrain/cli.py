"""The `longtrain` command line.

Each subcommand lives in its own module under `longtrain/commands/` with `add_arguments(parser)` and
`run(args) -> int`; this file only wires them up. A user error (config, data, checkpoint: `longtrain.errors`)
exits with code 2 and a one-line message, its traceback only with `--debug`; Ctrl-C exits 130 without one.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import longtrain
from longtrain.errors import UserError

# name -> (module, one-line help). Modules are imported lazily so `--help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("longtrain.commands.config", "print the resolved config as YAML"),
    "train": ("longtrain.commands.train", "train a model from a config (resumes from the latest checkpoint)"),
    "plan": ("longtrain.commands.plan", "compile the train step ahead of time: per-device memory and communication"),
    "import": ("longtrain.commands.import_hf", "import a Hugging Face model folder as a longtrain checkpoint"),
    "export": ("longtrain.commands.export_hf", "export a longtrain checkpoint as a Hugging Face model folder"),
    "index-lengths": ("longtrain.commands.index_lengths", "token-length index of a file corpus (balance mode)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longtrain",
        description="Train long-context language models with JAX. Every config key can be overridden as key=value.",
    )
    parser.add_argument("--version", action="version", version=f"longtrain {longtrain.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors (anywhere on the "
                                                             "command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # argparse stops filling the `overrides` positional at the first flag; collect key=value tokens that come after
    # flags too, so `longtrain train CFG --devices 8 optim.learning_rate=1e-3` works.
    args, extra = parser.parse_known_args(argv)
    stray = [t for t in extra if t.startswith("-") or "=" not in t or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"longtrain: {e.kind} error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (which stops cleanly itself): compiling, loading, ...
        if debug:
            raise
        print("longtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
