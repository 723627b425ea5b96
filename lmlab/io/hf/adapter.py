"""Hugging Face interop: the adapter type and the generic weight mapping every family shares.

An adapter is a config mapping in each direction plus a table of weights: each of our tensors is one
or more HF tensors concatenated along the output dimension (Llama's q/k/v and gate/up go into our
fused Linears), transposed where HF GPT-2 uses `Conv1D` (which stores [in, out]). Each family's adapter
lives in its own module of this package and registers itself here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError
from lmlab.models.base import ModelConfig
from lmlab.models.registry import build

_REQUIRED = object()


def get(hf: dict, key: str, default: Any = _REQUIRED) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is _REQUIRED:
        raise LmlabError(f"HF config ({hf.get('model_type')}) lacks the key '{key}'")
    return default


def unsupported(hf: dict, key: str, value: Any) -> LmlabError:
    return LmlabError(f"HF config ({hf.get('model_type')}): {key}={value!r} is not supported by lmlab")


@dataclass(frozen=True)
class Param:
    """Our tensor `ours` = the HF tensors `theirs` concatenated along dim 0 (each transposed first
    when `conv1d`); `sizes` are their rows, for splitting a fused tensor back."""
    ours: str
    theirs: tuple[str, ...]
    conv1d: bool = False
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Adapter:
    family: str
    model_type: str                                   # config.json "model_type"
    architecture: str                                 # the transformers class that loads it
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[Any], dict]
    params: Callable[[Any], list[Param]]
    ignore: re.Pattern = re.compile(r"$^")           # HF buffers that are not weights
    normalize: Callable[[str], str] = str             # HF key -> its canonical spelling
    also_reads: tuple[str, ...] = ()                  # other model_types with the same weights
    prepare: Callable[[dict], dict] = dict            # whole state dict -> canonical layout (e.g. stacked experts)


ADAPTERS: dict[str, Adapter] = {}  # lmlab family -> its adapter


def register(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.family] = adapter
    return adapter


def _adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise LmlabError(f"no Hugging Face adapter for family '{family}' (have: {', '.join(ADAPTERS)})")
    return ADAPTERS[family]


def _adapter_for_hf(hf: dict) -> Adapter:
    mt = hf.get("model_type")
    for a in ADAPTERS.values():
        if a.model_type == mt or mt in a.also_reads:
            return a
    raise LmlabError(f"HF model_type '{mt}' is not supported (supported: "
                     f"{', '.join(a.model_type for a in ADAPTERS.values())})")


# ---------------------------------------------------------------------------------------------
# public API: configs and state dicts

def config_from_hf(hf_config: dict) -> ModelConfig:
    return _adapter_for_hf(hf_config).config_from_hf(hf_config)


def config_to_hf(cfg: ModelConfig) -> dict:
    a = _adapter(cfg.family)
    return {"model_type": a.model_type, "architectures": [a.architecture], **a.config_to_hf(cfg)}


def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in build(cfg).state_dict().items()}


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF weights -> ours, checked against `cfg`: a missing, unexpected or misshapen weight is an
    LmlabError naming it. A tied output layer is taken from the token embedding."""
    a = _adapter(cfg.family)
    sd = {a.normalize(k): v for k, v in a.prepare(sd).items() if not a.ignore.search(k)}
    if getattr(cfg, "tie_embeddings", False):  # (an image classifier has no embedding to tie)
        sd.pop("lm_head.weight", None)  # transformers ties it to the embedding on load
    shapes = _expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for p in a.params(cfg):
        missing = [k for k in p.theirs if k not in sd]
        if missing:
            raise LmlabError(f"HF weights lack '{missing[0]}' (needed for {cfg.family} with this config)")
        parts = [sd.pop(k).t() if p.conv1d else sd.pop(k) for k in p.theirs]
        fits = all(x.ndim == parts[0].ndim and x.shape[1:] == parts[0].shape[1:] for x in parts)
        t = torch.cat(parts, dim=0) if fits else None
        if t is None or t.shape != shapes[p.ours]:
            got = " + ".join(str(tuple(x.shape)) for x in parts)
            raise LmlabError(f"HF weight {' + '.join(repr(k) for k in p.theirs)} has shape {got}; the config "
                             f"needs {tuple(shapes[p.ours])} for '{p.ours}'")
        out[p.ours] = t.contiguous()
    if sd:
        raise LmlabError(f"HF weight '{sorted(sd)[0]}' is not used by {cfg.family} with this config "
                         f"({len(sd)} unused)")
    if getattr(cfg, "tie_embeddings", False):  # (an image classifier has no embedding to tie)
        out["lm_head.weight"] = out["wte.weight"]
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights -> HF's names and layouts (a tied output layer is left out, as transformers saves it)."""
    a = _adapter(cfg.family)
    out: dict[str, torch.Tensor] = {}
    for p in a.params(cfg):
        if p.ours not in sd:
            raise LmlabError(f"weights lack '{p.ours}'")
        t = sd[p.ours]
        parts = t.split(list(p.sizes), dim=0) if p.sizes else [t]
        for key, part in zip(p.theirs, parts, strict=True):
            out[key] = (part.t() if p.conv1d else part).detach().contiguous()
    return out


def from_hf(hf_config: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """An lmlab model (eval mode, float32) from a transformers config dict and state dict."""
    cfg = config_from_hf(hf_config)
    model = build(cfg)
    model.load_state_dict(state_dict_from_hf(state_dict, cfg))
    return model.eval()


def to_hf(model: nn.Module, **extra: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) in transformers' format; `extra` adds config keys (e.g. eos_token_id)."""
    cfg = model.config
    return {**config_to_hf(cfg), **extra}, state_dict_to_hf(model.state_dict(), cfg)
