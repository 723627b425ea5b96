"""Data parallelism on PyTorch's own engine, applied to a model from outside it.

`torchrun --nproc-per-node=N -m lmlab train ...` (and multi-node: `--nnodes`, `--rdzv-endpoint`) starts
N processes with RANK / WORLD_SIZE / LOCAL_RANK in their environment; the trainer reads them here,
joins the process group (gloo on CPU, NCCL on CUDA) and either wraps the model in
DistributedDataParallel (`train.parallel=ddp`: every rank holds all weights and optimizer state) or
shards it with FSDP2 (`train.parallel=fsdp`: `fully_shard` on each transformer block, then on the root,
as torchtitan applies it; each rank keeps 1/N of every weight, gradient and optimizer moment, and
gathers a block's weights just before it runs). Nothing else in lmlab knows about ranks.

The data order is defined by global sample index: `train.batch_size` is the *global* micro-batch, every
rank draws the same global batch from identically seeded samplers and keeps its own contiguous slice
of rows, so the ranks' data are disjoint, together equal the one-process stream, and a checkpoint (the
sampler's state is the same on every rank) resumes on any number of processes with the same global
batch. Gradients are averaged by DDP, which equals the global batch's mean loss when every row has
the same number of target tokens (true of LM windows; padded seq2seq pairs are weighted per rank).
FSDP2 averages the same way: its reduce-scatter divides by the world size, on gloo too in torch 2.13
(pytorch/pytorch#162338 reported it summing there; tests/test_distributed.py compares the gradient norms
with one process, which would show that where Adam's scale invariance hides it in the weights).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

PARALLEL = ("ddp", "fsdp", "none")


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
                         "--train.parallel=ddp or fsdp")
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log.info(f"rank {world.rank} of {world.size} on {device}")
    return device


def fsdp_active(world: World, parallel: str) -> bool:
    """FSDP over more than one process: every rank must take part in each forward pass (evaluation
    too) and in each checkpoint, which is written sharded (lmlab/train/checkpoint.py)."""
    return world.size > 1 and parallel == "fsdp"


def wrap(model: nn.Module, world: World, device: torch.device, parallel: str, dtype: str = "float32") -> nn.Module:
    """The module the training step calls. DDP wraps `model`, which stays the one saved and evaluated;
    FSDP2 shards `model` in place (its parameters become DTensors) and returns it."""
    if world.size == 1 or parallel == "none":
        return model
    if parallel == "fsdp":
        return shard(model, dtype)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(model: nn.Module, dtype: str = "float32") -> nn.Module:
    """FSDP2 from outside the model: each transformer block is one unit (its weights are gathered just
    before it runs and freed after), the root holds the rest (embeddings, final norm, the tied output
    layer). Under bf16/fp16 the gathered weights are cast to that dtype (half the all-gather traffic and
    memory) while gradients are reduced and the sharded weights and Adam moments kept in float32, the
    mixed precision of torchtitan and of Micikevicius et al. 2018."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lmlab.nn.block import Block

    low = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    policy = MixedPrecisionPolicy(param_dtype=low.get(dtype), reduce_dtype=torch.float32 if dtype in low else None)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        log.warning("fsdp: %s has no transformer blocks; the whole model is one unit", type(model).__name__)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def gradient_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation: reduce gradients across processes only when `sync` (the last micro-step)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: unsharded gradients accumulate locally
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def local_value(t: torch.Tensor) -> float:
    """A number that may be a DTensor (the gradient norm of sharded parameters) as a Python float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every rank (a checkpoint's temporary directory name)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
