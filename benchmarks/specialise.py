"""Continued pre-training of SmolLM2-135M on tinyshakespeare (issue 19): full fine-tuning vs LoRA vs LoRA over
an int4 base, at equal tokens. Per arm and seed: trainable parameters, peak RSS while training, tokens/s,
and the domain test perplexity before and after.

Each arm is one `lmlab train --init` run in its own process (runs under benchmarks/runs/specialise/), so
peak RSS is that arm's alone; an interrupted arm resumes from its last checkpoint, and a finished arm keeps
its numbers in result.json, so rerunning the script only runs what is missing.

    flock /tmp/lmlab-heavy.lock python benchmarks/specialise.py --steps 24 --seeds 1     # a short version
    python benchmarks/specialise.py --steps 250 --seeds 1,2  # batch 4 x 256: ~250k tokens per arm

Writes benchmarks/results/specialise.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import machine, write_results  # noqa: E402

ROOT = Path(__file__).parent / "runs" / "specialise"
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# Learning rates: LoRA usually wants ~10x full fine-tuning's (Hu et al. 2021 use 2e-4 .. 2e-3 for
# GPT-2 / RoBERTa adapters); these are starting points, not the result of a probe.
ARMS = {
    "full": [],
    "lora": ["--lora.rank=16", "--lora.alpha=32", f"--lora.targets={ALL}"],
    "lora-int4": ["--lora.rank=16", "--lora.alpha=32", f"--lora.targets={ALL}", "--lora.base=int4"],
}
LR = {"full": 5e-5, "lora": 5e-4, "lora-int4": 5e-4}


def gguf() -> str:
    from peers import smollm2_gguf

    return str(smollm2_gguf())


def data_dir() -> Path:
    from lmlab.data.prepare import PrepareConfig, prepare

    out = ROOT / "data"
    if not (out / "meta.json").is_file():
        prepare(PrepareConfig(source=str(CORPUS), out=str(out), tokenizer=gguf()), force=out.exists())
    return out


class PeakRSS:
    """The highest resident set size seen while running (sampled from /proc every 20 ms)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())


def test_ppl(model, data: Path, eval_tokens: int) -> float:
    import torch

    from lmlab.data.stream import TokenSplit
    from lmlab.eval.perplexity import evaluate_split

    with torch.no_grad():
        r = evaluate_split(model.eval(), TokenSplit(data, "test"), block_size=256, batch_size=4,
                           max_tokens=eval_tokens, autocast_dtype=torch.bfloat16)
    return math.exp(r.loss)


def worker(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """One arm: train (or resume) and measure; runs in its own process."""
    import torch

    from lmlab.cli.train import build_run_config
    from lmlab.io.checkpoint import list_checkpoints
    from lmlab.models.registry import build
    from lmlab.nn.lora import trainable_parameters
    from lmlab.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    run = ROOT / f"{arm}-s{seed}"
    data = data_dir()
    ns = argparse.Namespace(resume=str(run) if list_checkpoints(run) else None, config=None, model=None,
                            init=None if list_checkpoints(run) else gguf(), data=str(data), out=str(run))
    rest = [f"--train.seed={seed}", f"--train.max_steps={args.steps}", "--model.block_size=256",
            "--train.batch_size=4", f"--train.lr={LR[arm]}", f"--train.min_lr={LR[arm] / 10}",
            f"--train.warmup_steps={max(1, args.steps // 10)}", "--train.dtype=bfloat16", "--train.weight_decay=0.0",
            "--train.eval_interval=0", "--train.eval_iters=4", "--train.log_interval=4", "--train.progress=false",
            f"--train.ckpt_interval={args.ckpt_interval}", "--train.keep_checkpoints=1", *ARMS[arm]]
    cfg = build_run_config(ns, [] if ns.resume else rest)
    if ns.resume:  # the interrupted run's own config, its step budget raised if asked
        cfg.train.max_steps = args.steps
    trainer = Trainer(cfg, run)
    if ns.resume:
        trainer.resume()
    before = None
    if trainer.step == 0 and args.eval_tokens:  # the arm's own start: the base (for lora-int4, quantized)
        before = test_ppl(trainer.model, data, args.eval_tokens)
        trainer.model.train()
    set_up = PeakRSS()._rss()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        summary = trainer.fit()
    seconds = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tok_per_s"] for r in rows if "tok_per_s" in r][1:]  # the first window includes warm-up
    with torch.device("meta"):  # the plain model's parameters (a tied embedding once), whatever the arm keeps
        n_all = sum(p.numel() for p in build(cfg.model).parameters())
    return {"arm": arm, "seed": seed, "steps": summary["step"], "tokens": summary["tokens_seen"],
            "lr": cfg.train.lr, "trainable": trainable_parameters(trainer.model), "parameters": n_all,
            "rss_setup_mb": set_up / 2**20, "rss_peak_train_mb": rss.peak / 2**20,
            "rss_max_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tok_per_s": sum(speeds) / len(speeds) if speeds else summary["tokens_seen"] / seconds,
            "train_loss": summary["loss"], "val_loss": summary.get("val_loss"),
            "test_ppl_before": before, "test_ppl_after": test_ppl(trainer.model, data, args.eval_tokens)
            if args.eval_tokens else None, "threads": args.threads, "eval_tokens": args.eval_tokens}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# Continued pre-training of SmolLM2-135M on tinyshakespeare: {args.steps} steps of 4 x 256 tokens",
             "", "| arm | seed | trainable | % | tokens | tokens/s | peak RSS training (MiB) | test ppl before | "
             "test ppl after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def f(x):
            return "-" if x is None else f"{x:.2f}"
        share = 100 * r["trainable"] / r["parameters"]
        lines.append(f"| {r['arm']} | {r['seed']} | {r['trainable']:,} | {share:.2f} | "
                     f"{r['tokens']:,} | {r['tok_per_s']:.0f} | {r['rss_peak_train_mb']:.0f} | "
                     f"{f(r['test_ppl_before'])} | {f(r['test_ppl_after'])} |")
    lines += ["", f"Test perplexity over the first {args.eval_tokens:,} tokens of the test split (bf16 autocast); "
              f"{args.threads} torch threads on a machine shared with other jobs: tokens/s are under load.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seeds", default="1")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--eval_tokens", type=int, default=4096, help="test tokens scored (0: skip perplexity)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt_interval", type=int, default=50)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = worker(args.worker, args.seed, args)
        (ROOT / f"{args.worker}-s{args.seed}" / "result.json").write_text(json.dumps(out, indent=2) + "\n")
        return
    ROOT.mkdir(parents=True, exist_ok=True)
    data_dir()  # once, before the arms
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            done = ROOT / f"{arm}-s{seed}" / "result.json"
            if done.is_file() and json.loads(done.read_text())["steps"] >= args.steps:
                results.append(json.loads(done.read_text()))
                continue
            print(f"== {arm}, seed {seed}", flush=True)
            subprocess.run([sys.executable, __file__, "--worker", arm, "--seed", str(seed), "--steps", str(args.steps),
                            "--eval_tokens", str(args.eval_tokens), "--threads", str(args.threads),
                            "--ckpt_interval", str(args.ckpt_interval)], check=True)
            results.append(json.loads(done.read_text()))
            print(json.dumps(results[-1]), flush=True)
    md = markdown(results, args)
    write_results("specialise", {"machine": machine(), "args": vars(args), "results": results}, md)
    print(md)


if __name__ == "__main__":
    main()
