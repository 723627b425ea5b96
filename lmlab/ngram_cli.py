"""`lmlab ngram build` and `lmlab ngram query`: count-based models from the command line.

`build` reads a text file (one sentence per line, as lmplz does) or a prepared data directory (its
training split, sentences closed by the tokenizer's `</s>`), estimates an n-gram model and writes it
as ARPA. `query` scores a text file with an ARPA model and prints KenLM `query`'s summary: perplexity
with OOVs scored as `<unk>` and without them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.models.ngram import NGramConfig, NGramModel, Perplexity

# short CLI names -> NGramConfig.smoothing
SMOOTHINGS = {"kn": "kneser_ney", "mle": "mle", "addk": "add_k", "stupid": "stupid_backoff"}
# a tokenizer's <unk> counted as an ordinary word (the PTB convention) needs another spelling, since
# `<unk>` in an n-gram model is the model's own unknown-word entry
UNK_AS_WORD = "<unk_word>"


def smoothing_name(name: str) -> str:
    full = SMOOTHINGS.get(name, name)
    if full not in SMOOTHINGS.values():
        raise LmlabError(f"unknown smoothing '{name}'; choose one of {', '.join(SMOOTHINGS)}")
    return full


def data_dir_itos(tok) -> list[str]:
    """How a prepared data directory's token ids are spelled in an n-gram model: words for a word
    tokenizer (its `<unk>` renamed so that it counts as a word), decimal ids otherwise (subword
    pieces may hold whitespace, which ARPA cannot)."""
    if getattr(tok, "kind", "") == "word":
        itos = list(tok.itos)
        itos[tok.unk_id] = UNK_AS_WORD
    else:
        itos = [str(i) for i in range(tok.vocab_size)]
    itos[tok.eos_id] = "</s>"
    return itos


def build_model(source: str | Path, config: NGramConfig, log=print) -> NGramModel:
    """An n-gram model of a text file or of a prepared data directory's training split."""
    path = Path(source)
    t0 = time.perf_counter()
    if (path / "meta.json").is_file():
        from lmlab.data.stream import TokenSplit
        from lmlab.tokenizers import load_tokenizer

        tok = load_tokenizer(path)
        model = NGramModel.from_ids(TokenSplit(path, "train").tokens().astype(np.int64), config,
                                    itos=data_dir_itos(tok), eos_id=tok.eos_id)
    elif path.is_file():
        with open(path, encoding="utf-8") as f:
            model = NGramModel.from_text(f, config)
    else:
        raise LmlabError(f"{path} is neither a text file nor a prepared data directory (with meta.json)")
    sizes = ", ".join(f"{k + 1}-grams {len(keys):,}" for k, keys in enumerate(model.keys))
    log(f"{config.order}-gram {config.smoothing} model of {path}: vocabulary {len(model.vocab):,}; {sizes} "
        f"({time.perf_counter() - t0:.1f} s)")
    return model


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


def cmd_ngram(args, rest: list[str]) -> int:
    if rest:
        raise LmlabError(f"unexpected arguments: {' '.join(rest)} (see lmlab ngram --help)")
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
    sp = add("ngram", cmd_ngram, "Build an n-gram language model (ARPA) or score text with one.",
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

