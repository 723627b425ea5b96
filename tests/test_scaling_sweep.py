import json
from pathlib import Path

import pytest
from peers import require_module

from lmlab.errors import LmlabError
from lmlab.scaling.sweep import SweepConfig, lr_for, planned_compute, run_config, shape_for, sweep


def test_shapes_hit_the_target_size():
    for n in (1e5, 1e6, 1e7):
        n_layer, d = shape_for(n)
        assert 0.6 < 12 * n_layer * d * d / n < 1.6 and d % 32 == 0
    # larger models train with smaller steps; the default rule falls as 1 / width (muP)
    assert lr_for(1e6, 256) == pytest.approx(lr_for(2e5, 128) / 2)
    assert lr_for(1e6, 128, rule="kaplan") < lr_for(1e5, 128, rule="kaplan")
    with pytest.raises(LmlabError, match="lr_rule"):
        lr_for(1e6, 128, rule="mup")
    assert shape_for(8e5, n_layer=2) == (2, 192) and shape_for(1.6e6, n_layer=2) == (2, 256)  # width only


def test_sweep_runs_resumes_and_tabulates(char_data, tmp_path):
    cfg = SweepConfig(data=str(char_data), out=str(tmp_path / "sweep"), sizes=[2e4, 4e4], tokens=[4096, 8192],
                      block_size=32, batch_size=8, dtype="float32", eval_tokens=2000)
    results = sweep(cfg)
    assert len(results) == 4 and all(r["D"] in (4096, 8192) for r in results)
    by = {(r["N"], r["D"]): r["val_loss"] for r in results}
    sizes = sorted({r["N"] for r in results})
    assert by[(sizes[0], 8192)] < by[(sizes[0], 4096)]  # more tokens help
    table = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert len(table) == 4 and (tmp_path / "sweep" / "results.md").is_file()
    # a finished run is skipped: its result file is reused as is
    run = run_config(cfg, 2e4, 4096)
    stamp = (tmp_path / "sweep" / run.train.out_dir.split("/")[-1] / "result.json").read_text()
    assert sweep(cfg) == results
    assert (tmp_path / "sweep" / run.train.out_dir.split("/")[-1] / "result.json").read_text() == stamp
    # a compute cap drops the grid points above it (here: every run on the larger budget)
    cfg.max_compute = 1.5 * max(planned_compute(cfg, n, 4096) for n in cfg.sizes)
    capped = sweep(cfg)
    assert len(capped) == 2 and all(r["D"] == 4096 for r in capped)
    assert len(json.loads((tmp_path / "sweep" / "results.json").read_text())) == 2
    # two worker processes train the same runs to the same losses (up to thread-count rounding)
    cfg.out, cfg.workers, cfg.max_compute, cfg.tokens = str(tmp_path / "parallel"), 2, 0.0, [4096]
    parallel = sweep(cfg)
    assert [r["name"] for r in parallel] == [r["name"] for r in capped]
    assert [r["val_loss"] for r in parallel] == pytest.approx([r["val_loss"] for r in capped], rel=1e-3)
    assert all((tmp_path / "parallel" / r["name"] / "result.json").is_file() for r in parallel)


def test_sweep_refuses_too_many_epochs(char_data, tmp_path):
    cfg = SweepConfig(data=str(char_data), out=str(tmp_path / "s"), sizes=[3e4], tokens=[1e9], block_size=32)
    with pytest.raises(LmlabError, match="epochs"):
        sweep(cfg)
    cfg.tokens, cfg.max_compute = [4096], 1.0  # a cap that leaves nothing to train is an error, not an empty table
    with pytest.raises(LmlabError, match="max_compute"):
        sweep(cfg)
    assert not (tmp_path / "s" / "results.json").exists()


def test_fit_and_predict_cli_on_synthetic_sweep(tmp_path, capsys):
    import numpy as np

    from lmlab.cli import main
    from lmlab.scaling.fit import ChinchillaLaw, KaplanLaw

    law = ChinchillaLaw(E=1.5, A=200.0, B=600.0, alpha=0.3, beta=0.35)
    runs = [{"name": f"r{i}", "N": n, "D": d, "val_loss": float(law.loss(n, d))}
            for i, (n, d) in enumerate((n, d) for n in np.geomspace(1e5, 1e6, 4) for d in np.geomspace(1e6, 1e7, 4))]
    (tmp_path / "results.json").write_text(json.dumps(runs))
    assert main(["scaling", "fit", str(tmp_path), "--bootstrap", "5"]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert set(fit["chinchilla"]) == {"E", "A", "B", "alpha", "beta"} and len(fit["bootstrap"]) == 5
    capsys.readouterr()
    assert main(["scaling", "predict", str(tmp_path / "fit.json"), "--n", "2e6", "--d", "2e7"]) == 0
    out = capsys.readouterr().out
    predicted = float(out.split(": ")[1].split(",")[0])
    assert predicted == pytest.approx(float(law.loss(2e6, 2e7)), rel=0.005)
    # Kaplan's L(N, D) is fitted alongside and can be asked for by name
    assert set(fit["kaplan"]) == {"N_c", "D_c", "alpha_N", "alpha_D"} and len(fit["kaplan_bootstrap"]) == 5
    assert main(["scaling", "predict", str(tmp_path / "fit.json"), "--n", "2e6", "--d", "2e7",
                 "--law", "kaplan"]) == 0
    out = capsys.readouterr().out
    assert "(kaplan law)" in out
    local = KaplanLaw(**fit["kaplan"])
    assert float(out.split(": ")[1].split(",")[0]) == pytest.approx(float(local.loss(2e6, 2e7)), abs=1e-4)


def test_train_longer_runs_each_budget_and_plots(char_data, tmp_path, capsys):
    from lmlab.cli import main
    from lmlab.scaling.fit import ChinchillaLaw

    law = ChinchillaLaw(E=1.0, A=50.0, B=50.0, alpha=0.3, beta=0.3)
    (tmp_path / "fit.json").write_text(json.dumps({"chinchilla": law.as_dict()}))
    n = 2e4
    d_opt = float(law.optimal_tokens(n))
    # N is compute-optimal for C = 6 N D*: the closed form gives back the same N
    assert float(law.compute_optimal(6 * n * d_opt)[0]) == pytest.approx(n, rel=1e-9)
    scale = 4096 / d_opt  # keep the runs tiny: multiples chosen so budgets are 4k and 8k tokens
    out = tmp_path / "longer"
    assert main(["scaling", "longer", str(tmp_path / "fit.json"), "--n", str(n), "--multiples",
                 f"{scale},{2 * scale}", f"--data={char_data}", f"--out={out}", "--block_size=32",
                 "--batch_size=8", "--dtype=float32", "--eval_tokens=2000"]) == 0
    rows = json.loads((out / "longer.json").read_text())
    assert [round(r["D"], -3) for r in rows] == [4000, 8000]
    assert rows[1]["val_loss"] < rows[0]["val_loss"]  # training longer lowers the loss
    assert rows[0]["predicted_loss"] == pytest.approx(float(law.loss(rows[0]["N"], rows[0]["D"])))
    require_module("matplotlib")
    assert (out / "train_longer.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_writes_plots(tmp_path):
    require_module("matplotlib")
    import numpy as np

    from lmlab.cli import main
    from lmlab.scaling.fit import ChinchillaLaw

    law = ChinchillaLaw(E=1.5, A=200.0, B=600.0, alpha=0.3, beta=0.35)
    runs = [{"name": f"r{i}", "N": n, "D": d, "val_loss": float(law.loss(n, d))}
            for i, (n, d) in enumerate((n, d) for n in np.geomspace(1e5, 8e5, 4) for d in np.geomspace(1e6, 4e6, 3))]
    (tmp_path / "results.json").write_text(json.dumps(runs))
    assert main(["scaling", "fit", str(tmp_path), "--bootstrap", "3"]) == 0
    for name in ("loss_vs_compute.png", "isoflop.png", "loss_vs_tokens.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_interrupted_run_is_not_recorded_as_a_result(char_data, tmp_path):
    from lmlab.scaling.sweep import run_one

    cfg = SweepConfig(data=str(char_data), out=str(tmp_path / "s"), block_size=32, batch_size=8,
                      dtype="float32", eval_tokens=2000)
    run = run_config(cfg, 2e4, 4096)
    run.train.stop_at_step = 3  # what Ctrl-C does mid-run: a checkpoint, then the loop ends early
    with pytest.raises(LmlabError, match="resume"):
        run_one(cfg, run, quiet=True)
    run_dir = tmp_path / "s" / run.train.out_dir.split("/")[-1]
    assert not (run_dir / "result.json").exists()
    run.train.stop_at_step = 0
    r = run_one(cfg, run, quiet=True)
    assert r["resumed"] and r["steps"] == run.train.max_steps and r["D"] == 4096


def test_fit_flags_an_unidentified_law_and_longer_refuses_it_without_force(tmp_path, capsys):
    import numpy as np

    from lmlab.cli import main
    from lmlab.scaling.fit import ChinchillaLaw

    law = ChinchillaLaw(E=0.0, A=400.0, B=900.0, alpha=0.34, beta=0.4)  # no irreducible loss: E not identified
    N, D = np.repeat(np.geomspace(2e5, 3.2e6, 4), 3), np.tile([2e6, 4e6, 8e6], 4)
    L = law.loss(N, D) * np.exp(np.random.default_rng(2).normal(0, 0.003, 12))
    (tmp_path / "results.json").write_text(json.dumps(
        [{"name": f"r{i}", "N": n, "D": d, "val_loss": float(v)} for i, (n, d, v) in enumerate(zip(N, D, L))]))
    assert main(["scaling", "fit", str(tmp_path), "--bootstrap", "4"]) == 0
    out = capsys.readouterr().out
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert not fit["identification"]["identified"] and "E" in fit["identification"]["pinned"]
    assert "NOT IDENTIFIED" in out and "compute-optimal allocation: refused" in out
    assert "refused" in fit["compute_optimal"] and fit["bootstrap_failed"]["count"] == 0
    assert main(["scaling", "longer", str(tmp_path / "fit.json"), "--n", "1e5", f"--out={tmp_path / 'l'}"]) != 0
    err = capsys.readouterr().err
    assert "refusing" in err and "E: the fit sits on the lower bound" in err and "--force" in err
    assert not (tmp_path / "l").exists()
    assert main(["scaling", "fit", str(tmp_path), "--bootstrap", "2", "--force"]) == 0
    forced = json.loads((tmp_path / "fit.json").read_text())["compute_optimal"]
    assert len(forced) == 5 and all("not identified" in row["forced"] for row in forced)
    assert "FORCED" in capsys.readouterr().out


def test_runs_are_keyed_by_their_whole_config_and_locked(char_data, tmp_path):
    from lmlab.scaling.sweep import run_lock, run_one

    cfg = SweepConfig(data=str(char_data), out=str(tmp_path / "s"), block_size=32, batch_size=8, dtype="float32")
    same = run_config(cfg, 2e4, 4096).train.out_dir
    assert run_config(cfg, 2e4, 4096).train.out_dir == same  # an identical rerun finds its finished run
    changed = [SweepConfig(**{**cfg.__dict__, k: v}) for k, v in
               (("lr_rule", "kaplan"), ("batch_size", 4), ("n_layer", 2), ("eval_tokens", 1000), ("seed", 1))]
    dirs = {run_config(c, 2e4, 4096).train.out_dir for c in changed}
    assert same not in dirs and len(dirs) == len(changed)  # any change that alters the result retrains
    run = run_config(cfg, 2e4, 4096)
    with run_lock(Path(run.train.out_dir)), pytest.raises(LmlabError, match="another process"):
        run_one(cfg, run, quiet=True)
