"""`lmlab quickstart`: the whole pipeline in a few minutes on a laptop CPU.

Prepares the built-in `stdlib-docs` corpus (BPE, 4096 tokens), trains a small GPT, compares its
validation perplexity with a unigram model of the same tokens, and samples from it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from lmlab.config import apply_overrides, dump_yaml
from lmlab.data.prepare import PrepareConfig, prepare, read_meta
from lmlab.data.sources import python_tag
from lmlab.data.stream import TokenSplit
from lmlab.errors import LmlabError
from lmlab.eval.perplexity import evaluate_split, unigram_baseline
from lmlab.generate.engine import SamplingConfig, generate_text
from lmlab.io.load import load_model
from lmlab.models.transformer.gpt import GPTConfig
from lmlab.train.config import DataConfig, RunConfig, TrainConfig
from lmlab.train.trainer import Trainer
from lmlab.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

RECIPE_STEPS = 400


def bf16_is_faster(n: int = 512, repeats: int = 5) -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 (AVX-512 BF16 / AMX do; many don't)."""
    if not torch.cuda.is_available():
        a32 = torch.randn(n, n)
        timings = {}
        for dtype in (torch.float32, torch.bfloat16):
            a = a32.to(dtype)
            a @ a
            t = time.perf_counter()
            for _ in range(repeats):
                a @ a
            timings[dtype] = time.perf_counter() - t
        return timings[torch.bfloat16] < 0.8 * timings[torch.float32]
    return torch.cuda.is_bf16_supported()


def recipe(data_dir: str, run_dir: str, steps: int) -> RunConfig:
    return RunConfig(
        model=GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.0),
        data=DataConfig(dir=data_dir),
        train=TrainConfig(out_dir=run_dir, batch_size=16, max_steps=steps, lr=2e-3, min_lr=2e-4,
                          warmup_steps=min(50, steps // 10), weight_decay=0.1, eval_interval=200,
                          eval_iters=10, ckpt_interval=0, log_interval=20,
                          dtype="bfloat16" if bf16_is_faster() else "float32"))


def quickstart(out: str = "", data: str = "data/stdlib-docs", steps: int = 0,
               overrides: list[str] | None = None) -> dict:
    """Run the four steps, logging progress; return quickstart.json's content plus "run_dir" (the
    caller prints the comparison table and the sample)."""
    t0 = time.time()
    data_dir = Path(data)
    run_dir = Path(out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise LmlabError(f"run directory {run_dir} already exists; choose another --out")
    # the options are checked before any work
    cfg = apply_overrides(recipe(str(data_dir), str(run_dir), steps or RECIPE_STEPS), overrides or [])

    log.info(f"== 1/4 data: the built-in stdlib-docs corpus ({python_tag()}) -> {data_dir}")
    if (data_dir / "meta.json").is_file():
        meta = read_meta(data_dir)
        log.info(f"reusing {data_dir} ({meta['splits']['train']['n_tokens']:,} training tokens)")
    else:
        prepare(PrepareConfig(source="stdlib-docs", out=str(data_dir), tokenizer="bpe", vocab_size=4096))
    log.info(f"== 2/4 train a small GPT ({cfg.train.max_steps} steps, {cfg.train.dtype}) -> {run_dir}")
    log.info(dump_yaml(cfg).rstrip("\n"))
    trainer = Trainer(cfg, run_dir)
    log.info(f"{trainer.model.num_params() / 1e6:.2f}M parameters without embeddings, "
             f"{trainer.model.num_params(non_embedding=False) / 1e6:.2f}M with")
    trainer.fit()
    model = trainer.model.eval()

    log.info("== 3/4 evaluate on the validation split (every token)")
    val = TokenSplit(data_dir, "val")
    ours = evaluate_split(model, val, block_size=cfg.model.block_size, batch_size=16)
    uni = unigram_baseline(TokenSplit(data_dir, "train"), val)
    ratio = ours.perplexity / uni.perplexity

    log.info(f"== 4/4 sample ({SAMPLE_SETTINGS})")
    saved = load_model(run_dir)  # the run as every command loads it (its tokenizer, its BOS rule)
    sample = generate_text(saved.model, saved.tokenizer, "The",
                           SamplingConfig(max_new_tokens=80, temperature=0.8, top_k=40, seed=0), bos=saved.bos)
    elapsed = time.time() - t0
    result = {"val": ours.as_dict(), "unigram": uni.as_dict(), "perplexity_ratio": ratio,
              "seconds": elapsed, "sample": "The" + sample, "dtype": cfg.train.dtype}
    atomic_write_text(run_dir / "quickstart.json", json.dumps(result, indent=2))
    return {**result, "run_dir": str(run_dir), "finite": math.isfinite(ours.loss)}


SAMPLE_SETTINGS = "temperature 0.8, top-k 40"
