"""Checkpoints: directories written atomically, weights in safetensors, state loaded weights-only.

    run_dir/
      config.yaml  metrics.jsonl
      checkpoints/step-000500/
        model.safetensors  config.yaml  tokenizer.json  trainer_state.pt  info.json

A model sharded by FSDP over several processes is saved sharded instead: `dcp/` holds its weights and
optimizer state as `torch.distributed.checkpoint` writes them (each rank its own shard, rank 0 the
metadata), and trainer_state.pt the rest. Either kind resumes on any number of processes, sharded or
not (`load_training_state`); `consolidate` adds the usual model.safetensors to a sharded one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from lmlab.config import dump_yaml, from_dict
from lmlab.errors import LmlabError
from lmlab.io.checkpoint import (
    SHARDED,
    is_sharded,
    list_checkpoints,
    load_model_dir,
    load_sharded_weights,
    load_weights,
    read_config_dict,
    read_model_config,
    single_process_dcp,
)
from lmlab.models.registry import build
from lmlab.tokenizers import Tokenizer
from lmlab.train.config import RunConfig
from lmlab.train.distributed import World, broadcast_object
from lmlab.utils.atomic import atomic_dir, atomic_path


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, cfg: RunConfig, tokenizer_dir: Path,
                    trainer_state: dict[str, Any], info: dict[str, Any], keep: int = 0, *,
                    sharded_optimizer: torch.optim.Optimizer | None = None, world: World | None = None) -> Path:
    """Rank 0 alone calls this for a whole model; with `sharded_optimizer` (the model is sharded by FSDP)
    every rank does, each writing its shard into the temporary directory rank 0 makes (a filesystem all
    ranks share, as torch.distributed.checkpoint's file writer assumes), and rank 0 renames it."""
    world = world or World()
    path = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(path, replace=True) if world.main else contextlib.nullcontext() as tmp:
        if sharded_optimizer is not None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            tmp_all = Path(broadcast_object(str(tmp) if world.main else None, world))
            weights, optimizer = get_state_dict(model, sharded_optimizer)
            # returns once every rank's shard is written and rank 0 has written the metadata
            dcp.save({"model": weights, "optimizer": optimizer}, checkpoint_id=str(tmp_all / SHARDED))
        if world.main:
            if sharded_optimizer is None:
                save_model(model, str(tmp / "model.safetensors"))
            (tmp / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
            for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / name)
            torch.save(trainer_state, tmp / "trainer_state.pt")
            (tmp / "info.json").write_text(json.dumps({"step": step, **info}, indent=2), encoding="utf-8")
    if keep > 0 and world.main:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint's weights and optimizer state into `model` and `optimizer`, whichever way it was
    written (one process, DDP, FSDP on any number of ranks) and however `model` is split now; returns
    the rest of the trainer's state. Under torchrun every rank calls this."""
    state = load_trainer_state(ckpt)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if is_sharded(ckpt):
        import torch.distributed.checkpoint as dcp

        # this process's part of each tensor (all of it for a whole model), resharded from the saved ones
        weights, opt = get_state_dict(model, optimizer)
        with single_process_dcp():  # (when there is no process group)
            dcp.load({"model": weights, "optimizer": opt}, checkpoint_id=str(ckpt / SHARDED))
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=opt)
    elif not any(hasattr(p, "full_tensor") for p in model.parameters()):
        load_weights(model, ckpt / "model.safetensors")
        optimizer.load_state_dict(state["optimizer"])
    else:  # a whole checkpoint into a sharded model: every rank reads it and keeps its shard
        weights = load_file(str(ckpt / "model.safetensors"))
        expected = _tied_aliases(model)
        missing = sorted(k for k in expected if k not in weights and not expected[k] & weights.keys())
        if missing or weights.keys() - expected.keys():
            raise LmlabError(f"checkpoint {ckpt} does not match the model config: missing {missing[:5]}, "
                             f"unexpected {sorted(weights.keys() - expected.keys())[:5]}")
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=_by_name(state["optimizer"],
                       model, optimizer), options=StateDictOptions(full_state_dict=True, strict=False))
    return state


def _tied_aliases(model: nn.Module) -> dict[str, set[str]]:
    """Every state-dict name of `model` -> the other names of the same tensor (tied embeddings: safetensors
    stores one of them)."""
    names: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(name)
    out = {name: names.get(id(p), {name}) - {name} for name, p in model.named_parameters(remove_duplicate=False)}
    return out | {name: set() for name, _ in model.named_buffers() if name not in out}


def _by_name(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An `optimizer.state_dict()` (parameters numbered in param-group order) keyed by parameter name,
    as torch.distributed.checkpoint's `set_state_dict` takes it."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def consolidate(ckpt: str | Path) -> Path:
    """The usual model.safetensors next to a sharded checkpoint's `dcp/` (kept for resuming), in one
    process: what tools that read the file itself, or older lmlab versions, need."""
    ckpt = Path(ckpt)
    if not is_sharded(ckpt):
        raise LmlabError(f"{ckpt} is not a sharded checkpoint (no {SHARDED}/.metadata)")
    model = build(read_model_config(ckpt))
    load_sharded_weights(model, ckpt / SHARDED)
    with atomic_path(ckpt / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    return ckpt / "model.safetensors"


def read_run_config(path: Path) -> RunConfig:
    return from_dict(RunConfig, read_config_dict(path))


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, RunConfig, Tokenizer, Path]:
    """Model (eval mode), run config and tokenizer from a checkpoint or run directory."""
    model, tok, ckpt = load_model_dir(path, device)
    return model, read_run_config(ckpt), tok, ckpt


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
