"""Test loss, perplexity and bits per byte over a whole held-out split.

Every token of the split is scored once, in windows of `block_size` that start after a `</s>` (the
split is a concatenation of documents each closed by `</s>`, so the first document's context is the
same as every other's). `stride < block_size` slides the windows so that each scored token sees at
least `block_size - stride` tokens of context.

Bits per byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes of the text it
covers, so models with different tokenizers are comparable (nanoGPT/nanochat report it the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.stream import TokenSplit
from lmlab.errors import LmlabError
from lmlab.eval.pll import pseudo_token_nll


@dataclass
class EvalResult:
    split: str
    tokens: int
    bytes: int
    loss: float          # mean nats per token

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens / (math.log(2) * self.bytes) if self.bytes else float("nan")

    def as_dict(self) -> dict:
        return {"split": self.split, "tokens": self.tokens, "bytes": self.bytes, "loss": self.loss,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


@torch.no_grad()
def token_nll(model: nn.Module, tokens: np.ndarray, *, bos: int, block_size: int, stride: int | None = None,
              batch_size: int = 8, device: str | torch.device = "cpu",
              autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Negative log-likelihood (nats) of every token of `tokens`, given `bos` before the first."""
    stride = stride or block_size
    seq = np.concatenate([[bos], tokens]).astype(np.int64)
    n = len(tokens)
    nll = np.zeros(n, dtype=np.float64)
    # window w covers inputs seq[s : s + block] and scores targets in [score_from, s + block)
    windows = []
    pos = 0  # next target index (into tokens) still to score
    while pos < n:
        end = min(pos + stride, n)            # score targets tokens[pos:end]
        start = max(0, end - block_size)      # inputs seq[start:end] predict tokens[start:end]
        windows.append((start, end, pos))
        pos = end
    model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(e - s for s, e, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (s, e, first) in enumerate(chunk):
            x[r, : e - s] = torch.from_numpy(seq[s:e])
            tgt = torch.from_numpy(seq[s + 1:e + 1].copy())
            tgt[: first - s] = -100          # context only, scored by an earlier window
            y[r, : e - s] = tgt
        ctx = torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype else _null()
        with ctx:
            logits = model(x.to(device)).logits
        losses = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), reduction="none", ignore_index=-100)
        for r, (s, e, first) in enumerate(chunk):
            nll[first:e] = losses[r, first - s: e - s].double().cpu().numpy()
    return nll


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def evaluate_split(model: nn.Module, data: TokenSplit, *, block_size: int, stride: int | None = None,
                   batch_size: int = 8, device: str | torch.device = "cpu", max_tokens: int = 0,
                   autocast_dtype: torch.dtype | None = None) -> EvalResult:
    tokens = data.tokens()
    n_bytes = data.n_bytes
    if max_tokens and len(tokens) > max_tokens:
        n_bytes = round(n_bytes * max_tokens / len(tokens))  # approximate: proportional share
        tokens = tokens[:max_tokens]
    bos = data.meta["tokenizer"]["eos_id"]  # documents are separated by </s>
    extra = {}
    if getattr(model, "objective", "causal") == "mlm":  # pseudo-perplexity (lmlab/eval/pll.py)
        from lmlab.tokenizers import load_tokenizer

        extra["mask_id"] = load_tokenizer(data.dir).mask_id
    objective = getattr(model, "objective", "causal")
    if objective not in SCORERS:
        raise LmlabError(f"no perplexity for '{objective}' models ({model.config.family}); "
                         f"scored objectives: {', '.join(SCORERS)}")
    nll = SCORERS[objective](
        model, tokens, bos=bos, block_size=block_size, stride=stride, batch_size=batch_size, device=device,
        autocast_dtype=autocast_dtype, **extra)
    return EvalResult(data.split, len(tokens), int(n_bytes), float(nll.mean()) if len(nll) else float("nan"))


# the model's objective -> the per-token scores its perplexity is made of
SCORERS = {"causal": token_nll, "mlm": pseudo_token_nll}


def unigram_baseline(train: TokenSplit, heldout: TokenSplit) -> EvalResult:
    """A unigram model of the training tokens (add-one smoothed), scored on `heldout`."""
    vocab = train.meta["vocab_size"]
    counts = np.zeros(vocab, dtype=np.float64)
    for shard in train.shards:
        counts += np.bincount(np.asarray(shard), minlength=vocab)[:vocab]
    logp = np.log(counts + 1.0) - math.log(counts.sum() + vocab)
    toks = heldout.tokens()
    return EvalResult(heldout.split, len(toks), heldout.n_bytes, float(-logp[toks].mean()))


def score_text(model: nn.Module, tokenizer, text: str, *, bos: list[int], block_size: int,
               stride: int | None = None, batch_size: int = 8, max_tokens: int = 0,
               name: str = "text") -> EvalResult:
    """Sliding-window loss of a whole text under a model that brings its own tokenizer: windows of
    `block_size` tokens, each scoring its last `stride` (default block_size // 2). `bos` is what the
    model reads before a text (lmlab.io.load's one BOS rule); with none, the first token is only
    context and is not scored (its bytes are left out of bits per byte too)."""
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    n_bytes = len(text.encode("utf-8"))
    if max_tokens and len(ids) > max_tokens:
        n_bytes = round(n_bytes * max_tokens / len(ids))  # approximate: proportional share
        ids = ids[:max_tokens]
    if not bos:
        if len(ids) == 0:
            return EvalResult(name, 0, 0, float("nan"))
        n_bytes -= len(tokenizer.decode([int(ids[0])]).encode("utf-8"))
        prefix, ids = [int(ids[0])], ids[1:]
    else:
        prefix = [int(b) for b in bos]
    # token_nll takes one token of context: the others of a longer prefix are scored and dropped
    extra = np.array(prefix[1:], dtype=np.int64)
    nll = token_nll(model, np.concatenate([extra, ids]), bos=prefix[0], block_size=block_size,
                    stride=stride or block_size // 2, batch_size=batch_size)[len(extra):]
    return EvalResult(name, len(ids), n_bytes, float(nll.mean()) if len(nll) else float("nan"))
