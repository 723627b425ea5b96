"""Attention backends (lmlab/nn/attention_backends.py): each equals the eager reference, forward and
gradients; sliding-window + global attention is banded (no [T, T] tensor) and wired into the decoders."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmlab.models.registry import build, preset
from lmlab.nn.attention_backends import ATTENTION_BACKENDS, eager_attention, sliding_window_attention, window_mask


def _qkv(B=2, H=4, H_kv=2, T=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, d, generator=g, requires_grad=True) for h in (H, H_kv, H_kv)]


def _grads(y, inputs):
    return torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), inputs)


@pytest.mark.parametrize("window, n_global, chunk, stride", [
    (1, 0, 0, 0), (5, 0, 0, 0), (5, 3, 0, 0), (5, 9, 3, 0), (8, 2, 16, 0), (64, 0, 0, 0), (4, 40, 0, 0),
    (5, 0, 0, 4), (5, 2, 3, 7), (8, 1, 16, 8)])  # stride: every s-th position global too
@pytest.mark.parametrize("padded", [False, True])
def test_sliding_window_equals_eager_with_its_mask(window, n_global, chunk, stride, padded):
    q, k, v = _qkv()
    T = q.shape[2]
    key_mask = None
    mask = window_mask(torch.arange(T), torch.arange(T), window, n_global, stride)[None, None]
    if padded:  # row 1 left-padded by 6, as the engine batches prompts: its global tokens start after them
        key_mask = torch.ones(2, T, dtype=torch.bool)
        key_mask[1, :6] = False
        shifted = window_mask(torch.arange(T) - 6, torch.arange(T) - 6, window, n_global, stride)
        mask = torch.stack([mask[0, 0], shifted])[:, None]
        own = torch.eye(T, dtype=torch.bool)
        mask = mask & (key_mask[:, None, None, :] | own)
    want = eager_attention(q, k, v, attn_mask=mask)
    got = sliding_window_attention(q, k, v, window=window, n_global=n_global, global_stride=stride,
                                   key_mask=key_mask, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(got, (q, k, v)), _grads(want, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_global_path_with_its_own_queries_and_keys():
    """`global_qk` (the model passes q, k before RoPE): scores against a global key outside the window
    use those, scores in the window the band's; the dense reference builds the mixed score matrix."""
    q, k, v = _qkv()
    gq, gk = (torch.randn_like(t, requires_grad=True) for t in (q, k))
    T, w, s = q.shape[2], 5, 6
    pos = torch.arange(T)
    local = window_mask(pos, pos, w, 0)
    glob = window_mask(pos, pos, w, 0, s) & ~local
    scale = q.shape[-1] ** -0.5
    ke, gke, ve = (t.repeat_interleave(2, dim=1) for t in (k, gk, v))  # grouped-query: 2 query heads each
    scores = torch.where(local, q @ ke.transpose(-1, -2), gq @ gke.transpose(-1, -2)) * scale
    want = torch.softmax(scores.masked_fill(~(local | glob), float("-inf")), -1) @ ve
    got = sliding_window_attention(q, k, v, window=w, global_stride=s, global_qk=(gq, gk))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(got, (q, k, v, gq, gk)), _grads(want, (q, k, v, gq, gk))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sdpa_equals_eager():
    q, k, v = _qkv()
    for causal in (False, True):
        want = eager_attention(q, k, v, is_causal=causal)
        got = ATTENTION_BACKENDS["sdpa"](q, k, v, is_causal=causal)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(_grads(got, (q, k, v)), _grads(want, (q, k, v))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_sliding_window_never_builds_a_quadratic_tensor():
    T, w, g, d = 16384, 256, 16, 16
    q, k, v = (torch.randn(1, 1, T, d, requires_grad=True) for _ in range(3))
    with _LargestTensor() as mode:
        y = sliding_window_attention(q, k, v, window=w, n_global=g)
        y.sum().backward()
    # chunks of w queries against a band of 2w - 1 keys (and g global ones): about 2 T w elements
    assert mode.largest <= 3 * T * w, mode.largest
    assert mode.largest < T * T / 20  # a [T, T] score matrix would be 268M elements
    # a global token every w positions: T / w global keys for every query, still under 3 T w here
    with _LargestTensor() as mode:
        sliding_window_attention(q, k, v, window=w, global_stride=w).sum().backward()
    assert mode.largest <= 3 * T * w, mode.largest


@pytest.mark.parametrize("family", ["tiny", "llama-tiny"])
def test_decoders_run_the_backends(family):
    cfg = preset(family)
    cfg.vocab_size = 53
    torch.manual_seed(0)
    plain = build(cfg).eval()
    x = torch.randint(0, 53, (2, 40))

    def variant(**kw):
        m = build(type(cfg)(**{**cfg.__dict__, **kw})).eval()
        m.load_state_dict(plain.state_dict())
        return m

    with torch.no_grad():
        want = plain(x).logits
        torch.testing.assert_close(variant(attention="eager")(x).logits, want, rtol=1e-5, atol=1e-5)
        # a window as long as the sequence is full causal attention
        torch.testing.assert_close(variant(sliding_window=64)(x).logits, want, rtol=1e-5, atol=1e-5)
        windowed = variant(sliding_window=8, global_tokens=2)
        local = windowed(x).logits
        assert (local[:, 8:] - want[:, 8:]).abs().max() > 1e-3  # the window matters past it
        torch.testing.assert_close(local[:, :8], want[:, :8], rtol=1e-5, atol=1e-5)
        # generation with the KV cache: a prefill, then one token at a time, equals the whole sequence
        cache = windowed.make_kv_cache(2, 40)
        steps = [windowed(x[:, :12], kv_cache=cache).logits]
        steps += [windowed(x[:, t:t + 1], kv_cache=cache).logits for t in range(12, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), local, rtol=1e-5, atol=1e-5)
        # every other layer global (Gemma 2's alternation) is its own model
        alternating = variant(sliding_window=8, global_tokens=2, global_every=2)
        assert [b.attn.backend for b in alternating.blocks] == ["sliding_window", "sdpa"]


@pytest.mark.parametrize("global_every", [0, 2])
def test_rolling_cache_generation_equals_full_recomputation(global_every):
    """Sliding-window layers decode from a ring of g + w keys (globals plus the last w): prefills in
    uneven chunks, then single tokens far past the window, give the logits of the whole sequence
    recomputed with the same window mask, and greedy decoding picks the same tokens."""
    cfg = preset("llama-tiny")
    cfg.vocab_size, cfg.sliding_window, cfg.global_tokens, cfg.global_every = 53, 6, 2, global_every
    torch.manual_seed(0)
    m = build(cfg).eval()
    x = torch.randint(0, 53, (2, 50))
    with torch.no_grad():
        want = m(x).logits
        cache = m.make_kv_cache(2, 50)
        assert cache.ring_k.shape[3] == 2 + 6 and cache.k.shape[0] == (1 if global_every else 0)
        cuts = [0, 3, 11, 12, 20]  # an empty-ring prefill, then chunks shorter and longer than w
        got = [m(x[:, a:b], kv_cache=cache).logits for a, b in zip(cuts, cuts[1:])]
        got += [m(x[:, t:t + 1], kv_cache=cache).logits for t in range(20, 50)]
        torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)
        assert sorted(cache.ring_pos.tolist()) == [0, 1, *range(44, 50)]
        # greedy generation: the ring against recomputing the whole sequence each step
        seq, cache = x[:1, :5], m.make_kv_cache(1, 40)
        nxt = m(seq, kv_cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(30):
            assert nxt.item() == m(seq).logits[0, -1].argmax().item()
            seq = torch.cat([seq, nxt], 1)
            nxt = m(nxt, kv_cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        with pytest.raises(ValueError, match="equal length without padding"):
            m(torch.ones(2, 3, dtype=torch.long), kv_cache=m.make_kv_cache(2, 8),
              attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))


def test_strided_global_models_decode_and_say_what_they_cannot():
    cfg = preset("llama-tiny")
    cfg.vocab_size, cfg.sliding_window, cfg.global_stride = 53, 6, 6
    torch.manual_seed(0)
    m = build(cfg).eval()
    x = torch.randint(0, 53, (1, 40))
    with torch.no_grad():
        want = m(x).logits
        cache = m.make_kv_cache(1, 40)  # strided globals grow with the sequence: full rows, no ring
        assert cache.ring_k.shape[0] == 0
        got = [m(x[:, :10], kv_cache=cache).logits] + [m(x[:, t:t + 1], kv_cache=cache).logits for t in range(10, 40)]
        torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)
        nope = build(type(cfg)(**{**cfg.__dict__, "global_rope": False})).eval()
        nope.load_state_dict(m.state_dict())
        assert (nope(x).logits[:, 12:] - want[:, 12:]).abs().max() > 1e-4  # the global path differs
        torch.testing.assert_close(nope(x).logits[:, :6], want[:, :6], rtol=1e-5, atol=1e-5)  # before any
        with pytest.raises(ValueError, match="without a cache"):
            nope(x[:, :4], kv_cache=nope.make_kv_cache(1, 8))
    with pytest.raises(ValueError, match="set sliding_window"):
        build(type(cfg)(**{**cfg.__dict__, "sliding_window": 0}))


def test_padded_batch_through_a_windowed_model():
    cfg = preset("llama-tiny")
    cfg.vocab_size, cfg.sliding_window, cfg.global_tokens = 53, 6, 1
    torch.manual_seed(0)
    m = build(cfg).eval()
    a, b = torch.randint(0, 53, (1, 30)), torch.randint(0, 53, (1, 22))
    x = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :8] = 0
    with torch.no_grad():
        batched = m(x, attention_mask=mask).logits
        torch.testing.assert_close(batched[0], m(a).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[1, 8:], m(b).logits[0], rtol=1e-5, atol=1e-5)


def test_alibi_slopes_are_the_papers():
    from lmlab.nn.position import alibi_slopes

    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # 12 heads: the 8-head sequence, then every other slope of the 16-head one
    want = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(k / 2) for k in (1, 3, 5, 7)]
    assert alibi_slopes(12).tolist() == pytest.approx(want, rel=1e-6)


def test_alibi_attention_is_the_biased_reference():
    from lmlab.nn.attention import Attention

    torch.manual_seed(0)
    att = Attention(32, 4, alibi=True).eval()
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        q, k, v = (t.view(2, 11, 4, 8).transpose(1, 2) for t in att.qkv(x).split(32, dim=-1))
        i = torch.arange(11)
        dist = (i[:, None] - i[None, :]).float()
        bias = -att.alibi_slopes[:, None, None] * dist.clamp(min=0)
        want = eager_attention(q, k, v, attn_mask=bias.masked_fill(dist < 0, float("-inf")))
        want = att.proj(want.transpose(1, 2).reshape(2, 11, 32))
        torch.testing.assert_close(att(x), want, rtol=1e-5, atol=1e-5)


def test_alibi_gpt_backends_cache_and_padding_agree():
    cfg = preset("tiny")
    cfg.vocab_size, cfg.position = 53, "alibi"
    torch.manual_seed(0)
    m = build(cfg).eval()
    assert m.wpe is None  # no position table
    eager = build(type(cfg)(**{**cfg.__dict__, "attention": "eager"})).eval()
    eager.load_state_dict(m.state_dict())
    x = torch.randint(0, 53, (2, 30))
    with torch.no_grad():
        full = m(x).logits
        torch.testing.assert_close(eager(x).logits, full, rtol=1e-5, atol=1e-5)
        cache = m.make_kv_cache(2, 30)
        steps = [m(x[:, :9], kv_cache=cache).logits] + [m(x[:, t:t + 1], kv_cache=cache).logits
                                                        for t in range(9, 30)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x[1:, :25]], 1)
        mask = torch.ones(1, 30, dtype=torch.long)
        mask[0, :5] = 0
        torch.testing.assert_close(m(padded, attention_mask=mask).logits[0, 5:], full[1, :25], rtol=1e-5, atol=1e-5)


def test_mistral_sliding_window_equals_transformers():
    from peers import require_module

    from lmlab.io.hf import config_to_hf, from_hf

    transformers = require_module("transformers")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     sliding_window=8, tie_word_embeddings=False)
    hf = transformers.MistralForCausalLM(cfg).eval()
    ours = from_hf(hf.config.to_dict(), hf.state_dict())
    assert ours.config.sliding_window == 8
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)
    back = config_to_hf(ours.config)
    assert back["model_type"] == "mistral" and back["sliding_window"] == 8
