import pytest
import torch

from lmlab.cli import main
from lmlab.models.nplm import NPLM, NPLMConfig
from lmlab.train.checkpoint import load_checkpoint


def tiny(**kw):
    torch.manual_seed(0)
    return NPLM(NPLMConfig(vocab_size=30, context=3, n_embd=8, hidden=16, init_std=0.3, **kw)).eval()


def test_bengio_equation_one_at_a_position():
    m = tiny()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    logits = m(x).logits
    # y = b + W x + U tanh(d + H x), x = (C(w_t-2), C(w_t-1), C(w_t)) predicting w_t+1, at t = 4
    feats = m.wte.weight[torch.tensor([7, 8, 9])].reshape(-1)
    y = m.out.bias + m.direct.weight @ feats + m.out.weight @ torch.tanh(m.hidden.bias + m.hidden.weight @ feats)
    torch.testing.assert_close(logits[0, 4], y)
    # the first position sees </s> (id 3) as its missing context
    feats0 = m.wte.weight[torch.tensor([3, 3, 5])].reshape(-1)
    y0 = m.out.bias + m.direct.weight @ feats0 + m.out.weight @ torch.tanh(m.hidden.bias + m.hidden.weight @ feats0)
    torch.testing.assert_close(logits[0, 0], y0)


def test_only_the_last_n_minus_1_tokens_matter():
    m = tiny(direct=False)
    a = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    b = a.clone()
    b[0, :3] = torch.tensor([9, 9, 9])
    la, lb = m(a).logits, m(b).logits
    torch.testing.assert_close(la[0, 5:], lb[0, 5:])  # positions 5, 6 see tokens 3.. only
    assert not torch.allclose(la[0, 2], lb[0, 2])
    assert m.direct is None


def test_trains_with_the_common_trainer_and_generates(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run), "--model", "nplm", "--train.max_steps=40",
                 "--train.batch_size=8", "--train.progress=false", "--train.log_interval=1",
                 "--train.eval_iters=2", "--train.lr=3e-3"]) == 0
    import json

    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(ln)]
    assert losses[-1] < losses[0] - 0.5
    model, cfg, _, _ = load_checkpoint(run)
    assert cfg.model.family == "nplm"
    capsys.readouterr()
    assert main(["generate", str(run), "The ", "--max_new_tokens", "10", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    assert main(["eval", str(run), "--split", "val"]) == 0


def test_tied_output_layer_is_the_embedding_through_a_projection(tmp_path):
    m = tiny(direct=False, tie_embeddings=True)
    assert m.out.weight is m.wte.weight
    x = torch.tensor([[5, 6, 7, 8, 9]])
    feats = m.wte.weight[torch.tensor([7, 8, 9])].reshape(-1)
    y = m.out.bias + m.wte.weight @ (m.proj.weight @ torch.tanh(m.hidden.bias + m.hidden.weight @ feats))
    torch.testing.assert_close(m(x).logits[0, 4], y)
    # the tied table is counted once, and it stays tied through a checkpoint round trip
    assert m.num_params(non_embedding=False) == sum(p.numel() for p in m.parameters())
    from safetensors.torch import load_model, save_model
    save_model(m, str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    m2 = NPLM(NPLMConfig(vocab_size=30, context=3, n_embd=8, hidden=16, direct=False, tie_embeddings=True))
    load_model(m2, str(tmp_path / "m.safetensors"))
    assert m2.out.weight is m2.wte.weight
    torch.testing.assert_close(m2(x).logits, m(x).logits)


@pytest.mark.parametrize("direct,tied", [(False, False), (True, False), (True, True)])
def test_chunked_training_loss_equals_the_plain_one(direct, tied):
    """The training loss through the chunked output layer (bias and direct connections folded into one
    weight) equals cross-entropy of the materialised logits, gradients included."""
    torch.manual_seed(0)
    cfg = NPLMConfig(vocab_size=50, context=3, n_embd=8, hidden=16, direct=direct, tie_embeddings=tied,
                     loss_chunk_size=7)
    model = NPLM(cfg)
    x, y = torch.randint(0, 50, (3, 11)), torch.randint(0, 50, (3, 11))
    chunked = model(x, y).loss
    grads = torch.autograd.grad(chunked, list(model.parameters()))
    cfg.loss_chunk_size = 0
    plain = model(x, y).loss
    assert model(x, y).logits is not None
    for g, p in zip(grads, torch.autograd.grad(plain, list(model.parameters()))):
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
