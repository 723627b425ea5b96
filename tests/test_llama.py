import json
import math

import torch
from peers import require_module

from lmlab.cli import main
from lmlab.generate.engine import SamplingConfig, generate_ids
from lmlab.io.hf import config_to_hf
from lmlab.models.registry import PRESETS, build, preset
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.nn.position import RotaryEmbedding
from lmlab.train.checkpoint import load_checkpoint


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64)
    return Llama(LlamaConfig(**{**cfg, **kw})).eval()


def test_llama_uses_gqa_rmsnorm_swiglu_and_no_biases():
    m = tiny()
    x = torch.randint(0, 50, (3, 10))
    assert m(x).logits.shape == (3, 10, 50)
    assert abs(m(x, torch.randint(0, 50, (3, 10))).loss.item() - math.log(50)) < 0.5
    attn = m.blocks[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)  # 4 query heads, 2 key/value heads of 8
    assert isinstance(m.blocks[0].norm1, torch.nn.RMSNorm) and m.blocks[0].mlp.gated
    assert not any(n.endswith(".bias") for n, _ in m.named_parameters())
    assert m.make_kv_cache(3).k.shape == (2, 3, 2, 32, 8)  # the cache holds only the kv heads


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, theta=100.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        rq = rope.rotary(torch.tensor([[m]]))(q)
        rk = rope.rotary(torch.tensor([[n]]))(k)
        return (rq * rk).sum()

    torch.testing.assert_close(score(7, 3), score(24, 20))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity
    assert not torch.allclose(score(7, 3), score(3, 7))


def test_kv_cache_matches_full_forward():
    m = tiny()
    x = torch.randint(0, 50, (2, 20))
    full = m(x).logits
    cache = m.make_kv_cache(2)
    parts = [m(x[:, :7], kv_cache=cache).logits, m(x[:, 7:8], kv_cache=cache).logits,
             m(x[:, 8:20], kv_cache=cache).logits]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_gives_the_logits_of_the_unpadded_sequence():
    m = tiny()
    x = torch.randint(5, 50, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], dim=1)
    torch.testing.assert_close(m(padded, attention_mask=mask).logits[:, 4:], m(x).logits, rtol=1e-5, atol=1e-5)


def test_smollm2_preset_has_the_published_size():
    require_module("transformers")
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    cfg = preset("smollm2-135m")
    assert {"llama-tiny", "llama-mini", "smollm2-135m"} <= set(PRESETS)
    with torch.device("meta"):
        ours = build(cfg)
        theirs = LlamaForCausalLM(HFLlamaConfig(**config_to_hf(cfg)))
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert ours.num_params(non_embedding=False) == n_theirs == 134_515_008  # "SmolLM2-135M"


def test_generation_engine_runs_llama_past_its_window():
    m = tiny(block_size=16)
    with torch.no_grad():
        m.wte.weight.mul_(8)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    assert list(generate_ids(m, [1, 2, 3], cfg)) == list(generate_ids(m, [1, 2, 3], cfg, use_cache=False))
    assert len(list(generate_ids(m, [1, 2, 3], SamplingConfig(max_new_tokens=40, temperature=0)))) == 40


def test_lmlab_train_llama_tiny_loss_falls(char_data, tmp_path):
    run = tmp_path / "run"
    rc = main(["train", "--data", str(char_data), "--out", str(run), "--model", "llama-tiny",
               "--train.max_steps=20", "--train.batch_size=4", "--train.lr=3e-3", "--train.warmup_steps=5",
               "--train.eval_interval=0", "--train.eval_iters=2", "--train.log_interval=1",
               "--train.progress=false"])
    assert rc == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in rows if "loss" in r]
    assert len(loss) == 20
    print(f"llama-tiny loss {loss[0]:.3f} -> {loss[-1]:.3f}")
    assert sum(loss[-5:]) / 5 < 0.85 * sum(loss[:5]) / 5
    assert "family: llama" in (run / "config.yaml").read_text()
    model, cfg, _, _ = load_checkpoint(run)
    assert isinstance(model, Llama) and cfg.model.n_kv_head == 2
