"""Seconds per few-shot cell of SmolLM2-135M-Instruct (GGUF) on three representative cells, and the
token count of the full committed run (benchmarks/fewshot_results.py) to scale them by.

Cells: arithmetic_2d+ 5-shot (generation: long prompts, short answers), capitals 5-shot (multiple
choice: four choices share each context), cycle_letters 1-shot (generation: short prompts, answers
of a few tokens, some rows rambling to max_new_tokens).

    python benchmarks/fewshot_speed.py --items 20 [--threads 1] [--estimate]

`--estimate` also tokenizes every prompt of the full run (21 tasks x k = 0, 1, 5 x 200 items) and
counts the tokens the forward passes see: padded prefills for generation, padded distinct contexts
plus continuations for multiple choice.
"""

from __future__ import annotations

import argparse

import torch
from fewshot_results import ALL_TASKS, smollm2_gguf

from lmlab.eval.harness.fewshot import build_prompt, demonstrations, evaluate_task
from lmlab.eval.harness.lm import TorchLM, load_lm
from lmlab.eval.tasks import Task, expand, load_task

CELLS = [("arithmetic_2d+", 5), ("capitals", 5), ("cycle_letters", 1)]


def _padded(lengths: list[int], batch_size: int) -> int:
    lengths = sorted(lengths, reverse=True)  # as TorchLM batches them: longest first
    return sum(len(lengths[i:i + batch_size]) * lengths[i] for i in range(0, len(lengths), batch_size))


def cell_tokens(lm: TorchLM, task: Task, k: int, seed: int = 0) -> int:
    prompts = [build_prompt(task, it, demonstrations(task, i, k, seed)) for i, it in enumerate(task.items)]
    if task.kind == "generation":
        return _padded([len(lm.tokenizer.encode(p)) for p in prompts], lm.batch_size)
    contexts, conts = {}, 0
    for p, it in zip(prompts, task.items):
        for c in it.choices:
            ctx, cont = lm.encode_pair(p, task.target_delimiter + c)
            contexts[tuple(ctx)], conts = len(ctx), conts + len(cont)
    return _padded(list(contexts.values()), lm.batch_size) + conts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--estimate", action="store_true", help="count the tokens of the full run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_lm(smollm2_gguf(), batch_size=a.batch_size)
    print(f"| cell | items | tokens | seconds | ms/token |  ({a.threads} thread(s), batch {a.batch_size})")
    print("|---|---|---|---|---|")
    rates = []
    for name, k in CELLS:
        task = load_task(name, a.items, 0)
        r = evaluate_task(lm, task, k, 0)
        n = cell_tokens(lm, task, k)
        rates.append(r.seconds / n)
        print(f"| {name} {k}-shot | {a.items} | {n} | {r.seconds:.2f} | {1e3 * r.seconds / n:.2f} |", flush=True)
    if a.estimate:
        total = sum(cell_tokens(lm, load_task(t, 200, 0), k) for t in expand(ALL_TASKS) for k in (0, 1, 5))
        lo, hi = min(rates) * total / 60, max(rates) * total / 60
        print(f"full run: {total} tokens -> {lo:.0f} to {hi:.0f} min at these cells' ms/token")


if __name__ == "__main__":
    main()
