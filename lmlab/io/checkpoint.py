"""Reading lmlab checkpoints: `step-N/` directories holding model.safetensors, config.yaml and the tokenizer.

A run trained with FSDP over several processes writes its weights sharded instead, as a
`torch.distributed.checkpoint` directory `dcp/` (keys `model.*` and `optimizer.*`, one file per rank);
the loaders here read either, so `lmlab generate`, `eval` and the rest need no conversion.

Writing them, with the trainer's state, is lmlab/train/checkpoint.py's job; reading the model back is
here so that everything above `io` (evaluation, generation, the server) loads through one place.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
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
SHARDED = "dcp"  # a checkpoint's sharded weights and optimizer state (torch.distributed.checkpoint)


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDED / ".metadata").is_file()


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
    if (p / "model.safetensors").is_file() or is_sharded(p):
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise LmlabError(f"{p} holds no checkpoint (expected model.safetensors, {SHARDED}/ or checkpoints/step-*/)")
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
    from lmlab.io.peft import apply_run_lora

    ckpt = resolve_checkpoint(path)
    model = apply_run_lora(build(read_model_config(ckpt)), read_config_dict(ckpt).get("lora"))  # a LoRA run's layers
    load_checkpoint_weights(model, ckpt)
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


def load_checkpoint_weights(model: nn.Module, ckpt: Path) -> None:
    """A checkpoint's weights into a whole (unsharded) model: model.safetensors, else the sharded `dcp/`."""
    if (Path(ckpt) / "model.safetensors").is_file() or not is_sharded(ckpt):
        load_weights(model, Path(ckpt) / "model.safetensors")
    else:
        load_sharded_weights(model, Path(ckpt) / SHARDED)


def load_sharded_weights(model: nn.Module, path: Path) -> None:
    """A `torch.distributed.checkpoint` directory's `model.*` tensors into a whole model, in this process
    alone (no process group): written by any number of ranks, read here as one."""
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    saved = {k.removeprefix("model."): m for k, m in dcp.FileSystemReader(str(path)).read_metadata()
             .state_dict_metadata.items() if k.startswith("model.")}
    missing, unexpected = sorted(state.keys() - saved.keys()), sorted(saved.keys() - state.keys())
    wrong = [k for k in state.keys() & saved.keys() if tuple(getattr(saved[k], "size", ())) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise LmlabError(f"sharded checkpoint {path} does not match the model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shapes {sorted(wrong)[:5]}")
    with single_process_dcp():
        dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """torch.distributed.checkpoint without a process group warns that it is "assuming the intent is to
    load in a single process": here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield
