"""Activation checkpointing applied from outside the model (lmlab/train/checkpointing.py): the same
losses and gradients, less saved for the backward pass, plain parameter names in checkpoints."""

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.io.load import load_model
from lmlab.models.registry import build, preset
from lmlab.train.checkpointing import checkpoint_blocks


def _pair(name: str):
    cfg = preset(name)
    cfg.vocab_size, cfg.n_layer = 61, 3
    torch.manual_seed(0)
    plain = build(cfg)
    wrapped = build(cfg)
    wrapped.load_state_dict(plain.state_dict())
    assert checkpoint_blocks(wrapped) > 0
    return plain.train(), wrapped.train()


def _batch(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, 61, (2, 24), generator=g)
    if name.startswith("bart"):
        return {"input_ids": x, "targets": torch.randint(5, 61, (2, 16), generator=g)}
    return {"input_ids": x[:, :-1], "targets": x[:, 1:]}


def _saved_bytes(model, batch) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes autograd keeps for the backward pass outside checkpointed regions."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    torch.manual_seed(2)  # the same dropout masks in both models; the recompute must replay them
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    return loss, total


@pytest.mark.parametrize("name", ["tiny", "llama-tiny", "bert-tiny", "bart-tiny"])
def test_same_loss_and_gradients_with_less_saved(name):
    plain, wrapped = _pair(name)
    batch = _batch(name)
    a, saved_plain = _saved_bytes(plain, batch)
    b, saved_wrapped = _saved_bytes(wrapped, batch)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    a.backward()
    b.backward()
    for (k, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=k)
    assert saved_wrapped < 0.5 * saved_plain, (saved_wrapped, saved_plain)


def test_training_with_checkpointing_saves_plain_names_and_matches(char_data, tmp_path):
    common = ["train", "--data", str(char_data), "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32",
              "--model.block_size=32", "--train.batch_size=4", "--train.max_steps=4", "--train.progress=false",
              "--train.log_interval=1", "--train.eval_interval=0", "--train.warmup_steps=1"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "ckpt"), "--train.checkpointing=true"]) == 0

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    loaded = load_model(tmp_path / "ckpt")  # the one loader reads it: the saved names are the plain ones
    assert not any("checkpoint" in k for k in loaded.model.state_dict())
