import torch

from lmlab.models.registry import PRESETS, build, preset
from lmlab.models.transformer.gpt import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


def test_forward_shapes_loss_and_tied_embeddings():
    m = tiny()
    x = torch.randint(0, 50, (3, 10))
    assert m(x).logits.shape == (3, 10, 50)
    out = m(x, x)
    assert out.loss.ndim == 0 and abs(out.loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    assert m.lm_head.weight.data_ptr() == m.wte.weight.data_ptr()
    n_all = sum(p.numel() for p in m.parameters())
    assert m.num_params(non_embedding=False) == n_all
    assert m.num_params() == n_all - 50 * 32 - 32 * 32


def test_kv_cache_matches_full_forward():
    m = tiny()
    x = torch.randint(0, 50, (2, 20))
    full = m(x).logits
    cache = m.make_kv_cache(2)
    parts = [m(x[:, :7], kv_cache=cache).logits, m(x[:, 7:8], kv_cache=cache).logits,
             m(x[:, 8:20], kv_cache=cache).logits]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 20


def test_causality_future_tokens_do_not_change_past_logits():
    m = tiny()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 50
    torch.testing.assert_close(m(x).logits[:, :8], m(y).logits[:, :8])


def test_presets_build_with_expected_sizes():
    assert set(PRESETS) >= {"tiny", "gpt2-124m"}
    cfg = preset("gpt2-124m")
    cfg.vocab_size = 50257
    with torch.device("meta"):
        m = build(cfg)
    # GPT-2 small: 124.4M parameters with tied embeddings (Radford et al. 2019; HF's count)
    assert abs(m.num_params(non_embedding=False) - 124_439_808) == 0


def test_fused_chunked_loss_equals_plain_cross_entropy():
    import torch.nn.functional as F

    from lmlab.nn.loss import linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::7] = -100
    fused = linear_cross_entropy(x, w, t, chunk_size=64)
    (2 * fused).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    plain = F.cross_entropy(x @ w.t(), t, ignore_index=-100)
    (2 * plain).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation path: no gradient work
        torch.testing.assert_close(linear_cross_entropy(x, w, t, chunk_size=64), plain)


def test_model_loss_paths_agree_and_bf16_is_close():
    m = tiny()
    x = torch.randint(0, 50, (2, 16))
    m.config.loss_chunk_size = 8
    fused = m(x, x).loss
    m.config.loss_chunk_size = 0
    plain = m(x, x).loss
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    m.config.loss_chunk_size = 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(x, x).loss
    assert low.dtype == torch.float32 and abs(low.item() - plain.item()) < 0.05


def test_fused_loss_under_bf16_autocast_is_close_to_float64():
    """More chunks than the bf16 partial sums cover, so the float32 total is added to several times."""
    from lmlab.nn import loss as loss_mod

    torch.manual_seed(0)
    x = torch.randn(600, 32, requires_grad=True)
    w = (0.3 * torch.randn(300, 32)).requires_grad_()
    t = torch.randint(0, 300, (600,))
    t[::5] = -100
    chunk = 16
    assert 600 / chunk > 2 * loss_mod._LOW_PRECISION_CHUNKS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_mod.linear_cross_entropy(x, w, t, chunk_size=chunk)
    low.backward()
    assert low.dtype == x.grad.dtype == w.grad.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64 @ w64.t(), t, ignore_index=-100)
    ref.backward()
    assert abs(low.item() - ref.item()) < 1e-2 * ref.item()
    for g, r in ((x.grad, x64.grad), (w.grad, w64.grad)):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-2


def test_fused_loss_under_bf16_autocast_with_one_partial_sum():
    """Few chunks (the bf16 partial sum is the whole weight gradient), a loss scaled by 3, and a second
    backward pass of a retained graph giving the same gradients."""
    from lmlab.nn import loss as loss_mod

    torch.manual_seed(0)
    x = torch.randn(100, 32, requires_grad=True)
    w = (0.3 * torch.randn(300, 32)).requires_grad_()
    t = torch.randint(0, 300, (100,))
    t[::5] = -100
    assert 100 / 16 <= loss_mod._LOW_PRECISION_CHUNKS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = 3 * loss_mod.linear_cross_entropy(x, w, t, chunk_size=16)
    low.backward(retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    low.backward()
    assert torch.equal(first[0], x.grad) and torch.equal(first[1], w.grad)
    assert x.grad.dtype == w.grad.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (3 * torch.nn.functional.cross_entropy(x64 @ w64.t(), t, ignore_index=-100)).backward()
    for g, r in ((x.grad, x64.grad), (w.grad, w64.grad)):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-2


def test_attn_dropout_is_separate_from_residual_dropout():
    """GPT-2's attn_pdrop: attn_dropout=0 leaves the attention probabilities alone (the causal fast paths stay on)
    while dropout still acts on the residual branches; None follows `dropout`; the HF config carries both."""
    from lmlab.io.hf import config_from_hf, config_to_hf

    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    split = GPT(GPTConfig(**base, dropout=0.3, attn_dropout=0.0))
    same = GPT(GPTConfig(**base, dropout=0.3))
    assert [b.attn.dropout for b in split.blocks] == [0.0, 0.0]
    assert [b.attn.dropout for b in same.blocks] == [0.3, 0.3]
    assert [b.drop.p for b in split.blocks] == [0.3, 0.3] and split.drop.p == 0.3
    x = torch.randint(0, 50, (2, 16))
    split.train()
    assert not torch.equal(split(x).logits, split(x).logits)  # residual dropout still draws
    hf = config_to_hf(split.config)
    assert (hf["attn_pdrop"], hf["resid_pdrop"], hf["embd_pdrop"]) == (0.0, 0.3, 0.3)
    hf["model_type"] = "gpt2"
    back = config_from_hf(hf)
    assert (back.attn_dropout, back.dropout) == (0.0, 0.3)
