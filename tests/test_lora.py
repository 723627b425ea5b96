"""LoRA (lmlab/nn/lora.py) and its PEFT format (lmlab/io/peft.py), against live `transformers` + `peft` on a
tiny random Llama: the same adapter gives the same logits both ways, merging adds exactly B A alpha / r,
training moves only the adapter."""

import copy
import json

import pytest
import torch
from peers import require_module

from lmlab.errors import LmlabError
from lmlab.io.hf import from_hf
from lmlab.io.peft import load_peft_adapter, lora_layout, save_peft_adapter
from lmlab.nn.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_lora, trainable_parameters

transformers = require_module("transformers")
peft = require_module("peft")
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
V = 64
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 7.0  # alpha != rank: the scale is not 1


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
                        rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def ours(hf):
    return from_hf(hf.config.to_dict(), hf.state_dict())


def randomize(model, seed=1):
    """Non-zero A and B (B starts at zero, which would hide a wrong B layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_lmlab_adapter_loads_in_peft_with_equal_logits(hf, tmp_path):
    model = ours(hf)
    apply_lora(model, lora_layout(model)[0], LoRAConfig(rank=RANK, alpha=ALPHA, targets=ALL))
    randomize(model)
    save_peft_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == RANK and saved["lora_alpha"] == ALPHA and sorted(saved["target_modules"]) == sorted(ALL)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "adapter")).eval()
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        want, got, base = peft_model(x).logits, model(x).logits, hf(x).logits
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_peft_adapter_loads_in_lmlab_with_equal_logits(hf, tmp_path):
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=ALL, lora_dropout=0.0,
                          init_lora_weights=False)  # A and B both random
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = load_peft_adapter(ours(hf), tmp_path / "adapter")
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        want, got, base = peft_model(x).logits, model(x).logits, hf(x).logits
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # merging: every fused weight is base + scale * B A of its projections, to 1e-5
    merged_peft = peft_model.merge_and_unload()
    merged = merge_lora(model)
    assert not lora_layers(merged)
    hf_sd = merged_peft.state_dict()
    for i in range(2):
        h = f"model.layers.{i}"
        qkv = torch.cat([hf_sd[f"{h}.self_attn.{p}_proj.weight"] for p in "qkv"])
        torch.testing.assert_close(merged.blocks[i].attn.qkv.weight, qkv, rtol=1e-5, atol=1e-5)
        up = torch.cat([hf_sd[f"{h}.mlp.gate_proj.weight"], hf_sd[f"{h}.mlp.up_proj.weight"]])
        torch.testing.assert_close(merged.blocks[i].mlp.up.weight, up, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged.blocks[i].mlp.down.weight, hf_sd[f"{h}.mlp.down_proj.weight"],
                                   rtol=1e-5, atol=1e-5)


def test_merge_is_base_plus_scaled_BA(hf):
    model = ours(hf)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, lora_layout(model)[0], LoRAConfig(rank=RANK, alpha=ALPHA, targets=["k_proj", "up_proj"]))
    randomize(model)
    layer = model.blocks[0].attn.qkv
    A, B = layer.lora_A["k_proj"].detach(), layer.lora_B["k_proj"].detach()
    merge_lora(model)
    w = model.blocks[0].attn.qkv.weight
    nq, nk = 32, 16  # q rows, then k rows (2 kv heads of 8)
    torch.testing.assert_close(w[nq:nq + nk], base["blocks.0.attn.qkv.weight"][nq:nq + nk] + ALPHA / RANK * B @ A,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w[:nq], base["blocks.0.attn.qkv.weight"][:nq], rtol=0, atol=0)  # q untouched
    gate = model.blocks[0].mlp.up.weight[:48]
    torch.testing.assert_close(gate, base["blocks.0.mlp.up.weight"][:48], rtol=0, atol=0)


def test_trainable_parameters_are_counted_per_projection(hf):
    model = ours(hf)
    apply_lora(model, lora_layout(model)[0], LoRAConfig(rank=RANK, targets=["q_proj", "v_proj", "down_proj"]))
    d, kv, ff, L = 32, 16, 48, 2
    # r (in + out) per adapted projection, per layer
    assert trainable_parameters(model) == L * RANK * ((d + d) + (d + kv) + (ff + d))
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


@pytest.mark.parametrize("base", ["fp32", "int4"])
def test_training_moves_only_the_adapter(hf, base):
    model = ours(hf).train()
    apply_lora(model, lora_layout(model)[0], LoRAConfig(rank=RANK, alpha=ALPHA, targets=ALL, base=base))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, V, (4, 16))
    losses = []
    for _ in range(5):
        loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # bitwise
    assert all(not torch.equal(after[k], v) for k, v in adapters.items() if "lora_B" in k)  # every B moved


def test_int4_base_gradients_match_a_dequantized_base(hf):
    """Through the int4 base the adapter's gradient is the one of an fp32 model holding the int4 weights."""
    q = ours(hf)
    apply_lora(q, lora_layout(q)[0], LoRAConfig(rank=RANK, targets=ALL, base="int4"))
    randomize(q)
    ref = copy.deepcopy(q)
    for m in lora_layers(ref).values():  # the same int4 weights, as a plain fp32 Linear
        w = m.base.dequantized_weight()
        m.base = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
        m.base.weight.data.copy_(w)
    x = torch.randint(0, V, (2, 16))
    for m in (q.train(), ref.train()):
        m(x[:, :-1], x[:, 1:]).loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(got) == 2 * 2 * len(ALL)
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bad_targets_and_adapters_are_clear_errors(hf, tmp_path):
    model = ours(hf)
    with pytest.raises(LmlabError, match="unknown lora target 'c_attn'"):
        apply_lora(model, lora_layout(model)[0], LoRAConfig(rank=2, targets=["c_attn"]))
    with pytest.raises(LmlabError, match="rank must be positive"):
        apply_lora(model, lora_layout(model)[0], LoRAConfig(rank=0))
    with pytest.raises(LmlabError, match="not a PEFT adapter directory"):
        load_peft_adapter(model, tmp_path)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    peft_model.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(LmlabError, match="use_dora"):
        load_peft_adapter(ours(hf), tmp_path / "dora")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
