"""What every lmlab language model shares: its config base class and its output type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None           # added to `loss` by the trainer (already weighted)
    router_logits: tuple[torch.Tensor, ...] | None = None  # MoE: per MoE layer, [B * T, n_expert]
    expert_load: torch.Tensor | None = None        # MoE: [MoE layers, n_expert] share of the assignments


@dataclass(kw_only=True)
class ModelConfig:
    """Base of every family's config; `family` picks the concrete class when loading from YAML."""

    family: str = "gpt"
    vocab_size: int = 0  # 0: taken from the prepared data's tokenizer at train time
    block_size: int = 256

    @classmethod
    def resolve_class(cls, data: dict[str, Any]) -> type[ModelConfig]:
        """The concrete config class for `data` (by its `family` key) when loading the base class."""
        if cls is not ModelConfig:
            return cls
        from lmlab.models.registry import family  # the registry imports every family's module

        return family(data.get("family", "gpt")).config


def init_normal(model: nn.Module, std: float) -> None:
    """N(0, std) weights, zero biases and zeroed padding rows: GPT-2's, BERT's and BART's init."""

    def init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])

    model.apply(init)


def count_params(model: nn.Module, non_embedding: bool, tables: tuple[nn.Module | None, ...]) -> int:
    """Parameters, counting tied weights once; `non_embedding` leaves out the embedding `tables`
    (Kaplan et al. 2020's N; an untied output layer stays counted)."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= sum(t.weight.numel() for t in tables if t is not None)
    return n
