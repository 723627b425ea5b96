"""ARPA files: our writer round-trips, our reader scores files written by KenLM (and hand-written
SRILM-style ones) exactly as the kenlm module does, and malformed files get errors with file:line."""

from __future__ import annotations

import numpy as np
import pytest
from kenlm_tools import needs_lmplz, run_lmplz
from peers import require_module

from lmlab.errors import LmlabError
from lmlab.io.arpa import read_arpa, write_arpa
from lmlab.models.ngram.model import NGramConfig, NGramModel


def test_write_read_round_trip(docs_lines, tmp_path):
    model = NGramModel.from_text(docs_lines[:1000], NGramConfig(order=4))
    test = docs_lines[1000:1100]
    for name in ("m.arpa", "m.arpa.gz"):
        write_arpa(model, tmp_path / name)
        back = read_arpa(tmp_path / name)
        assert back.vocab == model.vocab and back.order == 4
        np.testing.assert_array_equal(back.score_batch(test), model.score_batch(test))
    write_arpa(read_arpa(tmp_path / "m.arpa"), tmp_path / "again.arpa")
    assert (tmp_path / "again.arpa").read_bytes() == (tmp_path / "m.arpa").read_bytes()
    text = (tmp_path / "m.arpa").read_text()
    assert text.startswith("\\data\\\nngram 1=") and text.endswith("\n\\end\\\n")


@needs_lmplz
def test_reads_lmplz_arpa_like_kenlm(docs_lines, tmp_path):
    kenlm = require_module("kenlm")
    arpa, _ = run_lmplz(docs_lines[:2000], 5, tmp_path)
    ours, ref = read_arpa(arpa), kenlm.Model(str(arpa))
    test = docs_lines[2000:2300]
    np.testing.assert_allclose(ours.score_batch(test), [ref.score(s) for s in test], atol=1e-4)


# SRILM-style: -99 for <s>, no <unk>, backoff columns only where non-zero, a trigram section.
HAND = """\\data\\
ngram 1=6
ngram 2=5
ngram 3=2

\\1-grams:
-99\t<s>\t-0.30103
-0.69897\t</s>
-0.69897\tthe\t-0.2
-0.69897\tcat\t-0.1
-1\tsat
-1.2\ton\t-0.25

\\2-grams:
-0.3\t<s> the\t-0.1
-0.2\tthe cat\t-0.05
-0.25\tcat sat
-0.4\tsat </s>
-0.5\ton the

\\3-grams:
-0.1\t<s> the cat
-0.05\tthe cat sat

\\end\\
"""


def test_reads_hand_written_arpa_like_kenlm(tmp_path):
    kenlm = require_module("kenlm")
    path = tmp_path / "hand.arpa"
    path.write_text(HAND)
    ours, ref = read_arpa(path), kenlm.Model(str(path))
    for s in ["the cat sat", "on the cat", "cat on the mat", "sat sat on on", ""]:
        for bos in (True, False):
            assert ours.score(s, bos=bos) == pytest.approx(ref.score(s, bos=bos, eos=True), abs=1e-5)
        mine = ours.full_scores(s)
        assert [(m[1], m[2]) for m in mine] == [(k[1], k[2]) for k in ref.full_scores(s)]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("ngram 2=5", "ngram 2=6"),
     r"hand\.arpa:\d+: the header promises 6 2-grams but the section has 5"),
    (lambda t: t.replace("ngram 2=5", "ngram 2=4"),
     r"hand\.arpa:\d+: the header promises 4 2-grams but the section has mo"),
    (lambda t: t.replace("\\end\\\n", ""), r"hand\.arpa:\d+: file ends without \\end\\"),
    (lambda t: t.replace("\\data\\", "data"), r"no \\data\\ section"),
    (lambda t: t.replace("-0.25\tcat sat", "x\tcat sat"), r"hand\.arpa:\d+: not a number"),
    (lambda t: t.replace("-0.25\tcat sat", "-0.25\tcat dog"), r"'dog', which is not a unigram"),
    (lambda t: t.replace("-0.05\tthe cat sat", "-0.05\tthe sat on"), r"'the sat on' has no entry for its context"),
    (lambda t: t.replace("-0.4\tsat </s>", "-0.4\tsat"), r"hand\.arpa:\d+: expected log10 prob, 2 words"),
])
def test_malformed_arpa_is_a_clear_error(tmp_path, edit, message):
    path = tmp_path / "hand.arpa"
    path.write_text(edit(HAND))
    with pytest.raises(LmlabError, match=message):
        read_arpa(path)


def test_missing_arpa_file(tmp_path):
    with pytest.raises(LmlabError, match="not found"):
        read_arpa(tmp_path / "nope.arpa")
