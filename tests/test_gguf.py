"""GGUF import on tiny synthetic files written with llama.cpp's own `gguf` writer, checked against
`transformers` loading the same file (its GGUF loader dequantizes and un-permutes independently)."""

import numpy as np
import pytest
import torch
from peers import require_module

gguf = require_module("gguf")
transformers = require_module("transformers")
require_module("accelerate")  # transformers' GGUF loading needs it

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,  # noqa: E402
)
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from lmlab.errors import LmlabError  # noqa: E402
from lmlab.io.gguf.read import SUPPORTED_TYPES, dequantize, load_gguf  # noqa: E402

transformers.logging.set_verbosity_error()
Q = gguf.GGMLQuantizationType
V, N_HEAD, N_KV = 288, 4, 2  # 256 byte tokens + merges + 2 control tokens; rows of 32 for the block quants


@pytest.mark.parametrize("name", SUPPORTED_TYPES)
def test_dequantize_each_type_within_its_step(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, Q[name])
    got = dequantize(q, Q[name], (6, 64))
    assert got.dtype == torch.float32 and got.shape == (6, 64)
    # error bound from each format's step: absmax/127 (Q8_0), absmax/8 (Q4_0), range/15 (Q4_1)
    bound = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.5 / 127, "Q4_0": 1 / 8, "Q4_1": 0.5 / 15}[name]
    amax = np.abs(x.reshape(6, 2, 32)).max(-1, keepdims=True).repeat(32, -1).reshape(6, 64)
    scale = 2 * amax if name == "Q4_1" else amax
    assert np.all(np.abs(got.numpy() - x) <= bound * scale + 1e-6)


def test_unsupported_type_is_a_clear_error():
    with pytest.raises(LmlabError, match="Q8_K is not supported"):  # a type gguf.quants cannot dequantize
        dequantize(np.zeros((1, 292), np.uint8), Q.Q8_K, (1, 256))


def test_iq_quants_load_through_gguf_dequantization():
    raw = np.random.default_rng(0).integers(0, 256, (2, 136), dtype=np.uint8)
    raw[:, :2] = np.full((2, 1), 0.01, np.float16).view(np.uint8)  # finite super-block scales
    got = dequantize(raw, Q.IQ4_XS, (2, 256))
    np.testing.assert_array_equal(got.numpy(), gguf.quants.dequantize(raw, Q.IQ4_XS))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what llama.cpp's convert_hf_to_gguf.py does to q/k (pairs for GPT-J style RoPE)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(w) -> None:
    byte = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t"]
    tokens = byte + [m.replace(" ", "") for m in merges]
    tokens += [f"<x{i}>" for i in range(V - 2 - len(tokens))] + ["<|endoftext|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (V - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(V - 2)
    w.add_eos_token_id(V - 1)
    w.add_chat_template("{% for m in messages %}{{ '<|endoftext|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}"
                        "{% endfor %}{% if add_generation_prompt %}{{ '<|endoftext|>assistant ' }}{% endif %}")


def write_tiny_gguf(path, qtype: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=256,
                        rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(500.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(V)
    _tokenizer_metadata(w)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for key, t in hf.state_dict().items():
        stem = key.removesuffix(".weight")
        if stem.startswith("model.layers."):
            _, _, i, part = stem.split(".", 3)
            name = f"blk.{i}.{layer[part]}"
        else:
            name = names[stem]
        x = t.numpy().astype(np.float32)
        if name.endswith("attn_q"):
            x = _permute(x, N_HEAD)
        elif name.endswith("attn_k"):
            x = _permute(x, N_KV)
        if x.ndim == 1:  # norms stay F32, as llama.cpp keeps them
            w.add_tensor(name + ".weight", x)
        else:
            w.add_tensor(name + ".weight", gguf.quants.quantize(x, Q[qtype]), raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
@torch.no_grad()
def test_tiny_llama_matches_transformers_gguf_loader(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    original = write_tiny_gguf(path, qtype)
    ours, tok = load_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
    if qtype == "F32":  # lossless: the un-permuted weights are the original model's
        torch.testing.assert_close(ours(x).logits, original(x).logits, rtol=1e-5, atol=1e-5)
    assert ours.config.tie_embeddings is False and ours.config.rope_theta == 500.0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "the theater in  the rain, 42 sat there<|im_end|>"
    assert tok.encode(text, allow_special=True) == hf_tok(text, add_special_tokens=False).input_ids
    assert tok.eos_id == V - 1


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(LmlabError, match="not a readable GGUF"):
        load_gguf(bad)
    with pytest.raises(LmlabError, match="no GGUF file"):
        load_gguf(tmp_path / "missing.gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(d / "tiny.gguf", "Q8_0")
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    return d / "tiny.gguf", hf, AutoTokenizer.from_pretrained(d, gguf_file="tiny.gguf")


def _hf_greedy(hf, hf_tok, ids: list[int], n: int) -> str:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=V - 1, pad_token_id=V - 1)[0, len(ids):].tolist()
    out = out[:out.index(V - 1)] if V - 1 in out else out
    return hf_tok.decode(out, skip_special_tokens=True)


def test_cli_generate_streams_a_gguf_model(tiny, capsys):
    from lmlab.cli import main

    path, hf, hf_tok = tiny
    # the fp32 reference path (the default int4 path is judged against it in tests/test_quant.py)
    assert main(["generate", str(path), "the theater", "--temperature", "0", "--max_new_tokens", "12",
                 "--precision", "fp32"]) == 0
    want = _hf_greedy(hf, hf_tok, hf_tok("the theater", add_special_tokens=False).input_ids, 12)
    assert capsys.readouterr().out == "the theater" + want + "\n"


def test_cli_chat_applies_the_template(tiny, capsys, monkeypatch):
    import io

    from lmlab.cli import main

    path, hf, hf_tok = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("in the rain\nthe sea\n\n"))
    assert main(["chat", "--model", str(path), "--temperature", "0", "--max_new_tokens", "10",
                 "--precision", "fp32"]) == 0
    msgs, want = [], ""
    for user in ("in the rain", "the sea"):
        msgs.append({"role": "user", "content": user})
        ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        reply = _hf_greedy(hf, hf_tok, ids, 10)
        msgs.append({"role": "assistant", "content": reply.strip()})
        want += "> " + reply + "\n"
    assert capsys.readouterr().out == want + "> "


@pytest.mark.parametrize("block,stride,precision", [(256, 0, None), (24, 8, None), (24, 8, "fp32")])
@torch.no_grad()
def test_cli_eval_text_file_matches_transformers(tiny, tmp_path, block, stride, precision):
    import json

    from lmlab.cli import main

    path, hf, hf_tok = tiny
    data = tmp_path / "t.txt"
    data.write_text("the theater in the rain at the sea, then the heat returns. " * 3, encoding="utf-8")
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(path), "--data", str(data), "--block_size", str(block), "--json", str(out)]
    args += ["--precision", precision] if precision else []  # default: the file's blocks as stored
    assert main(args + (["--stride", str(stride)] if stride else [])) == 0
    got = json.loads(out.read_text())
    # the same sliding windows, scored by transformers: each window predicts its last `stride` targets
    # the file's own BOS rule (io.load: tokenizer.ggml.add_bos_token); without a BOS the first token is context
    from lmlab.io.load import load_model

    ids = load_model(path).bos + hf_tok(data.read_text(), add_special_tokens=False).input_ids
    n, stride = len(ids) - 1, stride or block // 2
    nll, pos = [], 0
    while pos < n:
        end = min(pos + stride, n)
        start = max(0, end - block)
        logp = hf(torch.tensor([ids[start:end]])).logits[0].log_softmax(-1)
        nll += [-logp[t - start, ids[t + 1]].item() for t in range(pos, end)]
        pos = end
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(sum(nll) / n, rel=1e-5)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@torch.no_grad()
def test_export_loads_in_transformers(tmp_path, qtype):
    from lmlab.io.gguf.write import save_gguf
    from lmlab.models.transformer.llama import Llama, LlamaConfig
    from lmlab.tokenizers import BPETokenizer

    lines = ["the theater in the rain", "def f(x):\n    return x + 1", "then the sea returns 123"] * 20
    tok = BPETokenizer.train(lines, vocab_size=320, min_count=1)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=64, mlp_hidden=96, rope_theta=500.0, init_std=0.2)).eval()
    path = save_gguf(model, tmp_path / "m.gguf", tok, qtype=qtype)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    back, back_tok = load_gguf(path)
    x = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(back(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
    if qtype == "F32":
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "the theater </s> in 2024:\n    return  x"
    # transformers always matches special tokens spelled in text; lmlab does so only when asked
    assert back_tok.encode(text) == tok.encode(text)
    assert back_tok.encode(text, allow_special=True) == hf_tok(text, add_special_tokens=False).input_ids
    assert tok.eos_id in back_tok.encode(text, allow_special=True)
    assert back_tok.eos_id == tok.eos_id
    with pytest.raises(LmlabError, match="already exists"):
        save_gguf(model, path, tok)


@pytest.mark.parametrize("setting", [{"sliding_window": 16}, {"sliding_window": 16, "global_tokens": 2}])
def test_export_refuses_attention_llama_cpp_cannot_compute(tmp_path, setting):
    from lmlab.io.gguf.write import save_gguf
    from lmlab.models.transformer.llama import Llama, LlamaConfig

    model = Llama(LlamaConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                              mlp_hidden=32, **setting))
    with pytest.raises(LmlabError, match="sliding-window"):
        save_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())



@torch.no_grad()
def test_many_token_forwards_take_their_temporaries_from_the_heap_then_pin_the_threshold_again(tiny, monkeypatch):
    from lmlab.io.gguf import read

    calls = []
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(read, "_mallopt_mmap_threshold", lambda size: calls.append(size) or True)
    monkeypatch.setattr(read, "_trim_heap", lambda: calls.append("trim"))
    model, _ = load_gguf(tiny[0], blocks=True)
    assert read.MMAP_THRESHOLD in calls  # pinned at load
    heap = [read.HEAP_MMAP_THRESHOLD, read.MMAP_THRESHOLD, "trim"]
    calls.clear()
    cache = model.make_kv_cache(1, 16)
    model(torch.tensor([[5]]), kv_cache=cache)  # a decoding step, one token: fresh mappings, nothing to do
    model(torch.tensor([[5]]))
    assert calls == []
    model(torch.arange(8)[None], kv_cache=cache)  # generation's prefill: the heap, then pinned and trimmed
    assert calls == heap
    calls.clear()
    model(torch.arange(8)[None])  # scoring: the same
    assert calls == heap
    calls.clear()
    with pytest.raises(IndexError):  # a failed forward pins the threshold again too
        model(torch.full((1, 8), V + 5))
    assert calls == heap


@torch.no_grad()
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])  # Int4Linear; GroupLinear
def test_block_layers_fuse_the_swiglu_of_many_rows_and_pack_their_kernels_arguments_at_load(tmp_path, monkeypatch,
                                                                                              qtype):
    """A file's gate-and-up projections compute silu(gate) * up with the product fused into the GEMM
    (`quant._swiglu`) under no_grad; the model's output equals the projection split by hand, and every
    block-major layer's kernel arguments exist right after loading (no repacking at the first forward)."""
    from lmlab.nn import quant
    from lmlab.nn.mlp import MLP

    write_tiny_gguf(tmp_path / "m.gguf", qtype)
    model, _ = load_gguf(tmp_path / "m.gguf", blocks=True)
    ups = [m.up for m in model.modules() if isinstance(m, MLP)]
    assert ups and all(isinstance(u, (quant.Int4Linear, quant.GroupLinear)) for u in ups)
    assert all("_decode_pack" in u.__dict__ for u in ups)
    x = torch.randn(2, 9, ups[0].in_features)
    gate, up = ups[0](x).chunk(2, dim=-1)
    torch.testing.assert_close(ups[0].swiglu(x), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)
    fused, swiglu = [], quant.kernels.block_major_swiglu
    monkeypatch.setattr(quant.kernels, "block_major_swiglu", lambda *a: fused.append(1) or swiglu(*a))
    ids = torch.arange(12)[None]
    got = model(ids).logits
    assert len(fused) == len(ups)
    for u in ups:  # the same model, the MLP's unfused path
        u.swiglu = None
    want = model(ids).logits
    assert len(fused) == len(ups)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
