"""The one decoding loop (lmlab/generate/engine.py) and the KV cache with a length per row
(lmlab/nn/kv_cache.py): a batch of prompts of different lengths decodes exactly as each prompt alone,
rows leave and join without changing the others, every request samples from its own generator, and
detokenisation costs O(1) tokens per step."""

import pytest
import torch

from lmlab.generate.engine import Decoder, Detokenizer, SamplingConfig, generate_ids, generate_texts, stream_text
from lmlab.models.transformer.gpt import GPT, GPTConfig
from lmlab.models.transformer.llama import Llama, LlamaConfig
from lmlab.tokenizers import CharTokenizer

CHARS = [*"<pad> <unk> <s> </s> <mask>".split(), *"abcdefghijklmnopqrstuvwxyz .,!?\n"]
TOK = CharTokenizer(CHARS)


def _model(family: str, block_size: int = 64, n_layer: int = 2):
    torch.manual_seed(0)
    if family == "gpt":
        m = GPT(GPTConfig(vocab_size=len(CHARS), block_size=block_size, n_layer=n_layer, n_head=2, n_embd=32))
    else:
        m = Llama(LlamaConfig(vocab_size=len(CHARS), block_size=block_size, n_layer=n_layer, n_head=4,
                              n_kv_head=2, n_embd=32, mlp_hidden=64))
    with torch.no_grad():  # sharpen the distribution so greedy choices are far from ties
        m.wte.weight.mul_(8)
    return m.eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [16], [17, 18, 19, 20, 21]]


def _alone_logits(model, prompt, n):
    """Logits of the prompt's last position and of n greedy steps after it, one sequence alone."""
    cache = model.make_kv_cache(1, len(prompt) + n)
    out = [model(torch.tensor([prompt]), kv_cache=cache).logits[:, -1]]
    for _ in range(n):
        out.append(model(out[-1].argmax(-1).view(1, 1), kv_cache=cache).logits[:, -1])
    return torch.cat(out)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@torch.no_grad()
def test_rows_of_different_lengths_decode_as_each_alone(family):
    model = _model(family)
    n = 10
    # each row prefilled alone into its own slot (no padding at all: rows keep different lengths)
    cache = model.make_kv_cache(len(PROMPTS), 8 + n + 1)
    first = torch.cat([model(torch.tensor([p]), kv_cache=cache.row(r)).logits[:, -1] for r, p in enumerate(PROMPTS)])
    assert cache.lengths.tolist() == [len(p) for p in PROMPTS] and cache.uniform() is None
    got = [first]
    for _ in range(n):  # then decoded together, each new token at its own row's position
        got.append(model(got[-1].argmax(-1)[:, None], kv_cache=cache).logits[:, -1])
    got = torch.stack(got, 1)  # [B, n + 1, V]
    for r, p in enumerate(PROMPTS):
        want = _alone_logits(model, p, n)
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
        assert got[r].argmax(-1).tolist() == want.argmax(-1).tolist()
    assert cache.positions.tolist() == [len(p) + n for p in PROMPTS]


@pytest.mark.parametrize("family", ["gpt", "llama"])
@torch.no_grad()
def test_a_row_leaves_and_a_new_one_joins_without_changing_the_others(family):
    model = _model(family)
    cache = model.make_kv_cache(3, 32)
    prompts = PROMPTS[:3]
    logits = torch.cat([model(torch.tensor([p]), kv_cache=cache.row(r)).logits[:, -1] for r, p in enumerate(prompts)])
    seqs = [[] for _ in prompts]
    for _ in range(3):
        nxt = logits.argmax(-1)
        for r in range(3):
            seqs[r].append(int(nxt[r]))
        logits = model(nxt[:, None], kv_cache=cache).logits[:, -1]
    cache.keep([0, 2])  # row 1 leaves (e.g. it finished)
    rows, logits = [0, 2], logits[[0, 2]]
    # a new sequence is prefilled into a free slot: clear one and prefill it alone
    cache.keep([0, 1, 1])  # grow by one row (a copy of row 1, about to be replaced)
    cache.clear(2)
    newp = PROMPTS[3]
    new_logits = model(torch.tensor([newp]), kv_cache=cache.row(2)).logits[:, -1]
    logits = torch.cat([logits, new_logits])
    rows.append(3)
    seqs.append([])
    steps = {0: [], 2: [], 3: []}
    for _ in range(4):
        nxt = logits.argmax(-1)
        for j, r in enumerate(rows):
            seqs[r].append(int(nxt[j]))
            steps[r].append(logits[j])
        logits = model(nxt[:, None], kv_cache=cache).logits[:, -1]
    for r, p in [(0, prompts[0]), (2, prompts[2]), (3, newp)]:
        n = len(seqs[r])
        want = _alone_logits(model, p, n)
        assert seqs[r] == want.argmax(-1).tolist()[:n]
        torch.testing.assert_close(torch.stack(steps[r]), want[n - 4:n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_batched_decoding_equals_each_request_alone(family):
    model = _model(family)
    cfgs = [SamplingConfig(max_new_tokens=n, temperature=0) for n in (12, 3, 20, 7)]  # rows leave early
    prompts = [[3] + p for p in PROMPTS]
    batched = generate_texts(model, TOK, prompts, cfgs)
    alone = [generate_texts(model, TOK, [p], c)[0] for p, c in zip(prompts, cfgs)]
    assert batched == alone
    assert [len(t) for t in batched] == [12, 3, 20, 7]


def test_each_request_samples_from_its_own_generator():
    model = _model("gpt")
    cfg = SamplingConfig(max_new_tokens=15, temperature=1.0, seed=11)
    others = [SamplingConfig(max_new_tokens=m, temperature=t, seed=s) for m, t, s in ((15, 1.0, 3), (4, 0.7, 5))]
    alone = generate_texts(model, TOK, [[3, 5, 6]], cfg)[0]
    for neighbours in ([others[0]], others, [SamplingConfig(max_new_tokens=15, temperature=0)]):
        prompts = [[3, 5, 6]] + [[3, 8, 9, 10][:2 + k] for k in range(len(neighbours))]
        assert generate_texts(model, TOK, prompts, [cfg] + neighbours)[0] == alone
    assert generate_texts(model, TOK, [[3, 5, 6]], SamplingConfig(max_new_tokens=15, temperature=1.0, seed=12))[0] \
        != alone


def test_decoder_rows_leave_at_eos_and_on_finish():
    model = _model("gpt")
    greedy = Decoder(model, [[3, 5, 6]], SamplingConfig(max_new_tokens=10, temperature=0))
    toks = [t for _ in range(10) for _, t in greedy.step()]
    eos = toks[4]
    dec = Decoder(model, [[3, 5, 6], [3, 9]], SamplingConfig(max_new_tokens=10, temperature=0), eos_id=eos)
    out: dict[int, list[int]] = {0: [], 1: []}
    while not dec.done:
        for i, t in dec.step():
            out[i].append(t)
            if i == 1 and len(out[1]) == 2:
                dec.finish(1)
    assert out[0] == toks[:toks.index(eos) + 1] and len(out[1]) == 2


def test_nplm_without_a_cache_decodes_in_a_batch():
    from lmlab.models.nplm import NPLM, NPLMConfig

    torch.manual_seed(0)
    model = NPLM(NPLMConfig(vocab_size=len(CHARS), block_size=16, context=3, n_embd=16, hidden=32)).eval()
    cfg = SamplingConfig(max_new_tokens=30, temperature=0)
    prompts = [[3] + p for p in PROMPTS]
    assert generate_texts(model, TOK, prompts, cfg) == [generate_texts(model, TOK, [p], cfg)[0] for p in prompts]


class CountingTokenizer:
    """Wraps a tokenizer and counts the tokens every `decode` call is given; no EOS ends the text."""

    eos_id = -1

    def __init__(self, tok):
        self.tok, self.decoded, self.calls = tok, 0, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, skip_special=False):
        self.decoded += len(ids)
        self.calls += 1
        return self.tok.decode(ids, skip_special=skip_special)


def test_generating_2000_tokens_decodes_o1_tokens_per_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(CHARS), block_size=2048 + 16, n_layer=1, n_head=2, n_embd=32)).eval()
    tok = CountingTokenizer(TOK)
    steps = 2000
    cfg = SamplingConfig(max_new_tokens=steps, temperature=1.0, seed=0, stop=["zzzzzz"])  # never matched
    text = "".join(stream_text(model, tok, [3, 5, 6], cfg))
    ids = list(generate_ids(model, [3, 5, 6], cfg))  # the same tokens: the request's own generator
    assert len(ids) == steps
    assert text == TOK.decode(ids, skip_special=True)  # the pieces add up to a full decode
    # O(1) tokens per step; re-decoding the whole reply every step would be ~steps^2 / 2 = 2,000,000
    assert tok.decoded < 20 * steps and tok.calls <= 2 * steps + 2


def test_incremental_detokenisation_equals_a_full_decode_with_bytes_and_stops():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from lmlab.tokenizers.bpe import BPETokenizer

    # byte-level tokens: multi-byte characters arrive one byte (token) at a time
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    tok = BPETokenizer(hf)
    text = "héllo wörld — 🎉 ok. naïve café “quotes” end"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span tokens
    for stop in ([], ["wör"], ["🎉"], ["end"], [" ok", "ll"], ["absent"]):
        d = Detokenizer(tok, stop)
        pieces = [d.push(t) for t in ids] + [d.flush()]
        assert all("\ufffd" not in p for p in pieces)
        want = text
        cuts = [i for s in stop if (i := text.find(s)) >= 0]
        if cuts:
            want = text[:min(cuts)]
        assert "".join(pieces) == want, stop
