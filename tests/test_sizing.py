"""Model arithmetic (lmlab/models/sizing.py): counts from meta-device builds against published sizes,
real builds and transformers; FLOPs against torch's FlopCounterMode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peers import require_module
from torch.utils.flop_counter import FlopCounterMode

from lmlab.cli import main
from lmlab.io.hf import config_to_hf
from lmlab.models.registry import build, preset
from lmlab.models.sizing import count_params, size
from lmlab.models.transformer.gpt import GPT, GPTConfig

# published sizes: Brown et al. 2020 table 2.1; Touvron et al. 2023 (Llama 2 7B: 6.74B, as the HF model
# card counts it); Meta-Llama-3-70B model card (70.6B); Jiang et al. 2024 / mistral.ai (46.7B, 12.9B active)
PUBLISHED = {"gpt3-175b": (175.0e9, None), "llama2-7b": (6.74e9, None), "llama3-70b": (70.6e9, None),
             "mixtral-8x7b": (46.7e9, 12.9e9)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_meta_counts_match_published_sizes(name):
    total, active = PUBLISHED[name]
    p = size(preset(name)).params
    assert abs(p.total / total - 1) < 0.005
    assert abs(p.active / (active or total) - 1) < 0.005


def test_counts_equal_transformers_own_models_on_the_meta_device():
    transformers = require_module("transformers")
    for name, cls in (("mixtral-8x7b", "MixtralForCausalLM"), ("llama3-70b", "LlamaForCausalLM")):
        cfg = config_to_hf(preset(name))
        hf_cfg = getattr(transformers, cls.replace("ForCausalLM", "Config"))(**cfg)
        with torch.device("meta"):
            theirs = getattr(transformers, cls)(hf_cfg)
        assert size(preset(name)).params.total == sum(p.numel() for p in theirs.parameters()), name


@pytest.mark.parametrize("name", ["gpt3-125m", "mixtral-tiny"])
def test_a_real_build_has_the_meta_count(name):
    cfg = preset(name)
    cfg.vocab_size = cfg.vocab_size or 100
    real = build(cfg)
    assert count_params(real) == size(cfg).params
    assert real.num_params(non_embedding=False) == size(cfg).params.total


def test_moe_at_half_width_top2_matches_the_dense_active_flops():
    """The FLOP-matched pair of the MoE comparison: dense 4 x 192 GPT against 8 experts, top-2, each
    half the dense FFN width; FlopCounterMode (matmuls; CPU attention is not counted) sees 2 N per token."""
    base = dict(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=192)
    x = torch.randint(0, 512, (2, 128))
    flops, configs = [], [GPTConfig(**base), GPTConfig(**base, n_expert=8, n_expert_per_token=2, moe_hidden=384)]
    for cfg in configs:
        torch.manual_seed(0)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            GPT(cfg).eval()(x)
        flops.append(fc.get_total_flops() / x.numel())
        assert flops[-1] == 2 * size(cfg).params.matmul  # each token through its k experts only
    dense, moe = flops
    assert abs(moe / dense - 1) < 0.05
    # all 8 experts on every token would cost 6 more experts (3 dense FFNs) per layer and token
    every_expert = moe + 6 * 4 * 2 * (2 * 192 * 384)
    assert every_expert > 2 * dense
    d, m = size(configs[0]).params, size(configs[1]).params
    assert m.total - m.embedding > 2.5 * (d.total - d.embedding) and abs(m.active / d.total - 1) < 0.05


def test_sizing_arithmetic():
    s = size(preset("llama2-7b"), context=4096, batch=2)
    assert s.kv_cache_bytes == 2 * 32 * 4096 * 4096 * 2 * 2  # k and v, 32 layers x 32 heads x 128, bf16
    assert s.weights_bytes["bfloat16"] == 2 * s.params.total
    assert s.train_bytes() == 16 * s.params.total + s.activations_bytes
    # FSDP: states sharded 8 ways, one layer's float32 weights gathered, activations per device unchanged
    assert s.train_bytes(devices=8) == 16 * s.params.total / 8 + 4 * s.largest_layer_params + s.activations_bytes
    assert s.activations_ckpt_bytes < s.activations_bytes / 8
    g = size(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=100, block_size=32, dropout=0.1))
    # Korthikanti et al. 2022: 34 s b h bytes per layer for GPT with dropout (without the s^2 score terms),
    # + 2 h for SDPA's kept output; + 6 h outside the blocks; + one layer's gradients during backward
    assert g.activations_bytes == (2 * 36 + 6 + 36) * 32 * 64


def test_lmlab_info_model(capsys):
    assert main(["info", "--model", "mixtral-8x7b", "--context", "4096", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "46.70B total with embeddings (46,702,792,704)" in out and "12.88B (27.6%) per token" in out
    assert "FSDP over 8" in out and "KV cache (bf16, 2 x 4,096) 1.0 GiB" in out and "this machine" in out


@pytest.mark.parametrize("kind,batch", [("gpt", 16), ("mixtral", 16)])
def test_training_memory_estimate_is_within_15_percent_of_a_measured_step(kind, batch):
    """float32 CPU training (act_bytes=4): weights, gradients, AdamW state and activations against the
    peak anonymous RSS of three real steps in a fresh process (clean environment), minus the same
    before the model was built."""
    probe = Path(__file__).parent / "memory_probe.py"
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), str(probe.parent)])
    out = subprocess.run([sys.executable, str(probe), kind, str(batch)], capture_output=True, text=True, check=True,
                         env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{kind} batch {batch}: estimate {r['estimate'] / 2**20:.0f} MiB, measured {r['measured'] / 2**20:.0f} MiB")
    assert abs(r["estimate"] / r["measured"] - 1) < 0.15
