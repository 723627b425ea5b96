"""Data parallelism through torchrun (lmlab/train/distributed.py), two CPU processes on gloo: the same
parameters as one process on the same global batch, disjoint rank data, resumable across world sizes."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmlab.io.checkpoint import list_checkpoints
from lmlab.train.distributed import World, local_rows

COMMON = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
          "--train.batch_size=8", "--train.max_steps=4", "--train.progress=false", "--train.log_interval=1",
          "--train.eval_interval=0", "--train.warmup_steps=1", "--train.threads=1", "--train.lr=3e-3"]


def lmlab(*args, procs: int = 1) -> None:
    """`lmlab ARGS` in one process, or under torchrun in `procs` (gloo on CPU)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                if procs > 1 else [sys.executable])
    r = subprocess.run([*launcher, "-m", "lmlab", "-q", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def train(data, out, *extra, procs: int = 1) -> None:
    lmlab("train", "--data", str(data), "--out", str(out), *COMMON, *extra, procs=procs)


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


def losses(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_same_weights(a, b, tol: float = 1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def test_rank_rows_are_disjoint_and_cover_the_global_batch():
    x, y = torch.arange(16).view(8, 2), torch.arange(16, 32).view(8, 2)
    parts = [local_rows((x, y), World(r, 2)) for r in range(2)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), x)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), y)
    d = local_rows({"input_ids": x}, World(1, 4))
    assert d["input_ids"].tolist() == x[2:4].tolist()


def test_ddp_equals_one_process_and_resumes_across_world_sizes(char_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(char_data, one)
    train(char_data, two, procs=2)
    assert_same_weights(one, two)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    # gradient accumulation, synchronised on the last micro-batch only, equals one process accumulating
    accum = ("--train.batch_size=4", "--train.grad_accum=2")
    train(char_data, tmp_path / "accum-1", *accum)
    train(char_data, tmp_path / "accum-2", *accum, procs=2)
    # (summed in another order; Adam's normalisation magnifies that where a gradient is near zero: one
    # weight in 4,096 moves 1.1e-5 after 4 steps)
    assert_same_weights(tmp_path / "accum-1", tmp_path / "accum-2", tol=1e-4)
    # a checkpoint written by 2 ranks resumes in 1 process, and one written by 1 process in 2
    for first, then in ((2, 1), (1, 2)):
        run = tmp_path / f"resume-{first}-{then}"
        train(char_data, run, "--train.stop_at_step=2", procs=first)
        lmlab("train", "--resume", str(run), "--train.stop_at_step=0", procs=then)
        assert_same_weights(one, run)
