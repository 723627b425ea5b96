import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmlab.cli import main
from lmlab.models.transformer.gpt import GPT, GPTConfig
from lmlab.nn.moe import MoE, MoEConfig, load_balancing_loss, router_z_loss


def layer(activation="swiglu", **kw):
    torch.manual_seed(0)
    m = MoE(32, 24, activation, MoEConfig(**{"n_expert": 4, **kw}))
    for p in (m.experts_up, m.experts_down):
        torch.nn.init.normal_(p, std=0.2)
    return m


def reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then the router's top-k weights pick: the dense definition."""
    x = x.reshape(-1, x.shape[-1])
    _, w, idx = m.route(x)
    every = torch.stack([m.expert(e, x) for e in range(m.n_expert)], 1)  # [N, E, D]
    out = (every.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])) * w[..., None]).sum(1)
    return out + (m.shared(x) if m.shared is not None else 0)


@pytest.mark.parametrize("kw", [dict(n_expert_per_token=2),
                                dict(n_expert_per_token=1, moe_norm_topk=False, moe_shared_hidden=16),
                                dict(n_expert_per_token=3)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
def test_sorted_dispatch_equals_every_expert_on_every_token(kw, activation):
    m = layer(activation, **kw)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(m(x).reshape(21, 32), reference(m, x), rtol=1e-5, atol=1e-6)
    assert int(m.load.sum()) == 21 * m.k and m.router_logits.shape == (21, 4)


def test_top1_without_renormalisation_keeps_the_router_gradient():
    m = layer(n_expert_per_token=1, moe_norm_topk=False)  # Switch: y = p_i E_i(x), so p_i gets a gradient
    m(torch.randn(5, 32)).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0


def test_expert_dropout_acts_inside_the_experts_in_training_only():
    m = layer(moe_expert_dropout=0.5)
    x = torch.randn(6, 32)
    m.eval()
    y = m(x)
    torch.testing.assert_close(y, reference(m, x))  # evaluation: no dropout
    m.train()
    torch.manual_seed(1)
    draws = torch.stack([m(x) for _ in range(3000)])
    assert (draws[0] - y).abs().max() > 0.1 and (draws[0] - draws[1]).abs().max() > 0.1
    # the mask is on the hidden units, before the (linear) down projection: inverted dropout keeps the mean
    torch.testing.assert_close(draws.mean(0), y, atol=0.06 * y.abs().max().item(), rtol=0)
    # the mask falls on hidden units: with each expert's down projection an identity onto the first 24
    # output features and k = 1 (weight 1), a dropped unit is an exact 0 in the output, and a kept one doubles
    m = layer(n_expert_per_token=1, moe_expert_dropout=0.5)
    with torch.no_grad():
        m.experts_down.copy_(torch.eye(32, 24).expand(4, 32, 24))
    m.eval()
    y = m(x)
    m.train()
    yt = m(x)
    dropped = yt[:, :24] == 0
    assert 0.3 < dropped.float().mean() < 0.7 and (y[:, :24] != 0).all()
    torch.testing.assert_close(yt[:, :24][~dropped], 2 * y[:, :24][~dropped])


def test_low_precision_cpu_dispatch_pads_expert_groups_to_bucketed_row_counts(monkeypatch):
    import lmlab.nn.moe as moe

    m = layer(n_expert_per_token=2)
    x = torch.randn(300, 32)  # 600 assignments over 4 experts: groups of ~150 rows
    with torch.no_grad():
        m.router.weight[0] += 0.5  # uneven groups
    seen, expert = [], m.expert
    monkeypatch.setattr(m, "expert", lambda e, xe: (seen.append(xe.shape[0]), expert(e, xe))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    counts = m.load.tolist()
    assert [n for n in counts if n] != seen  # padded ...
    assert seen == [n if n < moe._ROW_BUCKET else -(-n // moe._ROW_BUCKET) * moe._ROW_BUCKET for n in counts if n]
    monkeypatch.setattr(moe, "_ROW_BUCKET", 10**9)  # ... and the padding rows change nothing
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_unpadded = m(x)
    assert seen == [n for n in counts if n]
    torch.testing.assert_close(y, y_unpadded, rtol=2e-2, atol=2e-2)
    seen.clear()
    m(x)  # float32: row counts as they are (only oneDNN's low-precision kernels are built per shape)
    assert seen == [n for n in counts if n]


def test_capacity_factor_drops_the_overflow_first_come_first_served():
    m = layer(n_expert_per_token=1, moe_capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0  # every positive token prefers expert 0
    x = torch.rand(8, 32) + 0.1
    y = m(x)
    cap = math.ceil(1.0 * 8 / 4)  # Switch: capacity = cf * tokens / experts
    assert (y[:cap].abs().sum(-1) > 0).all() and (y[cap:] == 0).all()
    m.capacity_factor = 0.0  # default: nothing dropped
    assert (m(x).abs().sum(-1) > 0).all()


def test_balancing_loss_is_k_for_uniform_probabilities_and_grows_with_imbalance():
    uniform = [torch.zeros(10, 4)]
    assert load_balancing_loss(uniform, k=2).item() == pytest.approx(2.0)
    collapsed = torch.full((10, 4), -20.0)
    collapsed[:, 0] = 20.0  # every token on expert 0 with probability ~1: E * f_0 * P_0 = E
    assert load_balancing_loss([collapsed], k=1).item() == pytest.approx(4.0, rel=1e-4)
    # padding is left out: the masked loss equals the loss over the real tokens alone
    logits, mask = torch.randn(12, 4), torch.tensor([1] * 9 + [0] * 3)
    torch.testing.assert_close(load_balancing_loss([logits], 2, mask), load_balancing_loss([logits[:9]], 2))
    torch.testing.assert_close(router_z_loss([logits], mask), router_z_loss([logits[:9]]))
    # z-loss (Zoph et al. 2022, eq. 5): logsumexp of zero logits is log E
    assert router_z_loss(uniform).item() == pytest.approx(math.log(4) ** 2)


def test_per_layer_balancing_sees_what_pooling_over_layers_hides():
    a, b = torch.full((10, 2), -20.0), torch.full((10, 2), -20.0)
    a[:, 0] = b[:, 1] = 20.0  # layer a sends every token to expert 0, layer b to expert 1
    assert load_balancing_loss([a, b], k=1, pooled=True).item() == pytest.approx(1.0, rel=1e-4)  # looks balanced
    assert load_balancing_loss([a, b], k=1, pooled=False).item() == pytest.approx(4.0, rel=1e-4)  # 2 layers x E


def test_each_expert_costs_flops_only_for_its_tokens():
    m = layer(n_expert_per_token=2)
    x = torch.randn(64, 32)
    with FlopCounterMode(display=False) as fc:
        m(x)
    gated = 2 * 64 * 2 * (32 * 48 + 24 * 32)  # k experts per token: up ([gate | up]) and down
    router = 2 * 64 * 32 * 4
    assert fc.get_total_flops() == gated + router  # not n_expert / k = 2x that


def tiny_moe_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, n_expert=4,
                                   n_expert_per_token=2, moe_every=2), **kw}))


def test_moe_every_and_outputs_of_a_moe_gpt():
    m = tiny_moe_gpt()
    assert [type(b.mlp).__name__ for b in m.blocks] == ["MLP", "MoE"]
    x = torch.randint(0, 50, (2, 12))
    out = m(x, x)
    assert out.expert_load.shape == (1, 4) and out.expert_load.sum().item() == pytest.approx(1.0)
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (24, 4)
    c = m.config
    assert not c.moe_aux_pooled  # Switch's per-layer sum by default; the Mixtral family pools as transformers
    want = (c.moe_aux_loss_coef * load_balancing_loss(out.router_logits, 2, pooled=False)
            + c.moe_z_loss_coef * router_z_loss(out.router_logits))
    torch.testing.assert_close(out.aux_loss, want)
    assert GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32))(x).aux_loss is None  # dense: none


def test_train_a_moe_gpt_logs_expert_load(char_data, tmp_path):
    run = tmp_path / "run"
    rc = main(["train", "--data", str(char_data), "--out", str(run), "--model", "tiny", "--model.n_expert=4",
               "--model.n_expert_per_token=2", "--model.moe_hidden=128", "--train.max_steps=20",
               "--train.batch_size=4", "--train.lr=3e-3", "--train.warmup_steps=5", "--train.eval_interval=0",
               "--train.eval_iters=2", "--train.log_interval=1", "--train.progress=false"])
    assert rc == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    loss = [r["loss"] for r in rows]
    assert sum(loss[-5:]) / 5 < 0.85 * sum(loss[:5]) / 5
    assert all(len(r["expert_load"]) == 2 and r["expert_load_max"] >= 1.0 and r["aux_loss"] > 0 for r in rows)
    assert "n_expert: 4" in (run / "config.yaml").read_text()
