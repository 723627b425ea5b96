"""Sampling as pure functions on a row of logits: filters return new logits, `sample` draws a token."""

from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / max(temperature, 1e-8)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (Fan et al. 2018)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (Holtzman et al. 2020)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum - sorted_logits.softmax(dim=-1) >= p  # mass before this token already reaches p
    drop[..., 0] = False  # the top token always stays: a tiny p (0 in float32) must not drop every token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


FILTERS = {"top_k": top_k_filter, "top_p": top_p_filter}


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ([B]) from logits ([B, V]); temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    logits = FILTERS["top_k"](logits, top_k)
    logits = FILTERS["top_p"](logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
