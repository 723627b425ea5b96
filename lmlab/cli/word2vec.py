"""`lmlab word2vec train | eval | similar`: word vectors from the command line.

`train` reads a corpus (a text file, folder or glob: a sentence per line; a JSONL file or a built-in
corpus: a sentence per document), trains skip-gram or CBOW and writes the vectors in the word2vec
format (binary for a `.bin` file, text otherwise). `eval` reports analogy accuracy and WordSim-353
correlation; `similar` prints nearest neighbours.
"""

from __future__ import annotations

import dataclasses
import json

from lmlab.errors import LmlabError
from lmlab.models.word2vec.model import Word2VecConfig


def _train(args) -> None:
    from lmlab.data.sentences import read_sentences
    from lmlab.io.word2vec import save_word2vec
    from lmlab.models.word2vec.model import Word2Vec

    cfg = Word2VecConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Word2VecConfig)})
    sentences = read_sentences(args.corpus, args.doc_split)
    model = Word2Vec(cfg)
    model.build_vocab(sentences)
    print(f"{args.corpus}: {len(sentences):,} sentences, {sum(map(len, sentences)):,} words, "
          f"vocabulary {len(model.vocab.words):,} (min_count {cfg.min_count})")
    stats = model.train(sentences)
    print(f"{'skip-gram' if cfg.sg else 'CBOW'}, {cfg.epochs} epochs: {stats.seconds:.1f} s, "
          f"{stats.words_per_second:,.0f} words/s with {cfg.workers} workers")
    binary = args.binary if args.binary is not None else str(args.out).endswith(".bin")
    save_word2vec(model.wv, args.out, binary=binary)
    print(f"wrote {args.out} ({'binary' if binary else 'text'})")


def _eval(args) -> None:
    from lmlab.eval.word_vectors import evaluate_analogies, evaluate_word_pairs, gensim_test_file
    from lmlab.io.word2vec import load_word2vec

    kv = load_word2vec(args.vectors)
    analogies = args.analogies or gensim_test_file("questions-words.txt")
    pairs = args.wordsim or gensim_test_file("wordsim353.tsv")
    if analogies is None or pairs is None:
        raise LmlabError("give --analogies questions-words.txt and --wordsim wordsim353.tsv "
                         "(or pip install gensim, whose wheel ships both)")
    out = {"vectors": str(args.vectors), "words": len(kv), "dimensions": kv.vector_size}
    a = evaluate_analogies(kv, analogies, restrict_vocab=args.restrict_vocab)
    for s in a.sections:
        acc = f"{s['correct'] / s['covered']:.3f}" if s["covered"] else "  -  "
        print(f"{s['section']:<28} {acc}  ({s['correct']}/{s['covered']} covered of {s['questions']})")
    print(f"{'analogies, all sections':<28} {a.accuracy:.3f}  ({a.correct}/{a.covered} covered of {a.questions})")
    w = evaluate_word_pairs(kv, pairs, restrict_vocab=args.restrict_vocab)
    print(f"{'wordsim353':<28} Spearman {w.spearman:.3f}, Pearson {w.pearson:.3f} ({w.covered}/{w.pairs} pairs)")
    out.update(analogies=a.as_dict(), wordsim=w.as_dict())
    if args.json:
        from lmlab.utils.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")


def _similar(args) -> None:
    from lmlab.io.word2vec import load_word2vec

    kv = load_word2vec(args.vectors)
    for word in args.words:
        pos, neg = [], []
        for term in word.split(","):  # "king,-man,woman": king - man + woman
            (neg if term.startswith("-") else pos).append(term.lstrip("-").lower())
        near = kv.most_similar(positive=pos, negative=neg, topn=args.topn)
        print(f"{word}: " + ", ".join(f"{w} {s:.3f}" for w, s in near))


def run(args, rest: list[str]) -> int:
    if args.action == "train":
        if not args.corpus or not args.out:
            raise LmlabError("train needs --corpus SOURCE and --out VECTORS.bin")
        _train(args)
    elif not args.vectors:
        raise LmlabError(f"{args.action} needs a vectors file")
    elif args.action == "eval":
        _eval(args)
    else:
        if not args.words:
            raise LmlabError("similar needs one or more words after the vectors file")
        _similar(args)
    return 0


def add_parser(add) -> None:
    """Register `lmlab word2vec` with the CLI's `add(name, func, help, epilog)`."""
    sp = add("word2vec", run, "Train word2vec vectors (skip-gram / CBOW), evaluate them, find neighbours.",
             "examples:\n"
             "  lmlab word2vec train --corpus stdlib-docs --out docs.bin --sg 1 --workers 2\n"
             "  lmlab word2vec train --corpus kjv.txt --out kjv.txt.vec --min_count 5 --epochs 5\n"
             "  lmlab word2vec eval docs.bin                     analogies (covered questions) + wordsim353\n"
             "  lmlab word2vec similar docs.bin list dict king,-man,woman\n\n"
             "Text is lower-cased and split on whitespace, punctuation stripped from each end of a token.\n"
             "Defaults are gensim's Word2Vec defaults.")
    sp.add_argument("action", choices=["train", "eval", "similar"])
    sp.add_argument("vectors", nargs="?", help="eval/similar: a word2vec text or binary file")
    sp.add_argument("words", nargs="*", help="similar: words, or 'a,-b,c' for a + c - b")
    sp.add_argument("--corpus", help="train: text file, folder, glob, .jsonl or stdlib-docs")
    sp.add_argument("--doc_split", default="line", choices=["line", "paragraph", "file"],
                    help="train: what a sentence is in plain-text files (default: a line)")
    sp.add_argument("--out", help="train: vectors file to write (.bin: binary)")
    sp.add_argument("--binary", type=int, choices=[0, 1], default=None, help="train: force the format")
    for f in dataclasses.fields(Word2VecConfig):
        sp.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"train (default {f.default})")
    sp.add_argument("--restrict_vocab", type=int, default=300_000,
                    help="eval: only the most frequent words are candidates and covered (gensim's default)")
    sp.add_argument("--analogies", help="eval: questions-words.txt (default: gensim's copy)")
    sp.add_argument("--wordsim", help="eval: wordsim353.tsv (default: gensim's copy)")
    sp.add_argument("--json", help="eval: also write the results here")
    sp.add_argument("--topn", type=int, default=10, help="similar: neighbours shown")
