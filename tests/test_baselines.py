"""Every final model beats its trivial predictor: the baseline numbers against a hand
computation, the refusal to save (or load) a model that does not, with nothing written, and the
cpu profile's Adult model clearing the margin."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fimoda.training import final_model as T
from fimoda.training.baselines import (TrivialModelError, baseline_check, baseline_table,
                              trivial_baseline)
from fimoda.training.baselines import FINAL_MODEL_MARGIN, BaselineMargin
from fimoda.paper.config import get_config
from fimoda.data import load_dataset
from conftest import data_dir, require_file
from test_train import classification_ds, reg_cfg, regression_ds


def test_trivial_baseline_matches_hand_computation():
    c = trivial_baseline("classification", [0, 0, 1, 2, 0, 1], [1, 0, 2, 2], n_classes=4)
    assert c["majority_class"] == 0 and c["majority_rate"] == 0.25
    # class prior (3/6, 2/6, 1/6, 0) on the test labels 1, 0, 2, 2
    hand = -(math.log(2 / 6) + math.log(3 / 6) + 2 * math.log(1 / 6)) / 4
    assert c["prior_cross_entropy"] == pytest.approx(hand, rel=1e-15)
    assert trivial_baseline("classification", [1, 1, 0, 0], [1])["majority_class"] == 0  # tie
    assert trivial_baseline("classification", [0, 0], [1], n_classes=2)[
        "prior_cross_entropy"] == math.inf
    r = trivial_baseline("regression", [1.0, 2.0, 3.0, 6.0], [0.0, 3.0, 5.0])
    assert r == {"mean": 3.0, "mse": pytest.approx(13 / 3, rel=1e-15)}
    with pytest.raises(ValueError, match="non-empty 1-d"):
        trivial_baseline("regression", [], [1.0])

    m = BaselineMargin(error_ratio=0.8, cross_entropy_ratio=0.9, mse_ratio=0.5)
    chk = baseline_check("classification", {"accuracy": 0.41, "loss": 0.9 * hand + 1e-9, "n": 4},
                         c, m)
    acc, ce = chk["criteria"]
    assert acc["bound"] == pytest.approx(1 - 0.8 * 0.75) and acc["passed"]   # 0.41 >= 0.40
    assert ce["bound"] == pytest.approx(0.9 * hand) and not ce["passed"]
    assert not chk["passed"] and chk["n_test"] == 4
    reg = baseline_check("regression", {"rmse": math.sqrt(13 / 6), "n": 3}, r, m)
    assert reg["passed"] and reg["criteria"][0]["bound"] == pytest.approx(13 / 6)
    assert not baseline_check("regression", {"rmse": math.nan, "n": 3}, r, m)["passed"]
    with pytest.raises(ValueError, match="error_ratio"):
        BaselineMargin(error_ratio=1.5)


def _as_trivial(task):
    """A stand-in for the training loop that leaves theta^f equal to the trivial predictor:
    output weights 0, output bias the log class prior (classification) or the mean target."""
    def fit(model, cfg, Xtr, ytr, *a, **k):
        with torch.no_grad():
            model.out.weight.zero_()
            if task == "classification":
                counts = torch.bincount(ytr, minlength=model.out.bias.numel()).double()
                model.out.bias.copy_(torch.log(counts / counts.sum()))
            else:
                model.out.bias.fill_(float(ytr.mean()))
        return {"epoch": [1], "minibatch_loss": [0.0]}, 0
    return fit


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_trivial_model_is_refused_and_nothing_written(task, tmp_path, monkeypatch):
    ds = classification_ds() if task == "classification" else regression_ds()
    cfg = reg_cfg(epochs=30) if task == "regression" else get_config("adult", "smoke")
    # the same settings learn: the check passes and the record holds the comparison
    _, good = T.train_final_model(cfg, ds, progress=False)
    assert good["baseline"]["passed"] and good["baseline"]["enforced"]
    # an untrained model (lr 0) and a model equal to the trivial predictor are refused
    with pytest.raises(TrivialModelError, match="does not beat its trivial predictor"):
        T.train_final_model(replace(cfg, train=replace(cfg.train, lr=0.0)), ds,
                            out_dir=tmp_path / "lr0", progress=False)
    monkeypatch.setattr(T, "fit_model", _as_trivial(task))
    with pytest.raises(TrivialModelError) as err:
        T.train_final_model(cfg, ds, out_dir=tmp_path / "const", progress=False)
    msg = str(err.value)
    assert "not saved" in msg and f"on {len(ds.y_test)} test rows" in msg
    base = trivial_baseline(task, ds.y_train, ds.y_test, ds.n_classes)
    if task == "classification":
        assert f"test accuracy {base['majority_rate']:.4g} vs the trivial predictor's " \
               f"{base['majority_rate']:.4g}" in msg
        assert f"{base['prior_cross_entropy']:.4g}" in msg
    else:
        assert f"test MSE {base['mse']:.4g} vs the trivial predictor's {base['mse']:.4g}" in msg
    for d in ("lr0", "const"):      # no model file, no record (the lock file is removed too)
        assert not (tmp_path / d).exists() or list((tmp_path / d).iterdir()) == []


def test_saved_model_failing_the_check_is_refused_on_load(tmp_path, monkeypatch):
    """A model saved without the check (as an older version did) is refused when loaded, by
    load_final_model and by train_final_model, which does not retrain it; a passing model saved
    before the record had its ``baseline`` gets it recomputed on load."""
    ds, cfg = regression_ds(), reg_cfg(epochs=30)
    fit = T.fit_model
    monkeypatch.setattr(T, "fit_model", _as_trivial("regression"))
    _, rec = T.train_final_model(cfg, ds, out_dir=tmp_path / "old", progress=False, margin=None)
    assert not rec["baseline"]["passed"] and not rec["baseline"]["enforced"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(TrivialModelError, match="saved in .*old is refused"):
        T.load_final_model(cfg, ds, tmp_path / "old")
    with pytest.raises(TrivialModelError, match="saved in .*old is refused"):
        T.train_final_model(cfg, ds, out_dir=tmp_path / "old", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert T.load_final_model(cfg, ds, tmp_path / "old", margin=None) is not None

    monkeypatch.setattr(T, "fit_model", fit)
    _, rec = T.train_final_model(cfg, ds, out_dir=tmp_path / "new", progress=False)
    path = tmp_path / "new" / T.RECORD_FILE
    saved = json.loads(path.read_text())
    assert saved["baseline"] == json.loads(json.dumps(rec["baseline"]))
    del saved["baseline"]                       # a record from before the check
    path.write_text(json.dumps(saved))
    _, again = T.train_final_model(cfg, ds, out_dir=tmp_path / "new", progress=False)
    assert again["baseline"] == rec["baseline"]
    table = baseline_table(again)
    assert list(table.index) == ["test MSE"] and bool(table["passed"].iloc[0])
    assert table["trivial predictor"].iloc[0] == pytest.approx(
        trivial_baseline("regression", ds.y_train, ds.y_test)["mse"])


@pytest.mark.slow          # trains the cpu profile's 100-epoch Adult model on 4,000 rows
def test_adult_cpu_final_model_beats_its_majority_rate():
    """The cpu profile's Adult theta^f (the Folktables stand-in), which predicted the majority
    class for every row when it trained 20 epochs, now clears the margin; accuracy, majority
    rate and predicted positives recomputed here from the model and the labels."""
    require_file("adult/adult.data")
    cfg = get_config("adult", "cpu")
    ds = load_dataset("adult", data_dir=data_dir())
    model, rec = T.train_final_model(cfg, ds, progress=False)
    y = np.asarray(ds.y_test)
    with torch.no_grad():
        pred = model(torch.as_tensor(np.asarray(ds.X_test))).argmax(1).numpy()
    rows = T.train_rows(cfg, ds)[0]
    majority = int(np.bincount(np.asarray(ds.y_train)[rows]).argmax())
    rate = float((y == majority).mean())
    accuracy = float((pred == y).mean())
    assert majority == 0 and rate == pytest.approx(0.7577, abs=1e-4)   # 24.2 % earn > 50K
    assert accuracy == pytest.approx(rec["metrics"]["test"]["accuracy"], abs=1e-12)
    assert accuracy >= 1 - FINAL_MODEL_MARGIN.error_ratio * (1 - rate)
    assert 0.1 < (pred == 1).mean() < 0.4           # not a constant classifier
    assert rec["baseline"]["passed"]
