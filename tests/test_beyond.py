"""Beyond the paper (notebook 07): the infinitesimal gold standard against finite differences of the
one-model reference loop, and the trajectory-matched influence against its explicit recurrence,
Grad-Dot and the damped influence function."""
import dataclasses

import numpy as np
import pytest
import torch

import fimoda
from small_models import near_minimum_mlp
import fimoda.gold.reference as reference
from fimoda.gold import GoldConfig, gold_scores, reference_further_train
from fimoda.gold.infinitesimal import infinitesimal_further_train
from fimoda.influence import METHODS, compute_scores
from fimoda.influence.operators import DampedHessian
from fimoda.influence.trajectory import (SpectralPairs, TrajectoryConfig, damping_schedule_curve,
                                         trajectory_curve)
from fimoda.models import MLP


def _data(n, d=3, task="regression", seed=0, n_test=4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    Xt = rng.normal(size=(n_test, d))
    w = np.array([1.0, -2.0, 0.5])[:d]
    if task == "regression":
        return X, np.sin(X @ w), Xt, np.sin(Xt @ w)
    return X, (X @ w > 0).astype(np.int64), Xt, (Xt @ w > 0).astype(np.int64)


def _eps_reference(model, task, X, y, Xt, yt, loo, cfg, eps):
    """reference_further_train with the subtracted term weighted eps/n instead of 1/n: its loss
    function (the only one it calls on a single row, the subtracted z_i; batches and the test set
    have more rows here) scaled by eps."""
    base_loss = reference.per_example_loss

    def scaled(task):
        fn = base_loss(task)
        return lambda out, target: fn(out, target) * (eps if len(target) == 1 else 1.0)

    reference.per_example_loss = scaled
    try:
        return reference_further_train(model, task, X, y, Xt, yt, loo, cfg).loss_loo
    finally:
        reference.per_example_loss = base_loss


CASES = [("sgd", None, 0.0, "regression"), ("adam", None, 1e-3, "regression"),
         ("adamw", 0.5, 1e-2, "regression"), ("sgd", 0.3, 0.0, "classification")]


@pytest.mark.parametrize("optimizer,clip,wd,task", CASES)
def test_jvp_trajectory_equals_finite_difference_of_the_reference_loop(optimizer, clip, wd, task):
    X, y, Xt, yt = _data(37, task=task)           # 37 % 8 = 5: no batch of one row
    torch.manual_seed(0)
    model = MLP(3, 1 if task == "regression" else 2, hidden=8).double()
    loo = np.array([0, 5, 11])
    cfg = GoldConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2, epochs=3,
                     batch_size=8, seeds=(1, 2), mechanism="subtract", grad_clip=clip,
                     weight_decay=wd, progress=False)
    res = infinitesimal_further_train(model, task, X, y, Xt, yt, loo, cfg)
    eps = 1e-4
    fd = (_eps_reference(model, task, X, y, Xt, yt, loo, cfg, eps)
          - _eps_reference(model, task, X, y, Xt, yt, loo, cfg, -eps)) / (2 * eps)
    scale = np.abs(fd).max()
    assert scale > 1e-3
    assert np.abs(res.derivative - fd).max() < 1e-7 * scale
    # the full run is the reference's, bit for bit
    ref = reference_further_train(model, task, X, y, Xt, yt, loo, cfg)
    np.testing.assert_array_equal(res.loss_full, ref.loss_full)
    if clip is not None:                          # the clipping was active
        plain = infinitesimal_further_train(model, task, X, y, Xt, yt, loo,
                                            dataclasses.replace(cfg, grad_clip=None))
        assert np.abs(plain.derivative - res.derivative).max() > 1e-3 * scale


def test_infinitesimal_result_plugs_into_gold_scores_like_the_finite_one():
    X, y, Xt, yt = _data(30)
    torch.manual_seed(1)
    model = MLP(3, 1, hidden=6).double()
    cfg = GoldConfig(lr=0.05, epochs=2, batch_size=8, seeds=3, mechanism="subtract",
                     progress=False)
    res = infinitesimal_further_train(model, "regression", X, y, Xt, yt, [1, 2, 9, 20], cfg,
                                      tangent_chunk=3)
    d = res.derivative
    a13 = gold_scores(res.loss_full, res.loss_loo, "mean")
    a17 = gold_scores(res.loss_full, res.loss_loo, "full")
    np.testing.assert_allclose(a13, (d - d.mean(1, keepdims=True)).mean(0), atol=1e-14)
    np.testing.assert_allclose(a17, d.mean(0), atol=1e-14)
    assert np.all(d[:, :, 0] == 0) and res.loss_loo.shape == (3, 4, 3, 4)
    # chunks of tangents repeat the primal run: the same numbers as all at once
    whole = infinitesimal_further_train(model, "regression", X, y, Xt, yt, [1, 2, 9, 20], cfg)
    np.testing.assert_allclose(whole.derivative, d, rtol=1e-12, atol=1e-15)


def test_infinitesimal_gold_rejects_the_remove_mechanism_before_any_work():
    X, y, Xt, yt = _data(20)
    with pytest.raises(ValueError, match="subtract"):
        infinitesimal_further_train(MLP(3, 1, hidden=4).double(), "regression", X, y, Xt, yt,
                                    [0], GoldConfig(mechanism="remove", progress=False))
    with pytest.raises(ValueError, match="tangent_chunk"):
        infinitesimal_further_train(MLP(3, 1, hidden=4).double(), "regression", X, y, Xt, yt,
                                    [0], GoldConfig(mechanism="subtract"), tangent_chunk=0)


# ----------------------------------------------------------------------------- trajectory
def _attributor(n, hidden=6, seed=0, n_test=12):
    X, y, Xt, yt = _data(n, seed=seed, n_test=12)   # 12 x 9 pairs: the kernel's eigh pays
    Xt, yt = Xt[:n_test], yt[:n_test]
    model = near_minimum_mlp(X, y, hidden=hidden, seed=seed)
    return fimoda.attributor(model, X, y, np.arange(0, n, 7), Xt, yt, task="regression")


def _recurrence(att, hessian, wd, lr, steps):
    """v_0 = 0, v_{k+1} = v_k - lr (A v_k) + (lr/n) grad L(z_i), A the dense M/n + wd I;
    scores_t = grad g^T v_t."""
    A = DampedHessian(att, hessian, wd, "mean", "never").dense()
    W, G = att.train_grads.T, att.test_grads
    v, out = torch.zeros_like(W), []
    for k in range(max(steps) + 1):
        if k in steps:
            out.append((G @ v).numpy())
        v = v - lr * (A @ v) + (lr / att.n_train) * W
    return np.stack(out), float(torch.linalg.eigvalsh(A)[0])


@pytest.mark.parametrize("n,hessian,materialize,wd,route", [
    (60, "gn", "auto", 0.0, "kernel"),        # n <= P: the kernel's eigen-decomposition
    (100, "gn", "auto", 0.01, "spectral"),    # n > P: G/n's spectrum
    (60, "gn", "never", 0.01, "krylov"),      # through products
    (60, "true", "auto", 0.0, "krylov"),      # the true Hessian
])
def test_trajectory_closed_forms_equal_the_explicit_recurrence(n, hessian, materialize, wd, route):
    att = _attributor(n)
    steps = [0, 1, 2, 5, 40, 300]
    cfg = TrajectoryConfig(lr=0.1, hessian=hessian, materialize=materialize, weight_decay=wd)
    pairs = SpectralPairs(att, cfg, max(steps) - 1, progress=False)
    assert pairs.route == route
    curve = trajectory_curve(att, cfg, steps, pairs=pairs)
    ref, _ = _recurrence(att, hessian, wd, 0.1, steps)
    assert np.abs(curve - ref).max() < 1e-10 * np.abs(ref).max()


def test_trajectory_at_one_step_is_lr_over_n_times_grad_dot():
    att = _attributor(60)
    for hessian in ("gn", "true"):
        s = trajectory_curve(att, TrajectoryConfig(lr=0.3, hessian=hessian), [1])[0]
        gd = compute_scores("grad_dot", att)
        np.testing.assert_allclose(s, 0.3 / att.n_train * gd, rtol=1e-12, atol=1e-18)


def test_trajectory_approaches_the_damped_influence_function_on_gn_plus_lambda():
    att = _attributor(60)
    lam = 0.05
    dense = compute_scores("dense", att, damping=lam)               # (G/n + lam I)^{-1}
    cg = compute_scores("cg", att, damping=lam)
    cfg = TrajectoryConfig(lr=0.1, weight_decay=lam)
    steps = [10, 100, 1000, 10000]
    err = [np.abs(att.n_train * s - dense).max() / np.abs(dense).max()
           for s in trajectory_curve(att, cfg, steps)]
    assert all(b < a for a, b in zip(err, err[1:]))                 # closer as t grows
    assert err[0] > 0.1 and err[-1] < 1e-9
    assert np.abs(att.n_train * trajectory_curve(att, cfg, [10000])[0] - cg).max() \
        < 1e-6 * np.abs(cg).max()


def test_damping_schedule_exact_equals_cg_at_each_damping():
    att = _attributor(60)
    cfg = TrajectoryConfig(lr=0.1)
    exact = damping_schedule_curve(att, cfg, [0, 3, 50])
    by_cg = damping_schedule_curve(att, cfg, [0, 3, 50], solver="cg")
    assert np.abs(exact - by_cg).max() < 1e-7 * np.abs(by_cg).max()
    dense = compute_scores("dense", att, damping=1 / (0.1 * 50)) / att.n_train
    np.testing.assert_allclose(exact[2], dense, rtol=1e-9, atol=1e-15)
    assert np.all(exact[0] == 0)


def test_true_hessian_series_grows_along_negative_curvature_as_the_recurrence_does():
    att = _attributor(60)
    steps = [100, 1000, 2000, 3000]
    _, lam_min = _recurrence(att, "true", 0.0, 0.1, [0])
    assert lam_min < 0                            # theta^f is not a minimum of the true Hessian
    true = trajectory_curve(att, TrajectoryConfig(lr=0.1, hessian="true"), steps)
    gn = trajectory_curve(att, TrajectoryConfig(lr=0.1), steps)
    norm = lambda s: np.linalg.norm(s.reshape(len(s), -1), axis=1)
    growth = norm(true)[3] / norm(true)[2]
    # the part along the most negative eigenvalue grows by (1 + 0.1 |lam_min|)^1000 per 1000 steps
    assert growth > 0.5 * (1 + 0.1 * abs(lam_min)) ** 1000 > 5
    assert norm(gn)[3] / norm(gn)[2] < 1.5                          # GN: PSD, bounded (~ eta t)
    ref, _ = _recurrence(att, "true", 0.0, 0.1, steps)
    assert np.abs(true - ref).max() < 1e-8 * np.abs(ref).max()


@pytest.mark.parametrize("hessian,materialize,wd,n_test", [
    ("gn", "auto", 0.01, 12),      # the kernel's rows; test side (9 left out) as the columns
    ("gn", "never", 0.0, 4),       # per-chunk products; the test side (4 < 9) as the columns
    ("true", "auto", 0.01, 12),    # true-Hessian products
])
def test_trajectory_recurrence_equals_the_explicit_recurrence(hessian, materialize, wd, n_test):
    att = _attributor(60, n_test=n_test)
    steps = [0, 1, 2, 5, 40, 300]
    cfg = TrajectoryConfig(lr=0.1, hessian=hessian, materialize=materialize, weight_decay=wd,
                           route="recurrence")
    curve = trajectory_curve(att, cfg, steps, progress=False)
    ref, _ = _recurrence(att, hessian, wd, 0.1, steps)
    assert curve.shape == ref.shape
    assert np.abs(curve - ref).max() < 1e-10 * np.abs(ref).max()
    closed = trajectory_curve(att, dataclasses.replace(cfg, route="auto"), steps, progress=False)
    assert np.abs(curve - closed).max() < 1e-10 * np.abs(closed).max()


def test_trajectory_recurrence_at_one_step_is_lr_over_n_times_grad_dot():
    att = _attributor(60)
    gd = compute_scores("grad_dot", att)
    for products in ("full", "batch"):
        cfg = TrajectoryConfig(lr=0.3, route="recurrence", products=products, batch_size=8)
        s = trajectory_curve(att, cfg, [1], progress=False)[0]
        np.testing.assert_allclose(s, 0.3 / att.n_train * gd, rtol=1e-12, atol=1e-18)


def test_trajectory_recurrence_mini_batch_products():
    """Batch = n is the full product (in another row order); B < n: seeded (same seed, same
    curve), noisy, and its mean over seeds approaches the full-batch curve."""
    att = _attributor(60)
    steps = [0, 3, 6]
    full = trajectory_curve(att, TrajectoryConfig(lr=0.05, route="recurrence"), steps, False)
    cfg = TrajectoryConfig(lr=0.05, route="recurrence", products="batch", batch_size=60)
    np.testing.assert_allclose(trajectory_curve(att, cfg, steps, False), full, rtol=1e-12,
                               atol=1e-15 * np.abs(full).max())
    runs = [trajectory_curve(att, dataclasses.replace(cfg, batch_size=6, seed=s), steps, False)
            for s in range(300)]
    np.testing.assert_array_equal(runs[0], trajectory_curve(
        att, dataclasses.replace(cfg, batch_size=6, seed=0), steps, False))
    err = lambda x: np.abs(x[2] - full[2]).max() / np.abs(full[2]).max()
    one = np.median([err(r) for r in runs])
    assert one > 0.01                                               # one realisation: noisy
    # the mean's error falls like 1/sqrt(seeds) (measured: 0.0075 over 30, 0.0018 over 300;
    # the bias of an epoch's disjoint batches, O(eta^2 Var), is below that here)
    assert err(np.mean(runs, axis=0)) < 0.5 * err(np.mean(runs[:30], axis=0)) < 0.5 * one
    assert err(np.mean(runs, axis=0)) < 0.005


def test_trajectory_recurrence_preconditioner_hook():
    """D = c^2 I: SGD with eta D is SGD with lr eta c^2."""
    att = _attributor(60)
    from fimoda.influence.trajectory_recurrence import recurrence_curve
    cfg = TrajectoryConfig(lr=0.1, route="recurrence", weight_decay=0.01)
    c = torch.full((att.problem.n_params,), 0.5, dtype=torch.float64)
    pre = recurrence_curve(att, cfg, np.array([0, 2, 30]), False, sqrt_precond=c)
    plain = trajectory_curve(att, dataclasses.replace(cfg, lr=0.025), [0, 2, 30], False)
    assert np.abs(pre - plain).max() < 1e-12 * np.abs(plain).max()
    with pytest.raises(ValueError, match="products"):
        trajectory_curve(att, dataclasses.replace(cfg, products="half"), [1])
    with pytest.raises(ValueError, match="route"):
        trajectory_curve(att, dataclasses.replace(cfg, route="lanczos"), [1])


def test_trajectory_is_a_method_scored_at_the_configured_amount_of_further_training():
    assert METHODS["trajectory"] == "trajectory"
    att = _attributor(60)
    K = int(np.ceil(60 / 16))
    s = compute_scores("trajectory", att, lr=0.2, batch_size=16, epochs=3)
    np.testing.assert_allclose(s, trajectory_curve(att, TrajectoryConfig(lr=0.2), [3 * K])[0],
                               rtol=1e-13)
    s2 = compute_scores("trajectory", att, lr=0.2, steps=7)
    np.testing.assert_allclose(s2, trajectory_curve(att, TrajectoryConfig(lr=0.2), [7])[0],
                               rtol=1e-13)
    with pytest.raises(ValueError, match="lr"):
        compute_scores("trajectory", att, lr=-1.0)
    with pytest.raises(ValueError, match="steps"):
        trajectory_curve(att, TrajectoryConfig(), [1.5])



def test_the_infinitesimal_study_runs_where_the_profile_says():
    from fimoda.paper import beyond
    from fimoda.paper.config import get_config
    assert beyond.infinitesimal_applies(get_config("concrete", "cpu")) == (True, "")
    assert beyond.infinitesimal_applies(get_config("fico", "cpu")) == (True, "")
    runs, why = beyond.infinitesimal_applies(get_config("energy", "cpu"))
    assert not runs and "concrete and fico" in why and "profile='paper'" in why
    assert beyond.infinitesimal_applies(get_config("energy", "smoke"))[0]
    assert beyond.infinitesimal_applies(get_config("energy", "paper"))[0]
    assert not beyond.infinitesimal_applies(get_config("sst2", "paper"))[0]


def test_the_trajectory_study_runs_for_every_model_the_true_hessian_parts_for_mlps_only():
    from fimoda.paper import beyond
    from fimoda.paper.config import get_config
    assert beyond.applies(get_config("concrete", "cpu")) == (True, "")
    for ds in ("fashion_mnist", "sst2"):
        runs, left_out = beyond.applies(get_config(ds, "cpu"))
        assert runs and "part 1" in left_out and "true-Hessian" in left_out
        assert not beyond.full_hessian_applies(get_config(ds, "cpu"))[0]
        assert not beyond.infinitesimal_applies(get_config(ds, "paper"))[0]


def test_trajectory_figure_draws_the_curves_asked_for_and_refuses_unknown_names():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fimoda.paper.beyond import LABELS, trajectory_figure
    from fimoda.style import label
    t = np.arange(1, 5)
    one = (np.linspace(0.1, 0.4, 4), np.full(4, 0.01))
    study = {"eval_points": t, "curves": {"grad_dot": one, "cg": one, "trajectory": one,
                                          "schedule": one, "trajectory_h": one}}

    def legend(fig):
        return [x.get_text() for x in fig.axes[0].get_legend().get_texts()]
    assert len(legend(trajectory_figure(study, "all", "epochs"))) == 5
    # a family asked for but not computed (the Adam curves here) is passed over
    fig = trajectory_figure(study, "some", "epochs",
                            curves=["grad_dot", "trajectory", "trajectory_adam"])
    assert legend(fig) == [label("grad_dot"), LABELS["trajectory"]]
    with pytest.raises(ValueError, match="unknown curves"):
        trajectory_figure(study, "typo", "epochs", curves=["trajectroy"])
    plt.close("all")
