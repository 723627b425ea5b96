import json
import subprocess
import sys

import pytest
import yaml

from lmlab.cli import main
from lmlab.io.load import load_model

COMMANDS = ["prepare", "train", "eval", "generate", "fill-mask", "chat", "info", "export", "scaling", "quickstart",
            "ngram", "lineage", "word2vec", "fewshot", "serve"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout
    assert "lmlab quickstart" in r.stdout  # examples for newcomers


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"lmlab {command}" in out and len(out) > 200


def test_train_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("--model.n_layer", "--train.lr", "--train.dtype", "--data.dir", "--resume"):
        assert key in out


def _tiny_run(char_data, out):
    return main(["train", "--data", str(char_data), "--out", str(out), "--model.n_layer=1", "--model.n_head=2",
                 "--model.n_embd=32", "--model.block_size=32", "--train.max_steps=3", "--train.batch_size=2",
                 "--train.progress=false", "--train.eval_iters=1"])


def test_generate_and_info(char_data, tmp_path, capsys):
    assert _tiny_run(char_data, tmp_path / "run") == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "The ", "--max_new_tokens", "12", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The ") and len(out) > 4
    assert main(["info", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step       3" in out and "parameters" in out
    assert main(["info", str(char_data)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer  char" in out and "train" in out


def test_unknown_config_key_via_cli(char_data, tmp_path):
    r = run_cli("train", "--data", str(char_data), "--out", str(tmp_path / "r"), "--model.n_layers=2")
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown config key 'model.n_layers'") and "model.n_layer" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["missing", "latin1", "empty"])
def test_bad_corpus_via_cli(tmp_path, case):
    src = tmp_path / "in.txt"
    if case == "latin1":
        src.write_bytes(b"na\xefve\n")
    elif case == "empty":
        src.write_text("")
    r = run_cli("prepare", str(src), "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert str(src) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in.txt"] if case != "missing" else [])


def test_mismatched_checkpoint_is_a_clear_error(char_data, tmp_path):
    assert _tiny_run(char_data, tmp_path / "run") == 0
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["model"]["n_embd"] = 64
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("eval", str(tmp_path / "run"))
    assert r.returncode == 2 and "does not match the model config" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_dir_and_checkpoint(tmp_path):
    r = run_cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "lmlab prepare" in r.stderr
    r = run_cli("generate", str(tmp_path / "nope"))
    assert r.returncode == 2 and "model not found" in r.stderr


# -- every unknown or ignored option is an error -------------------------------------------------

# the least each subcommand needs to get past argparse's own checks
MINIMAL = {"prepare": [], "train": [], "eval": ["m"], "generate": ["m"], "fill-mask": ["m", "text"], "chat": ["m"],
           "info": ["p"], "export": ["m", "out", "--to", "hf"], "scaling": ["sweep"], "quickstart": [],
           "ngram": ["query", "m.arpa"], "lineage": [],
           "word2vec": ["eval", "v.bin"], "fewshot": ["m", "--tasks", "days"], "serve": ["m"]}


def test_minimal_covers_every_subcommand():
    from lmlab.cli import make_parser

    sub = next(a for a in make_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(MINIMAL) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("option", ["--no_such_option", "--no_such.option=1"])
def test_an_unknown_option_is_an_error_naming_it(command, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written, even by mistake
    assert main([command, *MINIMAL[command], option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and option.lstrip("-").split("=")[0] in err
    assert list(tmp_path.iterdir()) == []


def test_eval_rejects_an_override_it_would_ignore(char_data, tmp_path):
    assert _tiny_run(char_data, tmp_path / "run") == 0
    r = run_cli("eval", str(tmp_path / "run"), "--eval.nonsense=1")
    assert r.returncode == 2 and "--eval.nonsense=1" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("eval", str(tmp_path / "run"), "--eval.nonsense", "1")
    assert r.returncode == 2 and "--eval.nonsense" in r.stderr


def test_a_stray_argument_and_a_bad_value_are_errors(tmp_path, capsys):
    assert main(["scaling", "sweep", str(tmp_path)]) == 2
    assert "unexpected argument" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--model.n_layer=four"]) == 2
    assert "model.n_layer" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path), "--workers=2"]) == 2
    assert "--workers=2" in capsys.readouterr().err


def test_string_config_values_stay_strings_on_the_command_line(char_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(char_data), "--train.out_dir=no", "--model.n_layer=1", "--model.n_head=2",
                 "--model.n_embd=32", "--model.block_size=32", "--train.max_steps=1", "--train.batch_size=2",
                 "--train.progress=false", "--train.eval_iters=1"]) == 0
    assert (tmp_path / "no" / "config.yaml").is_file()
    assert yaml.safe_load((tmp_path / "no" / "config.yaml").read_text())["train"]["out_dir"] == "no"


# -- one way to name a model: positional MODEL; the old --model spelling still works, with a warning --


@pytest.fixture(scope="module")
def tiny_run(char_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert _tiny_run(char_data, run) == 0
    return run


def test_generate_old_and_new_spelling_agree(tiny_run, capsys):
    args = ["The ", "--max_new_tokens", "8", "--seed", "3"]
    assert main(["generate", str(tiny_run), *args]) == 0
    new = capsys.readouterr()
    assert "deprecated" not in new.err
    assert main(["generate", "--model", str(tiny_run), *args]) == 0
    old = capsys.readouterr()
    assert old.out == new.out
    assert "deprecated" in old.err and f"lmlab generate {tiny_run}" in old.err and len(old.err.splitlines()) == 1


def test_eval_old_and_new_spelling_agree(tiny_run, char_data, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The json module encodes and decodes JSON.\n" * 4)
    assert main(["eval", str(tiny_run), "--data", str(text), "--json", str(tmp_path / "new.json")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_run), "--data", str(text), "--json", str(tmp_path / "old.json")]) == 0
    assert "use `lmlab eval " in capsys.readouterr().err
    new, old = (json.loads((tmp_path / f).read_text()) for f in ("new.json", "old.json"))
    assert new == {**old, "model": new["model"]} and new["tokens"] > 0
    # lmlab runs read a </s> before a text (io.load's BOS rule), so every token is scored
    assert new["tokens"] == len(load_model(tiny_run).tokenizer.encode(text.read_text()))
    assert main(["eval", str(tiny_run), "--split", "val"]) == 0  # a run dir: its prepared split
    assert "[val]" in capsys.readouterr().out


def test_eval_without_bos_scores_from_the_second_token(tiny_run, tmp_path, monkeypatch):
    from lmlab.eval.perplexity import score_text

    loaded = load_model(tiny_run)
    text = "The json module"
    n = len(loaded.tokenizer.encode(text))
    with_bos = score_text(loaded.model, loaded.tokenizer, text, bos=loaded.bos, block_size=32)
    without = score_text(loaded.model, loaded.tokenizer, text, bos=[], block_size=32)
    assert (with_bos.tokens, without.tokens) == (n, n - 1)
    assert without.bytes == with_bos.bytes - len(loaded.tokenizer.decode(loaded.tokenizer.encode(text)[:1]).encode())


def test_chat_old_and_new_spelling(monkeypatch, capsys):
    import io

    for argv in (["chat", "eliza", "--seed", "1"], ["chat", "--model", "eliza", "--seed", "1"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("I feel sad\n"))
        assert main(argv) == 0
    out = capsys.readouterr()
    first, second = out.out[: len(out.out) // 2], out.out[len(out.out) // 2:]
    assert first == second and out.err.count("deprecated") == 1


def test_model_given_twice_is_an_error(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--model", str(tiny_run)]) == 2
    assert "give the model once" in capsys.readouterr().err


# -- logging: progress on stderr (-q silences it), results on stdout ----------------------------------


def test_quiet_and_verbose(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"hello world {i}\n" for i in range(60)))
    assert main(["prepare", str(src), "--out", str(tmp_path / "d1"), "--tokenizer=char", "--doc_split=line"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert main(["-q", "prepare", str(src), "--out", str(tmp_path / "d2"), "--tokenizer=char", "--doc_split=line"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["prepare", "-q", str(src), "--out", str(tmp_path / "d3"), "--tokenizer=char", "--doc_split=line"]) == 0
    assert capsys.readouterr().err == ""
