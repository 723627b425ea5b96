import subprocess
import sys

import pytest
import yaml

from lmlab.cli import main

COMMANDS = ["prepare", "train", "eval", "generate", "info", "quickstart", "scaling"]


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
    assert r.returncode == 2 and "checkpoint not found" in r.stderr
