"""`lmlab lineage`: the perplexity ladder from a unigram to a small GPT (lmlab/recipes/lineage.py)."""

from __future__ import annotations

import argparse
import time

from lmlab.cli._args import overrides
from lmlab.config import apply_overrides, describe, from_dict, load_yaml
from lmlab.recipes.lineage import LineageConfig, lineage, quick, table


def run(args: argparse.Namespace, rest: list[str]) -> int:
    cfg = from_dict(LineageConfig, load_yaml(args.config)) if args.config else LineageConfig()
    if args.corpus:
        cfg.corpus = args.corpus
    cfg.out = args.out or f"runs/lineage-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.quick:
        cfg = quick(cfg)
    cfg = apply_overrides(cfg, overrides(rest))  # --gpt.steps=1000 style overrides of LineageConfig
    print(table(lineage(cfg)))
    return 0


def add_parser(add) -> None:
    sp = add("lineage", run,
             "Train and evaluate unigram, Kneser-Ney 3/5-gram, NPLM and a small GPT on one word-level split "
             "and print the test-perplexity ladder.",
             "options (defaults shown; override as --key=value, e.g. --gpt.steps=2000):\n"
             + "\n".join(describe(LineageConfig)) +
             "\n\nexamples:\n  lmlab lineage                                   the built-in stdlib-docs corpus\n"
             "  lmlab lineage --corpus ../shared/data/ptb --out /tmp/ptb-lineage\n"
             "  lmlab lineage --config recipes/lineage-ptb.yaml --corpus ../shared/data/ptb   the PTB recipe\n"
             "  lmlab lineage --quick --out runs/lineage-quick      tiny neural rungs (CI)",
             overrides=True)
    sp.add_argument("--corpus", default="",
                    help="a folder with train/valid/test .txt files, or a source for lmlab prepare "
                         "(default: the recipe's, else stdlib-docs)")
    sp.add_argument("--config", default="", help="a YAML recipe of the options below (recipes/lineage-ptb.yaml)")
    sp.add_argument("--out", default="", help="output folder (default: runs/lineage-<time>)")
    sp.add_argument("--quick", action="store_true", help="tiny neural rungs: well under a minute")
