import pytest
import torch
import torch.nn.functional as F

from lmlab.nn import mlp
from lmlab.nn.mlp import MLP, gelu_tanh


def _reference(x: torch.Tensor, go: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's tanh GELU and its gradient in float64."""
    x64 = x.detach().double().requires_grad_()
    y = F.gelu(x64, approximate="tanh")
    y.backward(go.double())
    return y.detach(), x64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_training_path_matches_torch_in_value_and_gradient(dtype, monkeypatch):
    monkeypatch.setattr(mlp, "_GELU_CHUNK", 1000)  # several chunks, the last one short
    torch.manual_seed(0)
    x = (4 * torch.randn(37, 100)).to(dtype)[:, ::2].requires_grad_()  # not contiguous
    go = torch.randn(37, 50).to(dtype)
    y = gelu_tanh(x)
    y.backward(go)
    ref_y, ref_g = _reference(x, go)
    # torch's own kernels in this dtype set the bar: within a rounding step of the exact value
    xn = x.detach().clone().requires_grad_()
    yn = F.gelu(xn, approximate="tanh")
    yn.backward(go)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref_y, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), ref_g, rtol=2e-5, atol=1e-5)
    else:
        assert ((y.double() - ref_y).abs() <= (yn.double() - ref_y).abs().max()).all()
        # the derivative is kept in bf16 and the product rounded again: two roundings (2^-8 each at most)
        err, torch_err = (x.grad.double() - ref_g).abs(), (xn.grad.double() - ref_g).abs()
        assert (err <= 2**-7 * ref_g.abs() + 1e-6).all()
        assert err.norm() < 2 * torch_err.norm()
    assert y.dtype == x.grad.dtype == dtype


def test_gelu_tanh_without_gradients_is_torchs_kernel():
    x = torch.randn(8, 16)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    with torch.no_grad():
        xg = x.clone().requires_grad_()
        assert torch.equal(gelu_tanh(xg), F.gelu(x, approximate="tanh"))


def test_mlp_under_bf16_autocast_trains_like_float32():
    torch.manual_seed(0)
    m = MLP(16, 64, "gelu_tanh")
    x = torch.randn(4, 8, 16)
    m(x).square().mean().backward()
    fp32 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for g32, p in zip(fp32, m.parameters()):
        assert ((p.grad - g32).norm() / g32.norm()).item() < 2e-2
