import json

import pytest

from lmlab.errors import LmlabError
from lmlab.scaling.sweep import SweepConfig, lr_for, run_config, shape_for, sweep


def test_shapes_hit_the_target_size():
    for n in (1e5, 1e6, 1e7):
        n_layer, d = shape_for(n)
        assert 0.6 < 12 * n_layer * d * d / n < 1.6 and d % 32 == 0
    assert lr_for(1e6) < lr_for(1e5)  # larger models train with smaller steps


def test_sweep_runs_resumes_and_tabulates(char_data, tmp_path):
    cfg = SweepConfig(data=str(char_data), out=str(tmp_path / "sweep"), sizes=[2e4, 4e4], tokens=[4096, 8192],
                      block_size=32, batch_size=8, dtype="float32", eval_tokens=2000)
    results = sweep(cfg, log=lambda *a: None)
    assert len(results) == 4 and all(r["D"] in (4096, 8192) for r in results)
    by = {(r["N"], r["D"]): r["val_loss"] for r in results}
    sizes = sorted({r["N"] for r in results})
    assert by[(sizes[0], 8192)] < by[(sizes[0], 4096)]  # more tokens help
    table = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert len(table) == 4 and (tmp_path / "sweep" / "results.md").is_file()
    # a finished run is skipped: its result file is reused as is
    run = run_config(cfg, 2e4, 4096)
    stamp = (tmp_path / "sweep" / run.train.out_dir.split("/")[-1] / "result.json").read_text()
    assert sweep(cfg, log=lambda *a: None) == results
    assert (tmp_path / "sweep" / run.train.out_dir.split("/")[-1] / "result.json").read_text() == stamp


def test_sweep_refuses_too_many_epochs(char_data, tmp_path):
    cfg = SweepConfig(data=str(char_data), out=str(tmp_path / "s"), sizes=[3e4], tokens=[1e9], block_size=32)
    with pytest.raises(LmlabError, match="epochs"):
        sweep(cfg, log=lambda *a: None)


def test_fit_and_predict_cli_on_synthetic_sweep(tmp_path, capsys):
    import numpy as np

    from lmlab.cli import main
    from lmlab.scaling.fit import ChinchillaLaw

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
