"""Passkey retrieval at 4k-32k tokens from a model trained on at most 2k (issue 20).

The task of Mohtashami & Jaggi (2023, "Landmark attention"): a pass key hidden at a random depth in
repeated filler text, asked for at the end. Here the key is one token of 100 ("the pass key is 42 .
remember it . 42 is the pass key ."; chance 1%). The model is a small Llama (RoPE) whose every layer
is sliding-window attention (w = 64) with a global token every 64 positions (`global_stride`): a global
token reads its own window, and every later query reads every earlier global token, so the key
crosses any distance in two layers. The global path scores queries and keys without RoPE
(`global_rope=False`): what it reads does not depend on how far back it lies, so distances never seen
in training (up to 32k here against 2k) are no different from those that were. Memory stays
O(n (w + n / s)).

Training: cross-entropy on every occurrence of the key after the first (the needle's own repetition,
and the answers to three questions asked at random places after the needle and to the final one), on
sequences of 128 tokens to a maximum that grows from 256 to 2048 (a curriculum), drawn afresh every
step (seeded), checkpointed every 100 steps (resumable). Evaluation: 50 keys per length, each at a
uniformly random depth, one question at the end; a key counts when it is the model's greedy answer.
The control is the same trained model with its global path switched off (`global_stride=0`, only the
local window), which cannot see a key more than 3 x 64 tokens back.

A first design (a five-digit key, answer-only loss) learnt to copy the key inside the needle but not to
answer: 1,500 steps left it at 27-31% per digit and 0% whole keys at 256-4,096 tokens (seed 0).

    python benchmarks/passkey.py train   # resumes; PASSKEY_STEPS (default 1500), PASSKEY_SEED (0)
    python benchmarks/passkey.py eval    # benchmarks/results/passkey.{json,md}

CPU budget: about 30 minutes of training on 2 cores, a few minutes of evaluation.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmlab.models.registry import build  # noqa: E402
from lmlab.models.transformer.llama import LlamaConfig  # noqa: E402
from lmlab.train.optim import make_optimizer  # noqa: E402
from lmlab.train.schedule import lr_at  # noqa: E402
from lmlab.utils.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402

STEPS = int(os.environ.get("PASSKEY_STEPS", 1500))
SEED = int(os.environ.get("PASSKEY_SEED", 0))
RUN = ROOT / "benchmarks" / "runs" / f"passkey-s{SEED}"
RESULTS = ROOT / "benchmarks" / "results"
WINDOW = STRIDE = 64
TRAIN_LENGTHS, EVAL_LENGTHS = (256, 2048), (4096, 8192, 16384, 32768)  # curriculum: max 256 -> 2048
BATCH, KEYS = 8, 50

FILLER = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again ."
KEYS_VOCAB = [f"{i:02d}" for i in range(100)]  # the pass key: one of 100 tokens (chance 1%)
WORDS = sorted(set(FILLER.split()) | set("pass key is remember it what ?".split())) + KEYS_VOCAB
VOCAB = {w: i for i, w in enumerate(WORDS)}
N_QUESTIONS = 3  # questions asked (and answered) inside a training sequence, besides the last one


def config(global_stride: int = STRIDE) -> LlamaConfig:
    return LlamaConfig(n_layer=3, n_head=4, n_kv_head=4, n_embd=128, mlp_hidden=384, vocab_size=len(WORDS),
                       block_size=max(EVAL_LENGTHS), tie_embeddings=True, loss_chunk_size=0,
                       sliding_window=WINDOW, global_stride=global_stride, global_rope=False)


def ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def sample(rng: random.Random, length: int, questions: int = 0) -> tuple[list[int], int, list[int]]:
    """One sequence of exactly `length` tokens: filler with the needle at a random depth, `questions`
    answered questions at random places after it, and the final question, whose answer is the last
    token. Returns the tokens, the key, and the positions that predict the key (every occurrence but
    the first: the needle's own repetition, the answers)."""
    key = rng.choice(KEYS_VOCAB)
    needle = ids(f"the pass key is {key} . remember it . {key} is the pass key .")
    question = ids(f"what is the pass key ? the pass key is {key} .")
    filler = ids(FILLER)
    n_fill = length - len(needle) - (questions + 1) * len(question) + 1  # the last question ends on the key
    if n_fill < 0:
        raise ValueError(f"{length} tokens cannot hold the needle and {questions + 1} questions")
    haystack = (filler * (n_fill // len(filler) + 1))[:n_fill]
    at = rng.randrange(n_fill + 1)
    cuts = sorted(rng.randrange(at, n_fill + 1) for _ in range(questions))
    seq = haystack[:at] + needle
    for a, b in zip([at, *cuts], [*cuts, n_fill]):
        seq += haystack[a:b] + question
    seq = seq[:-1]
    k = VOCAB[key]
    hits = [i - 1 for i, t in enumerate(seq) if t == k]
    return seq, k, hits[1:]


def batch(rng: random.Random, length: int, n: int, questions: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs, keys, at = zip(*(sample(rng, length, questions) for _ in range(n)))
    return torch.tensor(seqs), torch.tensor(keys), torch.tensor(at)


def answer_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits predicting the answer, the last token."""
    return model(x, logits_to_keep=2).logits[:, 0]


def max_length(step: int) -> int:
    """The curriculum: the longest training sequence grows from 256 to 2048 over the first 40% of the
    steps, so the key is first often within the local layers' reach (3 x 64 tokens) and copying it is
    learnt before it has to travel through the global tokens."""
    grow = min(1.0, step / (0.4 * STEPS))
    return int(TRAIN_LENGTHS[0] + grow * (TRAIN_LENGTHS[1] - TRAIN_LENGTHS[0])) // 64 * 64


def train() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = build(config())
    opt = make_optimizer(model, lr=2e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    state = RUN / "state.json"
    step, log = 0, []
    if state.is_file():
        meta = json.loads(state.read_text())
        step, log = meta["step"], meta["log"]
        load_model(model, RUN / "model.safetensors")
        opt.load_state_dict(torch.load(RUN / "optim.pt", weights_only=True))
        print(f"resuming at step {step}", flush=True)
    t0 = time.time()
    while step < STEPS:
        rng = random.Random(SEED * 1_000_003 + step)  # the data of step n, whatever the resumes
        length = rng.randrange(2, max_length(step) // 64 + 1) * 64
        x, key, at = batch(rng, length, BATCH, N_QUESTIONS)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=2e-3, min_lr=2e-4, warmup_steps=100, max_steps=STEPS)
        logits = model(x).logits[torch.arange(BATCH)[:, None], at]
        loss = F.cross_entropy(logits.reshape(-1, len(WORDS)), key[:, None].expand_as(at).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log.append({"step": step, "length": length, "loss": round(loss.item(), 4)})
        if step % 20 == 0:
            print(f"step {step} len {length} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        if step % 100 == 0 or step == STEPS:
            save_model(model, str(RUN / "model.safetensors.tmp"))
            os.replace(RUN / "model.safetensors.tmp", RUN / "model.safetensors")
            torch.save(opt.state_dict(), RUN / "optim.pt.tmp")
            os.replace(RUN / "optim.pt.tmp", RUN / "optim.pt")
            meta = {"step": step, "log": log, "train_seconds": round(time.time() - t0, 1)
                    + (json.loads(state.read_text()).get("train_seconds", 0) if state.is_file() else 0)}
            atomic_write_text(state, json.dumps(meta))
            t0 = time.time()


@torch.no_grad()
def accuracy(model: torch.nn.Module, length: int, keys: int = KEYS) -> dict:
    rng = random.Random(10_000 + length)  # the same keys and depths for every model
    hits = 0
    for _ in range(keys):
        x, key, _ = batch(rng, length, 1)
        hits += int(answer_logits(model, x).argmax(-1).item() == key.item())
    lo, hi = _wilson(hits, keys)
    return {"length": length, "keys": keys, "correct": hits, "accuracy": hits / keys, "wilson95": [lo, hi]}


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


def evaluate() -> None:
    meta = json.loads((RUN / "state.json").read_text())
    rows = []
    t0 = time.time()
    for arm, stride in (("sliding window + strided globals", STRIDE), ("local window only (globals off)", 0)):
        model = build(config(stride)).eval()
        load_model(model, RUN / "model.safetensors")
        for length in (1024, *EVAL_LENGTHS):
            r = {"model": arm, **accuracy(model, length)}
            rows.append(r)
            print(r, flush=True)
    out = {"config": asdict(config()), "seed": SEED, "steps": meta["step"], "train_lengths": TRAIN_LENGTHS,
           "train_seconds": meta.get("train_seconds"), "eval_seconds": round(time.time() - t0, 1),
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}", "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS / "passkey.json", (json.dumps(out, indent=2) + "\n").encode())
    lines = ["# Passkey retrieval beyond the trained length", "",
             f"3-layer Llama (128 wide), sliding window {WINDOW}, a global token every {STRIDE} positions, "
             f"global path without RoPE; trained {meta['step']} steps on 128-{TRAIN_LENGTHS[1]}"
             f" tokens (a curriculum; seed {SEED}, {meta.get('train_seconds')} s of training on {os.cpu_count()} CPUs, "
             f"shared with other jobs). {KEYS} keys (one token of 100) per length at random depths; accuracy = "
             "greedy answer is the key, [Wilson 95% interval]. `python benchmarks/passkey.py eval`.", "",
             "| model | " + " | ".join(f"{r['length']:,}" for r in rows[:len(rows) // 2]) + " |",
             "|---|" + "---|" * (len(rows) // 2)]
    for arm in dict.fromkeys(r["model"] for r in rows):
        cells = [f"{100 * r['accuracy']:.0f}% [{100 * r['wilson95'][0]:.0f}, {100 * r['wilson95'][1]:.0f}]"
                 for r in rows if r["model"] == arm]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    atomic_write_text(RESULTS / "passkey.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("PASSKEY_THREADS", 2)))
    {"train": train, "eval": evaluate}[sys.argv[1] if len(sys.argv) > 1 else "train"]()
