"""The experiment glue: method configs from the profile, caching of scores, Assumption 1."""
import dataclasses

import numpy as np
import pytest
import torch

from fimoda.paper import experiment as ex
from fimoda import store
from fimoda.paper.config import get_config
from fimoda.gradients import Problem
from fimoda.influence import Attributor
from fimoda.models import MLP


@pytest.fixture
def att():
    torch.manual_seed(0)
    m = MLP(3, 1, hidden=6).double()
    X = torch.randn(40, 3, dtype=torch.float64)
    Y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)) + 0.1 * torch.randn(40, dtype=torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        ((m(X).squeeze(-1) - Y) ** 2).mean().backward()
        opt.step()
    return Attributor(Problem(m, X, Y, "regression", progress=False), X[:8], Y[:8], X[30:34], Y[30:34])


def test_method_config_takes_the_profiles_settings():
    cfg = get_config("folktables", "paper")
    lh = ex.method_config("lissa_h", cfg)
    assert (lh.scale, lh.depth, lh.batch_size) == (200.0, 5000, None)
    assert lh.scale_grid[0] == 200.0 and all(s >= 200.0 for s in lh.scale_grid)
    assert ex.method_config("lissa", cfg).scale == 20.0
    assert ex.method_config("cg", get_config("energy", "paper")).damping_grid == (1.0, 10.0, 100.0, 1000.0)
    assert ex.method_config("lissa_h", get_config("concrete", "cpu")).batch_size is None
    assert ex.method_config("lissa_h", get_config("concrete", "smoke")).batch_size == 128
    assert ex.method_config("trak", get_config("concrete", "smoke")).proj_dim == 256
    assert ex.method_config("cg", cfg, damping_index=3).damping_index == 3
    tr = ex.method_config("trajectory", get_config("concrete", "cpu"))    # the dataset's further training
    assert (tr.lr, tr.epochs, tr.steps, tr.batch_size) == (3e-2, 100, None, 128)
    tr = ex.method_config("trajectory", get_config("sst2", "paper"))
    assert (tr.lr, tr.steps, tr.batch_size) == (1e-6, None, 64)
    assert ex.method_config("trajectory", get_config("fashion_mnist", "paper")).steps == 50


def test_smallest_eigenvalue_and_assumption1_damping(att):
    H = att.problem.dense_hessian() / att.n_train
    lam_min = float(torch.linalg.eigvalsh(H).min())
    assert ex.smallest_hessian_eigenvalue(att, n_iter=att.problem.n_params) == pytest.approx(lam_min, abs=1e-8)
    cfg = get_config("concrete", "smoke")
    lam = ex.assumption1_damping(att, cfg)
    assert lam >= att.lambda_G * cfg.methods.damping_grid[cfg.methods.damping_index]
    assert float(torch.linalg.eigvalsh(H + lam * torch.eye(len(H), dtype=H.dtype)).min()) > 0


def test_lambda_min_is_kept_on_disk_for_the_same_problem_only(att, tmp_path, monkeypatch):
    cfg = get_config("concrete", "smoke")
    lam = ex.assumption1_damping(att, cfg, directory=tmp_path)
    assert (tmp_path / "hessian_lambda_min.json").exists()
    import fimoda.influence.arnoldi as arn
    real = arn.arnoldi_eig

    def forbidden(*a, **k):
        raise AssertionError("lambda_min recomputed although it is on disk for this problem")

    monkeypatch.setattr(arn, "arnoldi_eig", forbidden)
    p = att.problem                                        # a new model object, same numbers
    again = Attributor(Problem(p.model, p.X, p.Y, "regression", progress=False), *att_rows(att))
    assert ex.assumption1_damping(again, cfg, directory=tmp_path) == lam
    monkeypatch.setattr(arn, "arnoldi_eig", real)
    X2 = p.X.clone()
    X2[0] += 1.0                                           # another training set: recomputed
    other = Attributor(Problem(p.model, X2, p.Y, "regression", progress=False), *att_rows(att))
    ex.assumption1_damping(other, cfg, directory=tmp_path)
    H2 = other.problem.dense_hessian() / other.n_train
    want = float(torch.linalg.eigvalsh(H2).min())
    assert ex.load_json(tmp_path / "hessian_lambda_min.json")["lambda_min"] == pytest.approx(
        want, abs=1e-3 * abs(want) + 1e-8)


def att_rows(att):
    return att.X_loo, att.Y_loo, att.X_test, att.Y_test


def test_run_method_saves_loads_and_invalidates(att, tmp_path, monkeypatch):
    cfg = get_config("concrete", "smoke")
    loo, test = np.arange(8), np.arange(30, 34)
    s = ex.run_method("grad_dot", att, cfg, loo, test, directory=tmp_path)
    assert s.shape == (4, 8) and (tmp_path / "scores_grad_dot.npz").exists()
    expected = (att.test_grads @ att.train_grads.T).numpy()
    np.testing.assert_allclose(s, expected, rtol=1e-12)
    import fimoda.influence as inf
    real, calls = inf.compute_scores, []
    monkeypatch.setattr(inf, "compute_scores", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    # reused while nothing it depends on changed; the gold standard's settings are not part of a
    # method's identity
    assert np.array_equal(ex.run_method("grad_dot", att, cfg, loo, test, directory=tmp_path), s)
    cfg_f = dataclasses.replace(cfg, further=dataclasses.replace(cfg.further, seeds=9))
    assert np.array_equal(ex.run_method("grad_dot", att, cfg_f, loo, test, directory=tmp_path), s)
    assert calls == []
    # a file edited behind its record's back is recomputed, not reused
    z = dict(np.load(tmp_path / "scores_grad_dot.npz"))
    np.savez(tmp_path / "scores_grad_dot.npz", **{**z, "scores": z["scores"] * 0})
    np.testing.assert_allclose(ex.run_method("grad_dot", att, cfg, loo, test, directory=tmp_path), expected)
    assert calls == ["grad_dot"]
    # ... and so is a result of another method config
    cfg2 = dataclasses.replace(cfg, methods=dataclasses.replace(cfg.methods, damping_index=2))
    np.testing.assert_allclose(ex.run_method("grad_dot", att, cfg2, loo, test, directory=tmp_path), expected)
    assert calls == ["grad_dot"] * 2
    assert set(ex.load_scores(cfg2, ["grad_dot", "cg"], directory=tmp_path)) == {"grad_dot"}


def test_numerical_breakdown_is_reported_not_hidden(att, tmp_path):
    cfg = get_config("concrete", "smoke")
    with pytest.raises(ex.MethodFailed, match="lissa"):
        ex.run_method("lissa", att, cfg, np.arange(8), np.arange(30, 34), directory=tmp_path,
                      scale=1e-3, scale_grid=(), damping=1e-6)
    assert not (tmp_path / "scores_lissa.npz").exists()


def test_retrain_comparison_uses_eq17_at_the_final_epoch(tmp_path):
    cfg = get_config("concrete", "smoke")
    assert ex.retrain_comparison(cfg, {"grad_dot": np.ones((3, 4))}, directory=tmp_path) is None
    rng = np.random.default_rng(0)
    full = rng.normal(size=(1, 5, 3))                  # (seed, epoch, test)
    effect = rng.normal(size=(4, 3))                   # (left-out, test) at the last epoch
    loo = np.repeat(full[:, None], 4, axis=1)
    loo[0, :, -1, :] += effect
    np.savez(tmp_path / "retrain_remove.npz", loss_full=full, loss_loo=loo)
    with pytest.raises(ex.StaleResult, match="no record"):      # not from the experiment's run
        ex.retrain_comparison(cfg, {"grad_dot": effect.T}, directory=tmp_path)
    store.write_record(tmp_path / "retrain_remove.npz",
                       {"experiment": ex.records.config_without(cfg, "methods")})
    table = ex.retrain_comparison(cfg, {"grad_dot": effect.T, "cg": -effect.T}, directory=tmp_path)
    assert table.loc["Grad-Dot", "cosine to re-training"] == pytest.approx(1.0)
    assert table.loc["CG", "cosine to re-training"] == pytest.approx(-1.0)


def test_fit_rows_keep_the_left_out_rows_and_the_attributor_knows_where():
    import types
    cfg = get_config("concrete", "smoke")
    loo = np.array([30, 2, 17])
    assert np.array_equal(ex.fit_rows(cfg, 50, loo), np.arange(50))          # None: every row
    cfg = dataclasses.replace(cfg, methods=dataclasses.replace(cfg.methods, fit_rows=10))
    rows = ex.fit_rows(cfg, 50, loo)
    assert len(rows) == 10 and set(loo) <= set(rows.tolist()) and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, ex.fit_rows(cfg, 50, loo))                   # seeded
    with pytest.raises(ValueError, match="smaller than the 3 left-out rows"):
        ex.fit_rows(dataclasses.replace(cfg, methods=dataclasses.replace(cfg.methods, fit_rows=2)),
                    50, loo)
    rng = np.random.default_rng(0)
    ds = types.SimpleNamespace(X_train=rng.normal(size=(50, 3)), y_train=rng.normal(size=50),
                               X_test=rng.normal(size=(4, 3)), y_test=rng.normal(size=4))
    att = ex.make_attributor(MLP(3, 1, hidden=4).double(), ds, cfg, loo, np.arange(4),
                             progress=False)
    assert att.n_train == 10
    # the left-out instances are the problem's rows at loo_rows
    assert torch.equal(att.problem.X[att.loo_rows], att.X_loo)
    assert torch.equal(att.X_loo, torch.as_tensor(ds.X_train[loo]))


def test_damping_sweep_runs_the_whole_grid_and_reuses_the_default(att, tmp_path):
    cfg = get_config("concrete", "smoke")
    loo, test = np.arange(8), np.arange(30, 34)
    m = cfg.methods
    assert m.damping_sweep == ("dense",) and m.damping_index == len(m.damping_grid) - 1
    assert get_config("fashion_mnist", "cpu").methods.damping_sweep == ()
    main = ex.run_method("dense", att, cfg, loo, test, directory=tmp_path)
    sweeps = ex.damping_sweeps(att, cfg, loo, test, directory=tmp_path)
    assert list(sweeps) == ["dense"] and sorted(sweeps["dense"]) == sorted(map(float, m.damping_grid))
    np.testing.assert_array_equal(sweeps["dense"][float(m.damping_grid[-1])], main)
    names = sorted(p.name for p in tmp_path.glob("scores_dense*.npz"))
    assert names == ["scores_dense.npz"] + [f"scores_dense_damping{k}.npz"
                                            for k in range(len(m.damping_grid) - 1)]
    for k, g in enumerate(m.damping_grid):     # each file is the solve at its own damping, and
        want = ex.run_method("cg", att, cfg, loo, test, directory=tmp_path / "cg",
                             file=f"{k}.npz", damping_index=k)          # what CG converges to
        np.testing.assert_allclose(sweeps["dense"][float(g)], want, rtol=1e-6,
                                   atol=1e-8 * np.abs(want).max())
    small, large = sweeps["dense"][float(m.damping_grid[0])], sweeps["dense"][float(m.damping_grid[-1])]
    assert np.abs(small - large).max() > 1e-3 * np.abs(large).max()     # the damping matters
    loaded = ex.load_damping_sweep(cfg, "dense", directory=tmp_path)
    assert all(np.array_equal(loaded[g], sweeps["dense"][g]) for g in sweeps["dense"])
    big = dataclasses.replace(cfg, methods=dataclasses.replace(m, skip=(("dense", "why"),)))
    assert ex.damping_sweeps(att, big, loo, test, directory=tmp_path) == {}


def test_seeds_override_reaches_every_per_dataset_notebook_and_the_banner(capsys):
    from fimoda.paper import pipeline
    steps = pipeline.plan("smoke", ["concrete"], seeds=3)
    per_ds = [p for _, p, _ in steps if "dataset" in p]
    assert per_ds and all(p["seeds"] == 3 for p in per_ds)
    assert [p.get("seeds") for nb, p, _ in steps if "dataset" not in p] == [None, None, 3]   # walkthrough, 00, 05
    assert all("seeds" not in p for _, p, _ in pipeline.plan("smoke", ["concrete"]))
    cfg, _ = ex.setup("concrete", "paper", seeds=10)
    assert cfg.further.seeds == 10 and get_config("concrete", "paper").further.seeds == 100
    assert "further-training seeds averaged: 10 (paper: 100) -- set for this run" in \
        capsys.readouterr().out                                 # the banner names the change
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
            ex.setup("concrete", "paper", seeds=bad)
    with pytest.raises(SystemExit, match="--seeds must be at least 1"):
        pipeline.run("smoke", ["concrete"], seeds=0)


def test_adam_gold_runs_its_own_number_of_epochs(tmp_path):
    """``further.adam_epochs`` sets the Adam gold standard's epochs (the SGD one keeps
    ``epochs``), and is part of what the saved gold file was computed with."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    X, Xt = np.random.RandomState(0).randn(30, 3), np.random.RandomState(1).randn(4, 3)
    ds = SimpleNamespace(X_train=X, y_train=X @ [1.0, -1.0, 0.5], X_test=Xt, y_test=Xt[:, 0],
                         extra={})
    cfg = get_config("concrete", "smoke")
    cfg = dataclasses.replace(cfg, further=dataclasses.replace(
        cfg.further, epochs=3, adam_epochs=2, seeds=1, batch_size=8))
    model = MLP(3, 1, hidden=4).double()
    loo, test = np.array([0, 5, 9]), np.array([0, 1])
    sgd = ex.run_gold(model, ds, cfg, loo, test, optimizer="sgd", directory=tmp_path)
    adam = ex.run_gold(model, ds, cfg, loo, test, optimizer="adam", directory=tmp_path)
    assert list(sgd["eval_points"]) == [0, 1, 2, 3] and list(adam["eval_points"]) == [0, 1, 2]
    longer = dataclasses.replace(cfg, further=dataclasses.replace(cfg.further, adam_epochs=3))
    again = ex.run_gold(model, ds, longer, loo, test, optimizer="adam", directory=tmp_path)
    assert list(again["eval_points"]) == [0, 1, 2, 3]       # recomputed, not the stored 2 epochs
    with pytest.raises(ex.StaleResult, match=r"differs in: .*adam_epochs"):
        ex.load_gold(cfg, "adam", directory=tmp_path)      # and the 2-epoch one is gone


def test_mislabel_detection_runs_where_its_auc_can_mean_something():
    assert ex.mislabel_applies(get_config("fico", "cpu")) == (True, "")
    assert ex.mislabel_applies(get_config("sst2", "paper")) == (True, "")
    applies, why = ex.mislabel_applies(get_config("sst2", "cpu"))
    assert not applies and "cpu profile" in why and "0, 1/2 or 1" in why
    assert not ex.mislabel_applies(get_config("fashion_mnist", "cpu"))[0]
    assert not ex.mislabel_applies(get_config("energy", "paper"))[0]
