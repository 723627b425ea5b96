"""Checkpoints: directories written atomically, weights in safetensors, state loaded weights-only.

    run_dir/
      config.yaml  metrics.jsonl
      checkpoints/step-000500/
        model.safetensors  config.yaml  tokenizer.json  trainer_state.pt  info.json
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from lmlab.config import dump_yaml, from_dict
from lmlab.io.checkpoint import list_checkpoints, load_model_dir, read_config_dict
from lmlab.tokenizers import Tokenizer
from lmlab.train.config import RunConfig
from lmlab.utils.atomic import atomic_dir


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, cfg: RunConfig, tokenizer_dir: Path,
                    trainer_state: dict[str, Any], info: dict[str, Any], keep: int = 0) -> Path:
    path = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(path, replace=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "info.json").write_text(json.dumps({"step": step, **info}, indent=2), encoding="utf-8")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def read_run_config(path: Path) -> RunConfig:
    return from_dict(RunConfig, read_config_dict(path))


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, RunConfig, Tokenizer, Path]:
    """Model (eval mode), run config and tokenizer from a checkpoint or run directory."""
    model, tok, ckpt = load_model_dir(path, device)
    return model, read_run_config(ckpt), tok, ckpt


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
