"""Mask-predict: the re-masking schedule, lengths, the conditional masked LM's bidirectional decoder
and its training (masked-token + length loss falls), and `lmlab generate --mode nar`."""

import json

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.data.prepare import PrepareConfig, prepare
from lmlab.data.seq2seq import PairConfig, collate
from lmlab.data.synthetic import WORDS, reversal_pairs, write_jsonl
from lmlab.generate.nar import MaskPredictConfig, mask_predict, remask_count
from lmlab.models.transformer.bart import BART
from lmlab.models.transformer.cmlm import CMLM, CMLMConfig

V = 40


def tiny_cmlm(seed: int = 0, **kw) -> CMLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, block_size=16, n_layer=1, n_dec_layer=2, n_head=2, n_embd=32, mlp_hidden=64,
               dropout=0.0, init_std=0.2)
    return CMLM(CMLMConfig(**{**cfg, **kw})).eval()


def test_remask_schedule_decays_linearly():
    L = torch.tensor([10, 7, 1])
    assert [remask_count(L, t, 4).tolist() for t in (1, 2, 3)] == [[7, 5, 0], [5, 3, 0], [2, 1, 0]]
    assert remask_count(torch.tensor([9]), 1, 1).tolist() == [0]


def test_mask_predict_remasks_the_scheduled_number_and_keeps_the_lengths():
    model = tiny_cmlm()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, V, (3, 9), generator=g)
    mask = torch.ones_like(x)
    mask[2, 4:] = 0
    lengths = torch.tensor([6, 11, 3])
    out = mask_predict(model, x, MaskPredictConfig(iterations=5), attention_mask=mask, lengths=lengths)
    assert out.lengths.tolist() == [6, 11, 3] and out.tokens.shape == (3, 11)
    assert len(out.n_masked) == 4
    for t, n in enumerate(out.n_masked, 1):
        assert n.tolist() == remask_count(lengths, t, 5).tolist()
    for r, n in enumerate(lengths.tolist()):
        assert (out.tokens[r, n:] == 0).all()  # <pad> beyond the length
        assert not np.isin(out.tokens[r, :n].numpy(), [0, 3, 4]).any()  # never <pad>, </s> or <mask>
    assert (out.scores <= 0).all()
    # one iteration: every position predicted once, from an all-mask target (nothing re-masked)
    once = mask_predict(model, x, MaskPredictConfig(iterations=1), attention_mask=mask, lengths=lengths)
    assert once.n_masked == []


def test_length_comes_from_the_length_head_and_the_length_beam_picks_among_its_top_lengths():
    model = tiny_cmlm(2)
    with torch.no_grad():
        model.length_head.bias.zero_()
        model.length_head.bias[[4, 6, 9]] = torch.tensor([8.0, 7.0, 6.0])  # a clear preference: 4, then 6, 9
    x = torch.randint(5, V, (2, 7), generator=torch.Generator().manual_seed(3))
    out = mask_predict(model, x, MaskPredictConfig(iterations=2))
    assert out.lengths.tolist() == [4, 4]
    beam = mask_predict(model, x, MaskPredictConfig(iterations=2, length_beam=3))
    assert set(beam.lengths.tolist()) <= {4, 6, 9}
    for r in range(2):  # the chosen candidate has the best mean log-probability of the three
        alone = [mask_predict(model, x[r:r + 1], MaskPredictConfig(iterations=2), lengths=torch.tensor([n])).scores
                 for n in (4, 6, 9)]
        assert beam.scores[r].item() == pytest.approx(max(s.item() for s in alone), abs=1e-5)


def test_the_cmlm_decoder_is_bidirectional_and_barts_is_causal():
    cmlm = tiny_cmlm()
    bart = BART(cmlm.config)
    bart.load_state_dict(cmlm.state_dict(), strict=False)
    bart.eval()
    x = torch.randint(5, V, (1, 6))
    d = torch.randint(5, V, (1, 5))
    d2 = d.clone()
    d2[0, -1] = 4 if int(d[0, -1]) != 4 else 5
    with torch.no_grad():
        for model, sees_future in ((cmlm, True), (bart, False)):
            a, b = (model(x, decoder_input_ids=y).logits[0, 0] for y in (d, d2))
            assert (not torch.allclose(a, b)) == sees_future


def test_cmlm_trains_and_its_loss_falls():
    """Masked-token CE + length CE on a reversal task, from the collator's masked batches."""
    torch.manual_seed(0)
    words = {w: i + 5 for i, w in enumerate(WORDS[:8])}
    pairs = [([words[w] for w in p["source"].split()] + [3], [words[w] for w in p["target"].split()])
             for p in reversal_pairs(512, seed=1, vocab=8, min_words=3, max_words=5)]
    cfg = PairConfig(pad_id=0, eos_id=3, mask_id=4, block_size=16, masked=True)
    model = tiny_cmlm(n_embd=64, n_head=4, mlp_hidden=128).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    tok_loss, len_loss = [], []
    for _ in range(80):
        batch = collate([pairs[i] for i in rng.integers(0, len(pairs), 32)], cfg, rng)
        n_masked = (batch["targets"] != -100).sum(1)
        assert ((n_masked >= 1) & (n_masked <= batch["target_lengths"])).all()
        assert ((batch["decoder_input_ids"] == 4) == (batch["targets"] != -100)).all()
        out = model(**batch)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        tok_loss.append(out.loss.item())
        len_loss.append(out.aux_loss.item() / model.config.length_loss_weight)
    print(f"CMLM token loss {np.mean(tok_loss[:5]):.3f} -> {np.mean(tok_loss[-5:]):.3f}, "
          f"length loss {np.mean(len_loss[:5]):.3f} -> {np.mean(len_loss[-5:]):.3f}")
    assert np.mean(tok_loss[-5:]) < 0.8 * np.mean(tok_loss[:5])
    assert np.mean(len_loss[-5:]) < 0.3 * np.mean(len_loss[:5])  # the length is the source's: easy


@pytest.fixture(scope="module")
def cmlm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmlm")
    pairs = write_jsonl(reversal_pairs(1000, seed=0, vocab=8, min_words=3, max_words=5), root / "pairs.jsonl")
    prepare(PrepareConfig(source=str(pairs), jsonl_field="source", out=str(root / "data"), tokenizer="word",
                          min_count=1, vocab_size=0))
    run = root / "run"
    rc = main(["train", "--data", str(root / "data"), "--out", str(run), "--model", "cmlm-tiny",
               f"--data.seq2seq={pairs}", "--model.block_size=8", "--model.dropout=0.0", "--model.n_layer=1",
               "--model.n_dec_layer=1", "--model.n_head=4", "--train.batch_size=32", "--train.max_steps=60",
               "--train.lr=3e-3", "--train.warmup_steps=10", "--train.eval_interval=0", "--train.eval_iters=2",
               "--train.progress=false", "--train.log_interval=1", "--train.threads=1"])
    assert rc == 0
    return run


def test_cmlm_trains_through_lmlab_train_and_generates_with_mode_nar(cmlm_run, capsys):
    loss = [json.loads(ln)["loss"] for ln in (cmlm_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert np.mean(loss[-5:]) < np.mean(loss[:5])
    capsys.readouterr()
    assert main(["generate", "--model", str(cmlm_run), "--mode", "nar", "--iterations", "4", "alfa bravo charlie"]) == 0
    words = capsys.readouterr().out.split()
    assert 1 <= len(words) <= 8 and all(w in WORDS[:8] for w in words)
    assert main(["generate", str(cmlm_run), "alfa bravo", "--iterations", "2", "--length_beam", "3"]) == 0
    assert main(["generate", "--model", str(cmlm_run), "alfa", "--mode", "ar"]) == 2
    assert main(["generate", "--model", str(cmlm_run), "alfa", "--iterations", "0"]) == 2
    assert "--iterations" in capsys.readouterr().err


def test_cmlm_without_pairs_is_an_error(cmlm_run, tmp_path, capsys):
    from lmlab.io.checkpoint import resolve_checkpoint
    from lmlab.train.checkpoint import read_run_config

    data = read_run_config(resolve_checkpoint(cmlm_run)).data.dir
    assert main(["train", "--data", data, "--out", str(tmp_path / "r"), "--model", "cmlm-tiny",
                 "--model.block_size=8", "--train.progress=false"]) == 2
    assert "data.seq2seq" in capsys.readouterr().err
