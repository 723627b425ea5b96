"""`lmlab fewshot MODEL... --tasks ...`: k-shot accuracy of one or more models (lmlab/eval/harness/)."""

from __future__ import annotations

import argparse
import time

from lmlab.cli._args import deprecated
from lmlab.errors import LmlabError


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LmlabError(f"--{what} takes comma-separated integers, got '{text}'") from None
    if not out or min(out) < 0:
        raise LmlabError(f"--{what} needs at least one non-negative integer, got '{text}'")
    return out


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from lmlab.eval.harness.fewshot import run_fewshot

    models = list(args.models)
    if args.old_model:
        deprecated("lmlab fewshot --model A --model B", "lmlab fewshot A B")
        models += args.old_model
    if not models:
        raise LmlabError("give one or more models: lmlab fewshot MODEL [MODEL ...] --tasks TASKS")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_fewshot(models, [t.strip() for t in args.tasks.split(",") if t.strip()], _ints(args.shots, "shots"),
                items=args.items, seed=args.seed, out=args.out or f"runs/fewshot-{time.strftime('%Y%m%d-%H%M%S')}",
                batch_size=args.batch_size, bf16=args.bf16, words_file=args.words_file, device=args.device,
                names=args.name)
    return 0


def add_parser(add) -> None:
    sp = add("fewshot", run, "Zero-, one- and few-shot accuracy (GPT-3 style) of one or more models.",
             "models: lmlab run/checkpoint directories, .gguf files, Hugging Face directories, .arpa n-grams\n"
             "tasks (comma-separated; groups in brackets):\n"
             "  [arithmetic] arithmetic_2d+ 2d- 3d+ 3d- 4d+ 4d- 5d+ 5d- 2dx 1dc   (Brown et al. 2020, 3.9.1)\n"
             "  [scramble]   cycle_letters anagrams1 anagrams2 random_insertion reversed_words\n"
             "  [analogy]    analogy      [easy] counting days months letters capitals\n"
             "  or a .jsonl task file (see lmlab/eval/tasks/jsonl.py)\n"
             "analogy, capitals and scrambling read a questions-words.txt (gensim ships one; --words_file).\n"
             "writes OUT/results.json, OUT/results.md and accuracy plots (if matplotlib is installed)\n\n"
             "example:\n  lmlab fewshot SmolLM2-135M-Instruct.Q4_1.gguf runs/<run> \\\n"
             "      --tasks arithmetic_2d+,easy --shots 0,1,5 --items 200 --out runs/fewshot")
    sp.add_argument("models", metavar="MODEL", nargs="*", help="models to evaluate")
    sp.add_argument("--model", dest="old_model", action="append", help=argparse.SUPPRESS)
    sp.add_argument("--name", action="append", help="display name of each MODEL, in order (repeatable)")
    sp.add_argument("--tasks", required=True, help="comma-separated task names, groups or .jsonl files")
    sp.add_argument("--shots", default="0,1,5", help="comma-separated k (default 0,1,5)")
    sp.add_argument("--items", type=int, default=200, help="test items per task and k (default 200)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the task generators and demo sampler")
    sp.add_argument("--out", default="", help="output directory (default runs/fewshot-<time>); finished cells are "
                    "kept in OUT/cells, so the same command with the same --out continues an interrupted run")
    sp.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    sp.add_argument("--bf16", action="store_true", help="run neural models under bfloat16 autocast")
    sp.add_argument("--words_file", default=None, help="questions-words.txt (default: gensim's copy)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; on a busy "
                    "machine 1 can be several times faster)")
