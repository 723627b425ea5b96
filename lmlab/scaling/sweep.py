"""`lmlab scaling sweep`: a grid of model sizes x token budgets, each a normal, resumable lmlab run.

Shapes: for a target non-embedding parameter count N (12 n_layer n_embd^2 for GPT blocks, Kaplan et
al. 2020 Table 1) the sweep picks the (n_layer, n_embd) closest to N with n_embd / n_layer near
`aspect` and 32-wide heads, or fixes n_layer and scales the width.

Learning rate, by a stated rule (`lr_rule`), with a cosine schedule to 10% over each run's own length
and warmup over the first 5% of steps:
- "width" (default): LR = lr_scale x 0.44 / n_embd. Adam's best rate falls as 1/width (muP, Yang et
  al. 2022). Measured here (L4, batch 16 x 128, 4M tokens of stdlib-code, val loss): d64 3.1e-3 3.293,
  4.6e-3 3.218, 6.5e-3 3.159; d128 2.5e-3 2.936, 4.0e-3 2.928; d256 0.87e-3 2.792, 1.73e-3 2.682,
  3.5e-3 2.733. 0.44 / n_embd sits at each optimum (6.9e-3, 3.4e-3, 1.7e-3).
- "kaplan": LR = lr_scale x (0.003239 - 0.0001395 ln N), the form of Kaplan et al. 2020, eq. D.1, used
  by the sweeps in docs/scaling/ up to v4 with lr_scale 3. It falls only logarithmically with N: 1.5x
  too low at d64, 2x too high at d256, so larger models under-performed every law fitted to smaller ones.
Kaplan et al. 2020 (Fig. 5) find loss nearly independent of shape at fixed N once n_layer >= 2.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmlab.data.stream import TokenSplit
from lmlab.errors import LmlabError
from lmlab.eval.perplexity import evaluate_split
from lmlab.models.transformer.gpt import GPTConfig
from lmlab.train.config import DataConfig, RunConfig, TrainConfig
from lmlab.train.trainer import Trainer
from lmlab.utils.atomic import atomic_write_text

MAX_EPOCHS = 4.0  # Muennighoff et al. 2023: up to ~4 epochs of repeated data cost little

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SweepConfig:
    data: str = "data/stdlib-code"
    out: str = "runs/scaling"
    # The default grid is docs/scaling/v5's: six widths of 4-layer GPT (N = 2e5 to 3.2e6) on 2M-8M tokens,
    # capped at 6ND <= 4.3e13, 14 runs, about 31 min on 2 cores with workers=2. It predicted held-out
    # L4 d320 on 6M and d288 on 8M tokens (4.2x, 4.5x the largest fitted compute) within 1.0% and 1.2%.
    sizes: list[float] = field(default_factory=lambda: [2e5, 4e5, 8e5, 1.2e6, 1.6e6, 3.2e6])  # target N
    tokens: list[float] = field(default_factory=lambda: [2e6, 4e6, 8e6])                     # budgets D
    block_size: int = 128
    batch_size: int = 16
    n_layer: int = 4            # fixed depth, width scaled to N; 0 = search shapes with n_embd / n_layer near aspect
    aspect: float = 64.0
    lr_rule: str = "width"      # "width" (0.44 / n_embd) or "kaplan" (Kaplan et al.'s LR(N)), see above
    lr_scale: float = 1.0       # multiplies the rule's rate
    head_dim: int = 32
    dtype: str = "bfloat16"
    seed: int = 1337
    # validation tokens scored for each run's final loss: the FIRST eval_tokens of the split (stdlib-code's
    # has ~773k, so the default scores about a quarter of it); 0 scores the whole split
    eval_tokens: int = 200_000
    # Skip grid points whose 6 N D (N = 12 n_layer n_embd^2 of the chosen shape) is above this (0: no cap).
    # A capped grid gives small models long budgets without paying for the largest model on them, and
    # keeps the largest fitted compute a known fraction of the held-out run's.
    max_compute: float = 4.3e13
    # Runs trained at once, each in its own process with cpu_count / workers threads. Small models use
    # threads poorly: on 2 cores one thread trains L4 d128 as fast as two (16.6k tokens/s), so two
    # workers halve a sweep's wall time.
    workers: int = 1


LR_RULES = ("width", "kaplan")


def lr_for(n_params: float, n_embd: int, *, rule: str = "width", scale: float = 1.0) -> float:
    if rule == "width":
        return scale * 0.44 / n_embd
    if rule == "kaplan":
        return scale * (0.003239 - 0.0001395 * math.log(n_params))
    raise LmlabError(f"unknown lr_rule '{rule}'; choose one of {', '.join(LR_RULES)}")


def shape_for(n_target: float, *, aspect: float = 32.0, head_dim: int = 32, n_layer: int = 0) -> tuple[int, int]:
    """(n_layer, n_embd) whose 12 L d^2 is closest to n_target (in log space), d / L near `aspect`;
    with n_layer given, only the width is chosen."""
    if n_layer > 0:
        return n_layer, max(1, round(math.sqrt(n_target / (12 * n_layer)) / head_dim)) * head_dim
    best, best_score = (1, head_dim), math.inf
    for n_layer in range(1, 25):
        d = round(math.sqrt(n_target / (12 * n_layer)) / head_dim) * head_dim
        if d < head_dim:
            continue
        score = abs(math.log(12 * n_layer * d * d / n_target)) + 0.25 * abs(math.log(d / n_layer / aspect))
        if score < best_score:
            best, best_score = (n_layer, d), score
    return best


def flops_per_token(n_params: int, n_layer: int, block_size: int, n_embd: int) -> float:
    """Training FLOPs per token: 6N plus attention, 3 x (2 n_layer n_ctx d_attn) (Kaplan et al. Table 1)."""
    return 6 * n_params + 6 * n_layer * block_size * n_embd


def planned_compute(cfg: SweepConfig, n_target: float, d_target: float) -> float:
    n_layer, n_embd = shape_for(n_target, aspect=cfg.aspect, head_dim=cfg.head_dim, n_layer=cfg.n_layer)
    return 6 * 12 * n_layer * n_embd**2 * d_target


def run_config(cfg: SweepConfig, n_target: float, d_target: float) -> RunConfig:
    n_layer, n_embd = shape_for(n_target, aspect=cfg.aspect, head_dim=cfg.head_dim, n_layer=cfg.n_layer)
    steps = max(1, round(d_target / (cfg.batch_size * cfg.block_size)))
    n_actual = 12 * n_layer * n_embd**2
    lr = lr_for(n_actual, n_embd, rule=cfg.lr_rule, scale=cfg.lr_scale)
    name = f"N{n_target:.2g}-D{d_target:.2g}".replace("+", "")
    run = RunConfig(
        model=GPTConfig(n_layer=n_layer, n_head=n_embd // cfg.head_dim, n_embd=n_embd, block_size=cfg.block_size),
        data=DataConfig(dir=cfg.data),
        train=TrainConfig(out_dir=str(Path(cfg.out) / name), seed=cfg.seed, dtype=cfg.dtype,
                          batch_size=cfg.batch_size, max_steps=steps, lr=lr, min_lr=lr / 10,
                          warmup_steps=max(1, steps // 20), eval_interval=0, ckpt_interval=max(50, steps // 10),
                          keep_checkpoints=1, log_interval=max(1, steps // 50), progress=False))
    run.train.out_dir = str(Path(cfg.out) / f"{name}-{config_hash(run, cfg)}")
    return run


# fields that change neither the trained weights nor the score: where and how often to log or save,
# the thread count (results agree up to rounding, see tests), the directory itself
_NOT_HASHED = ("out_dir", "progress", "log_interval", "ckpt_interval", "keep_checkpoints", "threads")


def config_hash(run: RunConfig, cfg: SweepConfig) -> str:
    """8 hex digits of sha256 over everything that decides a run's result: the whole model, data and
    training config (less _NOT_HASHED), the scored validation tokens, and the data's meta.json (its
    tokenizer and shards). Nothing time-dependent: an identical rerun finds the same directory."""
    d = asdict(run)
    d["train"] = {k: v for k, v in d["train"].items() if k not in _NOT_HASHED}
    meta = Path(cfg.data) / "meta.json"
    d["_eval_tokens"] = cfg.eval_tokens
    d["_data_meta"] = hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else None
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


@contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on run_dir/.lock; a second process on the same run fails at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LmlabError(f"{run_dir} is being trained by another process (locked); wait for it or "
                             "stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_one(cfg: SweepConfig, run: RunConfig, *, quiet: bool = False) -> dict:
    """Train (or resume) one grid point and evaluate it; a finished run's result.json is read back.
    `quiet`: the trainer's own notes go to the debug level."""
    run_dir = Path(run.train.out_dir)
    with run_lock(run_dir):
        return _run_one(cfg, run, run_dir, quiet)


def _run_one(cfg: SweepConfig, run: RunConfig, run_dir: Path, quiet: bool) -> dict:
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.time()
    trainer = Trainer(run, run_dir, quiet=quiet)
    resumed = trainer.resume() is not None
    trainer.fit()
    if trainer.step < run.train.max_steps:  # stopped by Ctrl-C / SIGTERM: resumable, not a result
        raise LmlabError(f"{run_dir.name} stopped at step {trainer.step} of {run.train.max_steps} "
                         "(checkpoint written); rerun the same command to resume")
    val = evaluate_split(trainer.model, TokenSplit(run.data.dir, "val"), block_size=run.model.block_size,
                         batch_size=16, max_tokens=cfg.eval_tokens, device=trainer.device,
                         autocast_dtype=torch.bfloat16 if run.train.dtype == "bfloat16" else None)
    m = run.model
    n = trainer.model.num_params()
    tokens = trainer.tokens_seen
    seconds = time.time() - t0
    result = {"name": run_dir.name, "N": n, "N_with_embeddings": trainer.model.num_params(non_embedding=False),
              "D": tokens, "C": 6 * n * tokens,
              "C_counted": flops_per_token(n, m.n_layer, m.block_size, m.n_embd) * tokens,
              "val_loss": val.loss, "val_bits_per_byte": val.bits_per_byte,
              "val_tokens_scored": cfg.eval_tokens or "all", "config_hash": config_hash(run, cfg),
              "seconds": seconds,
              "tok_per_s": tokens / seconds, "resumed": resumed, "n_layer": m.n_layer, "n_embd": m.n_embd,
              "n_head": m.n_head, "block_size": m.block_size, "batch_size": run.train.batch_size,
              "lr": run.train.lr, "steps": run.train.max_steps, "dtype": run.train.dtype}
    atomic_write_text(done, json.dumps(result, indent=2))
    return result


def sweep(cfg: SweepConfig) -> list[dict]:
    train_tokens = TokenSplit(cfg.data, "train").n_tokens
    plan = []
    for n in cfg.sizes:
        for d in cfg.tokens:
            if d > MAX_EPOCHS * train_tokens:
                raise LmlabError(f"a budget of {d:.0e} tokens is over {MAX_EPOCHS:g} epochs of {cfg.data} "
                                 f"({train_tokens:,} training tokens); use a larger corpus or smaller budgets")
            if cfg.max_compute > 0 and planned_compute(cfg, n, d) > cfg.max_compute:
                log.info(f"skip N{n:.2g}-D{d:.2g}: 6ND = {planned_compute(cfg, n, d):.3g} is over max_compute")
                continue
            plan.append(run_config(cfg, n, d))
    if cfg.workers < 1:
        raise LmlabError(f"workers must be at least 1, not {cfg.workers}")
    if not plan:
        raise LmlabError(f"every grid point is over max_compute={cfg.max_compute:.3g} (6ND); raise it, or pass "
                         "--max_compute=0 for no cap")
    if cfg.workers > 1:
        for run in plan:
            run.train.threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    if cfg.workers == 1:  # one run after another, each announced as it starts
        results = [_report(run_one(cfg, _announce(run), quiet=True)) for run in plan]
    else:  # spawn: a forked child would inherit torch's thread pool
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, cfg, _announce(run), quiet=True) for run in plan]
            results = [_report(f.result()) for f in futures]
    write_table(results, Path(cfg.out))
    return results


def _announce(run: RunConfig) -> RunConfig:
    log.info(f"run {Path(run.train.out_dir).name}: L{run.model.n_layer} d{run.model.n_embd}, "
        f"{run.train.max_steps} steps, lr {run.train.lr:.2e}")
    return run


def _report(r: dict) -> dict:
    log.info(f"  {r['name']}: N={r['N']:,} D={r['D']:,} val loss {r['val_loss']:.4f} ({r['seconds']:.0f} s)")
    return r


def train_longer(cfg: SweepConfig, n_target: float, budgets: list[float]) -> list[dict]:
    """Fixed N, growing D: each budget is its own run with its own cosine schedule, since losses read
    off the middle of one long cosine run are biased upwards (Hoffmann et al. 2022, Appendix A)."""
    train_tokens = TokenSplit(cfg.data, "train").n_tokens
    rows = []
    for d in budgets:
        if d > MAX_EPOCHS * train_tokens:
            raise LmlabError(f"a budget of {d:.3g} tokens is over {MAX_EPOCHS:g} epochs of {cfg.data} "
                             f"({train_tokens:,} training tokens); choose a smaller N or fewer multiples")
        run = run_config(cfg, n_target, d)
        log.info(f"run {Path(run.train.out_dir).name}: {run.train.max_steps} steps")
        rows.append(_report(run_one(cfg, run, quiet=True)))
    write_table(rows, Path(cfg.out))
    return rows


def write_table(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    scored = sorted({str(r.get("val_tokens_scored", "?")) for r in results})
    what = "the whole validation split" if scored == ["all"] else f"the first {', '.join(scored)} validation tokens"
    lines = [f"val loss: mean over {what} (`eval_tokens`)", "",
             "| run | N | N (with emb) | D | C = 6ND | C counted | val loss | s | tok/s | shape | lr |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["N"], r["D"])):
        lines.append(f"| {r['name']} | {r['N']:,} | {r['N_with_embeddings']:,} | {r['D']:,} | {r['C']:.3g} | "
                     f"{r['C_counted']:.3g} | {r['val_loss']:.4f} | {r['seconds']:.0f} | {r['tok_per_s']:,.0f} | "
                     f"L{r['n_layer']} d{r['n_embd']} h{r['n_head']} | {r['lr']:.2e} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def train_longer_against_fit(cfg: SweepConfig, fit: dict, n_target: float,
                             multiples: list[float]) -> tuple[list[dict], str, list[Path]]:
    """`lmlab scaling longer`: one run per multiple of the fit's compute-optimal D for `n_target`, each
    compared with the fitted Chinchilla law. Writes longer.json, longer.md and (with matplotlib) a plot
    into cfg.out; returns (rows, the markdown table, the files written)."""
    from lmlab.scaling.fit import ChinchillaLaw
    from lmlab.scaling.plots import train_longer as plot_longer

    law = ChinchillaLaw(**fit["chinchilla"])
    d_opt = float(law.optimal_tokens(n_target))
    log.info(f"N={n_target:.3g}: compute-optimal D = {d_opt:.3g} tokens by the fit; budgets x"
             + ",".join(f"{m:g}" for m in multiples))
    rows = train_longer(cfg, n_target, [m * d_opt for m in multiples])
    for r, m in zip(rows, multiples, strict=True):
        r["multiple"] = m
        r["predicted_loss"] = float(law.loss(r["N"], r["D"]))
    out = Path(cfg.out)
    atomic_write_text(out / "longer.json", json.dumps(rows, indent=2))
    lines = ["| x D* | D | val loss | law's prediction | error |", "|---|---|---|---|---|"]
    lines += [f"| {r['multiple']:g} | {r['D']:,} | {r['val_loss']:.4f} | {r['predicted_loss']:.4f} | "
              f"{(r['predicted_loss'] - r['val_loss']) / r['val_loss']:+.2%} |" for r in rows]
    table = "\n".join(lines)
    atomic_write_text(out / "longer.md", table + "\n")
    written = [out / "longer.md"]
    try:
        written.append(plot_longer(rows, law, out / "train_longer.png"))
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
    return rows, table, written
