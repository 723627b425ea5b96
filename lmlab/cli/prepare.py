"""`lmlab prepare SOURCE`: text -> tokenizer + token shards (lmlab/data/prepare.py)."""

from __future__ import annotations

import argparse
import dataclasses

from lmlab.config import apply_overrides, describe
from lmlab.data.prepare import PrepareConfig, prepare


def run(args: argparse.Namespace, rest: list[str]) -> int:
    given = [f"{f.name}={getattr(args, f.name)}" for f in dataclasses.fields(PrepareConfig)
             if f.name != "source" and getattr(args, f.name) is not None]
    prepare(apply_overrides(PrepareConfig(source=args.source), given), force=args.force)
    return 0


def add_parser(add) -> None:
    sp = add("prepare", run, "Turn text into a tokenizer and token shards (a data directory).",
             "sources: a file, a folder, a glob ('texts/**/*.txt'), a .jsonl file, or a built-in corpus:\n"
             "  stdlib-docs  English docstrings and help topics of this Python's standard library\n"
             "  stdlib-code  the standard library's source code (~30 MB)\n\n"
             "options (defaults shown):\n" + "\n".join(describe(PrepareConfig)) +
             "\n\nexamples:\n  lmlab prepare notes/ --out data/notes --tokenizer=char\n"
             "  lmlab prepare ../shared/data/ptb --splits=files --tokenizer=word --min_count=1 --vocab_size=0\n"
             "      (given train/valid/test files, each one split)")
    sp.add_argument("source", nargs="?", default="stdlib-docs", help="text to prepare (default: stdlib-docs)")
    sp.add_argument("--force", action="store_true", help="rebuild the data directory if it exists")
    for f in dataclasses.fields(PrepareConfig):
        if f.name != "source":
            sp.add_argument(f"--{f.name}", default=None, help=argparse.SUPPRESS)
