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


# -- command-line values are parsed by the field's declared type, not by YAML 1.1 ----------------


def test_string_fields_keep_the_exact_text():
    assert apply_overrides(RunConfig(), ["train.out_dir=no"]).train.out_dir == "no"
    assert apply_overrides(RunConfig(), ["train.out_dir=007"]).train.out_dir == "007"
    assert apply_overrides(RunConfig(), ["train.out_dir=null"]).train.out_dir == "null"
    assert apply_overrides(RunConfig(), ["data.dir=[a, b]"]).data.dir == "[a, b]"


def test_numbers_and_booleans_are_strict():
    cfg = apply_overrides(RunConfig(), ["train.lr=1e-3", "train.max_steps=1e3", "model.n_layer=007",
                                        "train.progress=no"])
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.n_layer == 7
    assert cfg.train.progress is False
    for bad, key in (["model.n_layer=2.5", "model.n_layer"], ["model.n_layer=four", "model.n_layer"],
                     ["train.lr=fast", "train.lr"], ["train.progress=maybe", "train.progress"]):
        with pytest.raises(LmlabError, match=key.replace(".", r"\.")):
            apply_overrides(RunConfig(), [bad])


def test_lists_optional_and_literal_values():
    import dataclasses
    from typing import Literal

    from lmlab.config import CliValue, from_dict

    @dataclasses.dataclass
    class C:
        sizes: list[float] = dataclasses.field(default_factory=list)
        names: list[str] = dataclasses.field(default_factory=list)
        limit: int | None = 3
        mode: Literal["ar", "nar"] = "ar"

    cfg = apply_overrides(C(), ["sizes=1e5,3e5", "names=[no, 007]", "limit=none", "mode=nar"])
    assert cfg.sizes == [1e5, 3e5] and cfg.names == ["no", "007"] and cfg.limit is None and cfg.mode == "nar"
    assert apply_overrides(C(), ["limit=null"]).limit is None
    assert apply_overrides(C(), ["limit=12"]).limit == 12
    with pytest.raises(LmlabError, match="'mode' must be one of"):
        apply_overrides(C(), ["mode=fast"])
    with pytest.raises(LmlabError, match="'sizes' expects a number"):
        apply_overrides(C(), ["sizes=1,two"])
    # values from a YAML file keep YAML's types (saved run configs load as before)
    assert from_dict(C, {"sizes": [1, 2], "limit": None}).sizes == [1.0, 2.0]
    assert isinstance(CliValue("x"), str)


def test_a_section_is_not_a_value():
    with pytest.raises(LmlabError, match="'model' is a section"):
        apply_overrides(RunConfig(), ["model=gpt"])
