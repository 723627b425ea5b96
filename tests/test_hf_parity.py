"""Parity with live `transformers` on tiny random models built here (no download), fp32, 1e-5."""

import json

import pytest
import torch
from peers import require_module
from safetensors.torch import load_file, save_file

from lmlab.errors import LmlabError
from lmlab.generate.engine import SamplingConfig, generate_ids
from lmlab.io.hf import config_from_hf, from_hf, load_hf_dir, save_hf_dir, state_dict_from_hf
from lmlab.models.transformer.gpt import GPT, GPTConfig
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.tokenizers import BPETokenizer

transformers = require_module("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM  # noqa: E402
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402

transformers.logging.set_verbosity_error()
V, TOL = 64, {"rtol": 1e-5, "atol": 1e-5}


def make_hf(kind: str, init: float) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=init,
                         bos_token_id=None, eos_token_id=None)
        return GPT2LMHeadModel(cfg).eval()
    cfg = HFLlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=init,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    # A large init scale spreads the logits, so greedy decoding has no near-ties (checked below).
    hf = make_hf(request.param, init=0.3)
    return hf, from_hf(hf.config.to_dict(), hf.state_dict())


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), n, dtype=torch.long), torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        s = slice(0, len(r)) if side == "right" else slice(n - len(r), n)
        ids[i, s], mask[i, s] = torch.tensor(r), 1
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    # what transformers' generate passes for a padded batch
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def rows(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def test_logits_equal(pair):
    hf, ours = pair
    x = torch.randint(0, V, (3, 16))
    torch.testing.assert_close(ours(x).logits, hf(x).logits, **TOL)


@torch.no_grad()
def test_kv_cache_prefill_then_one_token_at_a_time(pair):
    hf, ours = pair
    x = torch.randint(0, V, (2, 20))
    cache = ours.make_kv_cache(2)
    got = [ours(x[:, :6], kv_cache=cache).logits] + [ours(x[:, t:t + 1], kv_cache=cache).logits for t in range(6, 20)]
    torch.testing.assert_close(torch.cat(got, dim=1), hf(x).logits, **TOL)


@torch.no_grad()
def test_right_padding_for_scoring(pair):
    hf, ours = pair
    seqs = rows([16, 11, 5])
    ids, mask = pad(seqs, "right")
    got, want = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **TOL)
    for i, s in enumerate(seqs):  # and each row equals its unpadded self
        torch.testing.assert_close(got[i, :len(s)], hf(torch.tensor([s])).logits[0], **TOL)


@torch.no_grad()
def test_left_padding_with_and_without_kv_cache(pair):
    hf, ours = pair
    prompts = rows([9, 4, 7], seed=2)
    ids, mask = pad(prompts, "left")
    new = torch.randint(1, V, (3, 5))
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    want = hf(full_ids, attention_mask=full_mask, position_ids=hf_positions(full_mask)).logits
    real = full_mask.bool()
    torch.testing.assert_close(ours(full_ids, attention_mask=full_mask).logits[real], want[real], **TOL)
    cache = ours.make_kv_cache(3)
    got = [ours(ids, kv_cache=cache, attention_mask=mask).logits]
    for t in range(5):  # decode steps need no mask: the cache remembers the prompt's pads
        got.append(ours(new[:, t:t + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(got, 1)[real], want[real], **TOL)
    # a transformers-style mask over all tokens so far is accepted too
    cache = ours.make_kv_cache(3)
    ours(ids, kv_cache=cache, attention_mask=mask)
    step = ours(new[:, :1], kv_cache=cache, attention_mask=full_mask[:, :ids.shape[1] + 1]).logits
    torch.testing.assert_close(step[:, 0], want[:, ids.shape[1]], **TOL)


@torch.no_grad()
def greedy_batch(model, ids, mask, n):
    cache = model.make_kv_cache(ids.shape[0], ids.shape[1] + n)
    logits = model(ids, kv_cache=cache, attention_mask=mask).logits
    out = []
    for _ in range(n):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = model(out[-1], kv_cache=cache).logits
    return torch.cat(out, 1)


@torch.no_grad()
def test_greedy_generation_equals_transformers_generate(pair):
    hf, ours = pair
    n = 24
    ids, mask = pad(rows([10, 3, 6], seed=3), "left")
    res = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                      output_scores=True, return_dict_in_generate=True)
    theirs = res.sequences[:, ids.shape[1]:]
    top2 = torch.stack(res.scores).topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3  # no near-ties: a token-for-token test is meaningful
    assert torch.equal(greedy_batch(ours, ids, mask, n), theirs)
    # one prompt through lmlab's generation engine (KV cache) equals transformers too
    prompt = rows([7], seed=4)[0]
    one = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert list(generate_ids(ours, prompt, SamplingConfig(max_new_tokens=n, temperature=0))) == one


@torch.no_grad()
def test_transformers_saved_directory_loads(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    model, tok = load_hf_dir(tmp_path)
    assert tok is None
    x = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(model(x).logits, hf(x).logits, **TOL)


def bpe_tokenizer():
    texts = ["the quick brown fox jumps over the lazy dog", "a model of language assigns probabilities"] * 20
    return BPETokenizer.train(texts, vocab_size=300, min_count=1)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_lmlab_trained_model_saved_in_hf_format_loads_in_transformers(family, tmp_path):
    tok = bpe_tokenizer()
    torch.manual_seed(0)
    if family == "gpt":
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    else:  # tied embeddings and GQA, like SmolLM2
        model = Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                  n_embd=32, mlp_hidden=64, rope_theta=1000.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):  # a few optimizer steps, so the weights are no longer the init
        x = torch.randint(0, tok.vocab_size, (4, 17))
        model(x[:, :-1], x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = save_hf_dir(model, tmp_path / "hf", tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    text = "the lazy fox assigns a model"
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(model(ids).logits, want, **TOL)
        back, back_tok = load_hf_dir(out)  # and lmlab reads its own export back
        torch.testing.assert_close(back(ids).logits, want, **TOL)
    assert back_tok.encode(text) == ids[0].tolist()
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert hf.config.eos_token_id == tok.eos_id
    with pytest.raises(LmlabError, match="already exists"):
        save_hf_dir(model, out)


def test_gpt2_checkpoint_without_prefix_and_with_attention_buffers_loads():
    hf = make_hf("gpt2", init=0.02)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # the causal-mask buffer older checkpoints carry
    ours = from_hf(hf.config.to_dict(), sd)
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, **TOL)


def test_mismatched_weights_and_configs_are_clear_errors(tmp_path):
    hf = make_hf("llama", init=0.02)
    cfg_dict, sd = hf.config.to_dict(), hf.state_dict()
    cfg = config_from_hf(cfg_dict)
    with pytest.raises(LmlabError, match="model.layers.1.mlp.up_proj.weight"):
        state_dict_from_hf({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, cfg)
    with pytest.raises(LmlabError, match=r"model.layers.0.self_attn.k_proj.weight.*blocks.0.attn.qkv.weight"):
        state_dict_from_hf({**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}, cfg)
    with pytest.raises(LmlabError, match="model.layers.2.mlp.up_proj.weight"):
        state_dict_from_hf({**sd, "model.layers.2.mlp.up_proj.weight": torch.zeros(48, 32)}, cfg)
    with pytest.raises(LmlabError, match="rope_type"):
        config_from_hf({**cfg_dict, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(LmlabError, match="attention_bias"):
        config_from_hf({**cfg_dict, "attention_bias": True})
    with pytest.raises(LmlabError, match="model_type 'bloom'"):
        config_from_hf({"model_type": "bloom"})
    # a directory whose config does not match its weights
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg_dict, "intermediate_size": 40}))
    with pytest.raises(LmlabError, match="mlp.gate_proj.weight"):
        load_hf_dir(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(LmlabError, match="pickled"):
        load_hf_dir(tmp_path)


def test_sharded_safetensors_directory_loads(tmp_path):
    hf = make_hf("gpt2", init=0.02)
    hf.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(sd)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in half.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in half.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_hf_dir(tmp_path)
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, **TOL)
