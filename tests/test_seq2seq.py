"""BART generation and seq2seq fine-tuning: greedy and beam search equal transformers' `generate` token
for token, sampling filters, JSONL pairs (errors name the line), resumable pair batches, and a BART
trained by `lmlab train --data.seq2seq=...` whose loss falls and which `lmlab generate` runs."""

import json

import numpy as np
import pytest
import torch
from peers import require_module

from lmlab.cli import main
from lmlab.data.objectives import make_sampler
from lmlab.data.prepare import PrepareConfig, prepare
from lmlab.data.seq2seq import PairBatches, read_pairs, split_pairs
from lmlab.data.stream import TokenSplit
from lmlab.data.synthetic import reversal_pairs, write_jsonl
from lmlab.errors import LmlabError
from lmlab.generate.seq2seq import Seq2SeqConfig, generate
from lmlab.io.hf import from_hf
from lmlab.models.transformer.bart import BART, BartConfig

transformers = require_module("transformers")
from transformers import BartConfig as HFBartConfig  # noqa: E402
from transformers import BartForConditionalGeneration  # noqa: E402

transformers.logging.set_verbosity_error()
V = 64
# transformers' defaults that lmlab does not have, switched off (BartConfig sets forced_eos_token_id)
HF_PLAIN = {"do_sample": False, "forced_bos_token_id": None, "forced_eos_token_id": None, "no_repeat_ngram_size": 0,
            "min_length": 0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = HFBartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                       max_position_embeddings=64, init_std=0.3)  # a large init: no near-ties between tokens
    hf = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.final_logits_bias.normal_()
        hf.final_logits_bias[0, cfg.eos_token_id] += 3.5  # so that some hypotheses end before the limit
    return hf, from_hf(hf.config.to_dict(), hf.state_dict())


def padded_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 7:], mask[2, 3:] = 0, 0
    return x, mask


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping",
                         [(1, 1.0, False), (4, 1.0, False), (4, 2.0, True), (3, 0.5, False), (2, -1.0, True)])
def test_greedy_and_beam_search_equal_transformers_generate(pair, num_beams, length_penalty, early_stopping):
    hf, ours = pair
    ended = []
    for seed in range(6):
        x, mask = padded_batch(seed)
        want = hf.generate(input_ids=x, attention_mask=mask, num_beams=num_beams, max_new_tokens=10,
                           length_penalty=length_penalty, early_stopping=early_stopping, **HF_PLAIN)
        cfg = Seq2SeqConfig(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty,
                            early_stopping=early_stopping)
        got = generate(ours, x, cfg, attention_mask=mask)
        assert got.tolist() == want.tolist(), f"seed {seed}"
        ended += ((got[:, 1:] == hf.config.eos_token_id).any(1)).tolist()
    assert any(ended) and not all(ended)  # both ways of finishing: </s>, and the length limit


def test_beam_search_finds_a_better_sequence_than_greedy(pair):
    """Beam search maximises sum log p / length: its result scores at least as well as greedy's."""
    hf, ours = pair
    x, mask = padded_batch(7)

    def score(out):
        with torch.no_grad():
            logp = ours(x, attention_mask=mask, decoder_input_ids=out[:, :-1]).logits.log_softmax(-1)
        tok = out[:, 1:]
        lp = logp.gather(-1, tok[..., None])[..., 0]
        real = torch.ones_like(tok, dtype=torch.bool)
        for r in range(len(tok)):  # up to and including the first </s>
            e = (tok[r] == hf.config.eos_token_id).nonzero()
            if len(e):
                real[r, int(e[0]) + 1:] = False
        return (lp * real).sum(1) / real.sum(1)

    greedy = generate(ours, x, Seq2SeqConfig(max_new_tokens=10), attention_mask=mask)
    beam = generate(ours, x, Seq2SeqConfig(max_new_tokens=10, num_beams=5), attention_mask=mask)
    assert (score(beam) >= score(greedy) - 1e-5).all() and (score(beam) > score(greedy) + 1e-3).any()


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, ours = pair
    x, mask = padded_batch(3)
    greedy = generate(ours, x, Seq2SeqConfig(max_new_tokens=8), attention_mask=mask)
    top1 = generate(ours, x, Seq2SeqConfig(max_new_tokens=8, temperature=1.5, top_k=1, seed=0), attention_mask=mask)
    assert top1.tolist() == greedy.tolist()
    cfg = Seq2SeqConfig(max_new_tokens=8, temperature=2.0, seed=4)
    a, b = (generate(ours, x, cfg, attention_mask=mask) for _ in range(2))
    assert a.tolist() == b.tolist() and a.tolist() != greedy.tolist()
    with pytest.raises(ValueError, match="beam search"):
        generate(ours, x, Seq2SeqConfig(num_beams=2, temperature=1.0))


def test_pairs_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a b", "target": "b a"}\n\n{"source": "c d"}\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r"bad\.jsonl:3: no field 'target'"):
        read_pairs(bad)
    bad.write_text('{"source": "a b", "target": "b a"}\n{"source": "c", "target": 3}\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r":2: field 'target' must be a non-empty string"):
        read_pairs(bad)
    bad.write_text('{"source": "a b", "target": "b a"\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r":1: invalid JSON"):
        read_pairs(bad)
    pairs = [(f"s{i}", f"t{i}") for i in range(100)]
    val, train = split_pairs(pairs, "val"), split_pairs(pairs, "train")
    assert len(val) == 5 and len(train) == 95 and not set(val) & set(train)


@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    """A reversal task over 8 words (3-5 per source) and a word tokenizer prepared from the sources."""
    root = tmp_path_factory.mktemp("reversal")
    pairs = write_jsonl(reversal_pairs(2000, seed=0, vocab=8, min_words=3, max_words=5), root / "pairs.jsonl")
    prepare(PrepareConfig(source=str(pairs), jsonl_field="source", out=str(root / "data"), tokenizer="word",
                          min_count=1, vocab_size=0))
    return pairs, root / "data"


def train_args(data, pairs, run, model: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), "--model", model, f"--data.seq2seq={pairs}",
            "--model.block_size=8", "--model.dropout=0.0", "--model.n_layer=1", "--model.n_dec_layer=1",
            "--model.n_head=4", "--train.batch_size=32", "--train.max_steps=150", "--train.lr=3e-3",
            "--train.warmup_steps=10", "--train.eval_interval=0", "--train.eval_iters=2",
            "--train.progress=false", "--train.log_interval=1", "--train.threads=1"]


def losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_pair_batches_resume_exactly(reversal):
    pairs, data = reversal
    split = TokenSplit(data, "train")
    model = BART(BartConfig(vocab_size=split.meta["vocab_size"], block_size=8, n_layer=1, n_dec_layer=1, n_head=2,
                            n_embd=16, mlp_hidden=32))
    a = make_sampler("random", split, model, 8, 4, seed=5, pairs=str(pairs))
    assert isinstance(a, PairBatches)
    batches = [a.next_batch() for _ in range(3)]
    b = make_sampler("random", split, model, 8, 4, seed=5, pairs=str(pairs))
    b.load_state_dict(json.loads(json.dumps({**a.state_dict(), "step": 2})))
    got = b.next_batch()
    assert all(torch.equal(got[k], batches[2][k]) for k in got)
    x = batches[0]
    assert set(x) == {"input_ids", "attention_mask", "targets"}
    rows = x["attention_mask"].sum(1)
    assert (x["input_ids"][torch.arange(4), rows - 1] == 3).all()  # every source ends with </s>
    assert ((x["targets"] == 3).sum(1) == 1).all()  # and every target
    assert model(**x).loss.isfinite()


def test_bart_fine_tunes_on_pairs_and_generates_from_the_cli(reversal, tmp_path, capsys):
    pairs, data = reversal
    run = tmp_path / "bart"
    assert main(train_args(data, pairs, run, "bart-tiny")) == 0
    loss = losses(run)
    print(f"seq2seq loss {np.mean(loss[:5]):.3f} -> {np.mean(loss[-5:]):.3f}")
    assert np.mean(loss[-5:]) < 0.6 * np.mean(loss[:5])
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "alfa bravo charlie", "--num_beams", "3"]) == 0
    words = capsys.readouterr().out.split()
    assert 1 <= len(words) <= 8 and all(w in "alfa bravo charlie delta echo foxtrot golf hotel".split() for w in words)
    assert main(["generate", str(run), "alfa bravo", "--temperature", "0.7", "--top_p", "0.9", "--seed", "1"]) == 0
    assert main(["generate", "--model", str(run), "alfa", "--mode", "nar"]) == 2
    assert "needs a conditional masked LM" in capsys.readouterr().err


def test_bad_pairs_file_fails_the_train_command(reversal, tmp_path, capsys):
    _, data = reversal
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "alfa", "target": "alfa"}\n{"src": "bravo", "target": "bravo"}\n', encoding="utf-8")
    assert main(train_args(data, bad, tmp_path / "run", "bart-tiny")) == 2
    assert f"{bad}:2: no field 'source'" in capsys.readouterr().err
    pairs, _ = reversal
    gpt = ["train", "--data", str(data), "--out", str(tmp_path / "gpt"), "--model", "tiny", f"--data.seq2seq={pairs}",
           "--train.progress=false"]
    assert main(gpt) == 2  # a decoder-only model has no pair objective
    assert "needs an encoder-decoder" in capsys.readouterr().err
