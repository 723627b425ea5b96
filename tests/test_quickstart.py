import json

import pytest

from lmlab.cli import main
from lmlab.recipes.quickstart import SAMPLE_PROMPTS, choose_dtype, cpu_dtype, word_share, words
from lmlab.tokenizers import train_tokenizer


def test_quickstart_runs_the_whole_pipeline(tmp_path, capsys):
    run, data = tmp_path / "run", tmp_path / "data"
    assert main(["quickstart", "--out", str(run), "--data", str(data), "--steps", "12",
                 "--train.eval_interval=0", "--model.n_layer=1"]) == 0
    out, err = capsys.readouterr()
    assert "== 4/4 sample" in err and "== 1/4 data" in err  # progress on stderr
    assert "unigram" in out and "samples (" in out and "lmlab generate" in out  # results on stdout
    result = json.loads((run / "quickstart.json").read_text())
    assert result["val"]["perplexity"] < result["unigram"]["perplexity"] * 1.5
    # three samples, and the share of their words found in the training text, printed and saved
    assert [s[:len(p)] for s, p in zip(result["samples"], SAMPLE_PROMPTS, strict=True)] == list(SAMPLE_PROMPTS)
    share = result["word_share"]
    assert share["words"] > 0 and 0 <= share["share"] <= 1
    assert f"{share['share']:.1%} of their {share['words']} words occur in the training text" in out
    meta = json.loads((data / "meta.json").read_text())
    assert meta["corpus"]["source"] == "stdlib-docs" and meta["tokenizer"]["kind"] == "bpe"
    assert main(["quickstart", "--out", str(run), "--data", str(data), "--steps", "1"]) == 2  # never overwrite
    # the dtype is decided by the CPU's features, and recorded with the reason
    assert (result["dtype"], result["dtype_reason"]) == choose_dtype()
    # a reused data directory whose tokenizer file is another tokenizer is refused, not trained on
    tok_file = data / "tokenizer.json"
    original = tok_file.read_text()
    train_tokenizer("char", ["ab"]).save(str(data))  # 5 specials + 2 characters
    assert main(["quickstart", "--out", str(tmp_path / "run2"), "--data", str(data), "--steps", "1"]) == 2
    assert "is a char tokenizer of 7 tokens" in capsys.readouterr().err
    tok_file.write_text(original)
    # ... as is one prepared otherwise (here: another vocabulary)
    meta["vocab_size"] = 512
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(["quickstart", "--out", str(tmp_path / "run3"), "--data", str(data), "--steps", "1"]) == 2
    assert "holds other data" in capsys.readouterr().err


def test_word_share_counts_sampled_words_found_in_the_training_text():
    known = set(words("Return the json_module's value, or None. utf8 2x"))
    assert words("json_module's utf8 2x") == ["json", "module", "s", "utf", "x"]  # letters only
    r = word_share(["Return the valu", "None or Nones."], known)
    # 6 words: Return the valu | None or Nones; 'valu' and 'Nones' are not training words
    assert r == {"share": pytest.approx(4 / 6), "words": 6, "unseen": ["Nones", "valu"]}
    assert word_share(["the THE"], known)["unseen"] == ["THE"]  # case-sensitive
    assert word_share(["", "123 ..."], known)["words"] == 0
    # prompts' words are not counted; a prompt word the model extended is the model's
    r = word_share(["Return the valu", "Returns None", "Return. Nones"], known, prompts=["Return", "Return", "Return."])
    assert r == {"share": pytest.approx(2 / 5), "words": 5, "unseen": ["Nones", "Returns", "valu"]}


def test_dtype_from_cpu_features_not_timing():
    cap = "AVX512"
    assert cpu_dtype({"fpu", "avx512f", "avx512_bf16"}, cap)[0] == "bfloat16"
    assert cpu_dtype({"amx_bf16", "amx_tile"}, cap)[0] == "bfloat16"
    assert cpu_dtype({"avx512f", "avx2"}, cap)[0] == "float32"  # AVX-512 without bf16: emulated
    assert cpu_dtype({"avx512_bf16"}, "AVX2")[0] == "float32"  # torch's kernels would not use it
    dtype, why = cpu_dtype(set(), "DEFAULT")
    assert dtype == "float32" and "absent" in why
