"""`lmlab fewshot`: k-shot accuracy of one or more models on built-in or JSONL tasks."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmlab.errors import LmlabError


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LmlabError(f"--{what} takes comma-separated integers, got '{text}'") from None
    if not out or min(out) < 0:
        raise LmlabError(f"--{what} needs at least one non-negative integer, got '{text}'")
    return out


def run_fewshot(models: list[str], tasks: list[str], shots: list[int], *, items: int = 200, seed: int = 0,
                out: str | Path = "runs/fewshot", batch_size: int = 16, bf16: bool = False,
                words_file: str | None = None, device: str = "cpu", names: list[str] | None = None,
                log=print) -> list[dict]:
    """Evaluate every model on every task at every k; write results.json, results.md and plots to `out`.
    Finished cells are kept in `out/cells/`: a rerun with the same settings skips them."""
    import torch

    from lmlab.eval.harness.fewshot import CellCache, evaluate_model
    from lmlab.eval.harness.lm import load_lm
    from lmlab.eval.harness.report import write_results
    from lmlab.eval.tasks import expand, load_task

    if items < 1:
        raise LmlabError("--items must be at least 1")
    task_list = [load_task(t, items, seed, words_file=words_file) for t in expand(tasks)]
    key = {"items": items, "seed": seed, "bf16": bf16, "words_file": words_file}  # what decides the numbers
    cache = CellCache(Path(out) / "cells", key)
    rows: list[dict] = []
    for i, path in enumerate(models):
        name = names[i] if names and i < len(names) else Path(path).name  # load_lm's default name

        def load(path=path):
            return load_lm(path, batch_size=batch_size, dtype=torch.bfloat16 if bf16 else None, device=device)

        rows += evaluate_model(load, name, str(path), task_list, shots, seed, cache=cache, log=log)
    config = {"models": [str(m) for m in models], "tasks": [t.name for t in task_list], "shots": shots,
              "items": items, "seed": seed, "bf16": bf16}
    for p in write_results(out, rows, config, log=log):
        log(f"wrote {p}")
    return rows


def cmd_fewshot(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise LmlabError(f"unexpected arguments: {' '.join(rest)} (see lmlab fewshot --help)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_fewshot(args.model, [t.strip() for t in args.tasks.split(",") if t.strip()], _ints(args.shots, "shots"),
                items=args.items, seed=args.seed, out=args.out or f"runs/fewshot-{time.strftime('%Y%m%d-%H%M%S')}",
                batch_size=args.batch_size, bf16=args.bf16, words_file=args.words_file, device=args.device,
                names=args.name)
    return 0


def add_parser(add) -> None:
    sp = add("fewshot", cmd_fewshot, "Zero-, one- and few-shot accuracy (GPT-3 style) of one or more models.",
             "models: lmlab run/checkpoint directories, .gguf files, Hugging Face directories, .arpa n-grams\n"
             "tasks (comma-separated; groups in brackets):\n"
             "  [arithmetic] arithmetic_2d+ 2d- 3d+ 3d- 4d+ 4d- 5d+ 5d- 2dx 1dc   (Brown et al. 2020, 3.9.1)\n"
             "  [scramble]   cycle_letters anagrams1 anagrams2 random_insertion reversed_words\n"
             "  [analogy]    analogy      [easy] counting days months letters capitals\n"
             "  or a .jsonl task file (see lmlab/eval/tasks/jsonl.py)\n"
             "analogy, capitals and scrambling read a questions-words.txt (gensim ships one; --words_file).\n"
             "writes OUT/results.json, OUT/results.md and accuracy plots (if matplotlib is installed)\n\n"
             "example:\n  lmlab fewshot --model SmolLM2-135M-Instruct.Q4_1.gguf --model runs/<run> \\\n"
             "      --tasks arithmetic_2d+,easy --shots 0,1,5 --items 200 --out runs/fewshot")
    sp.add_argument("--model", action="append", required=True, help="a model to evaluate (repeatable)")
    sp.add_argument("--name", action="append", help="display name of each --model, in order (repeatable)")
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
