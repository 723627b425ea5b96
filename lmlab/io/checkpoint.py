"""Reading lmlab checkpoints: `step-N/` directories holding model.safetensors, config.yaml and the tokenizer.

Writing them, with the trainer's state, is lmlab/train/checkpoint.py's job; reading the model back is
here so that everything above `io` (evaluation, generation, the server) loads through one place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_model
from torch import nn

from lmlab.config import from_dict
from lmlab.errors import LmlabError
from lmlab.models.base import ModelConfig
from lmlab.models.registry import build
from lmlab.tokenizers import Tokenizer, load_tokenizer

_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise LmlabError(f"checkpoint not found: {p}")
    if (p / "model.safetensors").is_file():
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise LmlabError(f"{p} holds no checkpoint (expected model.safetensors or checkpoints/step-*/)")
    return ckpts[-1]


def read_config_dict(ckpt: Path) -> dict[str, Any]:
    """The run's config.yaml as plain data (model, data and train sections)."""
    file = Path(ckpt) / "config.yaml"
    if not file.is_file():
        raise LmlabError(f"{ckpt} has no config.yaml")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmlabError(f"cannot parse {file}: {e}") from None
    if not isinstance(data, dict):
        raise LmlabError(f"{file} must hold a mapping at the top level")
    return data


def read_model_config(ckpt: Path) -> ModelConfig:
    return from_dict(ModelConfig, read_config_dict(ckpt).get("model", {}), prefix="model.")


def load_model_dir(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer | None, Path]:
    """Model (eval mode), tokenizer (None for an image classifier, which reads no text) and the
    checkpoint directory of a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    model = build(read_model_config(ckpt))
    load_weights(model, ckpt / "model.safetensors")
    model.to(device).eval()
    reads_text = (ckpt / "tokenizer.json").is_file() or getattr(model, "objective", "causal") != "classify"
    return model, load_tokenizer(ckpt) if reads_text else None, ckpt


def load_weights(model: nn.Module, file: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except RuntimeError as e:  # shape mismatch
        first = str(e).strip().splitlines()
        raise LmlabError(f"checkpoint {file} does not match the model config: {first[-1] if first else e}") from None
    if missing or unexpected:
        raise LmlabError(f"checkpoint {file} does not match the model config: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
