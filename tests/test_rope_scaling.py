"""RoPE scaling (lmlab/nn/position.py) against live `transformers` Llama models: linear, dynamic NTK,
YaRN and Llama 3, imported through the HF adapter, tested past the original context."""

import pytest
import torch
from peers import require_module

from lmlab.io.hf import config_to_hf, from_hf
from lmlab.models.transformer.llama import Llama

transformers = require_module("transformers")

ORIGINAL = 16  # the "pretraining" context the scaling stretches
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
             "beta_fast": 8.0, "beta_slow": 0.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}


def hf_llama(scaling: dict, theta: float = 100.0):
    torch.manual_seed(0)
    # the context a scaled checkpoint declares: the stretched one, except for dynamic NTK, which
    # stretches past max_position_embeddings at run time
    max_pos = ORIGINAL if scaling["rope_type"] == "dynamic" else 4 * ORIGINAL
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                                   rope_parameters={**scaling, "rope_theta": theta}, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def ours_from(hf) -> Llama:
    return from_hf(hf.config.to_dict(), hf.state_dict())


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_scaled_rope_equals_transformers_past_the_original_context(kind):
    hf = hf_llama(SCALINGS[kind])
    ours = ours_from(hf)
    assert ours.config.rope_scaling["rope_type"] == kind
    x = torch.randint(0, 97, (2, 4 * ORIGINAL))  # four times the original context
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the scaling matters there: the same weights without it give other logits
    plain = Llama(ours.config.__class__(**{**ours.config.__dict__, "rope_scaling": None}))
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        unscaled = plain.eval()(x).logits
    assert (unscaled[:, ORIGINAL:] - want[:, ORIGINAL:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_scaled_rope_with_kv_cache_equals_full_forward(kind):
    ours = ours_from(hf_llama(SCALINGS[kind]))
    x = torch.randint(0, 97, (1, 3 * ORIGINAL))
    with torch.no_grad():
        full = ours(x).logits
        cache = ours.make_kv_cache(1, x.shape[1])
        first = ours(x[:, :ORIGINAL + 5], kv_cache=cache).logits
        rest = torch.cat([ours(x[:, t:t + 1], kv_cache=cache).logits for t in range(ORIGINAL + 5, x.shape[1])], 1)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_scaling_round_trips_through_the_hf_config():
    ours = ours_from(hf_llama(SCALINGS["llama3"]))
    hf_cfg = config_to_hf(ours.config)
    assert hf_cfg["rope_parameters"]["rope_type"] == "llama3"
    back = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")})
    assert back.rope_parameters["factor"] == 8.0 and back.rope_parameters["rope_theta"] == ours.config.rope_theta


def test_unknown_rope_type_is_refused():
    from lmlab.errors import LmlabError

    cfg = config_to_hf(ours_from(hf_llama(SCALINGS["linear"])).config)
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 100.0}
    with pytest.raises(LmlabError, match="longrope"):
        from_hf(cfg, {})
