"""The notebooks, executed end to end by papermill on the smoke profile (as run_all.sh does)."""
import json
import re

import pytest

from conftest import require_file
from fimoda import pipeline


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    for var, sub in (("FIMODA_RESULTS_DIR", "results"), ("FIMODA_FIGURES_DIR", "figures"),
                     ("FIMODA_EXECUTED_DIR", "executed")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def test_plan_orders_notebooks_and_skips_non_tabular_steps():
    steps = pipeline.plan("smoke", ["concrete", "sst2"])
    names = [(nb, p.get("dataset")) for nb, p, _ in steps]
    assert names[0] == ("00_data.ipynb", None)
    assert ("01_final_models.ipynb", "sst2") in names
    assert ("02_gold_further_training.ipynb", "sst2") not in names
    order = [nb for nb, _ in names]
    assert order == sorted(order)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown dataset"):
        pipeline.run("smoke", ["mnist"])


def test_only_matching_no_notebook_is_an_error():
    with pytest.raises(SystemExit, match="matches no notebook"):
        pipeline.run("smoke", ["concrete"], only=["99"])


def test_smoke_pipeline_runs_every_notebook(isolated, capfd):
    require_file("concrete/Concrete_Data.xls")
    pipeline.run("smoke", ["concrete"])
    out, err = capfd.readouterr()
    # one line per notebook with its wall time, then the total; nothing from the kernels
    lines = out.strip().splitlines()
    assert len(lines) == 1 + 7 + 1, out
    assert all(re.search(r"^\[ ?\d/7\] \S+.* \d+:\d\d$", ln) for ln in lines[1:-1]), out
    assert lines[-1].startswith("all 7 notebooks done in ")
    assert "without encryption" not in err and "TCP" not in err, err
    executed = sorted((isolated / "executed" / "smoke").glob("*.ipynb"))
    assert len(executed) == 7
    for nb in executed:
        cells = json.loads(nb.read_text())["cells"]
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, nb.name
    res = isolated / "results" / "smoke" / "concrete"
    for name in ("final_model.pt", "final_model.json", "gold_sgd_subtract.npz",
                 "scores_grad_dot.npz", "scores_cg.npz", "evaluation_sgd_subtract_eq13.csv",
                 "retrain_remove.npz"):
        assert (res / name).exists(), name
    figs = {p.name for p in (isolated / "figures" / "smoke").glob("*.png")}
    assert "concrete_cosine_sgd_subtract_eq13.png" in figs and "figure2_sgd_subtract.png" in figs


def test_mislabel_detection_runs_on_a_classification_dataset(isolated):
    require_file("heloc/heloc_dataset_v1.csv")
    pipeline.run("smoke", ["fico"], only=["01", "02", "06"])
    nb = json.loads((isolated / "executed" / "smoke" / "06_qualitative_fico.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/plain", "")) for c in nb["cells"]
                   for o in c.get("outputs", []))
    assert "further training (gold)" in text and "Grad-Dot" in text and "AUC mean" in text
