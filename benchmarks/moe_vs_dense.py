"""FLOP-matched MoE vs dense GPT on stdlib-docs (issue 21): resumable runs, then a report in docs/moe/.

Dense: 4 layers, 192 wide, GELU FFN of 768. MoE: the same with 8 experts per layer, top-2, each expert
768 / 2 = 384 wide, so a token passes through 2 x 384 = 768 hidden units as in the dense model (active
FLOPs within 1%, tests/test_sizing.py). Same data order, schedule and seeds for both.

    python benchmarks/moe_vs_dense.py run      # runs what is missing, resumes what was interrupted
    python benchmarks/moe_vs_dense.py report   # docs/moe/results.md, results.json, curves.png
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = int(os.environ.get("MOE_STEPS", 300))  # a longer run: MOE_STEPS=800 MOE_SEEDS=1 (own folders)
SEEDS = tuple(int(s) for s in os.environ.get("MOE_SEEDS", "1,2").split(","))
_TAG = "" if STEPS == 300 else f"-{STEPS}"
RUNS = ROOT / "benchmarks" / "runs" / f"moe{_TAG}"
DOCS = ROOT / "docs" / "moe" / _TAG.lstrip("-")
BATCH, BLOCK, WARMUP = 16, 256, 30
TOKENS_PER_STEP = BATCH * BLOCK
MODEL = ["--model.family=gpt", "--model.n_layer=4", "--model.n_head=4", "--model.n_embd=192",
         f"--model.block_size={BLOCK}", "--model.dropout=0"]
ARMS = {"dense": [], "moe": ["--model.n_expert=8", "--model.n_expert_per_token=2", "--model.moe_hidden=384"]}
TRAIN = [f"--train.batch_size={BATCH}", f"--train.max_steps={STEPS}", "--train.lr=2e-3", "--train.min_lr=2e-4",
         f"--train.warmup_steps={WARMUP}", "--train.eval_interval=50", "--train.eval_iters=8",
         "--train.log_interval=10", "--train.ckpt_interval=50", "--train.threads=1", "--train.dtype=bfloat16",
         "--train.progress=false"]


def rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.is_file() else []


def done(run: Path) -> bool:
    return any(r.get("step") == STEPS and "val_loss" in r for r in rows(run))


def run_all(data: str) -> None:
    for seed in SEEDS:
        for arm, extra in ARMS.items():
            run = RUNS / f"{arm}-s{seed}"
            if done(run):
                continue
            cmd = [sys.executable, "-m", "lmlab", "train"]
            cmd += (["--resume", str(run)] if (run / "checkpoints").is_dir()
                    else ["--data", data, "--out", str(run), *MODEL, *extra, *TRAIN, f"--train.seed={seed}"])
            print(" ".join(cmd), flush=True)
            subprocess.run(["nice", "-n", "10", *cmd], check=True, cwd=ROOT)


def curves(run: Path) -> dict:
    rs = rows(run)
    train = [r for r in rs if "loss" in r and "tok_per_s" in r]
    wall, t, last = {}, 0.0, 0
    for r in train:  # wall-clock of training steps (evaluation excluded) from each window's tokens/s
        t += (r["step"] - last) * TOKENS_PER_STEP / r["tok_per_s"]
        wall[r["step"]], last = t, r["step"]
    val = [(r["step"], r["val_loss"]) for r in rs if "val_loss" in r and "loss" not in r]
    out = {"val": val, "wall": wall, "tok_per_s": statistics.median(r["tok_per_s"] for r in train)}
    loads = [r["expert_load_max"] for r in train if "expert_load_max" in r and r["step"] > WARMUP]
    if loads:
        out["expert_load_max_after_warmup"] = max(loads)
        out["expert_load_max_second_half"] = max(r["expert_load_max"] for r in train if r["step"] > STEPS // 2)
    return out


def full_val_loss(run: Path) -> float:
    """`lmlab eval` of the final checkpoint over the whole validation split (the same tokens for every
    run; the trainer's periodic val loss samples windows by seed, so it differs between seeds)."""
    cache = run / "full_val.json"
    if not cache.is_file():
        out = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "lmlab", "eval", str(run), "--split", "val"],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout
        loss = float(out.rsplit(" loss ", 1)[1].split(",")[0])
        cache.write_text(json.dumps({"val_loss": loss}))
    return json.loads(cache.read_text())["val_loss"]


def report() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    res = {f"{arm}-s{seed}": curves(RUNS / f"{arm}-s{seed}") for arm in ARMS for seed in SEEDS
           if done(RUNS / f"{arm}-s{seed}")}
    # the first MoE run, with the aux loss pooled over layers (transformers' Mixtral formula): a side note
    if done(RUNS / "moe-pooled-s1"):
        res["moe-pooled-s1 (aux pooled over layers)"] = curves(RUNS / "moe-pooled-s1")
    for k in res:
        res[k]["full_val_loss"] = full_val_loss(RUNS / k.split(" ")[0])
    (DOCS / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    final = {arm: [res[f"{arm}-s{s}"]["full_val_loss"] for s in SEEDS if f"{arm}-s{s}" in res] for arm in ARMS}
    pairs = {k: v for k, v in res.items() if "pooled" not in k}
    lines = ["# MoE vs dense at equal active FLOPs (stdlib-docs)", "",
             f"GPT 4 x 192, block {BLOCK}, batch {BATCH}, {STEPS} steps = {STEPS * TOKENS_PER_STEP:,} tokens per run, "
             f"bf16 autocast, 1 CPU thread (shared machine, nice 10), lr 2e-3 cosine to 2e-4, warm-up {WARMUP}. "
             "MoE: 8 experts of 384, top-2, aux 0.01, z 0.001. `python benchmarks/moe_vs_dense.py run && ... report`.",
             "", "| run | val loss, whole split | trainer's val loss (8 windows by seed) | median tok/s "
             "| busiest expert / mean, after warm-up | same, second half |", "|---|---|---|---|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v['full_val_loss']:.4f} | {v['val'][-1][1]:.4f} | {v['tok_per_s']:,.0f} | "
                     f"{v.get('expert_load_max_after_warmup', float('nan')):.2f} | "
                     f"{v.get('expert_load_max_second_half', float('nan')):.2f} |")
    if all(len(v) == len(SEEDS) for v in final.values()):
        spread = max(max(v) - min(v) for v in final.values())
        gap = statistics.mean(final["dense"]) - statistics.mean(final["moe"])
        ratio = (statistics.mean(pairs[f"moe-s{s}"]["tok_per_s"] for s in SEEDS)
                 / statistics.mean(pairs[f"dense-s{s}"]["tok_per_s"] for s in SEEDS))
        paired = [final["dense"][i] - final["moe"][i] for i in range(len(SEEDS))]
        lines += ["", f"Dense minus MoE, same seed (same data order): {', '.join(f'{d:+.4f}' for d in paired)}.",
                  f"Dense minus MoE mean val loss (whole split): {gap:+.4f}; largest seed-to-seed spread: {spread:.4f} "
                  f"({'more' if gap > 2 * spread else 'not more'} than twice the spread). "
                  f"MoE tokens/s over dense: {ratio:.2f}x."]
    (DOCS / "results.md").write_text("\n".join(lines) + "\n")
    _plot(res)
    print("\n".join(lines))


def _plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for k, v in res.items():
        steps = [s for s, _ in v["val"] if s in v["wall"]]
        loss = [x for s, x in v["val"] if s in v["wall"]]
        style = "-" if k.startswith("moe") else "--"
        a.plot([s * TOKENS_PER_STEP / 1e6 for s in steps], loss, style, label=k)
        b.plot([v["wall"][s] / 60 for s in steps], loss, style, label=k)
    a.set_xlabel("tokens (M)")
    b.set_xlabel("training wall-clock (min, 1 thread)")
    a.set_ylabel("validation loss")
    a.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "curves.png", dpi=100)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run_all(sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "data" / "stdlib-docs"))
    elif sys.argv[1:2] == ["report"]:
        report()
    else:
        sys.exit(__doc__)
