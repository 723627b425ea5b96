"""Mixture-of-Experts feed-forward: a router picks k of E expert MLPs per token (Shazeer et al. 2017).

k = 1 is the Switch Transformer (Fedus et al. 2021), k = 2 with renormalised top-k weights is Mixtral
(Jiang et al. 2024). Dispatch sorts the (token, expert) assignments by expert and runs each expert once
on its own contiguous slice of tokens, so an expert costs FLOPs only for the tokens routed to it
(as transformers' MixtralExperts and megablocks do; never every expert on every token).

Expert weights are stored stacked, one 3-D parameter per projection ([E, out, in]), the layout of
transformers >= 5 (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): gated experts keep [gate | up]
in one tensor as lmlab's SwiGLU `MLP` does. Experts have no biases (Mixtral, Switch and ST-MoE have none).

The layer keeps its last forward's router logits and expert counts (`router_logits`, `load`); the
decoder reads them right after its blocks run and turns them into the auxiliary losses below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.nn.device_paths import compute_dtype, cpu_kernels
from lmlab.nn.mlp import ACTIVATIONS, MLP

# oneDNN (PyTorch's CPU bf16/fp16 matmul) builds a kernel for each new row count and caches it; an expert's
# row count changes every batch, so each call paid for a build (measured, 1 thread: bf16 [~1000 x 192] @
# [192 x 384] at 100 GFLOP/s with a new row count per call, 940 with row counts seen before; fp32 does not
# care). On that path a group of >= _ROW_BUCKET rows is padded with zero rows to a multiple of it (at most
# 63 extra rows, ~3% at training sizes), which bounds the shapes the cache sees.
_ROW_BUCKET = 64
_LOW = (torch.bfloat16, torch.float16)


@dataclass(kw_only=True)
class MoEConfig:
    """MoE options shared by the decoder families' configs (a mixin: `n_expert=0` means dense)."""

    n_expert: int = 0                  # experts per MoE layer; 0: dense feed-forward everywhere
    n_expert_per_token: int = 2        # k: 1 = Switch (Fedus et al. 2021), 2 = Mixtral (Jiang et al. 2024)
    moe_every: int = 1                 # layer i is MoE when (i + 1) % moe_every == 0 (GShard/Switch use 2)
    moe_hidden: int = 0                # each expert's hidden width; 0: the dense MLP's
    moe_shared_hidden: int = 0         # width of an always-on shared expert (DeepSeekMoE, Dai et al. 2024); 0: none
    moe_capacity_factor: float = 0.0   # > 0: each expert takes at most ceil(cf * k * N / E) tokens (Switch
    #                                    sec. 2.2), the rest skip the layer; 0: no token dropping
    moe_norm_topk: bool = True         # renormalise the k router weights to sum 1 (Mixtral); Switch keeps p_i
    moe_aux_loss_coef: float = 0.01    # load-balancing loss weight alpha = 1e-2 (Fedus et al. 2021, sec. 2.2)
    moe_aux_pooled: bool = False       # one loss over all layers' pooled routing (transformers' Mixtral)
    #                                    instead of Switch's one per layer, summed
    moe_z_loss_coef: float = 0.001     # router z-loss weight 1e-3 (Zoph et al. 2022, ST-MoE, eq. 5 / table 4)
    moe_expert_dropout: float = 0.0    # dropout on each expert's hidden activations, training only: Switch's
    #                                    "expert dropout" (Fedus et al. 2021, sec. 4, table 4: 0.4 in the experts,
    #                                    0.1 elsewhere) regularises the experts' extra parameters on little data

    def is_moe_layer(self, i: int) -> bool:
        return self.n_expert > 0 and (i + 1) % self.moe_every == 0


class MoE(nn.Module):
    def __init__(self, n_embd: int, hidden: int, activation: str, cfg: MoEConfig, *, dropout: float = 0.0):
        super().__init__()
        if not 1 <= cfg.n_expert_per_token <= cfg.n_expert:
            raise ValueError(f"n_expert_per_token={cfg.n_expert_per_token} must be in 1..n_expert={cfg.n_expert}")
        self.n_expert, self.k, self.hidden = cfg.n_expert, cfg.n_expert_per_token, hidden
        self.norm_topk, self.capacity_factor = cfg.moe_norm_topk, cfg.moe_capacity_factor
        self.gated = activation == "swiglu"
        self.act = ACTIVATIONS["silu" if self.gated else activation]
        self.router = nn.Linear(n_embd, cfg.n_expert, bias=False)
        # initialised by the model (lmlab/models/transformer/decoder.py), like every other weight
        self.experts_up = nn.Parameter(torch.empty(cfg.n_expert, hidden * (2 if self.gated else 1), n_embd))
        self.experts_down = nn.Parameter(torch.empty(cfg.n_expert, n_embd, hidden))
        self.shared = (MLP(n_embd, cfg.moe_shared_hidden, activation, bias=False)
                       if cfg.moe_shared_hidden > 0 else None)
        self.drop = nn.Dropout(dropout)
        self.expert_dropout = cfg.moe_expert_dropout
        self.router_logits: torch.Tensor | None = None  # [N, E] of the last forward
        self.load: torch.Tensor | None = None           # [E] assignments per expert (before capacity drops)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], top-k weights [N, k] (float32) and expert indices [N, k]."""
        logits = self.router(x)
        probs = logits.float().softmax(dim=-1)
        weights, idx = probs.topk(self.k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, idx

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.experts_up[e])
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if self.expert_dropout > 0:
            h = F.dropout(h, self.expert_dropout, self.training)
        return F.linear(h, self.experts_down[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, idx = self.route(x)
        flat = idx.reshape(-1)                              # assignment a = token * k + slot
        order = flat.argsort(stable=True)                   # assignments grouped by expert, tokens in order
        counts = torch.bincount(flat, minlength=self.n_expert)
        self.router_logits, self.load = logits, counts.detach()
        token = order // self.k
        gate = weights.reshape(-1)[order]
        if self.capacity_factor > 0:  # Switch sec. 2.2: an expert's overflow is dropped, first come first served
            cap = math.ceil(self.capacity_factor * flat.numel() / self.n_expert)
            start = torch.cumsum(counts, 0) - counts
            keep = torch.arange(flat.numel(), device=x.device) - start.repeat_interleave(counts) < cap
            token, gate, counts = token[keep], gate[keep], counts.clamp(max=cap)
        sizes = counts.tolist()
        bucket = cpu_kernels(x) and compute_dtype(x) in _LOW
        pieces = []
        for e, xe in enumerate(x[token].split(sizes)):
            n = sizes[e]
            pad = (-n) % _ROW_BUCKET if bucket and n >= _ROW_BUCKET else 0
            if n:
                pieces.append(self.expert(e, F.pad(xe, (0, 0, 0, pad)))[:n] if pad else self.expert(e, xe))
        out = torch.zeros_like(x)
        if pieces:
            y = torch.cat(pieces) * gate[:, None].to(x.dtype)
            out = out.index_add(0, token, y.to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        return self.drop(out.reshape(shape))


def load_balancing_loss(router_logits: list[torch.Tensor], k: int, mask: torch.Tensor | None = None,
                        pooled: bool = True) -> torch.Tensor:
    """Switch's auxiliary loss E * sum_i f_i P_i (Fedus et al. 2021, eq. 4-6): f_i the fraction of
    top-k assignments that go to expert i, P_i its mean router probability; with top-k, f sums to k, so
    perfectly balanced routing gives k. `pooled`: f and P pooled over the MoE layers before the product,
    as transformers' `load_balancing_loss_func` (Mixtral) computes it; otherwise one loss per layer,
    summed (Switch, ST-MoE), which balances every layer and not only their sum. `mask` ([N], 1 = real
    token) leaves padding out."""
    if not pooled:
        return sum(load_balancing_loss([r], k, mask) for r in router_logits)
    E = router_logits[0].shape[-1]
    probs = torch.cat([r.float().softmax(-1) for r in router_logits])          # [L * N, E]
    chosen = F.one_hot(probs.topk(k, dim=-1).indices, E).sum(1).float()       # [L * N, E]
    if mask is not None:
        m = mask.reshape(-1).float().repeat(len(router_logits))[:, None]
        f, p = (chosen * m).sum(0) / m.sum(), (probs * m).sum(0) / m.sum()
    else:
        f, p = chosen.mean(0), probs.mean(0)
    return E * (f * p).sum()


def router_z_loss(router_logits: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2, which
    keeps router logits small and the softmax numerically stable; averaged over the MoE layers."""
    z = torch.stack([r.float().logsumexp(-1).square() for r in router_logits])  # [L, N]
    if mask is None:
        return z.mean()
    m = mask.reshape(-1).float()
    return (z * m).sum(-1).div(m.sum()).mean()
