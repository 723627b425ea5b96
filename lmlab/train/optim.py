"""AdamW with decoupled weight decay on matrices only (Loshchilov & Hutter 2019).

Biases, norm gains and other 1-D parameters are not decayed, as in GPT-2 / nanoGPT. Embedding
tables are 2-D and are decayed, like every other weight matrix.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float, fused: bool | None = None) -> torch.optim.AdamW:
    """`fused` (one kernel for the whole update) defaults to on for CPU and CUDA parameters, as
    transformers' Trainer does with torch >= 2.8."""
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)
