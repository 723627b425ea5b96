"""Position information: position ids from a padding mask, and rotary embeddings (RoPE).

RoPE (Su et al. 2021, "RoFormer") rotates each query/key feature pair by an angle proportional to the
token's position, so attention scores depend on relative positions only. Pairs follow the
*half-split* layout of Hugging Face Llama (feature i pairs with i + head_dim/2, `rotate_half`), not
the interleaved (2i, 2i+1) layout of Meta's original code; HF checkpoints store q/k weights permuted
for this layout, so no permutation is needed when loading them.

RoPE scaling stretches a model's positions past the context it was trained on, with Hugging Face's
`rope_type`s and parameter names (`rope_scaling` in a config.json, `rope_parameters` in transformers 5):
- `linear`: positions divided by `factor` (Chen et al. 2023, "Position Interpolation");
- `dynamic`: NTK-aware base stretching once a forward reaches past `max_position_embeddings`
  (bloc97/emozilla's "dynamic NTK"), base * (factor * L / max_pos - (factor - 1))^(d / (d - 2));
- `yarn`: per-frequency blend of interpolation and extrapolation between `beta_fast` and `beta_slow`
  rotations, and cos/sin scaled by 0.1 ln(factor) + 1 (Peng et al. 2023, "YaRN", eqs. 18-23);
- `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between (Meta's
  Llama 3.1 `apply_scaling`: factor 8, low_freq_factor 1, high_freq_factor 4, original context 8192);
- `freq_factors`: each inverse frequency divided by its own factor (`factors`, head_dim / 2 of them):
  how GGUF files carry Llama 3.1's scaling, as the tensor `rope_freqs.weight` (llama.cpp's
  `rope_freq_factors`), without the parameters that made it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def position_ids_from_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only ([B, S] bool -> [B, S] long): the first real token of
    every row is at 0, so a left-padded row sees the same positions as the unpadded sequence.
    Pads get 0, as `transformers` computes them in `generate`."""
    pos = key_mask.long().cumsum(-1) - 1
    return pos.masked_fill(~key_mask, 0)


def position_ids_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each document begins ([B, T] ids -> [B, T] long): a row packing
    several documents (conversations) gives each the positions it would have alone. A document is a
    run of equal consecutive ids."""
    T = document_ids.shape[-1]
    idx = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=-1).values


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "freq_factors")


def _yarn_inv_freq(inv_freq: torch.Tensor, d: int, theta: float, s: dict[str, Any]) -> torch.Tensor:
    """YaRN's blend: dimensions that rotate more than `beta_fast` times over the original context keep
    their frequency, those under `beta_slow` are interpolated, a linear ramp between (YaRN sec. 3.2)."""
    factor, orig = s["factor"], s["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over `orig`
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, orig = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def yarn_attention_factor(s: dict[str, Any]) -> float:
    """YaRN's cos/sin scale, sqrt(1/t) = 0.1 ln(s) + 1 (YaRN eq. 22; DeepSeek's mscale variant)."""
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(s["factor"], s["mscale"]) / mscale(s["factor"], s["mscale_all_dim"])
    return mscale(s["factor"])


class RotaryEmbedding:
    """cos/sin tables for given position ids; holds no parameters (nothing to save or load).

    The inverse frequencies theta^(-2i/d) are recomputed per call in float32 (d/2 numbers), so a model
    built on the meta device or moved between devices needs no buffer bookkeeping. `scaling` is a Hugging
    Face rope-scaling dict (see the module docstring); `dynamic` stretches from its
    `original_max_position_embeddings`, else from `max_position`.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None,
                 max_position: int = 0):
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = dict(scaling or {})
        self.rope_type = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unknown RoPE scaling type '{self.rope_type}' (known: {', '.join(ROPE_TYPES)})")
        self.max_position = max_position
        self.attention_factor = yarn_attention_factor(self.scaling) if self.rope_type == "yarn" else 1.0

    def inv_freq(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        """The d/2 inverse frequencies for a forward whose furthest position is `seq_len - 1`."""
        d, theta, s = self.head_dim, self.theta, self.scaling
        orig = s.get("original_max_position_embeddings", self.max_position)
        if self.rope_type == "dynamic" and seq_len > orig:
            theta = theta * ((s["factor"] * seq_len / orig) - (s["factor"] - 1)) ** (d / (d - 2))
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d))
        if self.rope_type == "linear":
            return inv_freq / s["factor"]
        if self.rope_type == "yarn":
            return _yarn_inv_freq(inv_freq, d, theta, s)
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv_freq, s)
        if self.rope_type == "freq_factors":
            return inv_freq / torch.tensor(s["factors"], dtype=torch.float32, device=device)
        return inv_freq

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] positions -> float32 cos, sin of shape [B, 1, T, head_dim] (broadcast over heads)."""
        # only dynamic NTK depends on how far this forward reaches (one host sync, that type only)
        seq_len = int(position_ids.max()) + 1 if self.rope_type == "dynamic" and position_ids.numel() else 0
        freqs = position_ids[..., None].float() * self.inv_freq(seq_len, position_ids.device)  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        if self.attention_factor != 1.0:
            return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return emb.cos(), emb.sin()

    def rotary(self, position_ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The `rotary` hook for `Attention`: rotates a [B, H, T, head_dim] query or key tensor (in its
        own dtype, so under autocast q and k stay in the low-precision dtype).

        Called once per layer, so it is kept to three kernels: since both halves of `sin` are equal,
        rotate_half(x) * sin == roll(x, d/2) * [-sin | sin], and the tables are converted to x's dtype
        once per forward, not once per layer."""
        cos, sin = self.cos_sin(position_ids)
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

        def apply(x: torch.Tensor) -> torch.Tensor:
            if x.dtype not in tables:
                tables[x.dtype] = (cos.to(x.dtype), sin.to(x.dtype))
            c, s = tables[x.dtype]
            return (x * c).addcmul_(x.roll(half, dims=-1), s)  # in place: mul saves x and c, not its result

        return apply


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022, sec. 3): the geometric sequence 2^(-8/n), 2^(-16/n), ...
    for n heads; when n is not a power of two, the slopes of the closest smaller power of two followed
    by every other slope of the next power (the paper's reference code)."""
    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = powers(closest)
    if closest < n_head:
        slopes += powers(2 * closest)[0::2][:n_head - closest]
    return torch.tensor(slopes)
