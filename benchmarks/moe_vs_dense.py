"""FLOP-matched MoE vs dense GPT on stdlib-docs (issue 21): resumable runs, then a report in docs/moe/.

Dense: 4 layers, 192 wide, GELU FFN of 768. MoE: the same with 8 experts per layer, top-2, each expert
768 / 2 = 384 wide, so a token passes through 2 x 384 = 768 hidden units as in the dense model (active
FLOPs within 1%, tests/test_sizing.py). Same data order, schedule and seeds for both.

    nohup python benchmarks/moe_vs_dense.py run &   # 2 runs at a time at nice 19; resumes what was interrupted
    MOE_CORPUS=stdlib-code python benchmarks/moe_vs_dense.py run   # the same at ~1 pass (runs/moe-10m-stdlib-code)
    MOE_DATA_SEED=1 MOE_CORPUS=stdlib-code ... run   # data order fixed across seeds: seeds vary the init only
    MOE_POSITION=alibi MOE_DATA_SEED=1 MOE_CORPUS=stdlib-code ... run   # ALiBi in both arms (docs/moe/README.md)
    MOE_DROPOUT=0.2 MOE_POSITION=alibi MOE_DATA_SEED=1 ... run   # stdlib-docs with dropout in both arms
    MOE_EXPERT_DROPOUT=0.4 MOE_DROPOUT=0.2 ... run   # and Switch's expert dropout in the MoE arm
    MOE_TOKENIZER=char MOE_DROPOUT=0.2 ... run   # stdlib-docs as characters: ~4.9 passes in 10M tokens
    flock /tmp/lmlab-heavy.lock python benchmarks/moe_vs_dense.py speed   # tokens/s apart, ~4 min
    python benchmarks/moe_vs_dense.py report   # docs/moe/results.md, results.json, curves.png (partial runs too)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
# ~10M tokens per run (the scale): 2442 steps of 16 x 256 = 10,002,432 tokens, ~17 passes over the
# 574k-token training split. Warm-up 100 steps (4%), cosine to 0.1x over the whole run, the same for both arms.
STEPS = int(os.environ.get("MOE_STEPS", 2442))
SEEDS = tuple(int(s) for s in os.environ.get("MOE_SEEDS", "1,2").split(","))
# stdlib-docs holds 574k training tokens, so 10M tokens repeat it ~17 times and both arms overfit;
# MOE_CORPUS=stdlib-code (10.9M training tokens) runs the same comparison at about one pass.
CORPUS = os.environ.get("MOE_CORPUS", "stdlib-docs")
# A paired design: with MOE_DATA_SEED every run draws its training windows in the same order (train.data_seed)
# and the seeds vary only the initialisation, so the seed spread measures init noise, not which windows came first.
DATA_SEED = os.environ.get("MOE_DATA_SEED", "")
# MOE_POSITION=alibi: ALiBi biases (Press et al. 2022) instead of the learned table, in both arms. On stdlib-code
# the learned-position runs' seed spread was in-context copying (docs/moe/README.md); ALiBi's recency bias gives
# every head a distance signal from the start, which is what copying the token after an earlier match needs.
POSITION = os.environ.get("MOE_POSITION", "learned")
# MOE_DROPOUT=p: dropout p in both arms on the embedding and each residual branch (the expert layer's output as
# the dense FFN's), none on the attention probabilities (that one turns off the causal fast paths: -30% tokens/s).
# stdlib-docs repeats ~17 times in 10M tokens and without it both arms overfit, the MoE (2.35x the parameters)
# more (docs/moe/README.md).
DROPOUT = float(os.environ.get("MOE_DROPOUT", "0"))
# MOE_EXPERT_DROPOUT=p: Switch's expert dropout (Fedus et al. 2021, sec. 4) in the MoE arm only, on the experts'
# hidden units (`moe_expert_dropout`), on top of MOE_DROPOUT; the dense arm has no experts and stays as it was.
EXPERT_DROPOUT = float(os.environ.get("MOE_EXPERT_DROPOUT", "0"))
# MOE_TOKENIZER=char: the corpus prepared as characters (`lmlab prepare stdlib-docs --tokenizer char --out
# data/stdlib-docs-char`): stdlib-docs' training split is then 2.06M tokens, so 10M tokens are ~4.9 passes, not ~17.
TOKENIZER = os.environ.get("MOE_TOKENIZER", "bpe")
_DROP_TEXT = (f"dropout {DROPOUT:g} in both arms (embedding, residual branches; none on attention probabilities)"
              if DROPOUT else "no dropout") + (f"; expert dropout {EXPERT_DROPOUT:g} on the MoE experts' hidden units"
                                               if EXPERT_DROPOUT else "")
_DATA_NAME = CORPUS + ("" if TOKENIZER == "bpe" else f"-{TOKENIZER}")  # default data/<this>
_TAG = (("" if STEPS == 2442 else f"-{STEPS}") + ("" if CORPUS == "stdlib-docs" else f"-{CORPUS}")
        + ("" if TOKENIZER == "bpe" else f"-{TOKENIZER}")
        + (f"-data{DATA_SEED}" if DATA_SEED else "") + ("" if POSITION == "learned" else f"-{POSITION}")
        + (f"-drop{DROPOUT:g}" if DROPOUT else "") + (f"-edrop{EXPERT_DROPOUT:g}" if EXPERT_DROPOUT else ""))
RUNS = ROOT / "benchmarks" / "runs" / f"moe-10m{_TAG}"
DOCS = ROOT / "docs" / "moe" / _TAG.lstrip("-")
BATCH, BLOCK, WARMUP, CKPT = 16, 256, 100, 100
TOKENS_PER_STEP = BATCH * BLOCK
# every checkpoint is kept, so the whole validation split can be scored part-way (~2.5M, 5M, 7.4M tokens)
MILESTONES = (600, 1200, 1800, STEPS)
NICE = os.environ.get("MOE_NICE", "19")  # runs soak up idle CPU only on the shared machine
MODEL = ["--model.family=gpt", "--model.n_layer=4", "--model.n_head=4", "--model.n_embd=192",
         f"--model.block_size={BLOCK}", f"--model.dropout={DROPOUT:g}", "--model.attn_dropout=0",
         *([] if POSITION == "learned" else [f"--model.position={POSITION}"])]
ARMS = {"dense": [], "moe": ["--model.n_expert=8", "--model.n_expert_per_token=2", "--model.moe_hidden=384",
                             *([f"--model.moe_expert_dropout={EXPERT_DROPOUT:g}"] if EXPERT_DROPOUT else [])]}
TRAIN = [f"--train.batch_size={BATCH}", f"--train.max_steps={STEPS}", "--train.lr=2e-3", "--train.min_lr=2e-4",
         f"--train.warmup_steps={WARMUP}", "--train.eval_interval=100", "--train.eval_iters=16",
         "--train.log_interval=10", f"--train.ckpt_interval={CKPT}", "--train.keep_checkpoints=0",
         "--train.threads=1", "--train.dtype=bfloat16", "--train.progress=false"]


def rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.is_file() else []


def done(run: Path) -> bool:
    return any(r.get("step") == STEPS and "val_loss" in r for r in rows(run))


def _claim(name: str) -> TextIO | None:
    """An exclusive lock on one run, so that two workers (or two drivers) never train it at once."""
    f = (RUNS / f"{name}.lock").open("w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _worker(data: str) -> None:
    for seed in SEEDS:  # the MoE run (the slower) first: two workers then finish at about the same time
        for arm, extra in sorted(ARMS.items(), key=lambda kv: kv[0] != "moe"):
            run = RUNS / f"{arm}-s{seed}"
            if done(run) or (lock := _claim(run.name)) is None:
                continue
            with lock:
                if done(run):
                    continue
                cmd = [sys.executable, "-m", "lmlab", "train"]
                cmd += (["--resume", str(run)] if (run / "checkpoints").is_dir()
                        else ["--data", data, "--out", str(run), *MODEL, *extra, *TRAIN, f"--train.seed={seed}",
                              *([f"--train.data_seed={DATA_SEED}"] if DATA_SEED else [])])
                with (RUNS / f"{run.name}.log").open("a") as log:
                    print(" ".join(cmd), file=log, flush=True)
                    subprocess.run(["nice", "-n", NICE, *cmd], check=True, cwd=ROOT, stdout=log, stderr=log)


def run_all(data: str, workers: int) -> None:
    """Every arm x seed, `workers` at a time (each on one thread): a worker takes the next run nobody holds."""
    RUNS.mkdir(parents=True, exist_ok=True)
    pool = [threading.Thread(target=_worker, args=(data,)) for _ in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def curves(run: Path) -> dict:
    rs = rows(run)
    train = [r for r in rs if "loss" in r and "tok_per_s" in r]
    wall, t, last = {}, 0.0, 0
    for r in train:  # cumulative wall-clock from each window's tokens/s (the window after an evaluation holds it)
        t += (r["step"] - last) * TOKENS_PER_STEP / r["tok_per_s"]
        wall[r["step"]], last = t, r["step"]
    val = [(r["step"], r["val_loss"]) for r in rs if "val_loss" in r and "loss" not in r]
    out = {"reached_step": max((r["step"] for r in rs), default=0), "val": val, "wall_s": wall,
           "tok_per_s_median": statistics.median(r["tok_per_s"] for r in train) if train else None}
    loads = [(r["step"], r["expert_load_max"]) for r in train if "expert_load_max" in r]
    if loads:  # the busiest expert's share over the mean, one batch per logged step, worst MoE layer
        after = [x for s, x in loads if s > WARMUP]
        out["expert_load_max"] = loads
        out["expert_load_max_after_warmup"] = max(after, default=float("nan"))
        out["expert_load_steps_above_2x_after_warmup"] = sum(x > 2 for x in after)
        out["expert_load_logged_steps_after_warmup"] = len(after)
        out["expert_load_max_second_half"] = max((x for s, x in loads if s > STEPS // 2), default=float("nan"))
    return out


def whole_split_losses(run: Path) -> dict[int, float]:
    """`lmlab eval` of the milestone checkpoints over the whole validation split (the same for
    every run; the trainer's periodic loss uses 16 batches of windows drawn by seed), cached per run."""
    cache = run / "full_val.json"
    got = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    for step in MILESTONES:
        ckpt = run / "checkpoints" / f"step-{step:06d}"
        if step in got or not (ckpt / "model.safetensors").is_file():
            continue
        out = run / f"eval-{step}.json"
        subprocess.run(["nice", "-n", NICE, sys.executable, "-m", "lmlab", "eval", str(ckpt), "--split", "val",
                        "--json", str(out), "-q"], check=True, cwd=ROOT, capture_output=True)
        got[step] = json.loads(out.read_text())["loss"]
        cache.write_text(json.dumps(got))
    return got


def speed(data: str) -> None:
    """Tokens/s of both arms from short runs, interleaved (dense, MoE, dense, MoE, ...), 1 thread, then one
    round at 2 threads; meant to run under the heavy lock (`flock /tmp/lmlab-heavy.lock ...`) so that the
    machine is as quiet as it gets. The long runs' own tokens/s are measured at nice 19 beside other work."""
    import tempfile

    steps, res = 40, {}
    for threads, rounds in ((1, 3), (2, 1)):
        for _ in range(rounds):
            for arm, extra in ARMS.items():
                with tempfile.TemporaryDirectory() as tmp:
                    skip = ("--train.max_steps", "--train.threads", "--train.eval", "--train.ckpt", "--train.keep")
                    args = [a for a in TRAIN if not a.startswith(skip)]
                    subprocess.run([sys.executable, "-m", "lmlab", "train", "--data", data, "--out", f"{tmp}/r",
                                    *MODEL, *extra, *args, f"--train.max_steps={steps}", f"--train.threads={threads}",
                                    "--train.eval_interval=0", "--train.eval_iters=1", "--train.ckpt_interval=0"],
                                   check=True, cwd=ROOT, capture_output=True)
                    windows = [x["tok_per_s"] for x in rows(Path(tmp) / "r") if "tok_per_s" in x and x["step"] > 10]
                res.setdefault(f"{arm}-{threads}t", []).append(statistics.median(windows))
                print(arm, threads, round(res[f"{arm}-{threads}t"][-1]), flush=True)
    out = {k: statistics.median(v) for k, v in res.items()}
    out["rounds"] = res
    out["moe_over_dense_1t"] = out["moe-1t"] / out["dense-1t"]
    out["steps_per_run"] = steps
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "speed.json").write_text(json.dumps(out, indent=1) + "\n")


def report(data: str) -> None:
    """results.json / results.md / curves.png from whatever the runs have reached (partial runs say so)."""
    DOCS.mkdir(parents=True, exist_ok=True)
    names = [f"{arm}-s{seed}" for arm in ARMS for seed in SEEDS]
    res = {k: curves(RUNS / k) for k in names if rows(RUNS / k)}
    for k in res:
        res[k]["done"] = done(RUNS / k)
        res[k]["whole_split_val_loss"] = whole_split_losses(RUNS / k)
    table = []  # milestones that every run has reached
    for step in MILESTONES:
        if len(res) < len(names) or any(step not in v["whole_split_val_loss"] for v in res.values()):
            continue
        loss = {arm: [res[f"{arm}-s{s}"]["whole_split_val_loss"][step] for s in SEEDS] for arm in ARMS}
        spread = max(max(v) - min(v) for v in loss.values())
        gap = statistics.mean(loss["dense"]) - statistics.mean(loss["moe"])
        table.append({"step": step, "tokens": step * TOKENS_PER_STEP, **loss, "dense_minus_moe": gap,
                      "paired": [d - m for d, m in zip(loss["dense"], loss["moe"], strict=True)],
                      "largest_seed_spread": spread, "moe_better_by_2x_spread": gap > 2 * spread})
    sp = json.loads((DOCS / "speed.json").read_text()) if (DOCS / "speed.json").is_file() else None
    config = {"steps": STEPS, "tokens_per_run": STEPS * TOKENS_PER_STEP, "batch": BATCH, "block": BLOCK,
              "warmup": WARMUP, "model": MODEL, "arms": ARMS, "train": TRAIN, "seeds": SEEDS, "nice": NICE,
              "data_seed": DATA_SEED or None, "position": POSITION,
              "dropout": DROPOUT, "expert_dropout": EXPERT_DROPOUT}
    (DOCS / "results.json").write_text(json.dumps({"config": config, "milestones": table, "speed": sp, "runs": res},
                                                  indent=1) + "\n")
    partial = [k for k, v in res.items() if not v["done"]]
    n_train = _train_tokens(data)
    lines = [f"# MoE vs dense at equal active FLOPs ({_DATA_NAME})", "",
             f"GPT 4 x 192 ({'learned positions' if POSITION == 'learned' else POSITION}), block {BLOCK}, "
             f"batch {BATCH}, {STEPS} steps = {STEPS * TOKENS_PER_STEP:,} tokens per run "
             f"(~{STEPS * TOKENS_PER_STEP / n_train:.1f} passes over the {n_train:,}-token training "
             "split), bf16 autocast, "
             f"lr 2e-3 (warm-up {WARMUP} steps) cosine to 2e-4 over the whole run, weight decay 0.1, "
             f"{_DROP_TEXT}. "
             "MoE: 8 experts of 384, top-2, load balancing 0.01 per layer, z-loss 0.001. Each run on 1 CPU thread at "
             f"nice {NICE}, two at a time, beside other work on a shared 2-core machine. "
             "`python benchmarks/moe_vs_dense.py run && ... speed && ... report`.", ""]
    if DATA_SEED:
        same = "" if POSITION != "learned" else (f" (Runs with seed {DATA_SEED} are the same runs as without a data "
                                                 "seed: data_seed -1 means the seed's own order.)")
        lines += [f"**Data order fixed** (`train.data_seed={DATA_SEED}` in every run): all runs draw the same "
                  "training windows in the same order, and the seeds vary only the initialisation, so the seed "
                  f"spread below is initialisation noise alone.{same}", ""]
    if partial:
        where = [f"{k} at step {res[k]['reached_step']} ({res[k]['reached_step'] * TOKENS_PER_STEP:,} tokens)"
                 for k in partial] + [f"{k} not started" for k in names if k not in res]
        lines += [f"**Partial**: {', '.join(where)}. Resume with `python benchmarks/moe_vs_dense.py run`.", ""]
    n_val = _train_tokens(data, "val")
    seeds = " / ".join(f"s{s}" for s in SEEDS)
    lines += [f"Validation loss over the whole validation split ({n_val:,} tokens, the same for every run) at "
              "checkpoints every run has reached:", "",
              f"| step | tokens | dense {seeds} | MoE {seeds} | dense - MoE (mean) | same seed | largest seed spread | "
              "MoE lower by > 2x spread |", "|---|---|---|---|---|---|---|---|"]
    for m in table:
        lines.append(f"| {m['step']} | {m['tokens'] / 1e6:.2f}M | {' / '.join(f'{x:.4f}' for x in m['dense'])} | "
                     f"{' / '.join(f'{x:.4f}' for x in m['moe'])} | {m['dense_minus_moe']:+.4f} | "
                     f"{', '.join(f'{x:+.4f}' for x in m['paired'])} | {m['largest_seed_spread']:.4f} | "
                     f"{'yes' if m['moe_better_by_2x_spread'] else 'no'} |")
    lines += ["", "| run | reached step | trainer's val loss at the end (16 batches) | lowest trainer's val loss "
              "(step) | median tok/s (niced, shared) | busiest expert / mean after warm-up: max; logged steps > 2x | "
              "max in second half |", "|---|---|---|---|---|---|---|"]
    for k, v in res.items():
        low = min(v["val"], key=lambda sv: sv[1]) if v["val"] else (0, float("nan"))
        load = (f"{v['expert_load_max_after_warmup']:.2f}; {v['expert_load_steps_above_2x_after_warmup']} of "
                f"{v['expert_load_logged_steps_after_warmup']}" if "expert_load_max" in v else "-")
        lines.append(f"| {k} | {v['reached_step']} | {v['val'][-1][1] if v['val'] else float('nan'):.4f} | "
                     f"{low[1]:.4f} ({low[0]}) | {v['tok_per_s_median'] or 0:,.0f} | {load} | "
                     f"{v.get('expert_load_max_second_half', float('nan')):.2f} |")
    if sp:
        lines += ["", f"Tokens/s measured apart (`speed`, under the heavy lock, {sp['steps_per_run']}-step runs "
                  f"interleaved, median of 3 rounds, 1 thread): dense {sp['dense-1t']:,.0f}, MoE {sp['moe-1t']:,.0f}, "
                  f"MoE / dense **{sp['moe_over_dense_1t']:.2f}x**; at 2 threads dense {sp['dense-2t']:,.0f}, "
                  f"MoE {sp['moe-2t']:,.0f}."]
    (DOCS / "results.md").write_text("\n".join(lines) + "\n")
    _plot(res)
    print("\n".join(lines))


def _train_tokens(data: str, split: str = "train") -> int:
    meta = json.loads((Path(data) / "meta.json").read_text())
    return sum(sh["n_tokens"] for sh in meta["splits"][split]["shards"])


def _plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for k, v in res.items():
        steps = [s for s, _ in v["val"] if s in v["wall_s"]]
        loss = [x for s, x in v["val"] if s in v["wall_s"]]
        nth = SEEDS.index(int(k.rsplit("-s", 1)[1]))
        color, style = ("C3" if k.startswith("moe") else "C0"), ("-", "--", ":", "-.")[nth % 4]
        a.plot([s * TOKENS_PER_STEP / 1e6 for s in steps], loss, style, color=color, label=k)
        b.plot([v["wall_s"][s] / 60 for s in steps], loss, style, color=color, label=k)
        full = sorted(v["whole_split_val_loss"].items())
        a.plot([s * TOKENS_PER_STEP / 1e6 for s, _ in full], [x for _, x in full], "o", color=color)
        if "expert_load_max" in v:
            c.plot([s * TOKENS_PER_STEP / 1e6 for s, _ in v["expert_load_max"]], [x for _, x in v["expert_load_max"]],
                   ".", ms=2, color=("C3", "C1", "C5", "C6")[nth % 4], label=k)
    a.set_xlabel("tokens (M)")
    a.set_ylabel("val loss (lines: 16 batches; dots: whole split)")
    b.set_xlabel(f"wall-clock (min; 1 thread, nice {NICE}, two runs at a time)")
    b.set_ylabel("validation loss")
    c.axhline(2, color="grey", lw=0.8)
    c.set_xlabel("tokens (M)")
    c.set_ylabel("busiest expert / mean (worst layer)")
    a.legend()
    c.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "curves.png", dpi=100)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "speed", "report"])
    ap.add_argument("data", nargs="?", default=str(ROOT / "data" / _DATA_NAME),
                    help="a prepared data dir (default data/$MOE_CORPUS[-$MOE_TOKENIZER]: `lmlab prepare` it first)")
    ap.add_argument("--workers", type=int, default=2, help="runs trained at once (run)")
    args = ap.parse_args()
    if args.what == "run":
        run_all(args.data, args.workers)
    elif args.what == "speed":
        speed(args.data)
    else:
        report(args.data)
