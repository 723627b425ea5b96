"""Continued pre-training of SmolLM2-135M-Instruct on tinyshakespeare (issue 19): full fine-tuning vs LoRA
(r=16, all seven projections) vs LoRA over an int4 base, at equal tokens.

1. A learning-rate probe per arm: each of three learning rates (one more beyond the grid's edge if the
   best is at an edge) trains `--probe_steps` steps (seed 1); the arm's learning rate is the one with the
   lowest domain validation loss at the end (the trainer's fixed validation windows).
2. The comparison: each arm at its probed learning rate for `--steps` steps of 4 x 256 tokens, per seed.
   Per arm and seed: trainable parameters, peak RSS while training, tokens/s, the train loss of every
   step and the validation loss every `--eval_interval` steps (the curves), and perplexity before and
   after on a fixed slice of `--eval_tokens` tokens of the domain test split and of the first
   `--eval_tokens` tokens of PTB's test text (general text; `../shared/data/ptb/ptb.test.txt`, read as it
   is: lower-cased, `<unk>` and all, tokenized by SmolLM2's tokenizer in memory, never written).

Each run is one `lmlab train --init` run in its own process (benchmarks/runs/specialise/, gitignored), so
peak RSS is that arm's alone. Checkpoints every `--ckpt_interval` steps; an interrupted run resumes from
its last one, a finished run keeps its numbers in result.json, so rerunning the same command only runs
what is missing (across sessions). Results and plots are rewritten after every finished run and say which
runs are complete; `--report` only rewrites them from what exists (including unfinished runs' curves).

    nice -n 19 python benchmarks/specialise.py --steps 250 --seeds 1,2 --threads 1   # the issue's comparison
    python benchmarks/specialise.py --report                                         # results from what exists
    flock /tmp/lmlab-heavy.lock python benchmarks/specialise.py --arms lora-int4 --steps 2 --probe_steps 1 \\
        --seeds 1 --eval_tokens 512 --eval_interval 1 --ckpt_interval 1 --root /tmp/spec-smoke \\
        --name specialise-smoke                                                    # a smoke test (~5 min)

CPU budget (SmolLM2-135M, ~1 GFLOP per trained token; 1 torch thread, bf16 autocast): probes 9-12 runs x 24
steps x 1,024 tokens (~0.3M tokens; measured ~50 min on a shared core), then six runs (3 arms x 2 seeds) x
250 steps x 1,024 tokens = 256k tokens each (measured: full fine-tuning ~300 tokens/s, 17 min of training,
on a mostly idle core; budget 20-45 min each when the core is shared), plus per run ~33k tokens of fp32
evaluation forward passes (~2-3 min) and ~11 validation passes of 8k tokens: about 3-5 hours of one core in
all (the runs are meant to soak idle CPU at `nice -n 19`).

Writes benchmarks/results/NAME.{json,md} and docs/specialise/NAME-curves.png (NAME: --name, default specialise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import machine, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE / "runs" / "specialise"
CORPUS = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
GENERAL = HERE.parent.parent / "shared" / "data" / "ptb" / "ptb.test.txt"  # LDC terms: only numbers leave here
DOCS = HERE.parent / "docs" / "specialise"
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ARMS = {
    "full": [],
    "lora": ["--lora.rank=16", "--lora.alpha=32", f"--lora.targets={ALL}"],
    "lora-int4": ["--lora.rank=16", "--lora.alpha=32", f"--lora.targets={ALL}", "--lora.base=int4"],
}
# Probe grids, half a decade apart: LoRA usually wants ~10x full fine-tuning's learning rate (Hu et al.
# 2021 use 2e-4 .. 2e-3 for GPT-2 / RoBERTa adapters).
GRID = {"full": [2e-5, 6e-5, 2e-4], "lora": [2e-4, 6e-4, 2e-3], "lora-int4": [2e-4, 6e-4, 2e-3]}
EDGE_STEP = math.sqrt(10)  # how far beyond the grid's edge the one extra probe point lies
MIN_GAIN = 0.05            # nats: the floor on full fine-tuning's gain for the ratio to count


def gguf() -> str:
    from peers import smollm2_gguf

    return str(smollm2_gguf())


def data_dir(root: Path) -> Path:
    from lmlab.data.prepare import PrepareConfig, prepare

    out = root / "data"
    if not (out / "meta.json").is_file():
        prepare(PrepareConfig(source=str(CORPUS), out=str(out), tokenizer=gguf()), force=out.exists())
    return out


class PeakRSS:
    """The highest resident set size seen while running (sampled from /proc every 20 ms)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.now())


def eval_slices(data: Path, n: int) -> dict:
    """The fixed evaluation token slices: the first n tokens of the domain test split and of PTB's test
    text (tokenized here, in memory), each read after the EOS that separates documents."""
    import numpy as np

    from lmlab.data.stream import TokenSplit
    from lmlab.tokenizers import load_tokenizer

    test = TokenSplit(data, "test").tokens()
    if len(test) < n:
        raise SystemExit(f"the domain test split has {len(test):,} tokens, fewer than --eval_tokens {n:,}")
    general = np.array(load_tokenizer(data).encode(GENERAL.read_text(encoding="utf-8")), dtype=np.int64)
    return {"domain": np.asarray(test[:n], dtype=np.int64), "general": general[:n]}


def perplexities(model, slices: dict, bos: int) -> dict:
    """Mean loss (nats per token) of each slice, windows of 256 tokens without overlap, fp32."""
    from lmlab.eval.perplexity import token_nll

    out = {k: float(token_nll(model.eval(), v, bos=bos, block_size=256, batch_size=4).mean())
           for k, v in slices.items()}
    model.train()
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def worker(args: argparse.Namespace) -> dict:
    """One run (an arm at one learning rate and seed): train or resume, then measure. Its own process."""
    import torch

    from lmlab.cli.train import build_run_config
    from lmlab.data.stream import read_meta
    from lmlab.io.checkpoint import list_checkpoints
    from lmlab.models.registry import build
    from lmlab.nn.lora import trainable_parameters
    from lmlab.train.trainer import Trainer
    from lmlab.utils.atomic import atomic_write_text

    torch.set_num_threads(args.threads)
    arm, run, root = args.worker, Path(args.run), Path(args.root)
    data = data_dir(root)
    resume = bool(list_checkpoints(run))
    if not resume and run.exists():  # a start interrupted before its first checkpoint: start again
        shutil.rmtree(run)
    ns = argparse.Namespace(resume=str(run) if resume else None, config=None, model=None,
                            init=None if resume else gguf(), data=str(data), out=str(run))
    rest = [f"--train.seed={args.seed}", f"--train.max_steps={args.steps}", "--model.block_size=256",
            "--train.batch_size=4", f"--train.lr={args.lr}", f"--train.min_lr={args.lr / 10}",
            f"--train.warmup_steps={max(1, args.steps // 10)}", "--train.dtype=bfloat16", "--train.weight_decay=0.0",
            f"--train.eval_interval={args.eval_interval}", f"--train.eval_iters={args.eval_iters}",
            "--train.log_interval=1", "--train.progress=false", f"--train.ckpt_interval={args.ckpt_interval}",
            "--train.keep_checkpoints=1", *ARMS[arm]]
    cfg = build_run_config(ns, [] if resume else rest)
    trainer = Trainer(cfg, run)
    if resume:
        trainer.resume()
    run.mkdir(parents=True, exist_ok=True)
    measure = not args.probe and args.eval_tokens > 0
    bos = read_meta(data)["tokenizer"]["eos_id"]
    slices = eval_slices(data, args.eval_tokens) if measure else {}
    before_file = root / f"before-{arm}.json"  # the arm's start (for lora-int4: the quantized base): seedless
    if trainer.step == 0:
        if measure and not before_file.is_file():
            atomic_write_text(before_file, json.dumps(perplexities(trainer.model, slices, bos)))
        if not args.probe:  # the curve's first validation point
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 0, "tokens": 0, "val_loss": trainer.evaluate()}) + "\n")
    t0, from_step = time.perf_counter(), trainer.step
    with PeakRSS() as rss:
        set_up = rss.now()
        summary = trainer.fit()
    session = {"from_step": from_step, "to_step": summary["step"],
               "seconds": time.perf_counter() - t0, "rss_setup_mb": set_up / 2**20,
               "rss_peak_train_mb": rss.peak / 2**20,
               "rss_max_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    with open(run / "sessions.jsonl", "a") as f:
        f.write(json.dumps(session) + "\n")
    sessions = read_jsonl(run / "sessions.jsonl")
    rows = read_jsonl(run / "metrics.jsonl")
    # the median over steps: robust to the steps that also evaluated, checkpointed or met other load
    speeds = [r["tok_per_s"] for r in rows if "tok_per_s" in r and r["step"] > 1]
    with torch.device("meta"):  # the plain model's parameters (a tied embedding once), whatever the arm keeps
        n_all = sum(p.numel() for p in build(cfg.model).parameters())
    out = {"arm": arm, "seed": args.seed, "lr": args.lr, "steps": summary["step"], "target_steps": args.steps,
           "complete": summary["step"] >= args.steps, "tokens": summary["tokens_seen"],
           "trainable": trainable_parameters(trainer.model), "parameters": n_all,
           "rss_peak_train_mb": max(s["rss_peak_train_mb"] for s in sessions),
           "rss_max_process_mb": max(s["rss_max_process_mb"] for s in sessions),
           "tok_per_s": statistics.median(speeds) if speeds else None, "train_loss": summary["loss"],
           "val_loss": summary.get("val_loss"), "threads": args.threads, "sessions": len(sessions)}
    if measure:
        out["before"] = json.loads(before_file.read_text())
        out["after"] = perplexities(trainer.model, slices, bos)
        out["eval_tokens"] = args.eval_tokens
    atomic_write_text(run / "result.json", json.dumps(out, indent=2) + "\n")
    return out


# -- the driver --------------------------------------------------------------------------------------


def probe_dir(root: Path, arm: str, lr: float) -> Path:
    return root / "probe" / f"{arm}-lr{lr:g}"


def run_dir(root: Path, arm: str, seed: int) -> Path:
    return root / f"{arm}-s{seed}"


def finished(run: Path, steps: int) -> dict | None:
    f = run / "result.json"
    if f.is_file():
        r = json.loads(f.read_text())
        if r["steps"] >= steps:
            return r
    return None


def launch(args: argparse.Namespace, arm: str, run: Path, lr: float, seed: int, steps: int, probe: bool) -> None:
    print(f"== {run.relative_to(args.root)}: {arm}, lr {lr:g}, seed {seed}, {steps} steps", flush=True)
    cmd = [sys.executable, __file__, "--worker", arm, "--run", str(run), "--lr", repr(lr), "--seed", str(seed),
           "--steps", str(steps), "--root", str(args.root), "--threads", str(args.threads),
           "--eval_tokens", str(args.eval_tokens), "--eval_interval", str(args.eval_interval),
           "--eval_iters", str(args.eval_iters), "--ckpt_interval", str(args.ckpt_interval)]
    subprocess.run(cmd + (["--probe"] if probe else []), check=True)


def probe_lrs(arm: str, root: Path, steps: int) -> list[float]:
    """The arm's grid, plus one point beyond its edge when the grid's best is at that edge."""
    lrs = list(GRID[arm])
    done = {lr: finished(probe_dir(root, arm, lr), steps) for lr in lrs}
    if all(done.values()):
        best = min(lrs, key=lambda lr: done[lr]["val_loss"])
        if best == lrs[0]:
            lrs.insert(0, lrs[0] / EDGE_STEP)
        elif best == lrs[-1]:
            lrs.append(lrs[-1] * EDGE_STEP)
    return lrs


def chosen_lr(arm: str, root: Path, steps: int) -> float | None:
    lrs = probe_lrs(arm, root, steps)
    done = [finished(probe_dir(root, arm, lr), steps) for lr in lrs]
    if not all(done):
        return None
    return min(done, key=lambda r: r["val_loss"])["lr"]


def curves(root: Path, arms: list[str], seeds: list[int]) -> dict:
    out = {}
    for arm in arms:
        for seed in seeds:
            rows = read_jsonl(run_dir(root, arm, seed) / "metrics.jsonl")
            if rows:
                out[f"{arm}-s{seed}"] = {
                    "train": [[r["tokens"], r["loss"]] for r in rows if "loss" in r],
                    "val": [[r["step"] * 1024, r["val_loss"]] for r in rows if "val_loss" in r]}
    return out


def plot(curve: dict, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"full": "tab:blue", "lora": "tab:orange", "lora-int4": "tab:green"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, c in curve.items():
        arm, seed = name.rsplit("-s", 1)
        style = "-" if seed == "1" else "--"
        if c["train"]:
            x, y = zip(*c["train"])
            k = 10  # a running mean over 10 steps: one step's loss is one batch of 4 windows
            smooth = [sum(y[max(0, i - k + 1): i + 1]) / len(y[max(0, i - k + 1): i + 1]) for i in range(len(y))]
            a.plot(x, y, style, color=colours[arm], alpha=0.15, lw=0.8)
            a.plot(x, smooth, style, color=colours[arm], lw=1.5, label=f"{arm} seed {seed}")
        if c["val"]:
            x, y = zip(*c["val"])
            b.plot(x, y, style, marker="o", ms=3, color=colours[arm], label=f"{arm} seed {seed}")
    for ax, title in ((a, "train loss per step (faint) and 10-step running mean"),
                      (b, "domain validation loss (fixed windows per seed)")):
        ax.set_xlabel("tokens trained")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, steps * 1024)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, continued pre-training on tinyshakespeare (batch 4 x 256 tokens)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def report(args: argparse.Namespace, arms: list[str], seeds: list[int]) -> None:
    root = Path(args.root)
    probes, lines = [], []
    for arm in arms:
        for lr in probe_lrs(arm, root, args.probe_steps):
            r = finished(probe_dir(root, arm, lr), args.probe_steps)
            probes.append({"arm": arm, "lr": lr, "steps": args.probe_steps,
                           "val_loss": r["val_loss"] if r else None, "train_loss": r["train_loss"] if r else None,
                           "chosen": bool(r) and lr == chosen_lr(arm, root, args.probe_steps)})
    runs = []
    for seed in seeds:
        for arm in arms:
            run = run_dir(root, arm, seed)
            res = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else None
            rows = read_jsonl(run / "metrics.jsonl")
            done_steps = max((r["step"] for r in rows), default=0)
            runs.append({"arm": arm, "seed": seed, "complete": bool(res) and res["steps"] >= args.steps,
                         "steps_done": res["steps"] if res else done_steps, "result": res})
    ratios = []
    for seed in seeds:
        by = {r["arm"]: r["result"] for r in runs if r["seed"] == seed and r["complete"]}
        if "full" in by:
            full_gain = by["full"]["before"]["domain"] - by["full"]["after"]["domain"]
            for arm in ("lora", "lora-int4"):
                if arm in by:
                    gain = by[arm]["before"]["domain"] - by[arm]["after"]["domain"]
                    ratios.append({"seed": seed, "arm": arm, "full_gain": full_gain, "gain": gain,
                                   "ratio": gain / full_gain if full_gain >= MIN_GAIN else None})
    curve = curves(root, arms, seeds)
    if curve:
        plot(curve, args.steps, DOCS / f"{args.name}-curves.png")

    def cell(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    lines = [f"# Continued pre-training of SmolLM2-135M-Instruct on tinyshakespeare: {args.steps} steps x 4 x 256 "
             f"= {args.steps * 1024:,} tokens per run", "",
             f"Generated by `benchmarks/specialise.py` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{args.threads} torch thread(s) per run at nice {os.nice(0)} on a {os.cpu_count()}-core machine shared "
             "with other jobs "
             "(tokens/s are under load: the median over steps).", "",
             f"## Learning-rate probe ({args.probe_steps} steps x 1,024 tokens, seed 1, warmup "
             f"{max(1, args.probe_steps // 10)} then cosine to lr/10; chosen by domain validation loss at the end, "
             f"{args.eval_iters} x 4 x 256 fixed validation windows)", "",
             "| arm | lr | train loss (last step) | val loss | chosen |", "|---|---|---|---|---|"]
    for p in probes:
        lines.append(f"| {p['arm']} | {p['lr']:.3g} | {cell(p['train_loss'], '{:.3f}')} | "
                     f"{cell(p['val_loss'], '{:.4f}')} | {'**yes**' if p['chosen'] else ''} |")
    lines += ["", f"## Comparison: perplexity on {args.eval_tokens:,} domain test tokens (the first of the test "
              f"split) and on the first {args.eval_tokens:,} tokens of PTB's test text (general), fp32, windows "
              "of 256 without overlap", "",
              "| arm | seed | status | lr | trainable | % | tokens | tokens/s | peak RSS training (MiB) | "
              "domain ppl before → after | Δ domain (nats) | PTB ppl before → after | Δ PTB (nats) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        res = r["result"]
        status = ("complete" if r["complete"] else f"unfinished: step {r['steps_done']}" if r["steps_done"]
                  else "not started")
        if not (res and r["complete"]):
            lines.append(f"| {r['arm']} | {r['seed']} | {status} | - | - | - | - | - | - | - | - | - | - |")
            continue
        b, a = res["before"], res["after"]
        lines.append(f"| {r['arm']} | {r['seed']} | {status} | {res['lr']:.3g} | {res['trainable']:,} | "
                     f"{100 * res['trainable'] / res['parameters']:.2f} | {res['tokens']:,} | "
                     f"{cell(res['tok_per_s'], '{:.0f}')} | {res['rss_peak_train_mb']:.0f} | "
                     f"{math.exp(b['domain']):.2f} → {math.exp(a['domain']):.2f} | {b['domain'] - a['domain']:.4f} | "
                     f"{math.exp(b['general']):.2f} → {math.exp(a['general']):.2f} | "
                     f"{b['general'] - a['general']:.4f} |")
    lines += ["", "## LoRA's share of full fine-tuning's reduction in domain log-perplexity (same seed)", "",
              "| seed | arm | full gain (nats) | arm gain (nats) | ratio |", "|---|---|---|---|---|"]
    for q in ratios:
        ratio = cell(q["ratio"], "{:.3f}") if q["ratio"] is not None else f"not counted (full < {MIN_GAIN})"
        lines.append(f"| {q['seed']} | {q['arm']} | {q['full_gain']:.4f} | {q['gain']:.4f} | {ratio} |")
    if not ratios:
        lines.append("| - | - | - | - | no seed has both full and a LoRA arm complete yet |")
    lines += ["", "Perplexities are per SmolLM2 token (not per word: the PTB numbers do not compare with the "
              "published word-level PTB results). Δ = before - after (positive: lower perplexity). "
              "Each arm's gain is its own before minus after (the lora-int4 arm starts from the int4 base). "
              "Peak RSS: sampled every 20 ms during training in the run's own process, the highest over its "
              "sessions (a resumed session starts from a checkpoint instead of the GGUF). Curves: "
              f"`docs/specialise/{args.name}-curves.png`.", ""]
    md = "\n".join(lines)
    write_results(args.name, {"machine": machine(), "args": {k: v for k, v in vars(args).items()
                                                                if k not in ("worker", "run", "lr", "probe")},
                                 "probe": probes, "runs": runs, "ratios": ratios, "curves": curve}, md)
    print(md, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--probe_steps", type=int, default=24)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--eval_tokens", type=int, default=16384, help="tokens of each perplexity slice")
    p.add_argument("--eval_interval", type=int, default=25)
    p.add_argument("--eval_iters", type=int, default=8, help="validation batches of 4 x 256 per evaluation")
    p.add_argument("--ckpt_interval", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=str(DEFAULT_ROOT))
    p.add_argument("--name", default="specialise", help="results and plot file names")
    p.add_argument("--report", action="store_true", help="only rewrite the results from what exists")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    root = Path(args.root)
    if args.report:
        report(args, arms, seeds)
        return
    root.mkdir(parents=True, exist_ok=True)
    data_dir(root)  # once, before the runs
    for arm in arms:  # 1. the probes (a second pass runs the point beyond an edge, if any)
        for _ in range(2):
            for lr in probe_lrs(arm, root, args.probe_steps):
                run = probe_dir(root, arm, lr)
                if not finished(run, args.probe_steps):
                    launch(args, arm, run, lr, 1, args.probe_steps, probe=True)
                    report(args, arms, seeds)
    for seed in seeds:  # 2. the comparison
        for arm in arms:
            run = run_dir(root, arm, seed)
            if not finished(run, args.steps):
                launch(args, arm, run, chosen_lr(arm, root, args.probe_steps), seed, args.steps, probe=False)
                report(args, arms, seeds)
    report(args, arms, seeds)


if __name__ == "__main__":
    main()
