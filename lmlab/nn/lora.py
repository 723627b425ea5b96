"""LoRA (Hu et al. 2021), applied to a model from outside it: y = W x + (alpha / r) B A x, W frozen.

lmlab fuses projections that PEFT adapts one by one: Llama's q, k and v rows live in one `attn.qkv`
Linear, gate and up in one `mlp.up`. A `LoRALinear` is therefore a block adapter: the fused output is
cut into named segments (q_proj | k_proj | v_proj) and each targeted segment s has its own A_s
[r, in] and B_s [out_s, r], exactly PEFT's lora_A and lora_B of that projection; an untargeted segment
gets no update. Rank is counted per projection, as PEFT counts it: `rank` r is each A_s's number of
rows, so a fused layer with k targeted segments carries a block-structured update of rank <= k r,
and sum_s r (in + out_s) trainable parameters.

B starts at zero and A as PEFT's default (Kaiming-uniform, a = sqrt(5)), so training starts from the
base model exactly (Hu et al. 2021, sec. 4.1). Dropout acts on the adapter's input, an independent
mask per projection as in PEFT.

The frozen base may also be kept in bf16, int8 or int4 (lmlab/nn/quant.py): QLoRA's idea (Dettmers
et al. 2023), the frozen weights in 4 bits and the adapter in full precision. Gradients pass through
a low-precision base by a matmul with its weight dequantized on the fly, in the forward pass and
again in the backward pass, so no full-precision copy of a weight outlives its use.

Which Linears can be adapted, and how their outputs are segmented, is the caller's `layout`
(lmlab/io/peft.py derives it from a family's Hugging Face weight map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError
from lmlab.nn.device_paths import compute_dtype
from lmlab.nn.quant import quantized_linear

BASES = ("fp32", "bf16", "int8", "int4")


@dataclass(kw_only=True)
class LoRAConfig:
    rank: int = 0               # r of every adapted projection (0: no LoRA; every weight trains)
    alpha: float = 16.0         # the update is scaled by alpha / r (Hu et al. 2021, sec. 4.1)
    dropout: float = 0.0        # on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # PEFT names (Hu et al.'s choice)
    rslora: bool = False        # scale alpha / sqrt(r) instead (Kalajdzievski 2023; PEFT's use_rslora)
    base: str = "fp32"          # the frozen base's adaptable Linears: fp32 | bf16 | int8 | int4 (QLoRA)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True)
class Segment:
    """`rows` consecutive output rows of a fused Linear that one named projection owns (e.g. q_proj)."""
    name: str
    rows: int


class _FrozenLinear(torch.autograd.Function):
    """x W^T (+ b) for a low-precision frozen `base`: W dequantized for the forward matmul and again for
    the backward one (grad_x = grad_y W); nothing but the module is kept in between."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base, ctx.x_dtype = base, x.dtype
        w = base.dequantized_weight()
        dtype = compute_dtype(x)
        bias = base.bias.to(dtype) if base.bias is not None else None
        return F.linear(x.to(dtype), w.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w = ctx.base.dequantized_weight().to(grad_y.dtype)
        return (grad_y @ w).to(ctx.x_dtype), None


class LoRALinear(nn.Module):
    """A frozen `base` Linear (or lmlab/nn/quant.py layer) plus a low-rank update on its `targets` segments."""

    def __init__(self, base: nn.Module, segments: list[Segment], targets: set[str], cfg: LoRAConfig):
        super().__init__()
        # nn.Linear and the int8/int4 layers say their shape; HalfLinear's weight does
        in_features = getattr(base, "in_features", None) or base.weight.shape[1]
        out_features = sum(s.rows for s in segments)
        if out_features != (getattr(base, "out_features", None) or base.weight.shape[0]):
            raise ValueError(f"segments cover {out_features} rows, not the layer's")
        self.base = base.requires_grad_(False)
        self.segments, self.targets = list(segments), [s.name for s in segments if s.name in targets]
        self.rank, self.alpha, self.rslora, self.scale = cfg.rank, cfg.alpha, cfg.rslora, cfg.scale
        self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(cfg.rank, in_features)) for n in self.targets})
        self.lora_B = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(s.rows, cfg.rank))
                                        for s in segments if s.name in targets})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.in_features, self.out_features = in_features, out_features

    def _B(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All B_s in one [out, k r] matrix: block-diagonal over the targeted segments, zero rows elsewhere."""
        total, col, parts = self.rank * len(self.targets), 0, []
        for s in self.segments:
            if s.name in self.lora_B:
                b = self.lora_B[s.name]
                parts.append(F.pad(b, (col, total - col - self.rank)))
                col += self.rank
            else:
                parts.append(self.lora_A[self.targets[0]].new_zeros(s.rows, total))
        out = torch.cat(parts)
        return out if dtype is None else out.to(dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The update as two factors, A [k r, in] (the targeted A_s stacked) and B [out, k r] (`_B`, the
        scale folded in): delta W = B A, for serving several adapters at once (lmlab/nn/multi_lora.py)."""
        return torch.cat([self.lora_A[n] for n in self.targets]).detach(), (self.scale * self._B()).detach()

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the weight: scale * B A ([out, in], float32)."""
        a = torch.cat([self.lora_A[n] for n in self.targets])
        return self.scale * (self._B() @ a)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer; a low-precision one in training through `_FrozenLinear` (differentiable, and
        in the activations' dtype), in inference through its own fast kernels."""
        if isinstance(self.base, nn.Linear) or not (self.training or torch.is_grad_enabled() and x.requires_grad):
            return self.base(x)
        return _FrozenLinear.apply(x, self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        if self.dropout is None:
            h = F.linear(x, torch.cat([self.lora_A[n] for n in self.targets]))
        else:
            h = torch.cat([F.linear(self.dropout(x), self.lora_A[n]) for n in self.targets], dim=-1)
        return y + (F.linear(h, self._B(h.dtype)) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear holding base + update (float32; a low-precision base is dequantized first)."""
        base = self.base
        w = base.weight.float() if isinstance(base, nn.Linear) else base.dequantized_weight().float()
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None)
        out.weight.copy_(w + self.delta_weight().float())
        if base.bias is not None:
            out.bias.copy_(base.bias.float())
        return out.to(self.lora_A[self.targets[0]].device)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, targets={self.targets}"


def apply_lora(model: nn.Module, layout: dict[str, list[Segment]], cfg: LoRAConfig) -> nn.Module:
    """Freeze `model` and wrap each Linear of `layout` (module path -> its output segments) that has a
    segment named in `cfg.targets` in a `LoRALinear`; with `cfg.base` other than fp32 every Linear of the
    layout (adapted or not) is kept frozen in that precision. Returns the model, changed in place."""
    if cfg.rank <= 0:
        raise LmlabError(f"lora.rank must be positive, got {cfg.rank}")
    if cfg.base not in BASES:
        raise LmlabError(f"unknown lora.base '{cfg.base}' ({' | '.join(BASES)})")
    if cfg.dropout < 0 or cfg.dropout >= 1:
        raise LmlabError(f"lora.dropout must be in [0, 1), got {cfg.dropout}")
    known = sorted({s.name for segs in layout.values() for s in segs})
    unknown = [t for t in cfg.targets if t not in known]
    if unknown or not cfg.targets:
        raise LmlabError(f"unknown lora target '{unknown[0] if unknown else ''}' for this model "
                         f"(its projections: {', '.join(known)})")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LmlabError("the model already has LoRA adapters; merge them first")
    model.requires_grad_(False)
    targets = set(cfg.targets)
    for path, segments in layout.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = getattr(parent, name)
        if not isinstance(layer, nn.Linear):
            raise LmlabError(f"{path} is a {type(layer).__name__}, not a Linear that LoRA can adapt")
        if cfg.base != "fp32":
            layer = quantized_linear(layer, cfg.base)
        if targets & {s.name for s in segments}:
            layer = LoRALinear(layer, segments, targets, cfg)
        setattr(parent, name, layer)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by a plain Linear holding base + update (in place); a model without
    adapters comes back as it was. The result trains and exports like any model of its family."""
    for path, layer in lora_layers(model).items():
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, layer.merged())
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
