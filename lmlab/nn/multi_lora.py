"""Several LoRA adapters over one frozen base, chosen per batch row: one decode batch serves many fine-tunes.

Row b of a batch computes y_b = W x_b + B_i A_i x_b, with i = the adapter of row b (0: none, the base),
the per-sequence adapter index of Punica (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving") and
S-LoRA (Sheng et al. 2023): the base matmul W x is shared by the whole batch, only the small low-rank
products are gathered per row. Each adapted Linear keeps its adapters stacked, A [n+1, R, in] and
B [n+1, out, R] with the adapter's scale folded into B (lmlab/nn/lora.py `LoRALinear.factors`), R the
largest rank among them: a smaller one is zero-padded and index 0 is all zeros, and both add exact zeros,
so a base row in a mixed batch gets exactly what it gets in a batch of base rows.

Which adapter each row uses is an `AdapterRows` shared by every wrapped layer and set by the decoder
before each forward: inference state outside the model, like its KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Factors = tuple[torch.Tensor, torch.Tensor]  # (A [R, in], B [out, R]): delta W = B A


class AdapterRows:
    """The adapter of each row of the next forward (0: the base). A batch of one adapter takes two plain
    matmuls with that adapter's factors (or none for the base); a mixed batch gathers them per row."""

    def __init__(self) -> None:
        self.single: int | None = 0            # the one adapter of every row, or None when they differ
        self.index: torch.Tensor | None = None  # per row, when they differ

    def set(self, rows: list[int]) -> None:
        self.single = rows[0] if len(set(rows)) == 1 else None
        self.index = None if self.single is not None else torch.tensor(rows)


class MultiLoRALinear(nn.Module):
    """A frozen `base` layer (nn.Linear or a lmlab/nn/quant.py layer) plus stacked adapter factors."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        self.register_buffer("A", A)
        self.register_buffer("B", B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        i = self.rows.single
        if i == 0:
            return y
        h = x.to(self.A.dtype)
        if i is not None:
            return y + F.linear(F.linear(h, self.A[i]), self.B[i]).to(y.dtype)
        idx = self.rows.index.to(x.device)
        if idx.shape[0] != x.shape[0]:
            raise RuntimeError(f"adapter rows for {idx.shape[0]} sequences, a batch of {x.shape[0]}")
        h = torch.bmm(h.reshape(x.shape[0], -1, x.shape[-1]), self.A[idx].transpose(1, 2))  # [b, t, R]
        return y + torch.bmm(h, self.B[idx].transpose(1, 2)).view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.A.shape[0] - 1}, rank<={self.A.shape[1]}"


def apply_multi_lora(model: nn.Module, adapters: list[dict[str, Factors]]) -> AdapterRows:
    """Wrap each Linear that any of `adapters` adapts (adapter k + 1 = adapters[k]: layer path -> its
    factors) in a `MultiLoRALinear`, in place; returns the rows selector the decoder sets."""
    rows = AdapterRows()
    for path in sorted({p for a in adapters for p in a}):
        pairs = [a.get(path) for a in adapters]
        some = next(p for p in pairs if p is not None)
        R, n_in, n_out = max(p[0].shape[0] for p in pairs if p is not None), some[0].shape[1], some[1].shape[0]
        A, B = torch.zeros(len(adapters) + 1, R, n_in), torch.zeros(len(adapters) + 1, n_out, R)
        for k, p in enumerate(pairs, 1):
            if p is not None:
                A[k, :p[0].shape[0]], B[k, :, :p[1].shape[1]] = p[0], p[1]
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, name)
        device = next(iter([*base.parameters(), *base.buffers()])).device
        setattr(parent, name, MultiLoRALinear(base, A.to(device), B.to(device), rows))
    return rows
