"""Data parallelism through torchrun (lmlab/train/distributed.py), two CPU processes on gloo: the same
parameters as one process on the same global batch, disjoint rank data, resumable across world sizes;
FSDP2 likewise, with sharded (DCP) checkpoints."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmlab.io.checkpoint import is_sharded, list_checkpoints, load_checkpoint_weights, read_model_config
from lmlab.models.registry import build
from lmlab.train.checkpoint import consolidate
from lmlab.train.distributed import World, local_rows

COMMON = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
          "--train.batch_size=8", "--train.max_steps=4", "--train.progress=false", "--train.log_interval=1",
          "--train.eval_interval=0", "--train.warmup_steps=1", "--train.threads=1", "--train.lr=3e-3"]


def lmlab(*args, procs: int = 1) -> None:
    """`lmlab ARGS` in one process, or under torchrun in `procs` (gloo on CPU)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                if procs > 1 else [sys.executable])
    r = subprocess.run([*launcher, "-m", "lmlab", "-q", *args], capture_output=True, text=True, timeout=300)
    if procs > 1 and r.returncode != 0 and "terminate called without an active exception" in r.stderr:
        # a rank aborted in C++ (a joinable std::thread destroyed: gloo's teardown), seen once in four CI runs
        # and never in isolation (3/3 passes); one retry, and any other failure fails at once
        r = subprocess.run([*launcher, "-m", "lmlab", "-q", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def train(data, out, *extra, procs: int = 1) -> None:
    lmlab("train", "--data", str(data), "--out", str(out), *COMMON, *extra, procs=procs)


def weights(run) -> dict[str, torch.Tensor]:
    """The latest checkpoint's weights, read as `lmlab generate` reads them (safetensors or sharded)."""
    ckpt = list_checkpoints(run)[-1]
    model = build(read_model_config(ckpt))
    load_checkpoint_weights(model, ckpt)
    return model.state_dict()


def losses(run, key: str = "loss") -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


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


FSDP = ("--train.parallel=fsdp", "--train.batch_size=4", "--train.grad_accum=2")


def test_fsdp_equals_one_process_and_resumes_across_world_sizes(char_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(char_data, one, *FSDP)  # one process: train.parallel=fsdp has nothing to shard
    train(char_data, two, *FSDP, procs=2)
    assert is_sharded(list_checkpoints(two)[-1]) and not is_sharded(list_checkpoints(one)[-1])
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    # gradients averaged, not summed, over the ranks (pytorch/pytorch#162338): Adam would hide a 2x
    # gradient in the weights, the norm shows it
    assert losses(two, "grad_norm") == pytest.approx(losses(one, "grad_norm"), rel=1e-5)
    assert_same_weights(one, two, tol=1e-4)  # accumulated in another order, see the DDP test
    # conversion to the usual checkpoint gives the same tensors as reading the shards
    ckpt = list_checkpoints(two)[-1]
    sharded = weights(two)
    consolidate(ckpt)
    got = load_file(str(ckpt / "model.safetensors"))
    assert got and all(torch.equal(got[k], sharded[k]) for k in got)  # (of tied tensors safetensors keeps one)
    # an interrupted sharded run resumed on 2 processes, or on 1, continues as if never stopped
    stopped = tmp_path / "stopped"
    train(char_data, stopped, *FSDP, "--train.stop_at_step=2", procs=2)
    shutil.copytree(stopped, tmp_path / "stopped-copy")
    for run, procs in ((stopped, 2), (tmp_path / "stopped-copy", 1)):
        lmlab("train", "--resume", str(run), "--train.stop_at_step=0", procs=procs)
        assert losses(run) == pytest.approx(losses(one), rel=1e-5)
        assert_same_weights(one, run, tol=1e-4)
    # and a one-process checkpoint resumed sharded on 2
    run = tmp_path / "from-one"
    train(char_data, run, *FSDP, "--train.stop_at_step=2")
    lmlab("train", "--resume", str(run), "--train.stop_at_step=0", procs=2)
    assert is_sharded(list_checkpoints(run)[-1])
    assert losses(run) == pytest.approx(losses(one), rel=1e-5)
    assert_same_weights(one, run, tol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_together(char_data, tmp_path):
    """`--nnodes=2`: two torchrun launchers, one process each, meet at a rendezvous and train as one
    2-process FSDP job, in bf16 (the mixed-precision policy) with activation checkpointing and the
    chunked loss, against one process in bf16."""
    one, two = tmp_path / "one", tmp_path / "two"
    bf16 = ("--train.dtype=bfloat16", "--train.max_steps=3")
    train(char_data, one, *bf16)
    port = _free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "lmlab", "-q", "train", "--data",
         str(char_data), "--out", str(two), *COMMON, *bf16, "--train.parallel=fsdp", "--train.checkpointing=true"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for p in launchers:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert is_sharded(list_checkpoints(two)[-1])
    # bf16 weights in the forward pass (FSDP's policy) round differently from autocast's bf16 matmuls
    # with float32 norms: close, not equal
    assert len(losses(two)) == 3
    assert losses(two) == pytest.approx(losses(one), rel=2e-2)


def test_sharded_checkpoint_of_another_shape_is_refused(tmp_path):
    """One process writes a DCP directory as a sharded run would; a model of another shape, or a
    checkpoint that is not sharded, gets one clear error."""
    import torch.distributed.checkpoint as dcp

    from lmlab.errors import LmlabError
    from lmlab.io.checkpoint import load_sharded_weights
    from lmlab.models.transformer.gpt import GPTConfig

    small = dict(n_layer=1, n_head=2, block_size=16, vocab_size=32)
    model = build(GPTConfig(**small, n_embd=16))
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    other = build(GPTConfig(**small, n_embd=16))
    load_sharded_weights(other, tmp_path / "dcp")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    with pytest.raises(LmlabError, match="does not match the model config"):
        load_sharded_weights(build(GPTConfig(**small, n_embd=32)), tmp_path / "dcp")
    with pytest.raises(LmlabError, match="not a sharded checkpoint"):
        consolidate(tmp_path / "dcp")  # (the shards themselves, not a checkpoint holding them)
