"""Data parallelism on PyTorch's own engine, applied to a model from outside it.

`torchrun --nproc-per-node=N -m lmlab train ...` (and multi-node: `--nnodes`, `--rdzv-endpoint`) starts
N processes with RANK / WORLD_SIZE / LOCAL_RANK in their environment; the trainer reads them here,
joins the process group (gloo on CPU, NCCL on CUDA) and wraps the model in DistributedDataParallel
(`train.parallel=ddp`). Nothing else in lmlab knows about ranks.

The data order is defined by global sample index: `train.batch_size` is the *global* micro-batch, every
rank draws the same global batch from identically seeded samplers and keeps its own contiguous slice
of rows, so the ranks' data are disjoint, together equal the one-process stream, and a checkpoint (the
sampler's state is the same on every rank) resumes on any number of processes with the same global
batch. Gradients are averaged by DDP, which equals the global batch's mean loss when every row has
the same number of target tokens (true of LM windows; padded seq2seq pairs are weighted per rank).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

PARALLEL = ("ddp", "none")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes checkpoints."""
        return self.rank == 0


def world_from_env() -> World:
    """The torchrun environment, or a world of one."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    return World(int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def setup(world: World, device: torch.device, parallel: str) -> torch.device:
    """Join the process group when there is more than one process; the device this rank trains on."""
    if parallel not in PARALLEL:
        raise LmlabError(f"unknown train.parallel '{parallel}' ({' | '.join(PARALLEL)})")
    if world.size == 1:
        return device
    if parallel == "none":
        raise LmlabError(f"{world.size} processes were started (torchrun) but train.parallel=none; use "
                         "--train.parallel=ddp")
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log.info(f"rank {world.rank} of {world.size} on {device}")
    return device


def wrap(model: nn.Module, world: World, device: torch.device, parallel: str) -> nn.Module:
    """The module the training step calls: DDP around `model` (which stays the one saved and evaluated)."""
    if world.size == 1 or parallel == "none":
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def local_rows(batch, world: World):
    """This rank's contiguous share of a global batch ((x, y) windows or a dict of tensors)."""
    if world.size == 1:
        return batch
    first = batch[0] if isinstance(batch, tuple) else next(iter(batch.values()))
    n = first.shape[0]
    if n % world.size:
        raise LmlabError(f"train.batch_size={n} (the global batch) must be a multiple of the {world.size} processes")
    per = n // world.size
    rows = slice(world.rank * per, (world.rank + 1) * per)
    if isinstance(batch, tuple):
        return tuple(t[rows] for t in batch)
    return {k: v[rows] for k, v in batch.items()}


def barrier(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_mean(value: float, world: World) -> float:
    """The mean of a per-rank number over the ranks (the logged loss is the global batch's)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / world.size
