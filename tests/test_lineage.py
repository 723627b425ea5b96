"""`lmlab ngram build/query` and `lmlab lineage`, checked against the kenlm module's scores."""

import json
import math
from pathlib import Path

import pytest
from peers import require_module

from lmlab.cli import main


@pytest.fixture(scope="module")
def corpus(docs_lines, tmp_path_factory):
    """A train/valid/test folder in PTB's layout, cut from the built-in corpus."""
    d = tmp_path_factory.mktemp("lineage") / "corpus"
    d.mkdir()
    for name, lines in (("train", docs_lines[:2400]), ("valid", docs_lines[2400:2700]), ("test", docs_lines[2700:])):
        (d / f"tiny.{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def kenlm_perplexity(arpa, path) -> tuple[float, float]:
    """Perplexity with and without OOVs as KenLM's query computes it, from the kenlm module's scores."""
    kenlm = require_module("kenlm")
    model = kenlm.Model(str(arpa))
    total = total_oov = 0.0
    tokens = oovs = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        for logp, _, oov in model.full_scores(line):
            total, tokens = total + logp, tokens + 1
            if oov:
                total_oov, oovs = total_oov + logp, oovs + 1
    return 10 ** (-total / tokens), 10 ** (-(total - total_oov) / (tokens - oovs))


def summary_numbers(out: str) -> dict[str, float]:
    return {k: float(v) for k, v in (ln.split(":\t") for ln in out.splitlines() if ":\t" in ln)}


def test_ngram_build_and_query_match_kenlm(corpus, tmp_path, capsys):
    arpa = tmp_path / "m.arpa"
    assert main(["ngram", "build", str(corpus / "tiny.train.txt"), "--order", "3", "--out", str(arpa)]) == 0
    capsys.readouterr()
    test = corpus / "tiny.test.txt"
    assert main(["ngram", "query", str(arpa), "--data", str(test)]) == 0
    got = summary_numbers(capsys.readouterr().out)
    with_oov, without_oov = kenlm_perplexity(arpa, test)
    assert got["Perplexity including OOVs"] == pytest.approx(with_oov, rel=1e-5)
    assert got["Perplexity excluding OOVs"] == pytest.approx(without_oov, rel=1e-5)
    assert got["OOVs"] > 0 and got["Tokens"] == sum(len(ln.split()) + 1 for ln in test.read_text().splitlines())


def test_ngram_cli_errors(corpus, tmp_path, capsys):
    train = str(corpus / "tiny.train.txt")
    assert main(["ngram", "build", train, "--smoothing", "addk", "--out", str(tmp_path / "x.arpa")]) == 2
    assert "only Kneser-Ney" in capsys.readouterr().err
    assert main(["ngram", "build", train, "--smoothing", "nope", "--out", str(tmp_path / "x.arpa")]) == 2
    assert "unknown smoothing" in capsys.readouterr().err
    assert main(["ngram", "build", train, "--order", "0", "--out", str(tmp_path / "x.arpa")]) == 2
    assert "order" in capsys.readouterr().err
    assert main(["ngram", "query", str(tmp_path / "missing.arpa")]) == 2
    # stupid backoff scores a file without writing a model
    assert main(["ngram", "build", train, "--smoothing", "stupid", "--data", str(corpus / "tiny.test.txt")]) == 0
    assert "Perplexity including OOVs" in capsys.readouterr().out


def test_lineage_quick(corpus, tmp_path, capsys):
    out = tmp_path / "ladder"
    assert main(["lineage", "--corpus", str(corpus), "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "lineage.json").read_text())
    ppl = {r["model"]: r["perplexity"] for r in result["rungs"]}
    assert list(ppl) == ["unigram", "KN 3-gram", "KN 5-gram", "NPLM", "GPT"]
    assert all(math.isfinite(p) and p > 1 for p in ppl.values())
    assert ppl["KN 3-gram"] < ppl["unigram"] and ppl["KN 5-gram"] < ppl["unigram"]
    val = {r["model"]: r["val_perplexity"] for r in result["rungs"]}
    assert all(math.isfinite(val[m]) and val[m] > 1 for m in ("NPLM", "GPT"))  # neural rungs: chosen on valid
    assert "| KN 5-gram |" in (out / "lineage.md").read_text() and "KN 5-gram" in printed
    # the KN-3 rung equals what the kenlm module gives for the same text (every word of the training
    # file is in the vocabulary; test OOVs are <unk>, </s> counted)
    arpa = tmp_path / "m.arpa"
    assert main(["ngram", "build", str(corpus / "tiny.train.txt"), "--order", "3", "--out", str(arpa)]) == 0
    assert ppl["KN 3-gram"] == pytest.approx(kenlm_perplexity(arpa, corpus / "tiny.test.txt")[0], rel=1e-5)
    # `ngram build` on the lineage's prepared data directory counts the same training tokens
    arpa2 = tmp_path / "d.arpa"
    assert main(["ngram", "build", str(out / "data"), "--order", "3", "--out", str(arpa2)]) == 0
    assert kenlm_perplexity(arpa2, corpus / "tiny.test.txt")[0] == pytest.approx(ppl["KN 3-gram"], rel=1e-5)
    assert result["tokens"]["test"] == sum(len(ln.split()) + 1 for ln in
                                           (corpus / "tiny.test.txt").read_text().splitlines())


def test_lineage_recipe_file(corpus, tmp_path, capsys):
    # the committed PTB recipe parses; a recipe with an unknown key is one clear error before any work
    from lmlab.config import from_dict, load_yaml
    from lmlab.recipes.lineage import LineageConfig

    cfg = from_dict(LineageConfig, load_yaml(Path(__file__).parents[1] / "recipes" / "lineage-ptb.yaml"))
    assert cfg.nplm.dropout > 0 and cfg.gpt.dropout > 0 and cfg.orders == (3, 5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nplm:\n  stepz: 3\n")
    assert main(["lineage", "--config", str(bad), "--corpus", str(corpus), "--out", str(tmp_path / "o")]) == 2
    assert "unknown config key 'nplm.stepz'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
