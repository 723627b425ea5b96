"""Mixtral against transformers' MixtralForCausalLM (tiny, random): logits, router logits, aux loss."""

import pytest
import torch
from peers import require_module

from lmlab.generate.engine import SamplingConfig, generate_ids
from lmlab.io.hf import from_hf, to_hf
from lmlab.models.transformer.mixtral import Mixtral

transformers = require_module("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hc = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        sliding_window=None, rope_theta=1e6, router_aux_loss_coef=0.02, initializer_range=0.2,
        output_router_logits=True, attn_implementation="eager")
    theirs = transformers.MixtralForCausalLM(hc).eval()
    ours = from_hf(hc.to_dict(), theirs.state_dict())
    return theirs, ours


def test_logits_router_logits_and_aux_loss_match(pair):
    theirs, ours = pair
    assert isinstance(ours, Mixtral) and ours.config.n_expert == 4 and ours.config.moe_z_loss_coef == 0
    x = torch.randint(0, 64, (3, 17))
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert a.logits.abs().max() > 1  # weights large enough for the comparison to mean something
    torch.testing.assert_close(b.logits, a.logits, **TOL)
    for r_theirs, r_ours in zip(a.router_logits, b.router_logits, strict=True):
        torch.testing.assert_close(r_ours, r_theirs, **TOL)
    torch.testing.assert_close(b.aux_loss, 0.02 * a.aux_loss, **TOL)  # theirs is unweighted


def test_padded_batch_matches_including_the_masked_aux_loss(pair):
    theirs, ours = pair
    x = torch.randint(3, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0  # left padding, as in batched generation
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = theirs(x, attention_mask=mask, position_ids=pos), ours(x, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(b.logits[real], a.logits[real], **TOL)
    torch.testing.assert_close(b.aux_loss, 0.02 * a.aux_loss, **TOL)


def test_kv_cache_chunks_match_their_full_forward(pair):
    theirs, ours = pair
    x = torch.randint(0, 64, (2, 20))
    cache = ours.make_kv_cache(2)
    with torch.no_grad():
        full = theirs(x).logits
        parts = [ours(x[:, :7], kv_cache=cache).logits, ours(x[:, 7:8], kv_cache=cache).logits,
                 ours(x[:, 8:], kv_cache=cache).logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)


def test_greedy_generation_is_equal(pair):
    theirs, ours = pair
    prompt = [5, 9, 17, 33]
    with torch.no_grad():
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
    got = list(generate_ids(ours, prompt, SamplingConfig(max_new_tokens=12, temperature=0)))
    assert got == want and len(set(want)) > 3  # not one token repeated


def test_export_and_the_hub_layout_round_trip(pair):
    theirs, ours = pair
    cfg, sd = to_hf(ours)
    back = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg)).eval()
    back.load_state_dict(sd, strict=True)
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, theirs(x).logits, **TOL)
    # the Hub's Mixtral-8x7B files keep one tensor per expert: block_sparse_moe.experts.{j}.w1|w3|w2
    hub = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            for j, w in enumerate(v):
                gate, up = w.chunk(2)
                p = k.replace("mlp.experts.gate_up_proj", f"block_sparse_moe.experts.{j}")
                hub[f"{p}.w1.weight"], hub[f"{p}.w3.weight"] = gate, up
        elif k.endswith("mlp.experts.down_proj"):
            for j, w in enumerate(v):
                hub[k.replace("mlp.experts.down_proj", f"block_sparse_moe.experts.{j}.w2.weight")] = w
        else:
            hub[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
    with torch.no_grad():
        torch.testing.assert_close(from_hf(cfg, hub)(x).logits, theirs(x).logits, **TOL)
