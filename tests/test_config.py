import pytest

from lmlab.config import apply_overrides, dump_yaml, from_dict, load_yaml
from lmlab.errors import LmlabError
from lmlab.models.transformer.gpt import GPTConfig
from lmlab.train.config import RunConfig


def test_dotted_overrides_are_typed():
    cfg = apply_overrides(RunConfig(), ["model.n_layer=4", "train.lr=1e-3", "train.progress=false",
                                        "data.dir=some/where"])
    assert cfg.model.n_layer == 4 and isinstance(cfg.model.n_layer, int)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.progress is False
    assert cfg.data.dir == "some/where"
    assert RunConfig().model.n_layer == 6  # the original is untouched


def test_unknown_key_lists_valid_keys():
    with pytest.raises(LmlabError) as e:
        apply_overrides(RunConfig(), ["model.n_layers=4"])
    msg = str(e.value)
    assert "model.n_layers" in msg and "model.n_layer" in msg and "model.n_embd" in msg
    with pytest.raises(LmlabError, match="unknown config section 'trian'"):
        apply_overrides(RunConfig(), ["trian.lr=1"])


def test_bad_value_type_is_an_error():
    with pytest.raises(LmlabError, match="train.max_steps"):
        apply_overrides(RunConfig(), ["train.max_steps=lots"])


def test_yaml_round_trip_and_family_resolution(tmp_path):
    cfg = apply_overrides(RunConfig(), ["model.n_embd=64", "model.n_head=2"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    again = from_dict(RunConfig, load_yaml(path))
    assert again == cfg
    assert isinstance(again.model, GPTConfig)
    with pytest.raises(LmlabError, match="unknown model family"):
        from_dict(RunConfig, {"model": {"family": "nope"}})


def test_yaml_unknown_key_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(LmlabError, match="train.learning_rate"):
        from_dict(RunConfig, load_yaml(path))
    with pytest.raises(LmlabError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_shipped_yaml_recipes_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = from_dict(RunConfig, load_yaml(f))
        assert isinstance(cfg.model, GPTConfig) and cfg.train.max_steps > 0
