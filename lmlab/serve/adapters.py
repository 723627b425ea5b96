"""LoRA adapters served by name beside their base (vLLM's `--lora-modules NAME=PATH`).

Each adapter is a PEFT directory (lmlab/io/peft.py). It is read onto a weightless copy of the base's
architecture (built on the meta device), which checks it as `load_peft_adapter` does (every tensor a
LoRA weight of a projection this model has, the shapes of this model's layers, the listed target
modules), and only its factors are kept; the served model, in whatever precision it was loaded, then
has each adapted Linear wrapped once for all adapters (lmlab/nn/multi_lora.py), and the decoder
chooses the adapter per batch row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.io.peft import load_peft_adapter, read_peft_config
from lmlab.models.registry import build
from lmlab.nn.lora import lora_layers
from lmlab.nn.multi_lora import AdapterRows, Factors, apply_multi_lora


def parse_lora_modules(specs: list[str], base_name: str) -> dict[str, Path]:
    """['name=path', ...] -> {name: path}; names unique and distinct from the base's."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise LmlabError(f"--lora-modules takes NAME=PATH, got '{spec}'")
        if name in out or name in (base_name, "default"):
            raise LmlabError(f"--lora-modules: the name '{name}' is already taken "
                             f"({'another adapter' if name in out else 'the base model'})")
        out[name] = Path(path)
    return out


def adapter_factors(config: Any, path: Path) -> dict[str, Factors]:
    """The PEFT adapter at `path`, checked against a model of `config`: layer path -> (A, B scaled)."""
    read_peft_config(path)  # is it a PEFT LoRA adapter at all
    with torch.device("meta"):
        skeleton = build(config)
    try:
        load_peft_adapter(skeleton, path)
    except LmlabError as e:
        raise LmlabError(f"it does not fit this base model: {e}") from None
    except (KeyError, TypeError, ValueError) as e:  # a config value missing or of the wrong kind
        raise LmlabError(f"{path}: bad adapter_config.json ({type(e).__name__}: {e})") from None
    return {p: m.factors() for p, m in lora_layers(skeleton).items()}


def attach_adapters(model: Any, paths: dict[str, Path]) -> tuple[dict[str, int], AdapterRows | None]:
    """Read every adapter (all checked before the model changes), then wrap `model`'s adapted Linears.
    Returns ({name: row index, base = 0}, the rows selector; None without adapters)."""
    if not paths:
        return {}, None
    factors = []
    for name, path in paths.items():
        try:
            factors.append(adapter_factors(model.config, path))
        except LmlabError as e:
            raise LmlabError(f"--lora-modules {name}={path}: {e}") from None
    return {name: k for k, name in enumerate(paths, 1)}, apply_multi_lora(model, factors)
