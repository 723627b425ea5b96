"""The `lmlab` command: `main()` and the parser. Each subcommand is a module of this package with
`add_parser(add)` and `run(args, rest)`: it parses, calls a library function and prints the result.

A model to load is a positional MODEL (`lmlab generate MODEL`, `lmlab eval MODEL`); an architecture
preset is `--model PRESET` (`lmlab train`). Commands built on a config dataclass (train, quickstart,
lineage, scaling) take `--section.key=value` overrides, checked against the dataclass; every other
unknown option is an error.
"""

from __future__ import annotations

import argparse
import sys

from lmlab.errors import LmlabError

EXAMPLES = """\
getting started:
  lmlab quickstart                              prepare the built-in corpus, train a small GPT, sample
  lmlab prepare stdlib-docs --out data/docs     text -> tokenizer + token shards
  lmlab train --data data/docs --model mini --train.max_steps=500 --train.lr=1e-3
  lmlab eval runs/<run> --split test            loss, perplexity and bits per byte
  lmlab generate runs/<run> "The json module" --temperature 0.8 --top_k 50
  lmlab chat SmolLM2-135M-Instruct.Q4_1.gguf    chat with a model that has a chat template
  lmlab info runs/<run>                         what a run, checkpoint or data directory holds
  lmlab export runs/<run> out --to hf           as a Hugging Face directory (or gguf; peft: a LoRA adapter)
  lmlab ngram build text.txt --order 5 --out m.arpa   a Kneser-Ney n-gram model (as KenLM's lmplz)
  lmlab lineage                                 unigram -> KN 3/5-gram -> NPLM -> GPT perplexity ladder

MODEL (generate, eval, chat, fill-mask, fewshot) is a run or checkpoint directory, a .gguf file or
a Hugging Face model directory; --model PRESET (train) names an architecture. Progress goes to
standard error (-q: warnings only, -v: more), results to standard output.
Every subcommand has its own --help.
"""

# name of the module in this package for each subcommand, in the order --help lists them
SUBCOMMANDS = ["prepare", "train", "eval", "generate", "fill_mask", "chat", "info", "export", "scaling",
               "quickstart", "ngram", "lineage", "word2vec", "fewshot", "serve"]


def _verbosity_flags(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default, help="more messages (debug)")
    p.add_argument("-q", "--quiet", action="count", default=default, help="only warnings and errors")


def make_parser() -> argparse.ArgumentParser:
    import importlib

    from lmlab import __version__

    p = argparse.ArgumentParser(
        prog="lmlab", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Language models from n-grams to LLMs: prepare data, train, evaluate, generate.",
        epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"lmlab {__version__}")
    _verbosity_flags(p, 0)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func, help: str, epilog: str = "", *, overrides: bool = False) -> argparse.ArgumentParser:
        """Register a subcommand; `overrides`: it accepts --section.key=value options (checked by its own
        config dataclass), otherwise any unknown option is an error."""
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func, overrides=overrides)
        _verbosity_flags(sp, argparse.SUPPRESS)
        return sp

    for name in SUBCOMMANDS:
        importlib.import_module(f"lmlab.cli.{name}").add_parser(add)
    return p


def main(argv: list[str] | None = None) -> int:
    from lmlab.utils.logging import setup_logging

    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    setup_logging(args.verbose - args.quiet)
    if not getattr(args, "command", None):
        if rest:
            print(f"error: unknown option '{rest[0]}' (see lmlab --help)", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    try:
        if rest and not args.overrides:
            what = "option" if rest[0].startswith("-") else "argument"
            raise LmlabError(f"unknown {what} '{rest[0]}' for lmlab {args.command} (see lmlab {args.command} --help)")
        return args.func(args, rest)
    except LmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
