"""Hugging Face model directories: config.json + safetensors weights (+ tokenizer.json), in and out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab.errors import LmlabError
from lmlab.io.hf.adapter import from_hf, to_hf
from lmlab.tokenizers import Tokenizer, load_tokenizer
from lmlab.utils.atomic import atomic_dir


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(path / f)))
        return sd
    other = "; it has only pickled weights, which lmlab does not load" if (path / "pytorch_model.bin").exists() else ""
    raise LmlabError(f"{path} has no model.safetensors{other}")


def load_hf_dir(path: str | Path, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, Tokenizer | None]:
    """(model in eval mode, tokenizer or None) from a Hugging Face model directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LmlabError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    model = from_hf(hf, _read_safetensors(path))
    if dtype is not None:
        model.to(dtype)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    return model, tokenizer


def save_hf_dir(model: nn.Module, path: str | Path, tokenizer: Tokenizer | None = None, *,
                overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`) as a directory `transformers` loads (AutoModelForCausalLM; for BERT
    AutoModelForMaskedLM, for BART AutoModelForSeq2SeqLM)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LmlabError(f"{path} already exists (pass overwrite=True to replace it)")
    extra: dict[str, Any] = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if tokenizer is not None:
        for role in ("bos", "eos", "pad"):
            extra[f"{role}_token_id"] = tokenizer.token_to_id(getattr(tokenizer.specials, role))
    config, sd = to_hf(model, **extra)
    with atomic_dir(path, replace=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.cpu() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(str(tmp))
    return path
