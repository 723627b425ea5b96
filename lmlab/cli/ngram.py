"""`lmlab ngram build` and `lmlab ngram query`: count-based models from the command line.

`build` reads a text file (one sentence per line, as lmplz does) or a prepared data directory (its
training split, sentences closed by the tokenizer's `</s>`), estimates an n-gram model and writes it
as ARPA. `query` scores a text file with an ARPA model and prints KenLM `query`'s summary: perplexity
with OOVs scored as `<unk>` and without them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.models.ngram.model import NGramConfig, NGramModel, Perplexity
from lmlab.train.ngram import SMOOTHINGS, build_model, smoothing_name


def summary(p: Perplexity) -> str:
    """The four lines KenLM's `query` ends with."""
    return (f"Perplexity including OOVs:\t{p.perplexity}\nPerplexity excluding OOVs:\t"
            f"{p.perplexity_excluding_oovs}\nOOVs:\t{p.oovs}\nTokens:\t{p.tokens}")


def query_lines(model: NGramModel, path: str | None) -> Perplexity:
    if path is None:
        return model.perplexity(sys.stdin)
    if not Path(path).is_file():
        raise LmlabError(f"--data: no such file {path}")
    with open(path, encoding="utf-8") as f:
        return model.perplexity(f)


def run(args, rest: list[str]) -> int:
    from lmlab.io.arpa import read_arpa, write_arpa

    if args.action == "build":
        cfg = NGramConfig(order=args.order, smoothing=smoothing_name(args.smoothing),
                          discount_fallback=args.discount_fallback, skip_symbols=args.skip_symbols)
        if cfg.smoothing != "kneser_ney" and args.out:
            raise LmlabError(f"only Kneser-Ney models can be written as ARPA ({args.smoothing} is not a back-off "
                             "model); drop --out and score a file with --data")
        if not args.out and not args.data:
            raise LmlabError("give --out MODEL.arpa (or --data FILE to score a text file right away)")
        model = build_model(args.path, cfg)
        if model.discounts is not None:
            print("discounts D1 D2 D3+ per order: " + "; ".join(
                " ".join(f"{d:.4f}" for d in row[1:]) for row in model.discounts))
        if args.out:
            write_arpa(model, args.out)
            print(f"wrote {args.out}")
    else:
        if not Path(args.path).is_file():
            raise LmlabError(f"no such ARPA file: {args.path}")
        model = read_arpa(args.path)
    if args.data or args.action == "query":
        print(summary(query_lines(model, args.data)))
    return 0


def add_parser(add) -> None:
    """Register `lmlab ngram` with the CLI's `add(name, func, help, epilog)`."""
    sp = add("ngram", run, "Build an n-gram language model (ARPA) or score text with one.",
             "examples:\n"
             "  lmlab ngram build corpus.txt --order 5 --out corpus.arpa     modified Kneser-Ney, as lmplz\n"
             "  lmlab ngram build data/docs --order 3 --out docs.arpa        a prepared data directory's train split\n"
             "  lmlab ngram build corpus.txt --smoothing addk --data test.txt   score without writing a model\n"
             "  lmlab ngram query corpus.arpa --data test.txt                perplexity with and without OOVs")
    sp.add_argument("action", choices=["build", "query"])
    sp.add_argument("path", help="build: a text file (a sentence per line) or data directory; query: an ARPA file")
    sp.add_argument("--order", type=int, default=5, help="build: n, the longest n-gram (default 5)")
    sp.add_argument("--out", default="", help="build: the ARPA file to write (.arpa or .arpa.gz)")
    sp.add_argument("--smoothing", default="kn", help=f"build: {' | '.join(SMOOTHINGS)} (default kn)")
    sp.add_argument("--discount_fallback", action="store_true",
                    help="build: fixed discounts 0.5 1 1.5 where a small corpus makes Kneser-Ney's invalid")
    sp.add_argument("--skip_symbols", action="store_true", help="build: read <s> </s> <unk> in the text as spaces")
    sp.add_argument("--data", default=None, help="a text file to score (query: default standard input)")

