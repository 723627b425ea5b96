"""Scores for masked language models: pseudo-log-likelihood and masked-token accuracy.

A bidirectional model gives no left-to-right probability of a text, so it enters perplexity tables
through the pseudo-log-likelihood of Salazar et al. 2020 ("Masked Language Model Scoring"): each
position in turn is replaced by `<mask>` and scored by log p(true token | every other token).
PLL perplexity is exp(-PLL / n); it is not comparable one-to-one with a causal model's perplexity
(the model sees context on both sides), which tables should say.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def pseudo_token_nll(model: nn.Module, tokens: np.ndarray, *, mask_id: int, block_size: int, batch_size: int = 8,
                     device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                     **_: object) -> np.ndarray:
    """-log p(token_i | tokens without i) in nats for every token, in windows of `block_size`.

    The split is cut into consecutive windows; each window becomes one row per position (that
    position masked), run `batch_size` rows at a time. Costs one forward pass per token."""
    model.eval()
    n = len(tokens)
    nll = np.zeros(n, dtype=np.float64)
    seq = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    ctx = (torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    for start in range(0, n, block_size):
        window = seq[start:start + block_size]
        L = len(window)
        for s in range(0, L, batch_size):
            pos = torch.arange(s, min(s + batch_size, L))
            x = window.repeat(len(pos), 1)
            x[torch.arange(len(pos)), pos] = mask_id
            with ctx:
                logits = model(x.to(device)).logits
            logp = torch.log_softmax(logits.float()[torch.arange(len(pos)), pos.to(device)], dim=-1)
            nll[start + pos.numpy()] = -logp.gather(1, window[pos].to(device)[:, None])[:, 0].double().cpu().numpy()
    return nll


@torch.no_grad()
def masked_accuracy(model: nn.Module, sampler, n_batches: int, device: str | torch.device = "cpu") -> dict:
    """Loss and top-1 accuracy at the masked positions of `n_batches` batches of an MLM sampler."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for _ in range(n_batches):
        x, y = sampler.next_batch()
        x, y = x.to(device), y.to(device)
        logits = model(x).logits
        picked = y != -100
        lp = torch.log_softmax(logits[picked].float(), dim=-1)
        loss_sum -= lp.gather(1, y[picked][:, None]).sum().item()
        correct += int((lp.argmax(-1) == y[picked]).sum())
        total += int(picked.sum())
    return {"masked_tokens": total, "loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}
