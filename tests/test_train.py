import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.data.stream import TokenSplit
from lmlab.eval.perplexity import evaluate_split, unigram_baseline
from lmlab.io.checkpoint import list_checkpoints
from lmlab.train.checkpoint import load_checkpoint

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.batch_size=4", "--train.progress=false", "--train.log_interval=1", "--train.eval_iters=2",
        "--train.warmup_steps=5"]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_end_to_end_training_beats_unigram_entropy_by_30_percent(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--data", str(char_data), "--out", str(run), "--model.n_layer=2", "--model.n_head=4",
               "--model.n_embd=128", "--model.block_size=64", "--train.batch_size=16", "--train.max_steps=600",
               "--train.lr=3e-3", "--train.min_lr=3e-4", "--train.warmup_steps=20", "--train.eval_interval=0",
               "--train.progress=false", "--train.dtype=bfloat16"])
    assert rc == 0
    model, cfg, tok, ckpt = load_checkpoint(run)
    val = TokenSplit(char_data, "val")
    ours = evaluate_split(model, val, block_size=cfg.model.block_size, batch_size=32)
    entropy = unigram_baseline(TokenSplit(char_data, "train"), val).loss
    print(f"val loss {ours.loss:.3f} vs unigram entropy {entropy:.3f}")
    assert ours.loss <= 0.7 * entropy
    assert (run / "config.yaml").is_file() and "n_embd: 128" in (run / "config.yaml").read_text()
    assert "n_embd: 128" in capsys.readouterr().out  # the config is printed at start


def _train(data, run, steps, *extra):
    return main(["train", "--data", str(data), "--out", str(run), *TINY, f"--train.max_steps={steps}",
                 "--train.ckpt_interval=5", "--train.eval_interval=7", "--model.dropout=0.1", *extra])


def test_resume_after_clean_stop_is_exact(char_data, tmp_path):
    assert _train(char_data, tmp_path / "full", 20) == 0
    assert _train(char_data, tmp_path / "part", 20, "--train.stop_at_step=8") == 0
    assert max(losses(tmp_path / "part")) == 8
    assert main(["train", "--resume", str(tmp_path / "part"), "--train.stop_at_step=0"]) == 0
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(part) == list(range(1, 21))
    for step in range(1, 21):
        assert abs(full[step] - part[step]) <= 1e-6, step


SLOW_CHILD = """
import sys, time
from lmlab.train import trainer
orig = trainer.Trainer._log_metrics
def slow(self, row):
    orig(self, row)
    time.sleep(0.05)
trainer.Trainer._log_metrics = slow
from lmlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill_is_exact(char_data, tmp_path):
    args = ["train", "--data", str(char_data), *TINY, "--train.max_steps=40", "--train.ckpt_interval=5",
            "--train.eval_interval=7", "--model.dropout=0.1", "--train.grad_accum=2", "--data.sampler=sequential"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *args, "--out", str(run)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = list_checkpoints(run)
        if ck and ck[-1].name >= "step-000015":
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    ckpts = list_checkpoints(run)
    assert 15 <= int(ckpts[-1].name.split("-")[1]) < 40
    assert main(["train", "--resume", str(run)]) == 0
    full, resumed = losses(tmp_path / "full"), losses(run)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(full[step] - resumed[step]) <= 1e-6, step


def test_existing_run_directory_is_never_overwritten(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(char_data, run, 3) == 0
    before = (run / "metrics.jsonl").read_text()
    assert _train(char_data, run, 3) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before


def test_eval_scores_every_token_and_reports_bits_per_byte(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(char_data, run, 5) == 0
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(run), "--split", "val", "--json", str(out_json), "--baseline"]) == 0
    res = json.loads(out_json.read_text())
    val = TokenSplit(char_data, "val")
    assert res["tokens"] == len(val) and res["bytes"] == val.n_bytes
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * res["tokens"] / (math.log(2) * res["bytes"]))
    model, cfg, _, _ = load_checkpoint(run)
    strided = evaluate_split(model, val, block_size=cfg.model.block_size, stride=8)
    assert strided.tokens == res["tokens"]
    assert strided.loss < res["loss"]  # more context per scored token


def test_eval_windows_match_a_direct_computation(char_data, tmp_path):
    import numpy as np
    import torch

    from lmlab.eval.perplexity import token_nll

    run = tmp_path / "run"
    assert _train(char_data, run, 2) == 0
    model, cfg, _, _ = load_checkpoint(run)
    toks = TokenSplit(char_data, "val").tokens()[:20]
    nll = token_nll(model, toks, bos=3, block_size=32, stride=32)
    seq = torch.tensor([[3, *toks.tolist()]])
    logp = model(seq).logits.log_softmax(-1)[0, :-1]
    direct = -logp.gather(1, seq[0, 1:, None])[:, 0].double().detach().numpy()
    np.testing.assert_allclose(nll, direct, rtol=1e-5, atol=1e-6)


def test_data_seed_fixes_the_data_order_and_leaves_the_initialisation_to_seed(char_data, tmp_path):
    import torch

    from lmlab.errors import LmlabError
    from lmlab.train.config import DataConfig, RunConfig, TrainConfig
    from lmlab.train.trainer import Trainer

    def build(seed: int, data_seed: int, name: str) -> Trainer:
        cfg = RunConfig(data=DataConfig(dir=str(char_data)),
                        train=TrainConfig(seed=seed, data_seed=data_seed, batch_size=4, progress=False))
        cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size = 1, 2, 16, 16
        return Trainer(cfg, tmp_path / name, quiet=True)

    a, b, c = build(1, 7, "a"), build(2, 7, "b"), build(1, -1, "c")
    first = [t.sampler.next_batch() for t in (a, b, c)]
    xa, xb, xc = (batch[0] if isinstance(batch, tuple) else batch["input_ids"] for batch in first)
    assert torch.equal(xa, xb)          # same data_seed: the same windows in the same order
    assert not torch.equal(xa, xc)      # data_seed -1 follows seed (1 here), another order than 7
    wa, wb = (next(t.model.parameters()) for t in (a, b))
    assert not torch.equal(wa, wb)      # the initialisation still follows seed
    with pytest.raises(LmlabError, match="data_seed"):
        build(1, -5, "d")
