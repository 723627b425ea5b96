import json

from lmlab.cli import main


def test_quickstart_runs_the_whole_pipeline(tmp_path, capsys):
    run, data = tmp_path / "run", tmp_path / "data"
    assert main(["quickstart", "--out", str(run), "--data", str(data), "--steps", "12",
                 "--train.eval_interval=0", "--model.n_layer=1"]) == 0
    out, err = capsys.readouterr()
    assert "== 4/4 sample" in err and "== 1/4 data" in err  # progress on stderr
    assert "unigram" in out and "sample (" in out and "lmlab generate" in out  # results on stdout
    result = json.loads((run / "quickstart.json").read_text())
    assert result["val"]["perplexity"] < result["unigram"]["perplexity"] * 1.5
    meta = json.loads((data / "meta.json").read_text())
    assert meta["corpus"]["source"] == "stdlib-docs" and meta["tokenizer"]["kind"] == "bpe"
    assert main(["quickstart", "--out", str(run), "--data", str(data), "--steps", "1"]) == 2  # never overwrite
    # the dtype is decided by the CPU's features, and recorded with the reason
    from lmlab.recipes.quickstart import choose_dtype

    assert (result["dtype"], result["dtype_reason"]) == choose_dtype()
    # a reused data directory prepared otherwise (here: another vocabulary) is refused, not trained on
    meta["vocab_size"] = 512
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(["quickstart", "--out", str(tmp_path / "run2"), "--data", str(data), "--steps", "1"]) == 2
    assert "holds other data" in capsys.readouterr().err
