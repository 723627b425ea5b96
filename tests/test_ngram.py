"""The n-gram LM against its peers: KenLM's lmplz (ARPA entries), the kenlm module and `query`
(sentence scores, perplexity), NLTK (maximum likelihood), and a direct dict-based implementation of
Chen & Goodman's formulas (modified Kneser-Ney, add-k, stupid backoff) on tiny corpora.

lmplz and query come from `bash .ci/build_kenlm.sh`; their tests skip when they are absent."""

from __future__ import annotations

import math
import re
import subprocess
import warnings
from collections import Counter, defaultdict

import numpy as np
import pytest
from kenlm_tools import assert_same_arpa, kenlm_tool, needs_lmplz, run_lmplz
from peers import needs, require_module

from lmlab.errors import LmlabError
from lmlab.io.arpa import write_arpa
from lmlab.models.ngram.model import NGramConfig, NGramModel
from lmlab.tokenizers import WordTokenizer

# ------------------------------------------------------------------ lmplz parity


@needs_lmplz
@pytest.mark.parametrize("order", [3, 5])
def test_kneser_ney_matches_lmplz(docs_lines, tmp_path, order):
    model = NGramModel.from_text(docs_lines, NGramConfig(order=order))
    write_arpa(model, tmp_path / "ours.arpa")
    ref, log = run_lmplz(docs_lines, order, tmp_path)
    assert_same_arpa(tmp_path / "ours.arpa", ref)
    # lmplz prints its discounts ("3 14294 D1=0.793135 D2=1.52231 D3+=1.67894") to 6 digits
    stats = re.findall(r"^(\d+) \d+ D1=(\S+) D2=(\S+) D3\+=(\S+)$", log, re.M)
    assert len(stats) == order
    for k, d1, d2, d3 in stats:
        np.testing.assert_allclose(model.discounts[int(k) - 1, 1:], [float(d1), float(d2), float(d3)], rtol=1e-5)


@needs_lmplz
def test_last_sorted_ngram_quirk_matches_lmplz(docs_lines, tmp_path):
    """lmplz counts the suffixes of the n-gram that sorts last with raw counts in its counts-of-counts;
    make that n-gram's last word (the newest word) frequent in varied contexts so it shows (~1e-3)."""
    lines = docs_lines[:2000] + ["the quux is here", "a quux is there", "one quux also", "my quux too"] * 3
    model = NGramModel.from_text(lines, NGramConfig(order=3))
    write_arpa(model, tmp_path / "ours.arpa")
    ref, _ = run_lmplz(lines, 3, tmp_path)
    assert_same_arpa(tmp_path / "ours.arpa", ref)


@needs_lmplz
def test_special_words_in_text_match_lmplz_skip_symbols(docs_lines, tmp_path):
    lines = [line.replace(" the ", " <unk> ", 1) if i % 3 == 0 else line for i, line in enumerate(docs_lines[:1500])]
    lines[5] = "<s> " + lines[5] + " </s>"
    with pytest.raises(LmlabError, match="skip_symbols=True"):
        NGramModel.from_text(lines, NGramConfig(order=3))  # lmplz refuses them too without the flag
    model = NGramModel.from_text(lines, NGramConfig(order=3, skip_symbols=True))
    write_arpa(model, tmp_path / "ours.arpa")
    ref, _ = run_lmplz(lines, 3, tmp_path, "--skip_symbols")
    assert_same_arpa(tmp_path / "ours.arpa", ref)


TINY = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "", "the end"]


@needs_lmplz
def test_discount_fallback_matches_lmplz(tmp_path):
    with pytest.raises(LmlabError, match="discount_fallback"):
        NGramModel.from_text(TINY, NGramConfig(order=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = NGramModel.from_text(TINY, NGramConfig(order=3, discount_fallback=True))
    for k in (1, 2, 3):  # every order of this corpus fails, and each says so (as lmplz does)
        assert any(f"fallback discounts for order {k}: D1=0.5 D2=1 D3+=1.5" in str(w.message) for w in caught)
    write_arpa(model, tmp_path / "ours.arpa")
    ref, _ = run_lmplz(TINY, 3, tmp_path, "--discount_fallback")
    assert_same_arpa(tmp_path / "ours.arpa", ref)


@needs("lmplz", "query")
def test_perplexity_matches_kenlm_query(docs_lines, tmp_path):
    train, test = docs_lines[:2500], docs_lines[2500:]
    model = NGramModel.from_text(train, NGramConfig(order=4))
    write_arpa(model, tmp_path / "m.arpa")
    (tmp_path / "test.txt").write_text("\n".join(test) + "\n")
    with open(tmp_path / "test.txt", "rb") as fin:
        out = subprocess.run([kenlm_tool("query"), "-v", "summary", str(tmp_path / "m.arpa")], stdin=fin,
                             capture_output=True, check=True, timeout=60).stdout.decode()
    ref = dict(line.split(":\t") for line in out.strip().splitlines() if ":\t" in line)
    ours = model.perplexity(test)
    assert ours.tokens == int(ref["Tokens"]) and ours.oovs == int(ref["OOVs"]) and ours.oovs > 0
    assert ours.perplexity == pytest.approx(float(ref["Perplexity including OOVs"]), rel=1e-5)
    assert ours.perplexity_excluding_oovs == pytest.approx(float(ref["Perplexity excluding OOVs"]), rel=1e-5)


# ------------------------------------------------------------------ kenlm module on our ARPA


def test_kenlm_module_scores_our_arpa(docs_lines, tmp_path):
    kenlm = require_module("kenlm")
    train, test = docs_lines[:2500], docs_lines[2500:2800]
    for order in (3, 5):
        model = NGramModel.from_text(train, NGramConfig(order=order))
        write_arpa(model, tmp_path / "m.arpa")
        ref = kenlm.Model(str(tmp_path / "m.arpa"))
        ours = model.score_batch(test)
        theirs = np.array([ref.score(s, bos=True, eos=True) for s in test])
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        for s in test[:20]:
            mine, kl = model.full_scores(s), list(ref.full_scores(s))
            assert [(m[1], m[2]) for m in mine] == [(k[1], k[2]) for k in kl]
            np.testing.assert_allclose([m[0] for m in mine], [k[0] for k in kl], atol=1e-5)
        s = test[0]
        assert model.score(s, bos=False, eos=False) == pytest.approx(ref.score(s, bos=False, eos=False), abs=1e-4)


# ------------------------------------------------------------------ reference implementation


def reference_kn(lines: list[str], N: int):
    """Interpolated modified Kneser-Ney straight from Chen & Goodman, with dicts and float64."""
    sents = [["<s>"] + line.split() + ["</s>"] for line in lines]
    raw = [Counter() for _ in range(N)]
    for s in sents:
        for k in range(1, N + 1):
            for i in range(len(s) - k + 1):
                if s[i:i + k] != ["<s>"]:
                    raw[k - 1][tuple(s[i:i + k])] += 1
    adj = [None] * N
    adj[N - 1] = raw[N - 1]
    for k in range(N - 1):
        left = Counter(g[1:] for g in raw[k + 1])
        adj[k] = {g: (c if g[0] == "<s>" else left[g]) for g, c in raw[k].items()}
    D = []
    for k in range(N):
        n = Counter(c for c in adj[k].values() if c <= 4)  # n_j: exactly j, j = 1..4
        y = n[1] / (n[1] + 2 * n[2])
        D.append([0.0] + [j - (j + 1) * y * n[j + 1] / n[j] for j in (1, 2, 3)])
    groups = [defaultdict(dict) for _ in range(N)]
    for k in range(N):
        for g, c in adj[k].items():
            groups[k][g[:-1]][g[-1]] = c
    n_vocab = len(adj[0]) + 1  # the words and </s>, plus <unk>; not <s>

    def gamma(ctx):
        ext = groups[len(ctx)].get(ctx)
        if not ext:
            return None
        d = D[len(ctx)]
        return sum(d[min(c, 3)] for c in ext.values()) / sum(ext.values())

    def prob(w, ctx):
        lower = prob(w, ctx[1:]) if ctx else 1.0 / n_vocab
        ext = groups[len(ctx)].get(ctx)
        if not ext:
            return lower
        c = ext.get(w, 0)
        own = (c - D[len(ctx)][min(c, 3)]) / sum(ext.values()) if c else 0.0
        return own + gamma(ctx) * lower

    return prob, gamma, D


def test_kneser_ney_matches_reference_formulas(docs_lines):
    lines, N = docs_lines[:400], 3
    prob, gamma, D = reference_kn(lines, N)
    model = NGramModel.from_text(lines, NGramConfig(order=N))
    np.testing.assert_allclose(model.discounts, np.array(D, dtype=np.float64), rtol=1e-6)
    t = model.tables
    V = len(model.vocab)
    for k in range(N):
        for row in range(0, len(t.prob[k]), 7):  # every 7th entry of every order
            words, key = [], int(model.keys[k][row])
            for j in range(k, -1, -1):
                words.append(model.vocab[key % V])
                key = int(model.keys[j - 1][key // V]) if j else 0
            g = tuple(words[::-1])
            if g == ("<s>",):
                continue
            assert t.prob[k][row] == pytest.approx(math.log10(prob(g[-1], g[:-1])), abs=1e-5)
            if k < N - 1 and g[-1] not in ("</s>", "<unk>"):
                assert t.backoff[k][row] == pytest.approx(math.log10(gamma(g)), abs=1e-5)
    # sentence scores by direct interpolation, OOVs included, equal the back-off reading of the tables
    for line in docs_lines[400:430]:
        ws = ["<s>"] + [w if w in model.index else "<unk>" for w in line.split()] + ["</s>"]
        ref = sum(math.log10(prob(ws[i], tuple(ws[max(0, i - N + 1):i]))) for i in range(1, len(ws)))
        assert model.score(line) == pytest.approx(ref, abs=1e-4)


def test_distributions_sum_to_one(docs_lines):
    lines = docs_lines[:500]
    w1, w2, w3 = next(line.split()[:3] for line in lines if len(line.split()) >= 3)
    for smoothing in ("kneser_ney", "mle", "add_k"):
        model = NGramModel.from_text(lines, NGramConfig(order=3, smoothing=smoothing))
        a, b, c = (model.index[w] for w in (w1, w2, w3))
        for ctx in ([1], [1, a], [a, b], [b, 0]):
            if smoothing == "mle" and ctx[-1] == 0:
                continue  # an unseen context has no maximum-likelihood distribution
            assert (10 ** model.next_logprobs(ctx)).sum() == pytest.approx(1.0, abs=1e-5)
        # next_logprobs agrees with sentence scoring
        scores = model.full_scores(f"{w1} {w2} {w3}")
        assert model.next_logprobs([1, a, b])[c] == pytest.approx(scores[2][0], abs=1e-6)


# ------------------------------------------------------------------ teaching smoothings


def test_mle_matches_nltk(docs_lines):
    nltk_lm = require_module("nltk.lm")
    from nltk.lm.preprocessing import padded_everygram_pipeline

    lines = docs_lines[:300]
    sents = [line.split() for line in lines]
    ref = nltk_lm.MLE(3)
    ref.fit(*padded_everygram_pipeline(3, sents))
    model = NGramModel.from_text(lines, NGramConfig(order=3, smoothing="mle"))
    for s in sents[:40]:
        padded = ["<s>", "<s>"] + s + ["</s>"]
        theirs = [ref.logscore(padded[i], padded[i - 2:i]) / math.log2(10) for i in range(2, len(padded))]
        ours = [p for p, _, _ in model.full_scores(" ".join(s))]
        np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_add_k_and_stupid_backoff_match_their_definitions(docs_lines):
    lines = docs_lines[:300]
    sents = [["<s>"] + line.split() + ["</s>"] for line in lines]
    c = Counter(tuple(s[i:i + k]) for s in sents for k in (1, 2, 3) for i in range(len(s) - k + 1))
    ctx_total = Counter()
    for g, n in c.items():
        if len(g) > 1:
            ctx_total[g[:-1]] += n
    unigram_total = sum(n for g, n in c.items() if len(g) == 1 and g != ("<s>",))
    n_vocab = len({w for s in sents for w in s})  # words, <s>, </s>: + <unk> - <s> = what can be predicted
    add = NGramModel.from_text(lines, NGramConfig(order=3, smoothing="add_k", add_k=0.5))
    sb = NGramModel.from_text(lines, NGramConfig(order=3, smoothing="stupid_backoff", alpha=0.4))
    for line in docs_lines[300:320] + lines[:10]:
        ws = ["<s>"] + line.split() + ["</s>"]
        for i in range(1, len(ws)):
            h, w = tuple(ws[max(0, i - 2):i]), ws[i]
            expect = (c[h + (w,)] + 0.5) / (ctx_total[h] + 0.5 * n_vocab)
            assert add.full_scores(line)[i - 1][0] == pytest.approx(math.log10(expect), abs=1e-9)
            score = 1.0
            while h and not c[h + (w,)]:
                score, h = score * 0.4, h[1:]
            score *= c[h + (w,)] / ctx_total[h] if h else c[(w,)] / unigram_total
            got = sb.full_scores(line)[i - 1][0]
            assert got == (pytest.approx(math.log10(score), abs=1e-9) if score > 0 else -math.inf)


# ------------------------------------------------------------------ ids, tokenizers, sampling, errors


def test_token_ids_build_the_same_model_as_text(docs_lines):
    lines = docs_lines[:500]
    tok = WordTokenizer.train(lines)
    a = NGramModel.from_text(lines, NGramConfig(order=4))
    b = NGramModel.from_tokenizer(tok, lines, NGramConfig(order=4))
    assert a.vocab == b.vocab
    for x, y in zip(a.tables.prob + a.tables.backoff, b.tables.prob + b.tables.backoff):
        np.testing.assert_array_equal(x, y)
    test = docs_lines[500:520]
    ids = [tok.encode(line) for line in test]
    np.testing.assert_allclose(b.score_batch([i[:-1] for i in ids]), a.score_batch(test), atol=1e-9)
    nat = b.logprobs(np.concatenate(ids))  # natural logs, </s> included
    assert nat.sum() / math.log(10) == pytest.approx(a.score_batch(test).sum(), abs=1e-6)


def test_sampling_follows_the_model(docs_lines):
    lines = docs_lines[:300]
    model = NGramModel.from_text(lines, NGramConfig(order=3, smoothing="mle"))
    seen = {tuple(g) for line in lines for ws in [["<s>"] + line.split() + ["</s>"]]
            for g in zip(ws, ws[1:], ws[2:])}
    samples = model.sample(5, seed=1, max_tokens=200)
    assert samples == model.sample(5, seed=1, max_tokens=200)
    for s in samples:  # every trigram of an MLE sample was seen in training
        ws = ["<s>"] + s.split() + ["</s>"]
        assert all(g in seen for g in zip(ws[1:], ws[2:], ws[3:]))
    kn = NGramModel.from_text(lines, NGramConfig(order=3))
    assert all("<unk>" not in s and "<s>" not in s for s in kn.sample(3, seed=0, prefix="The"))


def test_bad_input_is_a_clear_error():
    with pytest.raises(LmlabError, match="order"):
        NGramModel.from_text(["a b"], NGramConfig(order=0))
    with pytest.raises(LmlabError, match="empty"):
        NGramModel.from_text([], NGramConfig(order=3))
    with pytest.raises(LmlabError, match="empty"):
        NGramModel.from_text(["", "  "], NGramConfig(order=3))
    with pytest.raises(LmlabError, match="discount_fallback=True"):
        NGramModel.from_text(TINY, NGramConfig(order=3))  # too little data for KN's discounts
    with pytest.raises(LmlabError, match="only back-off"):
        write_arpa(NGramModel.from_text(TINY, NGramConfig(order=2, smoothing="mle")), "/tmp/never.arpa")
