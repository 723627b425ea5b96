"""Normalisation layers by name: LayerNorm (GPT-2, BERT, BART) and RMSNorm (Llama)."""

from __future__ import annotations

from torch import nn


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":  # Zhang & Sennrich 2019
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}' (layernorm | rmsnorm)")
