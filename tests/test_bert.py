"""BERT: parity with live transformers BertForMaskedLM (fp32, 1e-5), the 80/10/10 masking collator,
pseudo-log-likelihood scoring, training through the shared trainer, and `lmlab fill-mask`."""

import json
import math

import numpy as np
import pytest
import torch
from peers import require_module

from lmlab.cli import main
from lmlab.data.mlm import MaskedWindows, MaskingConfig, mask_tokens
from lmlab.data.objectives import make_sampler
from lmlab.data.stream import RandomWindows, TokenSplit
from lmlab.eval.perplexity import evaluate_split
from lmlab.eval.pll import masked_accuracy, pseudo_token_nll
from lmlab.io.hf import from_hf, load_hf_dir, save_hf_dir
from lmlab.models.transformer.bert import BERT, BertConfig
from lmlab.train.checkpoint import load_checkpoint

transformers = require_module("transformers")
from transformers import AutoModelForMaskedLM, BertForMaskedLM  # noqa: E402
from transformers import BertConfig as HFBertConfig  # noqa: E402

transformers.logging.set_verbosity_error()
V, TOL = 64, {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = HFBertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=64, type_vocab_size=2, initializer_range=0.3)
    hf = BertForMaskedLM(cfg).eval()
    return hf, from_hf(hf.config.to_dict(), hf.state_dict())


@torch.no_grad()
def test_logits_equal_with_token_types(pair):
    hf, ours = pair
    x, tt = torch.randint(0, V, (3, 16)), torch.randint(0, 2, (3, 16))
    torch.testing.assert_close(ours(x).logits, hf(x).logits, **TOL)
    torch.testing.assert_close(ours(x, token_type_ids=tt).logits, hf(x, token_type_ids=tt).logits, **TOL)


@torch.no_grad()
def test_right_padded_batch_equals_transformers_on_real_tokens(pair):
    hf, ours = pair
    x, mask = torch.randint(0, V, (3, 16)), torch.ones(3, 16, dtype=torch.long)
    mask[0, 9:], mask[2, 4:] = 0, 0
    real = mask.bool()
    got, want = ours(x, attention_mask=mask).logits, hf(x, attention_mask=mask).logits
    torch.testing.assert_close(got[real], want[real], **TOL)
    # and a padded row scores its real tokens as the unpadded row alone does
    torch.testing.assert_close(got[2, :4], ours(x[2:, :4]).logits[0], **TOL)


def test_transformers_saved_directory_loads(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    model, _ = load_hf_dir(tmp_path)
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, **TOL)


def test_lmlab_trained_bert_saved_in_hf_format_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = BERT(BertConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = MaskingConfig(mask_id=4, vocab_size=V, special_ids=(0, 1, 2, 3, 4))
    for i in range(5):  # a few optimizer steps, so the weights (and the decoder bias) are not the init
        x, y = mask_tokens(torch.randint(5, V, (4, 16)), cfg, np.random.default_rng(i))
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert model.lm_head.bias.abs().sum() > 0
    out = save_hf_dir(model, tmp_path / "hf")
    hf = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    x, tt = torch.randint(0, V, (2, 16)), torch.randint(0, 2, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x, token_type_ids=tt).logits, hf(x, token_type_ids=tt).logits, **TOL)
        back, _ = load_hf_dir(out)
        torch.testing.assert_close(back(x).logits, hf(x).logits, **TOL)


def test_masking_follows_devlin_80_10_10_and_never_picks_specials():
    specials = (0, 1, 2, 3, 4)
    cfg = MaskingConfig(mask_id=4, vocab_size=100, special_ids=specials)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 100, (64, 256), generator=g)
    tokens[:, ::10] = 3  # a </s> every 10 tokens
    before = tokens.clone()
    x, y = mask_tokens(tokens, cfg, np.random.default_rng(0))
    assert torch.equal(tokens, before)
    chosen = y != -100
    assert not chosen[tokens == 3].any()
    assert torch.equal(y[chosen], tokens[chosen]) and torch.equal(x[~chosen], tokens[~chosen])
    n = int(chosen.sum())
    frac = n / int((tokens != 3).sum())
    masked = (x[chosen] == 4).sum().item() / n
    unchanged = (x[chosen] == tokens[chosen]).sum().item() / n
    random = 1 - masked - unchanged
    assert abs(frac - 0.15) < 0.01 and abs(masked - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.015
    assert abs(random - 0.1) < 0.015  # (a random token equal to the original counts as unchanged: ~1%)
    assert not np.isin(x[chosen & (x != 4) & (x != tokens)].numpy(), specials).any()


def test_mlm_sampler_is_chosen_by_the_model_and_resumes_exactly(char_data):
    data = TokenSplit(char_data, "train")
    model = BERT(BertConfig(vocab_size=data.meta["vocab_size"], block_size=32, n_layer=1, n_head=2, n_embd=16,
                            mlp_hidden=32))
    a = make_sampler("random", data, model, 32, 4, seed=3)
    assert isinstance(a, MaskedWindows)
    batches = [a.next_batch() for _ in range(4)]
    b = make_sampler("random", data, model, 32, 4, seed=3)
    b.next_batch()
    b.next_batch()
    c = make_sampler("random", data, model, 32, 4, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for want in batches[2:]:
        got = c.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    gpt_like = torch.nn.Linear(1, 1)  # no `objective`: next-token windows as they are
    assert isinstance(make_sampler("random", data, gpt_like, 32, 4, seed=3), RandomWindows)


@torch.no_grad()
def test_pseudo_log_likelihood_equals_masking_each_position_in_transformers(pair):
    hf, ours = pair
    tokens = np.random.default_rng(0).integers(5, V, size=23)
    got = pseudo_token_nll(ours, tokens, mask_id=4, block_size=10, batch_size=4)
    want = []
    for start in range(0, 23, 10):  # windows of 10, each position masked in turn
        w = torch.from_numpy(tokens[start:start + 10])
        for i in range(len(w)):
            x = w.clone()
            x[i] = 4
            want.append(-torch.log_softmax(hf(x[None]).logits[0, i], -1)[w[i]].item())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bert_tiny_trains_and_evaluates_and_fills_masks(char_data, tmp_path, capsys):
    run = tmp_path / "bert"
    rc = main(["train", "--data", str(char_data), "--out", str(run), "--model", "bert-tiny",
               "--model.block_size=32", "--model.dropout=0.0", "--train.batch_size=16", "--train.max_steps=60",
               "--train.lr=3e-3", "--train.warmup_steps=5", "--train.eval_interval=0", "--train.eval_iters=4",
               "--train.progress=false", "--train.log_interval=1", "--train.threads=1"])
    assert rc == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    first, last = np.mean(loss[:5]), np.mean(loss[-5:])
    print(f"MLM loss {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first

    model, cfg, tok, _ = load_checkpoint(run)
    val = TokenSplit(char_data, "val")
    acc = masked_accuracy(model, make_sampler("random", val, model, 32, 16, seed=0), n_batches=4)
    res = evaluate_split(model, val, block_size=32, batch_size=32, max_tokens=256)
    print(f"masked accuracy {acc['accuracy']:.3f}, PLL perplexity {res.perplexity:.2f}")
    # 60 steps end on the unigram plateau of MLM training (the loss leaves it after ~1,000 steps),
    # so the check is against a uniform guess over the vocabulary
    assert 0 < acc["accuracy"] < 1 and acc["masked_tokens"] > 0
    assert math.isfinite(res.perplexity) and res.perplexity < 0.5 * cfg.model.vocab_size

    capsys.readouterr()
    assert main(["fill-mask", str(run), "import the json m<mask>dule", "--top_k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mask 1: ") and out.count("'") >= 6
    assert main(["fill-mask", str(run), "no mask here"]) == 2


def test_bert_training_resumes_exactly(char_data, tmp_path):
    def train(run, *extra):
        return main(["train", "--data", str(char_data), "--out", str(run), "--model", "bert-tiny",
                     "--model.block_size=16", "--model.n_embd=32", "--train.batch_size=4", "--train.max_steps=8",
                     "--train.warmup_steps=2", "--train.eval_interval=0", "--train.eval_iters=1",
                     "--train.progress=false", "--train.log_interval=1", "--train.threads=1", *extra])

    def losses(run):
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert train(tmp_path / "full") == 0 and train(tmp_path / "part", "--train.stop_at_step=4") == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "--train.stop_at_step=0"]) == 0
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(part) == list(range(1, 9)) and all(abs(full[s] - part[s]) <= 1e-6 for s in full)
    assert main(["generate", str(tmp_path / "full"), "x"]) == 2  # not a causal LM: a clear error


def test_training_steps_follow_transformers(char_data):
    """The same MLM batches and AdamW steps from the same weights give transformers' losses: the
    masked-position loss, the tied decoder's gradient and the head match, not only the forward."""
    data = TokenSplit(char_data, "train")
    torch.manual_seed(0)
    hf = BertForMaskedLM(HFBertConfig(vocab_size=data.meta["vocab_size"], hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    ours = from_hf(hf.config.to_dict(), hf.state_dict()).train()
    sampler = make_sampler("random", data, ours, 32, 8, seed=0)
    opts = [torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0) for m in (ours, hf)]
    for _ in range(15):
        x, y = sampler.next_batch()
        a, b = ours(x, y).loss, hf(input_ids=x, labels=y).loss
        assert abs(a.item() - b.item()) < 1e-4
        for loss, opt in zip((a, b), opts):
            loss.backward()
            opt.step()
            opt.zero_grad()
