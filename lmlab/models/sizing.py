"""The arithmetic of a model too big to hold: parameters, FLOPs and memory, from its meta-device build.

Every count is summed over the modules of the model built on the meta device (no memory is allocated),
never typed in; the formulas on top of the counts are the standard ones, cited where they are used.

- Parameters: total (tied weights once), embeddings (the input lookup tables: token and learned position
  embeddings), and active per token (an MoE layer's experts count k of E).
- FLOPs per token: forward 2 N + 4 L d_attn T, training 3x that (PaLM, Chowdhery et al. 2022, app. B:
  6 N + 12 L H Q T), N the active matmul weights a token passes through (output layer included, tied or
  not; embedding lookups are not matmuls), T the context. The attention term counts the full T x T
  square, as PaLM does (a causal kernel needs about half).
- Training memory: AdamW with float32 weights, gradients and two moments: 16 bytes per parameter
  (lmlab's trainer keeps float32 weights under autocast; ZeRO, Rajbhandari et al. 2020, sec. 3.1 counts
  the same 16 for mixed precision). Activations per layer after Korthikanti et al. 2022 (sec. 4.1, 34
  s b h bytes for GPT with 16-bit activations), written per tensor so GQA, SwiGLU and MoE (k experts per
  token) fit; the s^2 attention-score terms are absent because SDPA recomputes them. Full activation
  checkpointing keeps each layer's input (2 s b h bytes) plus one layer recomputed at a time. FSDP
  (ZeRO-3) shards weights, gradients and optimizer state over N devices and gathers one layer's weights.
- Inference memory: weights at each precision plus the KV cache, 2 L n_kv_head head_dim T B values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from lmlab.models.base import ModelConfig
from lmlab.nn.attention import Attention
from lmlab.nn.block import Block
from lmlab.nn.mlp import MLP
from lmlab.nn.moe import MoE

GIB = 1024 ** 3
WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5}  # int8/int4: quantization scales not counted
ADAMW_BYTES = 16  # float32 weight 4 + gradient 4 + AdamW's first and second moments 8


def build_meta(cfg: ModelConfig) -> nn.Module:
    from lmlab.models.registry import build  # the registry imports every family (and this module)

    with torch.device("meta"):
        return build(cfg)


@dataclass
class Params:
    total: int
    embedding: int    # input lookup tables (token, learned positions)
    active: int       # per token: an MoE layer's experts count n_expert_per_token of n_expert
    matmul: int       # active weights that multiply the token's activations (output layer included)
    experts: int      # all experts' weights (0 for a dense model)


def count_params(model: nn.Module) -> Params:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied weights are one Parameter
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = sum(m.weight.numel() for m in _unique(model, nn.Embedding))
    inactive = experts = 0
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # a tied lm_head too
    for m in _unique(model, MoE):
        n = m.experts_up.numel() + m.experts_down.numel()
        experts += n
        inactive += n * (m.n_expert - m.k) // m.n_expert
        matmul += n * m.k // m.n_expert
    return Params(total, embedding, total - inactive, matmul, experts)


def _unique(model: nn.Module, kind: type) -> list[nn.Module]:
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, kind) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


@dataclass
class Sizing:
    params: Params
    n_layer: int
    context: int
    batch: int
    flops_forward: float        # per token, at `context`
    flops_train: float          # per token: forward + backward (2x forward)
    weights_bytes: dict[str, float]
    kv_cache_bytes: float       # bfloat16, `context` x `batch`
    train_state_bytes: float    # weights + gradients + AdamW state, unsharded
    activations_bytes: float    # one micro-batch of `batch` x `context`
    activations_ckpt_bytes: float
    largest_layer_params: int
    devices: int = 1
    machine: dict[str, float] = field(default_factory=dict)

    def train_bytes(self, checkpointing: bool = False, devices: int = 1) -> float:
        act = self.activations_ckpt_bytes if checkpointing else self.activations_bytes
        if devices <= 1:
            return self.train_state_bytes + act
        # FSDP / ZeRO-3: states sharded; one layer's float32 weights gathered at a time
        return self.train_state_bytes / devices + 4 * self.largest_layer_params + act

    def infer_bytes(self, precision: str = "bfloat16") -> float:
        return self.weights_bytes[precision] + self.kv_cache_bytes


def _layer_activation_bytes(block: Block, act_bytes: int, dropout: bool) -> float:
    """Bytes per token that one block keeps for its backward pass (Korthikanti et al. 2022 sec. 4.1,
    written per tensor): with 16-bit activations and dropout, 34 h for GPT (36 h here: PyTorch's SDPA
    keeps its output besides the copy the output projection saves)."""
    attn: Attention = block.attn
    h, kv = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
    # norm output (QKV input), q k v, SDPA's output and the projection's input (a contiguous copy of it),
    # the two norms' inputs
    n = h + (h + 2 * kv) + 2 * h + 2 * h
    mlp = block.mlp
    if isinstance(mlp, MoE):
        hidden, gated, k = mlp.hidden, mlp.gated, mlp.k
        n += h * k                    # each routed copy of the token (the experts' gathered input)
    else:
        assert isinstance(mlp, MLP)
        hidden, gated, k = mlp.down.in_features, mlp.gated, 1
    n += h + k * hidden * (4 if gated else 2)  # MLP input; gate, up, act(gate), product (or pre/post act)
    return n * act_bytes + (2 * h if dropout else 0)  # two 1-byte dropout masks


def machine_memory() -> dict[str, float]:
    """This machine's memory in bytes: RAM total and available (/proc/meminfo), and each CUDA device's."""
    out: dict[str, float] = {}
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo", encoding="ascii"))
        out["ram_total"] = int(info["MemTotal"].split()[0]) * 1024
        out["ram_available"] = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        out["ram_total"] = out["ram_available"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        out["gpu_total"] = min(torch.cuda.get_device_properties(i).total_memory
                               for i in range(torch.cuda.device_count()))
    return out


def size(cfg: ModelConfig, *, context: int | None = None, batch: int = 1, act_bytes: int = 2) -> Sizing:
    """The parameter, FLOP and memory arithmetic of `cfg` at `context` tokens x `batch` sequences;
    `act_bytes` per activation: 2 under bf16 autocast, 4 in float32."""
    model = build_meta(cfg)
    p = count_params(model)
    T = context or cfg.block_size
    attns = _unique(model, Attention)
    d_attn = sum(a.n_head * a.head_dim for a in attns)  # summed over layers: L d_attn
    fwd = 2 * p.matmul + 4 * d_attn * T
    kv_values = sum(2 * a.n_kv_head * a.head_dim for a in attns) * T * batch
    blocks = _unique(model, Block)
    dropout = getattr(cfg, "dropout", 0.0) > 0
    per_token = [_layer_activation_bytes(b, act_bytes, dropout) for b in blocks]
    tokens = T * batch
    h = getattr(cfg, "n_embd", 0)
    # outside the blocks: the embedding output, the final norm's input and output (the loss keeps it);
    # during backward one layer's activation gradients live beside the activations (its working set)
    outside, working = 3 * h * act_bytes, max(per_token, default=0)
    act = (sum(per_token) + outside + working) * tokens
    act_ckpt = (act_bytes * h * len(blocks) + outside + 2 * working) * tokens  # inputs kept, one layer redone
    largest = max((sum(q.numel() for q in b.parameters()) for b in blocks), default=p.total)
    return Sizing(params=p, n_layer=len(blocks), context=T, batch=batch, flops_forward=fwd, flops_train=3 * fwd,
                  weights_bytes={k: v * p.total for k, v in WEIGHT_BYTES.items()}, kv_cache_bytes=2 * kv_values,
                  train_state_bytes=ADAMW_BYTES * p.total, activations_bytes=act, activations_ckpt_bytes=act_ckpt,
                  largest_layer_params=largest, machine=machine_memory())
