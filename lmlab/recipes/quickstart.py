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


def choose_dtype() -> tuple[str, str]:
    """(dtype, why) from the hardware's features, not a timing, so every machine of one kind runs the
    same recipe: bf16 autocast on a CUDA GPU that supports it, or on a CPU with native bf16 matrix
    instructions (AVX512-BF16 or AMX-BF16, as /proc/cpuinfo flags, with torch's kernels at AVX512
    capability); fp32 elsewhere, where bf16 would be emulated and slower."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ("bfloat16" if ok else "float32"), f"CUDA device {'supports' if ok else 'lacks'} bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native and "AVX512" in capability:
        return "bfloat16", f"CPU has {', '.join(native)} (torch kernels: {capability})"
    return "float32", f"no native bf16 on this CPU (torch kernels: {capability}; flags avx512_bf16/amx_bf16 absent)"


QUICKSTART_DATA = {"source": "stdlib-docs", "tokenizer": "bpe", "vocab_size": 4096}


def check_data(data_dir: Path, meta: dict) -> None:
    """A reused data directory must hold what the recipe prepares: stdlib-docs, BPE, 4096 tokens."""
    found = {"source": meta.get("prepare", {}).get("source"), "tokenizer": meta.get("tokenizer", {}).get("kind"),
             "vocab_size": meta.get("vocab_size")}
    if found != QUICKSTART_DATA or not (data_dir / meta["tokenizer"].get("file", "tokenizer.json")).is_file():
        raise LmlabError(f"{data_dir} holds other data ({found}, tokenizer file present: "
                         f"{(data_dir / 'tokenizer.json').is_file()}); the quickstart needs {QUICKSTART_DATA}. "
                         "Pass another --data, or remove the directory to prepare it again")


def recipe(data_dir: str, run_dir: str, steps: int) -> RunConfig:
    return RunConfig(
        model=GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.0),
        data=DataConfig(dir=data_dir),
        train=TrainConfig(out_dir=run_dir, batch_size=16, max_steps=steps, lr=2e-3, min_lr=2e-4,
                          warmup_steps=min(50, steps // 10), weight_decay=0.1, eval_interval=200,
                          eval_iters=10, ckpt_interval=0, log_interval=20,
                          dtype=choose_dtype()[0]))


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
        check_data(data_dir, meta)
        log.info(f"reusing {data_dir} ({meta['splits']['train']['n_tokens']:,} training tokens)")
    else:
        prepare(PrepareConfig(source="stdlib-docs", out=str(data_dir), tokenizer="bpe",
                              vocab_size=QUICKSTART_DATA["vocab_size"]))
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
              "seconds": elapsed, "sample": "The" + sample, "dtype": cfg.train.dtype,
              "dtype_reason": choose_dtype()[1] if cfg.train.dtype == choose_dtype()[0] else "set by an override"}
    atomic_write_text(run_dir / "quickstart.json", json.dumps(result, indent=2))
    return {**result, "run_dir": str(run_dir), "finite": math.isfinite(ours.loss)}


SAMPLE_SETTINGS = "temperature 0.8, top-k 40"
