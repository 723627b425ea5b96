"""`lmlab lineage`: the perplexity ladder from a unigram model to a small GPT on one word-level split.

Every rung is trained on the same training tokens and scored on every token of the same test split
with the same vocabulary: whitespace words, `</s>` closing each line and counted as a token, `<unk>`
an ordinary word (the convention of the published Penn Treebank numbers, e.g. Mikolov 2012's KN-5
141.2). Rungs: a unigram (add-one), interpolated modified Kneser-Ney 3- and 5-grams (as KenLM's
lmplz), Bengio et al. (2003)'s NPLM and a small GPT, the last two trained by the common Trainer.

`--corpus DIR` takes a folder with train/valid/test text files (PTB's ptb.{train,valid,test}.txt):
the vocabulary is then every training word. Otherwise a corpus `lmlab prepare` knows (default: the
built-in stdlib-docs) is split by document and its vocabulary is the training words seen at least
`min_count` times, at most `vocab_size` of them, the rest `<unk>`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmlab.config import to_dict
from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RungConfig:
    """Training settings of a neural rung (NPLM or GPT)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    block_size: int = 64
    dropout: float = 0.0
    weight_decay: float = 0.1


# Defaults: about 1.5 minutes each on two CPU cores. The NPLM's two output layers over ~10k words
# (hidden and direct) make its tokens ~4x dearer than the small GPT's, so it gets fewer steps.
@dataclass(kw_only=True)
class NPLMRung(RungConfig):
    steps: int = 300


@dataclass(kw_only=True)
class GPTRung(RungConfig):
    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    block_size: int = 128


@dataclass(kw_only=True)
class LineageConfig:
    corpus: str = "stdlib-docs"   # a folder with train/valid/test .txt files, or a source for `lmlab prepare`
    out: str = "runs/lineage"
    vocab_size: int = 10000       # cap on the word vocabulary (prepared corpora only)
    min_count: int = 2            # rarer training words become <unk> (prepared corpora only)
    orders: tuple[int, ...] = (3, 5)  # Kneser-Ney rungs
    nplm_context: int = 4         # n - 1 (Bengio et al. 2003 used n = 5 or 6)
    nplm_embd: int = 64
    nplm_hidden: int = 256
    gpt_layers: int = 2
    gpt_heads: int = 4
    gpt_embd: int = 128
    nplm: NPLMRung = field(default_factory=NPLMRung)
    gpt: GPTRung = field(default_factory=GPTRung)
    nplm_direct: bool = True      # Bengio et al.'s direct input-to-output connections
    nplm_tied: bool = False       # output layer tied to the input embedding (Press & Wolf 2017)
    seed: int = 1337
    threads: int = 0              # torch CPU threads (0: torch's default)
    device: str = "auto"          # auto | cpu | cuda for the neural rungs
    dtype: str = "float32"        # float32 | bfloat16 (autocast) for their training; scoring is fp32


def quick(cfg: LineageConfig) -> LineageConfig:
    """Tiny neural rungs, for tests and CI: well under a minute on two cores."""
    cfg.nplm_embd, cfg.nplm_hidden, cfg.gpt_embd, cfg.gpt_layers, cfg.gpt_heads = 32, 64, 64, 1, 2
    cfg.nplm = NPLMRung(steps=60, batch_size=16, lr=1e-2, block_size=32)
    cfg.gpt = GPTRung(steps=60, batch_size=8, lr=5e-3, block_size=64)
    return cfg


# ------------------------------------------------------------------------------------------ data

def prepare_data(cfg: LineageConfig, out: Path) -> Path:
    from lmlab.data.prepare import PrepareConfig, prepare

    folder = Path(cfg.corpus)
    if folder.is_dir() and not (folder / "meta.json").is_file() and any(folder.glob("*.txt")):
        # given splits (PTB): a word tokenizer holding every training word (min_count 1, no cap)
        return prepare(PrepareConfig(source=str(folder), out=str(out), splits="files", tokenizer="word",
                                     vocab_size=0, min_count=1), force=True)
    return prepare(PrepareConfig(source=cfg.corpus, out=str(out), tokenizer="word", vocab_size=cfg.vocab_size,
                                 min_count=cfg.min_count, seed=cfg.seed), force=True)


# ------------------------------------------------------------------------------------------ rungs


@dataclass
class Rung:
    name: str
    loss: float          # mean nats per test token
    tokens: int
    bytes: int
    seconds: float
    params: int = 0
    note: str = ""
    val_loss: float | None = None  # mean nats per validation token (neural rungs: for choosing a recipe)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def as_dict(self) -> dict:
        return {"model": self.name, "perplexity": self.perplexity, "loss": self.loss,
                "bits_per_byte": self.loss * self.tokens / (math.log(2) * self.bytes) if self.bytes else None,
                "val_perplexity": math.exp(self.val_loss) if self.val_loss is not None else None,
                "tokens": self.tokens, "params": self.params, "seconds": round(self.seconds, 2),
                "note": self.note}


def kn_rung(data_dir: Path, order: int) -> Rung:
    from lmlab.data.stream import TokenSplit
    from lmlab.models.ngram.model import NGramConfig, NGramModel
    from lmlab.tokenizers import load_tokenizer
    from lmlab.train.ngram import data_dir_itos

    t0 = time.perf_counter()
    tok = load_tokenizer(data_dir)
    train, test = TokenSplit(data_dir, "train"), TokenSplit(data_dir, "test")
    ids, itos, note = train.tokens().astype(np.int64), data_dir_itos(tok), ""
    try:
        model = NGramModel.from_ids(ids, NGramConfig(order=order), itos=itos, eos_id=tok.eos_id)
    except LmlabError as e:  # a tiny corpus: counts-of-counts leave a discount out of range
        if "discount" not in str(e).lower():
            raise
        model = NGramModel.from_ids(ids, NGramConfig(order=order, discount_fallback=True), itos=itos,
                                    eos_id=tok.eos_id)
        note = "discount_fallback"
    lp = model.logprobs(test.tokens().astype(np.int64))
    return Rung(f"KN {order}-gram", float(-lp.mean()), len(lp), test.n_bytes, time.perf_counter() - t0,
                sum(len(k) for k in model.keys), note)


def unigram_rung(data_dir: Path) -> Rung:
    from lmlab.data.stream import TokenSplit
    from lmlab.eval.perplexity import unigram_baseline

    t0 = time.perf_counter()
    train = TokenSplit(data_dir, "train")
    r = unigram_baseline(train, TokenSplit(data_dir, "test"))
    return Rung("unigram", r.loss, r.tokens, r.bytes, time.perf_counter() - t0, train.meta["vocab_size"],
                "add-one")


def neural_rung(name: str, model_cfg, rung: RungConfig, data_dir: Path, run_dir: Path,
                cfg: LineageConfig) -> Rung:
    from lmlab.data.stream import TokenSplit
    from lmlab.eval.perplexity import evaluate_split
    from lmlab.train.config import DataConfig, RunConfig, TrainConfig
    from lmlab.train.trainer import Trainer

    t0 = time.perf_counter()
    model_cfg.block_size = rung.block_size
    run = RunConfig(model=model_cfg, data=DataConfig(dir=str(data_dir)),
                    train=TrainConfig(out_dir=str(run_dir), seed=cfg.seed, threads=cfg.threads, device=cfg.device,
                                      dtype=cfg.dtype, batch_size=rung.batch_size, max_steps=rung.steps,
                                      lr=rung.lr, min_lr=rung.lr / 10, warmup_steps=min(200, rung.steps // 10),
                                      weight_decay=rung.weight_decay, eval_interval=max(rung.steps, 1), eval_iters=5,
                                      ckpt_interval=0, keep_checkpoints=1, log_interval=max(rung.steps // 5, 1),
                                      progress=False))
    trainer = Trainer(run, run_dir, quiet=True)
    trainer.fit()
    if trainer.step < rung.steps:  # Ctrl-C / SIGTERM: a half-trained rung is not a result
        raise LmlabError(f"{name} stopped at step {trainer.step} of {rung.steps}; the ladder is incomplete")
    trainer.model.eval()  # dropout off for scoring

    def score(split: str):
        # windows overlap by half, so every scored token sees at least block_size / 2 tokens of context
        return evaluate_split(trainer.model, TokenSplit(data_dir, split), block_size=rung.block_size,
                              stride=max(rung.block_size // 2, 1), batch_size=32, device=trainer.device)

    res, val = score("test"), score("val")
    return Rung(name, res.loss, res.tokens, res.bytes, time.perf_counter() - t0,
                trainer.model.num_params(non_embedding=False), f"{rung.steps} steps", val_loss=val.loss)


# ------------------------------------------------------------------------------------------ report


def table(rungs: list[Rung]) -> str:
    head = ("| model | test perplexity | bits/byte | valid perplexity | parameters (n-grams) | seconds | note |\n"
            "|---|---:|---:|---:|---:|---:|---|\n")
    rows = []
    for r in rungs:
        d = r.as_dict()
        bpb = f"{d['bits_per_byte']:.3f}" if d["bits_per_byte"] is not None else ""
        val = f"{d['val_perplexity']:.2f}" if d["val_perplexity"] is not None else ""
        rows.append(f"| {r.name} | {r.perplexity:.2f} | {bpb} | {val} | {r.params:,} | {r.seconds:.1f} | {r.note} |")
    return head + "\n".join(rows) + "\n"


def bar_plot(rungs: list[Rung], title: str) -> bytes | None:
    """A PNG bar chart of the ladder, or None without matplotlib (an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r.name for r in rungs], [r.perplexity for r in rungs], color="#4a7ab5")
    for i, r in enumerate(rungs):
        ax.text(i, r.perplexity, f"{r.perplexity:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("test perplexity")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def lineage(cfg: LineageConfig) -> list[Rung]:
    """Train and score every rung; write lineage.json, lineage.md (and lineage.png) into cfg.out. The
    caller prints `table(rungs)`."""
    from lmlab.models.nplm import NPLMConfig
    from lmlab.models.transformer.gpt import GPTConfig

    t0 = time.time()
    out = Path(cfg.out)
    data_dir = out / "data"
    log.info(f"== data: {cfg.corpus} -> {data_dir} (word level, </s> per line)")
    prepare_data(cfg, data_dir)
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    vocab = meta["vocab_size"]
    log.info(f"vocabulary {vocab:,}; " + ", ".join(f"{s} {v['n_tokens']:,} tokens" for s, v in meta["splits"].items()))
    if meta["splits"]["test"]["n_tokens"] == 0:
        raise LmlabError(f"{cfg.corpus}: the test split is empty")

    rungs: list[Rung] = []

    def done(r: Rung) -> None:
        rungs.append(r)
        note = f", {r.note}" if r.note else ""
        log.info(f"{r.name:<12} test perplexity {r.perplexity:10.2f}  ({r.seconds:.1f} s{note})")

    done(unigram_rung(data_dir))
    for n in cfg.orders:
        done(kn_rung(data_dir, n))
    eos = meta["tokenizer"]["eos_id"]
    done(neural_rung("NPLM", NPLMConfig(vocab_size=vocab, context=cfg.nplm_context, n_embd=cfg.nplm_embd,
                                        hidden=cfg.nplm_hidden, direct=cfg.nplm_direct,
                                        tie_embeddings=cfg.nplm_tied,
                                        dropout=cfg.nplm.dropout, pad_id=eos),
                     cfg.nplm, data_dir, out / "nplm", cfg))
    done(neural_rung("GPT", GPTConfig(vocab_size=vocab, n_layer=cfg.gpt_layers, n_head=cfg.gpt_heads,
                                      n_embd=cfg.gpt_embd, dropout=cfg.gpt.dropout),
                     cfg.gpt, data_dir, out / "gpt", cfg))

    title = f"{cfg.corpus}: vocabulary {vocab:,}, {meta['splits']['test']['n_tokens']:,} test tokens"
    md = (f"# Perplexity ladder\n\n{title} (every token including `</s>` counted; `<unk>` an ordinary word).\n\n"
          + table(rungs))
    result = {"corpus": cfg.corpus, "vocab_size": vocab,
              "tokens": {s: v["n_tokens"] for s, v in meta["splits"].items()},
              "config": to_dict(cfg), "rungs": [r.as_dict() for r in rungs], "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "lineage.json", json.dumps(result, indent=2))
    atomic_write_text(out / "lineage.md", md)
    png = bar_plot(rungs, title)
    if png is not None:
        atomic_write_bytes(out / "lineage.png", png)
    log.info(f"wrote {out / 'lineage.json'}, {out / 'lineage.md'}" + (f", {out / 'lineage.png'}" if png else
                                                                       " (no plot: matplotlib is not installed)")
             + f" in {time.time() - t0:.0f} s")
    return rungs
