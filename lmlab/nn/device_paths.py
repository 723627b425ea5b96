"""Which training kernels a tensor gets: lmlab's CPU-tuned autograd Functions, or PyTorch's own ops.

The CPU paths (GELU in cache-sized chunks keeping its derivative, lmlab/nn/mlp.py; causal attention as
bf16 batched matmuls, lmlab/nn/attention.py) win on a CPU, where every op runs on the host anyway. On
a GPU the same code issues many small kernels (issue 22 measured 155k launches in 3 steps of a
gpt2-124m shape on an H200: 1 s of host time per step against 150 ms of GPU work), and under
`torch.compile` a hand-written autograd Function is a unit Inductor cannot fuse into its neighbours.
So they are taken for CPU tensors in eager mode only; everywhere else PyTorch's fused ops (F.gelu,
SDPA: flash attention on CUDA). `forced("generic")` takes the other path on CPU tensors, so tests can
compare the two paths' results and count their operators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PATHS = ("cpu", "generic")
_forced: str | None = None


def cpu_kernels(t: torch.Tensor) -> bool:
    """Whether the CPU-tuned training kernels run on `t`."""
    if _forced is not None:
        return _forced == "cpu"
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: autocast's where it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


@contextlib.contextmanager
def forced(path: str) -> Iterator[None]:
    """Take `path` ("cpu" | "generic") whatever the device (for tests and benchmarks)."""
    global _forced
    if path not in PATHS:
        raise ValueError(f"unknown kernel path '{path}' ({' | '.join(PATHS)})")
    old, _forced = _forced, path
    try:
        yield
    finally:
        _forced = old
