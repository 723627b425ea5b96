import pytest
import torch
import torch.nn.functional as F

from lmlab.nn.attention import Attention, causal_matmul_attention


@pytest.mark.parametrize("block", [128, 5])  # one block; query blocks of 5 rows (the last one short)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_attention_matches_sdpa_values_and_gradients(dtype, tol, block):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    go = torch.randn(2, 3, 17, 8, dtype=dtype)
    ours = causal_matmul_attention(q, k, v, block)
    ours.backward(go)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    # the reference in float64, so both dtypes are judged against the exact value
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    ref.backward(go.double())
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
    for g, t in zip(grads, (q64, k64, v64)):
        torch.testing.assert_close(g.double(), t.grad, rtol=tol, atol=tol)


def test_matmul_attention_in_bf16_is_as_accurate_as_sdpa():
    """Large scores, where rounding them to bf16 before the soft-max would double the error."""
    torch.manual_seed(0)
    q, k, v = (3 * torch.randn(2, 4, 64, 32, dtype=torch.float64) for _ in range(3))
    go = torch.randn(2, 4, 64, 32, dtype=torch.float64)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    ref.backward(go)

    def errors(fn):
        qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
        y = fn(qb, kb, vb)
        y.backward(go.bfloat16())
        return [((a.double() - b).norm() / b.norm()).item()
                for a, b in ((y, ref), (qb.grad, q64.grad), (kb.grad, k64.grad), (vb.grad, v64.grad))]

    ours = errors(causal_matmul_attention)
    sdpa = errors(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    for o, s in zip(ours, sdpa):
        assert o < 1.2 * s, (ours, sdpa)


def test_bf16_training_path_is_taken_and_agrees_with_sdpa(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(32, 4).to(torch.bfloat16)
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    calls = []
    import lmlab.nn.attention as mod

    monkeypatch.setattr(mod, "causal_matmul_attention", lambda *a: calls.append(1) or causal_matmul_attention(*a))
    fast = attn(x)
    fast.sum().backward()
    assert calls == [1]  # bf16 with gradients on CPU: the matmul path
    gx, x.grad = x.grad.clone(), None
    monkeypatch.setattr(mod, "_MATMUL_ATTENTION_MAX_SCORES", 0)  # force SDPA
    slow = attn(x)
    slow.sum().backward()
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, x.grad, rtol=5e-2, atol=5e-2)
    with torch.no_grad():  # inference keeps SDPA
        attn(x)
    assert calls == [1]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_attention_with_more_keys_than_queries(dtype, tol):
    """Queries at the last T of S positions (a prefix of keys before them), against SDPA with the mask."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 11, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 3, 19, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    go = torch.randn(2, 3, 11, 8, dtype=dtype)
    ours = causal_matmul_attention(q, k, v, 4)
    ours.backward(go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = torch.ones(11, 19, dtype=torch.bool).tril(diagonal=19 - 11)
    ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask)
    ref.backward(go.double())
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
    for t, r in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=tol, atol=tol)


def test_bf16_training_path_with_rotary_and_a_second_backward_pass(monkeypatch):
    """The Llama path (rotated queries and keys), in several query blocks, agrees with SDPA, and the
    saved tensors survive a retained graph's second backward pass unchanged."""
    import lmlab.nn.attention as mod
    from lmlab.nn.position import RotaryEmbedding

    torch.manual_seed(0)
    attn = Attention(32, 4).to(torch.bfloat16)
    rotary = RotaryEmbedding(8).rotary(torch.arange(150)[None])
    x = torch.randn(2, 150, 32, dtype=torch.bfloat16, requires_grad=True)
    calls = []
    monkeypatch.setattr(mod, "causal_matmul_attention", lambda *a: calls.append(1) or causal_matmul_attention(*a))
    fast = attn(x, rotary=rotary)
    assert calls == [1]
    fast.sum().backward(retain_graph=True)
    g1, x.grad = x.grad.clone(), None
    fast.sum().backward()
    assert torch.equal(g1, x.grad)
    x.grad = None
    monkeypatch.setattr(mod, "_MATMUL_ATTENTION_MAX_SCORES", 0)  # force SDPA
    slow = attn(x, rotary=rotary)
    slow.sum().backward()
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g1, x.grad, rtol=5e-2, atol=5e-2)
