"""`lmlab info PATH`: what a data, run or checkpoint directory holds (lmlab/io/describe.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.io.describe import describe_path

    print(describe_path(Path(args.path)))
    return 0


def add_parser(add) -> None:
    sp = add("info", run, "Show what a data, run or checkpoint directory holds.",
             "for a data directory: corpus, Python version and content hash, tokenizer, tokens per split;\n"
             "for a run or checkpoint: parameters, step, tokens seen, validation loss and the full config.\n\n"
             "examples:\n  lmlab info data/stdlib-docs\n  lmlab info runs/quickstart-20260101-120000")
    sp.add_argument("path", help="a data directory, run directory or checkpoint directory")
