"""CPU proxies for the GPU training step (lmlab/nn/device_paths.py): the path a CUDA tensor takes, run on
CPU tensors, equals the CPU path; it issues no more ATen operators than transformers' GPT-2 on the same
shapes (host overhead per step on a GPU is per operator); and the training forward compiles as one graph
with no CPU-only autograd Function in it."""

import collections

import pytest
import torch
from peers import needs
from torch.utils._python_dispatch import TorchDispatchMode

from lmlab.models.transformer.gpt import GPT, GPTConfig
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.nn.device_paths import cpu_kernels, forced

SHAPE = dict(n_layer=4, n_head=4, n_embd=64, block_size=128, vocab_size=512)
B = 5  # 640 positions: the CPU path takes two loss chunks of 512, the generic one one


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SHAPE, dropout=0.0))


def batch(T: int = SHAPE["block_size"]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def loss_and_grads(model, path: str, dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x, y = batch()
    with forced(path), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        loss = model(x, y).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_path_is_chosen_by_device_and_compilation():
    assert cpu_kernels(torch.zeros(1))
    assert cpu_kernels(torch.zeros(1, device="meta")) is False
    with forced("generic"):
        assert not cpu_kernels(torch.zeros(1))
    assert torch.compile(lambda t: t + cpu_kernels(t), fullgraph=True, backend="eager")(torch.zeros(1)).item() == 0
    with pytest.raises(ValueError):
        forced("gpu").__enter__()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_generic_path_on_cpu_equals_the_cpu_path(family):
    if family == "gpt":
        model = tiny_gpt()
    else:
        torch.manual_seed(0)
        model = Llama(LlamaConfig(**SHAPE, n_kv_head=2))
    loss_c, grads_c = loss_and_grads(model, "cpu", None)
    loss_g, grads_g = loss_and_grads(model, "generic", None)
    torch.testing.assert_close(loss_g, loss_c, rtol=1e-5, atol=1e-5)
    for n in grads_c:
        torch.testing.assert_close(grads_g[n], grads_c[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # bf16: the CPU GELU rounds its float32 result once, torch's kernel and SDPA round elsewhere
    loss_c, _ = loss_and_grads(model, "cpu", torch.bfloat16)
    loss_g, _ = loss_and_grads(model, "generic", torch.bfloat16)
    torch.testing.assert_close(loss_g, loss_c, rtol=1e-2, atol=0)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step, path: str, dtype: torch.dtype | None) -> int:
    with forced(path), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None), _CountOps() as c:
        step().backward()
    return sum(c.ops.values())


@needs("transformers")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_generic_step_issues_no_more_operators_than_transformers(dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=SHAPE["vocab_size"], n_positions=SHAPE["block_size"],
                                    n_embd=SHAPE["n_embd"], n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"],
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new"))
    model = tiny_gpt()
    x, y = batch()
    ours = count_ops(lambda: model(x, y).loss, "generic", dtype)
    theirs = count_ops(lambda: hf(input_ids=x, labels=x).loss, "generic", dtype)
    assert ours <= 1.1 * theirs, (ours, theirs)
    # the CPU path issues more (chunked GELU: ~10 operators per 2^17 elements), by design
    assert count_ops(lambda: model(x, y).loss, "cpu", dtype) > ours


def test_training_forward_compiles_as_one_graph():
    model = tiny_gpt()
    x, y = batch(64)
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            explained = torch._dynamo.explain(model)(x, y)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        assert explained.graph_count == 1
        code = "\n".join(g.code for g in explained.graphs)
        # the CPU-only Functions stay out of the graph Inductor fuses (the chunked loss stays: it saves memory)
        assert "_GeluTanh" not in code and "_CausalMatmulAttention" not in code


def test_compiled_bf16_loss_takes_the_plain_ops_and_equals_eager():
    """Compiled under bf16 with all logits in one chunk, the loss is plain linear + cross-entropy (which
    Inductor fuses); in float32 it stays the chunked Function. Loss and gradients equal eager's."""
    x, y = batch(64)
    for dtype in (torch.float32, torch.bfloat16):
        eager, compiled = tiny_gpt(), tiny_gpt()
        compiled.load_state_dict(eager.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            explained = torch._dynamo.explain(compiled)(x, y)
            code = "\n".join(g.code for g in explained.graphs)
            assert ("cross_entropy" in code) == (dtype == torch.bfloat16)
            want = eager(x, y).loss
            got = torch.compile(compiled, backend="aot_eager", fullgraph=True)(x, y).loss
        want.backward()
        got.backward()
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got, want, **tol)
        for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, **tol, msg=name)
