"""BART: parity with live transformers BartForConditionalGeneration (fp32, 1e-5) with and without the
decoder KV cache, greedy generation equal to `generate`, HF export, text infilling, training."""

import json

import numpy as np
import pytest
import torch
from peers import require_module

from lmlab.cli import main
from lmlab.data.denoise import DenoiseConfig, DenoisingWindows, corrupt, infill, permute_sentences
from lmlab.data.objectives import make_sampler
from lmlab.data.stream import TokenSplit
from lmlab.generate.seq2seq import greedy_generate
from lmlab.io.hf import from_hf, load_hf_dir, save_hf_dir
from lmlab.models.transformer.bart import BART, BartConfig
from lmlab.train.checkpoint import load_checkpoint

transformers = require_module("transformers")
from transformers import AutoModelForSeq2SeqLM, BartForConditionalGeneration  # noqa: E402
from transformers import BartConfig as HFBartConfig  # noqa: E402

transformers.logging.set_verbosity_error()
V, TOL = 64, {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = HFBartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                       max_position_embeddings=64, init_std=0.3, forced_eos_token_id=None)
    hf = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.final_logits_bias.normal_()  # zeros at init; make the mapping visible,
        hf.final_logits_bias[0, cfg.eos_token_id] += 3.0  # and let some generations end early
    return hf, from_hf(hf.config.to_dict(), hf.state_dict())


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, d = torch.randint(3, V, (3, 12), generator=g), torch.randint(3, V, (3, 9), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:], mask[2, 3:] = 0, 0
    return x, d, mask


@torch.no_grad()
def test_logits_equal_with_and_without_encoder_padding(pair):
    hf, ours = pair
    x, d, mask = inputs()
    torch.testing.assert_close(ours(x, decoder_input_ids=d).logits, hf(input_ids=x, decoder_input_ids=d).logits, **TOL)
    torch.testing.assert_close(ours(x, attention_mask=mask, decoder_input_ids=d).logits,
                               hf(input_ids=x, attention_mask=mask, decoder_input_ids=d).logits, **TOL)


@torch.no_grad()
def test_decoder_kv_cache_prefill_then_one_token_at_a_time(pair):
    hf, ours = pair
    x, d, mask = inputs(1)
    want = hf(input_ids=x, attention_mask=mask, decoder_input_ids=d).logits
    cross = ours.cross_kv(ours.encode(x, mask))  # once for the whole decode
    cache = ours.make_kv_cache(3)
    got = [ours.decode(d[:, :4], cross, attention_mask=mask, kv_cache=cache)]
    got += [ours.decode(d[:, t:t + 1], cross, attention_mask=mask, kv_cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, **TOL)


@torch.no_grad()
def test_greedy_generation_equals_transformers_generate(pair):
    hf, ours = pair
    x, _, mask = inputs(2)
    want = hf.generate(input_ids=x, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=12)
    got = greedy_generate(ours, x, attention_mask=mask, max_new_tokens=12)
    assert got.tolist() == want.tolist()
    ended = (got == hf.config.eos_token_id)[:, 1:].any(1)
    assert ended.any() and not ended.all()  # one row stops early and is padded, the others run on
    for r in range(3):  # and each row alone, unpadded
        n = int(mask[r].sum())
        alone = hf.generate(input_ids=x[r:r + 1, :n], do_sample=False, num_beams=1, max_new_tokens=12)
        assert greedy_generate(ours, x[r:r + 1, :n], max_new_tokens=12).tolist() == alone.tolist()


def test_transformers_saved_directory_loads_and_lmlab_export_loads_in_transformers(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path / "theirs")
    model, _ = load_hf_dir(tmp_path / "theirs")
    x, d, _ = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, decoder_input_ids=d).logits, hf(input_ids=x, decoder_input_ids=d).logits,
                                   **TOL)
    torch.manual_seed(0)  # an lmlab-trained BART, exported
    ours = BART(BartConfig(vocab_size=V, block_size=32, n_layer=2, n_dec_layer=1, n_head=2, n_embd=32,
                           mlp_hidden=64))
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    cfg = DenoiseConfig(mask_id=4, pad_id=0, eos_id=3, special_ids=(0, 1, 2, 3, 4))
    for i in range(5):
        xb, yb = corrupt(torch.randint(5, V, (4, 16)), cfg, np.random.default_rng(i))
        ours(xb, yb).loss.backward()
        opt.step()
        opt.zero_grad()
    ours.eval()
    out = save_hf_dir(ours, tmp_path / "ours")
    back = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(back).__name__ == "BartForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(ours(x, decoder_input_ids=d).logits, back(input_ids=x, decoder_input_ids=d).logits,
                                   **TOL)
    want = back.generate(input_ids=x[:1], do_sample=False, num_beams=1, max_new_tokens=8)
    assert greedy_generate(ours, x[:1], max_new_tokens=8).tolist() == want.tolist()


def test_text_infilling_masks_30_percent_in_poisson_spans_one_mask_each():
    cfg = DenoiseConfig(mask_id=4, pad_id=0, eos_id=3, special_ids=(0, 1, 2, 3, 4))
    rng = np.random.default_rng(0)
    removed = masks = total = 0
    for _ in range(200):
        ids = rng.integers(5, 100, size=128)
        ids[::16] = 3
        out = infill(ids, cfg, rng)
        kept = out[out != 4]
        # the kept tokens are the original in order, and every </s> survives
        it = iter(ids.tolist())
        assert all(t in it for t in kept.tolist())
        assert (kept == 3).sum() == (ids == 3).sum()
        removed += len(ids) - len(kept)
        masks += int((out == 4).sum())
        total += int((ids != 3).sum())
    assert abs(removed / total - 0.3) < 0.02
    # one <mask> per span: tokens removed per mask ~ the mean Poisson(3) span (a little less: spans stop
    # at </s> and at earlier spans, and zero-length spans insert a mask)
    assert 2.0 < removed / masks < 3.5


def test_sentence_permutation_keeps_the_sentences():
    ids = np.array([5, 6, 3, 7, 3, 8, 9, 10, 3, 11])
    out = permute_sentences(ids, 3, np.random.default_rng(1))
    assert sorted(out.tolist()) == sorted(ids.tolist())
    pieces = {tuple(p) for p in np.split(out, np.flatnonzero(out == 3) + 1) if len(p)}
    assert {(5, 6, 3), (7, 3), (8, 9, 10, 3)} <= pieces | {(11,)}


def test_bart_tiny_trains_on_denoising_and_resumes_its_sampler(char_data, tmp_path):
    data = TokenSplit(char_data, "train")
    model = BART(BartConfig(vocab_size=data.meta["vocab_size"], block_size=32, n_layer=1, n_dec_layer=1, n_head=2,
                            n_embd=16, mlp_hidden=32))
    a = make_sampler("random", data, model, 32, 4, seed=5)
    assert isinstance(a, DenoisingWindows)
    want = [a.next_batch() for _ in range(3)][2]
    b = make_sampler("random", data, model, 32, 4, seed=5)
    state = {**a.state_dict(), "step": 2, "windows": {**a.windows.state_dict(), "step": 2}}  # as after batch 2
    b.load_state_dict(json.loads(json.dumps(state)))
    got = b.next_batch()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    run = tmp_path / "bart"
    rc = main(["train", "--data", str(char_data), "--out", str(run), "--model", "bart-tiny", "--model.block_size=32",
               "--model.dropout=0.0", "--train.batch_size=8", "--train.max_steps=40", "--train.lr=3e-3",
               "--train.warmup_steps=5", "--train.eval_interval=0", "--train.eval_iters=2", "--train.progress=false",
               "--train.log_interval=1", "--train.threads=1"])
    assert rc == 0
    loss = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    print(f"denoising loss {np.mean(loss[:5]):.3f} -> {np.mean(loss[-5:]):.3f}")
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5])
    model, cfg, tok, _ = load_checkpoint(run)  # the checkpoint reloads and decodes
    x, _ = make_sampler("random", TokenSplit(char_data, "val"), model, 32, 2, seed=0).next_batch()
    out = greedy_generate(model, x, max_new_tokens=8)
    assert out.shape[0] == 2 and (out[:, 0] == tok.eos_id).all() and tok.decode(out[0, 1:].tolist())


def test_training_steps_follow_transformers(char_data):
    """Denoising batches, teacher forcing (targets shifted right from </s>) and AdamW steps from the same
    weights give transformers' losses (its `labels` path)."""
    data = TokenSplit(char_data, "train")
    torch.manual_seed(0)
    cfg = HFBartConfig(vocab_size=data.meta["vocab_size"], d_model=32, encoder_layers=1, decoder_layers=2,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                       max_position_embeddings=32, dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                       decoder_start_token_id=3)
    hf = BartForConditionalGeneration(cfg).train()
    ours = from_hf(hf.config.to_dict(), hf.state_dict()).train()
    sampler = make_sampler("random", data, ours, 32, 4, seed=0)
    opts = [torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0) for m in (ours, hf)]
    for _ in range(10):
        x, y = sampler.next_batch()
        a, b = ours(x, y).loss, hf(input_ids=x, labels=y).loss
        assert abs(a.item() - b.item()) < 1e-4
        for loss, opt in zip((a, b), opts):
            loss.backward()
            opt.step()
            opt.zero_grad()
