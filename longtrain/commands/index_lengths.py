"""`longtrain index-lengths CONFIG [key=value ...] --out DIR`: tokenize a file corpus once and write the token
length of every record (and where the bad ones are) to DIR.

Balance mode plans each step over all ranks, so every process needs every document's length; with the index
(`data.balance.length_index=DIR`) a process reads and tokenizes only the documents placed on its own ranks. The
index records what the lengths depend on (data.source, text_field, tokenizer, bos/eos, add_bos/add_eos, each file's
size and mtime); the loader refuses an index that no longer matches, naming the key or file. Progress is printed
every few seconds on big corpora.
"""
from __future__ import annotations

import argparse
import sys

from longtrain.commands.config import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", default=None, help="index folder to write; defaults to data.balance.length_index")
    parser.add_argument("--workers", type=int, default=1, help="tokenize in this many processes (default 1)")
    parser.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                        help="print progress this often (default 5 s)")


def run(args: argparse.Namespace) -> int:
    from longtrain.config import ConfigError, load_config
    from longtrain.data.length_index import build_index

    config = load_config(args.config, args.overrides)
    data = config.data
    out = args.out or data.balance.length_index
    if not out:
        raise ConfigError("index-lengths: give --out DIR (or set data.balance.length_index)")
    if args.workers < 1:
        raise ConfigError(f"index-lengths: --workers={args.workers} must be >= 1")
    if data.source == "synthetic":
        raise ConfigError("index-lengths: data.source=synthetic has no files to index; set data.source and "
                          "data.paths")
    try:
        meta = build_index(data, out, workers=args.workers, progress=lambda line: print(line, file=sys.stderr, flush=True),
                           progress_every=args.progress_every)
    except (OSError, ValueError) as e:  # a missing/unreadable file or a bad tokenizer setting: a config problem
        raise ConfigError(f"index-lengths: {e}") from e
    print(f"wrote {out}: {meta['num_records']} records, {meta['num_tokens']} tokens, {len(meta['bad'])} bad "
          f"record(s), {len(meta['parts'])} part(s), in {meta['seconds']:.1f} s")
    print(f"use it with: data.balance.length_index={out}")
    return 0
