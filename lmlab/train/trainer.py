"""The one training loop, shared by every neural family.

The trainer knows nothing about objectives: it asks the sampler for a batch, calls the model and
backpropagates `output.loss` (+ `aux_loss`). Its whole state — step, tokens seen, optimizer, every
RNG, the sampler's position — goes into each checkpoint, so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import dump_yaml
from lmlab.data.images import open_split
from lmlab.data.objectives import make_sampler
from lmlab.data.stream import SAMPLERS
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import list_checkpoints
from lmlab.io.peft import apply_run_lora
from lmlab.models.registry import build
from lmlab.train.checkpoint import load_training_state, save_checkpoint
from lmlab.train.checkpointing import checkpoint_blocks
from lmlab.train.config import RunConfig
from lmlab.train.distributed import (
    all_mean,
    barrier,
    fsdp_active,
    gradient_sync,
    local_rows,
    local_value,
    setup,
    world_from_env,
    wrap,
)
from lmlab.train.init import check_tokenizer, load_init_weights
from lmlab.train.optim import make_optimizer
from lmlab.train.schedule import lr_at
from lmlab.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype in ("bfloat16", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype in ("float16", "fp16"):
        return torch.autocast(device.type, dtype=torch.float16)
    if dtype in ("float32", "fp32"):
        return contextlib.nullcontext()
    raise LmlabError(f"unknown train.dtype '{dtype}' (float32 | bfloat16 | float16)")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, *, quiet: bool = False):
        """`quiet`: the trainer's notes (resumed, validation loss, stopped) go to the debug level, as for the
        many small runs of a scaling sweep or the lineage ladder."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self._level = logging.DEBUG if quiet else logging.INFO
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.world = world_from_env()
        self.device = setup(self.world, pick_device(t.device), t.parallel)
        self.train_data = open_split(cfg.data.dir, "train")
        self.val_data = open_split(cfg.data.dir, "val")
        for key, value in self.train_data.meta.get("model", {}).items():  # image data: classes, size, channels
            if hasattr(cfg.model, key):
                setattr(cfg.model, key, value)
        # --init MODEL: the data must speak the model's tokenizer (a resumed run has its own weights)
        self._init_from = t.init if t.init and not list_checkpoints(self.run_dir) else ""
        if self._init_from:
            check_tokenizer(cfg.data.dir, self._init_from)
        vocab = self.train_data.meta["vocab_size"]
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise LmlabError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary ({vocab})")
        if cfg.data.sampler not in SAMPLERS:
            raise LmlabError(f"unknown data.sampler '{cfg.data.sampler}' ({' | '.join(SAMPLERS)})")
        if t.data_seed < -1:
            raise LmlabError(f"train.data_seed={t.data_seed}: a seed >= 0, or -1 for the same as train.seed")
        self.data_seed = t.seed if t.data_seed == -1 else t.data_seed
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        self.model = self._build_model().to(self.device)
        self.sampler = make_sampler(cfg.data.sampler, self.train_data, self.model, cfg.model.block_size,
                                    t.batch_size, seed=self.data_seed, pairs=cfg.data.seq2seq,
                                    augment=cfg.data.augment)
        self.step = 0
        self.tokens_seen = 0
        # Applied from outside the model; the checkpoint always saves the plain module's names.
        if t.checkpointing:
            checkpoint_blocks(self.model)
        # data parallelism too (lmlab/train/distributed.py). Under DDP evaluation runs the plain module on
        # rank 0 and rank 0 writes checkpoints; FSDP shards self.model in place, so every rank takes part.
        self.sharded = fsdp_active(self.world, t.parallel)
        self.ddp = wrap(self.model, self.world, self.device, t.parallel, t.dtype)
        # after sharding: FSDP replaces the parameters with sharded ones, the ones to optimize
        self.optimizer = make_optimizer(self.model, lr=t.lr, weight_decay=t.weight_decay,
                                        betas=(t.beta1, t.beta2), eps=t.eps)
        self.forward = torch.compile(self.ddp) if t.compile else self.ddp
        self._stop_requested = False

    def _build_model(self) -> torch.nn.Module:
        """A fresh model of the config; with train.init that model's weights (a resumed run loads its own
        checkpoint instead), and with lora.rank > 0 LoRA adapters on it, the base frozen."""
        model = build(self.cfg.model)
        if self._init_from:
            load_init_weights(model, self._init_from)
        return apply_run_lora(model, self.cfg.lora)

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "rng": rng_state(),
                 "sampler": self.sampler.state_dict()}
        if not self.sharded:  # (sharded: in the checkpoint's dcp/ directory, with the weights)
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def resume(self) -> Path | None:
        """Load the latest checkpoint of the run directory, if any; drop metrics logged after it."""
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return None
        ckpt = ckpts[-1]
        state = load_training_state(ckpt, self.model, self.optimizer)
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file() and self.world.main:
            kept = [ln for ln in metrics.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))
        log.log(self._level, f"resumed from {ckpt} (step {self.step}, {self.tokens_seen:,} tokens seen)")
        return ckpt

    def save(self, info: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.cfg, self.train_data.dir,
                               self.state_dict(), {"tokens_seen": self.tokens_seen, **(info or {})},
                               keep=self.cfg.train.keep_checkpoints, world=self.world,
                               sharded_optimizer=self.optimizer if self.sharded else None)

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over a fixed set of windows (the same ones at every evaluation). A sharded
        model is evaluated by every rank, each on its rows of the batch."""
        t = self.cfg.train
        sampler = make_sampler("random", self.val_data, self.model, self.cfg.model.block_size, t.batch_size,
                               seed=self.data_seed + 1, pairs=self.cfg.data.seq2seq)
        self.model.eval()
        losses = []
        for _ in range(t.eval_iters):
            batch = sampler.next_batch()
            with autocast(self.device, t.dtype):
                losses.append(self._run(local_rows(batch, self.world) if self.sharded else batch,
                                        self.model).loss.item())
        self.model.train()
        return all_mean(float(np.mean(losses)), self.world) if self.sharded else float(np.mean(losses))

    # -- the loop -------------------------------------------------------------------------------

    def _run(self, batch, module=None):
        """The model on a batch: (inputs, targets) windows, or a dict of keyword arguments (seq2seq pairs)."""
        module = module or self.forward
        if isinstance(batch, dict):
            return module(**{k: v.to(self.device) for k, v in batch.items()})
        x, y = batch
        return module(x.to(self.device), y.to(self.device))

    def _log_metrics(self, row: dict[str, Any]) -> None:
        if not self.world.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_requested = True

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.world.main:
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
        self._tb = _tensorboard(self.run_dir) if self.world.main else None
        end = min(t.max_steps, t.stop_at_step) if t.stop_at_step > 0 else t.max_steps
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.model.block_size
        # Ctrl-C / SIGTERM finish the current step and write a checkpoint (main thread only)
        old_handlers = ({s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
                        if threading.current_thread() is threading.main_thread() else {})
        bar = _progress(t.progress and self.world.main, self.step, t.max_steps)
        redirect = contextlib.ExitStack()
        if bar is not None:  # log lines go above the bar, not through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect.enter_context(logging_redirect_tqdm())
        self.model.train()
        last = {"loss": float("nan")}
        window_t, window_tokens = time.perf_counter(), 0
        try:
            while self.step < end and not self._stop_requested:
                lr = lr_at(self.step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                           max_steps=t.max_steps, schedule=t.schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(t.grad_accum):
                    batch = local_rows(self.sampler.next_batch(), self.world)
                    # gradients are averaged across processes once, on the last micro-step
                    last_micro = micro == t.grad_accum - 1
                    with gradient_sync(self.ddp, last_micro):
                        with autocast(self.device, t.dtype):
                            out = self._run(batch)
                            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
                        (loss / t.grad_accum).backward()
                    loss_sum += out.loss.item()
                loss_sum = all_mean(loss_sum, self.world)
                if not math.isfinite(loss_sum):
                    raise LmlabError(f"loss became {loss_sum} at step {self.step}; lower train.lr or use float32")
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                           t.grad_clip if t.grad_clip > 0 else float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                last = {"step": self.step, "loss": loss_sum / t.grad_accum, "lr": lr,
                        "grad_norm": local_value(grad_norm), "tokens": self.tokens_seen}
                if getattr(out, "expert_load", None) is not None:  # MoE: busiest expert over the mean (1: balanced)
                    last["expert_load_max"] = float(out.expert_load.max() * out.expert_load.shape[-1])
                    last["expert_load"] = [[round(x, 4) for x in row] for row in out.expert_load.tolist()]
                    last["aux_loss"] = out.aux_loss.item()
                if self.step % t.log_interval == 0 or self.step == end:
                    now = time.perf_counter()
                    last["tok_per_s"] = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    self._log_metrics(last)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tok_per_s']:,.0f}")
                if bar is not None:
                    bar.update(1)
                if ((self.world.main or self.sharded) and t.eval_interval > 0 and self.step % t.eval_interval == 0
                        and self.step < t.max_steps):
                    val = self.evaluate()
                    last["val_loss"] = val
                    self._log_metrics({"step": self.step, "val_loss": val})
                    if self.world.main:
                        log.log(self._level, f"step {self.step}: val loss {val:.4f} (ppl {math.exp(val):.1f})")
                if t.ckpt_interval > 0 and self.step % t.ckpt_interval == 0 and self.step < end:
                    if self.world.main or self.sharded:
                        self.save({"loss": last["loss"]})
                    barrier(self.world)  # no rank runs ahead of a checkpoint it could be resumed from
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            redirect.close()
        summary: dict[str, Any] = {"step": self.step, "tokens_seen": self.tokens_seen, "loss": last["loss"]}
        if not (self.world.main or self.sharded):  # rank 0 evaluates and writes the checkpoint
            return summary
        if self.step >= t.max_steps:
            summary["val_loss"] = self.evaluate()
            self._log_metrics({"step": self.step, "val_loss": summary["val_loss"]})
        if self.step > 0 and not (list_checkpoints(self.run_dir) and list_checkpoints(self.run_dir)[-1].name
                                  == f"step-{self.step:06d}"):
            summary["checkpoint"] = str(self.save({k: v for k, v in summary.items() if k != "step"}))
        if self.sharded:  # the checkpoint is complete before any rank returns
            barrier(self.world)
        if not self.world.main:
            return summary
        if self._tb is not None:
            self._tb.close()
        if self._stop_requested:
            log.log(self._level, f"stopped at step {self.step}; continue with `lmlab train --resume {self.run_dir}`")
        return summary


def _progress(enabled: bool, initial: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)


def _tensorboard(run_dir: Path):
    if os.environ.get("LMLAB_NO_TENSORBOARD"):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))
