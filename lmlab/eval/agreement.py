"""How closely two models' next-token distributions agree over the same positions: the acceptance
measure for an approximate inference path (a quantized model, another engine) against a reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Agreement:
    top1: float      # fraction of positions where both models' most likely token is the same
    kl: float        # mean KL(reference || other) in nats
    positions: int


def logit_agreement(reference: torch.Tensor, other: torch.Tensor) -> Agreement:
    """Compare logits of shape [..., V] (computed in float64, so bf16 inputs lose nothing further)."""
    if reference.shape != other.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    p = reference.reshape(-1, reference.shape[-1]).double().log_softmax(-1)
    q = other.reshape(-1, other.shape[-1]).double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    top1 = (p.argmax(-1) == q.argmax(-1)).double()
    return Agreement(top1=float(top1.mean()), kl=float(kl.mean()), positions=p.shape[0])
