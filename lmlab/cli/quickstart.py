"""`lmlab quickstart`: the main job, end to end (lmlab/recipes/quickstart.py)."""

from __future__ import annotations

import argparse

from lmlab.cli._args import overrides


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.recipes.quickstart import SAMPLE_SETTINGS, quickstart

    r = quickstart(out=args.out, data=args.data, steps=args.steps, overrides=overrides(rest))
    print(f"{'model':<10}{'loss':>8}{'perplexity':>12}{'bits/byte':>11}")
    for name, e in (("unigram", r["unigram"]), ("gpt", r["val"])):
        print(f"{name:<10}{e['loss']:>8.3f}{e['perplexity']:>12.2f}{e['bits_per_byte']:>11.3f}")
    verdict = "reached" if r["perplexity_ratio"] <= 0.5 else "did NOT reach"
    print(f"GPT perplexity is {r['perplexity_ratio']:.1%} of the unigram baseline's: {verdict} the goal of at most 50%")
    ws = r["word_share"]
    print(f"samples ({SAMPLE_SETTINGS}); {ws['share']:.1%} of their {ws['words']} words occur in the training text:")
    for s in r["samples"]:
        print("  " + s.strip().replace("\n", "\n  "))
    print(f"done in {r['seconds']:.0f} s; results in {r['run_dir']}/quickstart.json; try "
          f"`lmlab generate {r['run_dir']} \"The json module\"`")
    return 0 if r["finite"] else 1


def add_parser(add) -> None:
    sp = add("quickstart", run,
             "The main job: prepare the built-in corpus, train a small GPT (a few minutes on a CPU), "
             "compare it with a unigram baseline and print a sample.",
             "model and train config keys can be overridden, e.g. --train.max_steps=100 --model.n_layer=2\n"
             "(see lmlab train --help for the keys)", overrides=True)
    sp.add_argument("--out", default="", help="run directory (default: runs/quickstart-<time>)")
    sp.add_argument("--data", default="data/stdlib-docs", help="data directory to use or create")
    sp.add_argument("--steps", type=int, default=0, help="training steps (default: the recipe's)")
