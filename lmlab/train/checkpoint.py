"""Checkpoints: directories written atomically, weights in safetensors, state loaded weights-only.

    run_dir/
      config.yaml  metrics.jsonl
      checkpoints/step-000500/
        model.safetensors  config.yaml  tokenizer.json  trainer_state.pt  info.json
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model
from torch import nn

from lmlab.config import dump_yaml, from_dict
from lmlab.errors import LmlabError
from lmlab.io.atomic import atomic_dir
from lmlab.models.registry import build
from lmlab.tokenizers import Tokenizer, load_tokenizer
from lmlab.train.config import RunConfig

_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, cfg: RunConfig, tokenizer_dir: Path,
                    trainer_state: dict[str, Any], info: dict[str, Any], keep: int = 0) -> Path:
    path = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(path, replace=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "info.json").write_text(json.dumps({"step": step, **info}, indent=2), encoding="utf-8")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


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


def read_run_config(path: Path) -> RunConfig:
    file = path / "config.yaml"
    if not file.is_file():
        raise LmlabError(f"{path} has no config.yaml")
    data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    return from_dict(RunConfig, data)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, RunConfig, Tokenizer, Path]:
    """Model (eval mode), run config and tokenizer from a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    cfg = read_run_config(ckpt)
    model = build(cfg.model)
    load_weights(model, ckpt / "model.safetensors")
    model.to(device).eval()
    return model, cfg, load_tokenizer(ckpt), ckpt


def load_weights(model: nn.Module, file: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except RuntimeError as e:  # shape mismatch
        first = str(e).strip().splitlines()
        raise LmlabError(f"checkpoint {file} does not match the model config: {first[-1] if first else e}") from None
    if missing or unexpected:
        raise LmlabError(f"checkpoint {file} does not match the model config: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
