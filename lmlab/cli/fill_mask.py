"""`lmlab fill-mask MODEL TEXT`: the most likely fillers of each <mask> (lmlab/generate/fill_mask.py)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.generate.fill_mask import fill_mask
    from lmlab.io.load import load_model

    loaded = load_model(args.model)
    for i, fillers in enumerate(fill_mask(loaded.model, loaded.tokenizer, args.text, args.top_k)):
        print(f"mask {i + 1}: " + "  ".join(f"{t!r} {p:.3f}" for t, p in fillers))
    return 0


def add_parser(add) -> None:
    sp = add("fill-mask", run, "Print the most likely fillers of each <mask> (masked LMs such as BERT).",
             "example:\n  lmlab fill-mask runs/<bert-run> \"The json <mask>odule\" --top_k 5")
    sp.add_argument("model", metavar="MODEL", help="run or checkpoint directory of a masked language model")
    sp.add_argument("text", help="text with one or more <mask> (the tokenizer's mask token)")
    sp.add_argument("--top_k", type=int, default=5, help="fillers shown per mask")
