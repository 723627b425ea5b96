"""`lmlab info PATH`: what a data, run or checkpoint directory holds; `lmlab info --model PRESET`: the
parameters, FLOPs and memory of a model preset (lmlab/io/describe.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmlab.errors import LmlabError


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.io.describe import describe_model, describe_path

    if args.model:
        print(describe_model(args.model, context=args.context, batch=args.batch, devices=args.devices,
                             vocab_size=args.vocab_size))
    elif args.path:
        print(describe_path(Path(args.path)))
    else:
        raise LmlabError("give a PATH or --model PRESET")
    return 0


def add_parser(add) -> None:
    sp = add("info", run, "Show what a data, run or checkpoint directory holds, or what a model preset costs.",
             "for a data directory: corpus, Python version and content hash, tokenizer, tokens per split;\n"
             "for a run or checkpoint: parameters, step, tokens seen, validation loss and the full config;\n"
             "for --model PRESET: total and active parameters, FLOPs per token, memory to train and to infer\n"
             "(built on the meta device, so any size works) and whether it fits this machine.\n\n"
             "examples:\n  lmlab info data/stdlib-docs\n  lmlab info runs/quickstart-20260101-120000\n"
             "  lmlab info --model mixtral-8x7b --context 4096 --batch 8")
    sp.add_argument("path", nargs="?", help="a data directory, run directory or checkpoint directory")
    sp.add_argument("--model", help="a model preset (lmlab/models/registry.py), e.g. gpt3-175b, llama3-70b")
    sp.add_argument("--context", type=int, default=None, help="context length (default: the preset's block_size)")
    sp.add_argument("--batch", type=int, default=1, help="sequences per batch for activations and KV cache")
    sp.add_argument("--devices", type=int, default=8, help="devices to shard over with FSDP (default 8)")
    sp.add_argument("--vocab-size", type=int, default=50257,
                    help="vocabulary for presets that take it from the tokenizer (default GPT-2's 50257)")
