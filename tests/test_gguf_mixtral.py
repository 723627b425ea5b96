"""GGUF Mixtral layout: a file written with llama.cpp's own `gguf` writer under `gguf.constants` names
(not lmlab's writer) loads and gives transformers' logits; lmlab's writer round-trips."""

import numpy as np
import pytest
import torch
from peers import require_module

gguf = require_module("gguf")
transformers = require_module("transformers")

from lmlab.io.gguf.read import config_from_gguf, load_gguf, open_gguf, read_metadata, state_dict_from_gguf  # noqa: E402
from lmlab.io.gguf.write import save_gguf  # noqa: E402
from lmlab.models.registry import build  # noqa: E402

Q, T, NAMES = gguf.GGMLQuantizationType, gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
V, H, FF, E, N_HEAD, N_KV = 288, 64, 96, 4, 4, 2


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf.py's q/k reordering
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_mixtral(path, qtype: str):
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV, num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=128,
        rope_theta=1e6, rms_norm_eps=1e-5, initializer_range=0.2, sliding_window=None)).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(V)])
    w.add_token_types([1] * V)
    w.add_token_merges([])
    top = {"model.embed_tokens.weight": T.TOKEN_EMBD, "model.norm.weight": T.OUTPUT_NORM, "lm_head.weight": T.OUTPUT}
    layer = {"input_layernorm.weight": T.ATTN_NORM, "self_attn.q_proj.weight": T.ATTN_Q,
             "self_attn.k_proj.weight": T.ATTN_K, "self_attn.v_proj.weight": T.ATTN_V,
             "self_attn.o_proj.weight": T.ATTN_OUT, "post_attention_layernorm.weight": T.FFN_NORM,
             "mlp.gate.weight": T.FFN_GATE_INP, "mlp.experts.down_proj": T.FFN_DOWN_EXP}
    out = {}
    for key, t in hf.state_dict().items():
        x = t.numpy().astype(np.float32)
        if key in top:
            out[NAMES[top[key]]] = x
            continue
        i, part = key.split(".", 3)[2:]
        if part == "mlp.experts.gate_up_proj":  # [E, 2I, H] = [gate | up]: two stacked tensors in GGUF
            out[NAMES[T.FFN_GATE_EXP].format(bid=i)], out[NAMES[T.FFN_UP_EXP].format(bid=i)] = np.split(x, 2, axis=1)
            continue
        if part == "self_attn.q_proj.weight":
            x = _permute(x, N_HEAD)
        elif part == "self_attn.k_proj.weight":
            x = _permute(x, N_KV)
        out[NAMES[layer[part]].format(bid=i)] = x
    for name, x in out.items():
        if x.ndim == 1:
            w.add_tensor(name + ".weight", x)
        else:
            w.add_tensor(name + ".weight", gguf.quants.quantize(x, Q[qtype]), raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@torch.no_grad()
def test_llama_cpp_mixtral_layout_loads(tmp_path, qtype):
    path = tmp_path / f"mixtral-{qtype}.gguf"
    theirs = write_tiny_mixtral(path, qtype)
    ours, _ = load_gguf(path)
    assert ours.config.family == "mixtral" and ours.config.n_expert == E and ours.config.n_expert_per_token == 2
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    a, b = ours(x).logits, theirs(x).logits
    if qtype == "F32":
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # 8-bit: transformers' model with each matrix quantized and dequantized by gguf.quants (blocks of
        # 32 along the input dimension, which llama.cpp's q/k row reordering and the gate/up split leave whole)
        sd = {k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), Q.Q8_0), Q.Q8_0))
              if v.ndim > 1 else v for k, v in theirs.state_dict().items()}
        theirs.load_state_dict(sd)
        torch.testing.assert_close(a, theirs(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_our_writer_round_trips_mixtral(tmp_path):
    theirs = write_tiny_mixtral(tmp_path / "src.gguf", "F32")
    ours, _ = load_gguf(tmp_path / "src.gguf")
    save_gguf(ours, tmp_path / "ours.gguf", qtype="F32")
    reader = open_gguf(tmp_path / "ours.gguf")
    names = {t.name for t in reader.tensors}
    assert NAMES[T.FFN_GATE_EXP].format(bid=1) + ".weight" in names and "blk.0.ffn_gate_inp.weight" in names
    cfg = config_from_gguf(read_metadata(reader), tie_embeddings=False)
    back = build(cfg)
    back.load_state_dict(state_dict_from_gguf(reader, cfg))
    x = torch.randint(0, V, (1, 16))
    torch.testing.assert_close(back.eval()(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


# F32 and F16 (the writer's default). Not Q8_0: on this random model 8-bit weights flip router choices (llama.cpp's
# Q8_0 top-1 agreed with our float model at 90%; our own load of that file was as far off: docs/moe/README.md).
@pytest.mark.parametrize("qtype", ["F32", "F16"])
@torch.no_grad()
def test_our_mixtral_gguf_runs_in_llama_cpp(tmp_path, qtype):
    """A Mixtral GGUF written by lmlab's writer runs in llama.cpp itself (llama-cpp-python), whose logits
    pick the same next token as ours at >= 99% of positions (the issue's bar) and are close in value."""
    llama_cpp = require_module("llama_cpp")
    from lmlab.models.transformer.mixtral import Mixtral, MixtralConfig
    from lmlab.tokenizers import BPETokenizer

    lines = ["the experts route each token", "def f(x):\n    return x + 1", "then the router picks two"] * 20
    tok = BPETokenizer.train(lines, vocab_size=320, min_count=1)
    torch.manual_seed(0)
    ours = Mixtral(MixtralConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=4, n_kv_head=2,
                                 n_embd=64, mlp_hidden=96, n_expert=4, n_expert_per_token=2, init_std=0.2)).eval()
    path = save_gguf(ours, tmp_path / f"m-{qtype}.gguf", tok, qtype=qtype)
    f32 = llama_cpp.GGML_TYPE_F32  # llama.cpp's KV cache is F16 by default: keep F32 to compare at float precision
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1,
                          logits_all=True, type_k=f32, type_v=f32, verbose=False)
    assert llm.metadata.get("llama.expert_count") == "4"
    rows = torch.randint(4, tok.vocab_size, (3, 40), generator=torch.Generator().manual_seed(3))
    agree, total = 0, 0
    for ids in rows:  # one sequence at a time, from an empty cache
        llm.reset()
        llm.eval(ids.tolist())
        theirs = torch.from_numpy(np.asarray(llm.scores[:len(ids)], dtype=np.float32))
        mine = ours(ids[None]).logits[0]
        agree += int((theirs.argmax(-1) == mine.argmax(-1)).sum())
        total += len(ids)
        # F32: summation order only (measured 1.6e-5); F16: half-precision weights (measured 0.023; logits O(1-10))
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4 if qtype == "F32" else 0.1)
    assert agree / total >= 0.99, f"top-1 agreement {agree}/{total}"
