"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, in and out.

PEFT names an adapter's tensors after the `transformers` module it adapts
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, [r, in]; `...lora_B.weight`,
[out, r]). lmlab's fused Linears (Llama's `attn.qkv` = q_proj | k_proj | v_proj, `mlp.up` =
gate_proj | up_proj) come apart into those projections by the family's Hugging Face weight map
(lmlab/io/hf), which is also where `lora_layout` gets each fused Linear's segments from: one table says
both how the weights and how their adapters are laid out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.config import from_dict
from lmlab.errors import LmlabError
from lmlab.io.hf.adapter import ADAPTERS
from lmlab.nn.lora import LoRAConfig, LoRALinear, Segment, apply_lora, lora_layers
from lmlab.utils.atomic import atomic_dir

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_HEAD = "lm_head"  # the output layer: its weight feeds the fused loss directly, so it is not adapted


def lora_layout(model: nn.Module) -> tuple[dict[str, list[Segment]], dict[tuple[str, str], str]]:
    """(lmlab Linear path -> its segments named as PEFT targets them, (path, segment) -> the transformers
    module path), from the family's Hugging Face weight map."""
    family = model.config.family
    if family not in ADAPTERS:
        raise LmlabError(f"LoRA needs a Hugging Face weight map for family '{family}' (have: {', '.join(ADAPTERS)})")
    layout: dict[str, list[Segment]] = {}
    modules: dict[tuple[str, str], str] = {}
    for p in ADAPTERS[family].params(model.config):
        path = p.ours.removesuffix(".weight")
        if path == p.ours or path == _HEAD:
            continue
        try:
            layer = model.get_submodule(path)
        except AttributeError:  # e.g. a MoE layer's stacked experts: a parameter, not a module
            continue
        # Linears, also once adapted or kept in low precision (not embeddings, norms)
        if not (isinstance(layer, (nn.Linear, LoRALinear)) or hasattr(layer, "dequantized_weight")):
            continue
        segs = []
        for theirs, n in zip(p.theirs, p.sizes or (_out_features(layer),), strict=True):
            module = theirs.removesuffix(".weight")
            name = module.rpartition(".")[2]
            segs.append(Segment(name, n))
            modules[(path, name)] = module
        layout[path] = segs
    return layout, modules


def _out_features(layer: nn.Module) -> int:
    return getattr(layer, "out_features", None) or layer.weight.shape[0]


def save_peft_adapter(model: nn.Module, path: str | Path, *, base_model: str | None = None,
                      overwrite: bool = False) -> Path:
    """Write the model's LoRA adapters as PEFT does for the `transformers` model of its family, so
    `peft.PeftModel.from_pretrained(hf_model, path)` loads them."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LmlabError(f"{path} already exists (pass overwrite=True to replace it)")
    layers = lora_layers(model)
    if not layers:
        raise LmlabError("the model has no LoRA adapters to save")
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha, m.rslora) != (first.rank, first.alpha, first.rslora) for m in layers.values()):
        raise LmlabError("LoRA layers of different ranks or scales cannot be saved as one PEFT config")
    _, modules = lora_layout(model)
    conv1d = {p.ours.removesuffix(".weight") for p in ADAPTERS[model.config.family].params(model.config) if p.conv1d}
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for path_, m in layers.items():
        for name in m.targets:
            key = _PREFIX + modules[(path_, name)]
            tensors[f"{key}.lora_A.weight"] = m.lora_A[name].detach().float().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = m.lora_B[name].detach().float().cpu().contiguous()
            targets.add(name)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if getattr(model, "objective", "causal") == "causal" else None,
        "base_model_name_or_path": base_model, "r": first.rank, "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if first.dropout is not None else 0.0,
        "target_modules": sorted(targets), "bias": "none",
        "use_rslora": first.rslora,
        "fan_in_fan_out": bool(conv1d & set(layers)),  # GPT-2's Conv1D stores its weight transposed
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_dir(path, replace=True) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    return path


def read_peft_config(path: str | Path) -> dict:
    """A PEFT adapter directory's config, checked for what lmlab's LoRA can represent."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise LmlabError(f"{path} is not a PEFT adapter directory (no {name})")
    try:
        c = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path / CONFIG} is not valid JSON: {e}") from None
    if c.get("peft_type") != "LORA":
        raise LmlabError(f"{path}: peft_type {c.get('peft_type')!r} is not supported (LORA only)")
    unsupported = {"use_dora": c.get("use_dora"), "bias": c.get("bias", "none") != "none" and c.get("bias"),
                   "modules_to_save": c.get("modules_to_save"),
                   "layers_to_transform": c.get("layers_to_transform"), "rank_pattern": c.get("rank_pattern"),
                   "alpha_pattern": c.get("alpha_pattern")}
    for key, value in unsupported.items():
        if value:
            raise LmlabError(f"{path}: PEFT option {key}={value!r} is not supported by lmlab's LoRA")
    return c


def load_peft_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the PEFT LoRA adapter at `path` to `model` (in place; the base is frozen): every adapted
    projection must be one this model has, and every one the config targets must have its weights."""
    path = Path(path)
    c = read_peft_config(path)
    sd = load_file(str(path / WEIGHTS))
    layout, modules = lora_layout(model)
    where = {module: key for key, module in modules.items()}
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        stem, _, part = key.removeprefix(_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight") or stem not in where:
            raise LmlabError(f"{path / WEIGHTS}: tensor '{key}' is not a LoRA weight of a projection this "
                             f"{model.config.family} model has")
        found.setdefault(where[stem], {})[part[0]] = t
    targets = sorted({name for _, name in found})
    listed = c.get("target_modules")
    if isinstance(listed, list) and set(listed) != set(targets):
        raise LmlabError(f"{path}: target_modules {sorted(listed)} but weights for {targets} (lmlab adapts "
                         f"only {', '.join(sorted({s.name for v in layout.values() for s in v}))})")
    cfg = LoRAConfig(rank=int(c["r"]), alpha=float(c.get("lora_alpha", 8)), dropout=float(c.get("lora_dropout") or 0),
                     targets=targets, rslora=bool(c.get("use_rslora")))
    apply_lora(model, layout, cfg)
    with torch.no_grad():
        for path_, m in lora_layers(model).items():
            for name in m.targets:
                pair = found.pop((path_, name), {})
                for part, params in (("A", m.lora_A), ("B", m.lora_B)):
                    key = f"{_PREFIX}{modules[(path_, name)]}.lora_{part}.weight"
                    if part not in pair:
                        raise LmlabError(f"{path / WEIGHTS} lacks '{key}'")
                    if pair[part].shape != params[name].shape:
                        raise LmlabError(f"{path / WEIGHTS}: '{key}' has shape {tuple(pair[part].shape)}, "
                                         f"expected {tuple(params[name].shape)} (r={cfg.rank})")
                    params[name].copy_(pair[part])
    return model


def apply_run_lora(model: nn.Module, lora: LoRAConfig | dict | None) -> nn.Module:
    """A run's `lora` config section (a LoRAConfig, or plain data from config.yaml) applied to a freshly
    built model, so its checkpoint's weights load; no section or rank 0: the model as it is."""
    cfg = lora if isinstance(lora, LoRAConfig) else from_dict(LoRAConfig, lora or {}, prefix="lora.")
    return apply_lora(model, lora_layout(model)[0], cfg) if cfg.rank > 0 else model


def base_model_path(path: str | Path) -> Path:
    """The local base model a PEFT adapter directory names (its `base_model_name_or_path`)."""
    c = read_peft_config(path)
    base = c.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise LmlabError(f"{path}: its base model {base!r} is not a local path; load the base model and apply "
                         "the adapter with lmlab.io.peft.load_peft_adapter")
    return Path(base)
