"""CLI subcommands, one module each (see longtrain/cli.py)."""
