"""Position-wise feed-forward networks: GELU (GPT-2, BERT) and SwiGLU (Shazeer 2020; Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, activation: str = "gelu_tanh", bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.gated = activation == "swiglu"
        act = "silu" if self.gated else activation
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}' ({', '.join([*ACTIVATIONS, 'swiglu'])})")
        self.act = ACTIVATIONS[act]
        self.up = nn.Linear(n_embd, hidden * (2 if self.gated else 1), bias=bias)
        self.down = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.drop(self.down(h))
