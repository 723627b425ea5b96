"""`lmlab quickstart`: the whole pipeline in a few minutes on a laptop CPU.

Prepares the built-in `stdlib-docs` corpus (BPE, 4096 tokens), trains a small GPT, compares its
validation perplexity with a unigram model of the same tokens, and samples from it: three
samples, with the share of their words that occur in the training text.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import replace
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
from lmlab.tokenizers import load_tokenizer
from lmlab.train.config import DataConfig, RunConfig, TrainConfig
from lmlab.train.trainer import Trainer
from lmlab.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

# 1,500 steps of 16 x 128 tokens: 3.1M tokens, 5.4 passes over the 574k training tokens, about 2.5 min
# at the ~20k tokens/s this model trains at under bf16 on 2 idle cores. 400 steps (0.8M tokens) left
# samples that read as noise; the shape is kept (it is also benchmarks/train_throughput.py's), since at
# this compute a larger model would see the text fewer times (Muennighoff et al. 2023: up to ~4 passes
# are worth nearly as much as fresh text).
RECIPE_STEPS = 1500


def choose_dtype() -> tuple[str, str]:
    """(dtype, why) from the hardware's features, not a timing, so every machine of one kind runs the
    same recipe: bf16 autocast on a CUDA GPU that supports it, else as `cpu_dtype` decides."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ("bfloat16" if ok else "float32"), f"CUDA device {'supports' if ok else 'lacks'} bf16"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return cpu_dtype(flags, torch.backends.cpu.get_cpu_capability())


def cpu_dtype(flags: set[str], capability: str) -> tuple[str, str]:
    """bf16 on a CPU with native bf16 matrix instructions (AVX512-BF16 or AMX-BF16 among the
    /proc/cpuinfo `flags`) whose torch kernels run at AVX512 `capability`; fp32 elsewhere, where bf16
    would be emulated and slower."""
    native = sorted(set(flags) & {"avx512_bf16", "amx_bf16"})
    if native and "AVX512" in capability:
        return "bfloat16", f"CPU has {', '.join(native)} (torch kernels: {capability})"
    return "float32", f"no native bf16 on this CPU (torch kernels: {capability}; flags avx512_bf16/amx_bf16 absent)"


QUICKSTART_DATA = {"source": "stdlib-docs", "tokenizer": "bpe", "vocab_size": 4096}


def check_data(data_dir: Path, meta: dict) -> None:
    """A reused data directory must hold what the recipe prepares (stdlib-docs, BPE, 4096 tokens),
    and its tokenizer file must be that tokenizer: the token shards mean nothing under another one."""
    found = {"source": meta.get("prepare", {}).get("source"), "tokenizer": meta.get("tokenizer", {}).get("kind"),
             "vocab_size": meta.get("vocab_size")}
    file = data_dir / meta.get("tokenizer", {}).get("file", "tokenizer.json")
    if found != QUICKSTART_DATA or not file.is_file():
        raise LmlabError(f"{data_dir} holds other data ({found}, tokenizer file present: {file.is_file()}); "
                         f"the quickstart needs {QUICKSTART_DATA}. {REMEDY}")
    tok = load_tokenizer(file)
    if (tok.kind, tok.vocab_size) != (QUICKSTART_DATA["tokenizer"], QUICKSTART_DATA["vocab_size"]):
        raise LmlabError(f"{file} is a {tok.kind} tokenizer of {tok.vocab_size} tokens, not the {found['tokenizer']} "
                         f"tokenizer of {found['vocab_size']} that {data_dir / 'meta.json'} records. {REMEDY}")


REMEDY = "Pass another --data, or remove the directory to prepare it again"


WORD = re.compile(r"[^\W\d_]+")  # a maximal run of letters: "json_module" is two words, "utf8" is "utf"


def words(text: str) -> list[str]:
    return WORD.findall(text)


def word_share(samples: Sequence[str], training_words: set[str], prompts: Sequence[str] = ()) -> dict:
    """How many of the sampled words (case-sensitive) occur in the training text: a BPE model can
    spell words that do not exist, and a sample of such words reads as noise however low the loss.
    The words of each sample's prompt are the reader's, not counted (a word the model extended, "Return"
    + "s", is the model's)."""
    prompts = list(prompts) or [""] * len(samples)
    sampled = [w for s, p in zip(samples, prompts, strict=True) for w in _continuation_words(s, p)]
    unseen = [w for w in sampled if w not in training_words]
    share = 1 - len(unseen) / len(sampled) if sampled else float("nan")
    return {"share": share, "words": len(sampled), "unseen": sorted(set(unseen))}


def _continuation_words(sample: str, prompt: str) -> list[str]:
    ours, theirs = words(sample), words(prompt)
    skip = len(theirs)
    if theirs and prompt[-1:].isalpha() and ours[skip - 1] != theirs[-1]:  # the model extended the last word
        skip -= 1
    return ours[skip:]


def training_words(data_dir: Path) -> set[str]:
    """The words of the training split, read back through its tokenizer (the text the model saw)."""
    tok = load_tokenizer(data_dir)
    return set(words(tok.decode(TokenSplit(data_dir, "train").tokens().tolist(), skip_special=True)))


def recipe(data_dir: str, run_dir: str, steps: int) -> RunConfig:
    return RunConfig(
        model=GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.0),
        data=DataConfig(dir=data_dir),
        train=TrainConfig(out_dir=run_dir, batch_size=16, max_steps=steps, lr=2e-3, min_lr=2e-4,
                          warmup_steps=min(100, steps // 10), weight_decay=0.1, eval_interval=500,
                          eval_iters=10, ckpt_interval=0, log_interval=50,
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
    samples = [prompt + generate_text(saved.model, saved.tokenizer, prompt, replace(SAMPLING, seed=i), bos=saved.bos)
               for i, prompt in enumerate(SAMPLE_PROMPTS)]
    share = word_share(samples, training_words(data_dir), prompts=SAMPLE_PROMPTS)
    elapsed = time.time() - t0
    result = {"val": ours.as_dict(), "unigram": uni.as_dict(), "perplexity_ratio": ratio,
              "seconds": elapsed, "samples": samples, "sampling": SAMPLE_SETTINGS, "word_share": share,
              "dtype": cfg.train.dtype,
              "dtype_reason": choose_dtype()[1] if cfg.train.dtype == choose_dtype()[0] else "set by an override"}
    atomic_write_text(run_dir / "quickstart.json", json.dumps(result, indent=2))
    return {**result, "run_dir": str(run_dir), "finite": math.isfinite(ours.loss)}


SAMPLE_PROMPTS = ("The", "Return", "If")
# a little below 1: a small model's tail of unlikely tokens is where its misspelt words come from
SAMPLING = SamplingConfig(max_new_tokens=60, temperature=0.7, top_k=40)
SAMPLE_SETTINGS = f"temperature {SAMPLING.temperature}, top-k {SAMPLING.top_k}, seeds 0-{len(SAMPLE_PROMPTS) - 1}"
