"""The walkthrough's toy (fimoda.paper.walkthrough, notebook 00): its scores against an independent
dense float64 computation -- plain loops of full-batch gradient descent for further training,
closed forms for the gradients, the Hessian, Grad-Dot and the influence functions -- and the
notebook itself under papermill."""
import json
import resource

import numpy as np
import pytest

from fimoda.paper import pipeline, walkthrough as wt

STEPS = 40          # enough for the linearised and exact runs to part; the notebook runs 150


def _grads(theta, X, y):
    """grad_theta log(1 + exp(-s theta^T x)) = -s x / (1 + exp(s theta^T x)), s = 2y - 1."""
    s = 2 * y - 1
    return -(s / (1 + np.exp(s * (X @ theta))))[:, None] * X


def _losses(theta, X, y):
    return np.logaddexp(0, -(2 * y - 1) * (X @ theta))


def _newton():
    """The minimiser of the mean training loss by Newton's method (to machine precision)."""
    X, y = np.array(wt.TRAIN_X), np.array(wt.TRAIN_Y)
    th = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(X @ th)))
        H = (X.T * (p * (1 - p))) @ X / len(X)
        th = th - np.linalg.solve(H, _grads(th, X, y).mean(0))
    return th


def _reference(th, lr, steps):
    """Everything the walkthrough computes from theta^f = ``th``, by hand in numpy float64:
    further training by a plain loop per left-out point, the closed forms."""
    X, y = np.array(wt.TRAIN_X), np.array(wt.TRAIN_Y)
    Xt, yt = np.array(wt.TEST_X), np.array(wt.TEST_Y)
    n = len(X)
    p = 1 / (1 + np.exp(-(X @ th)))
    H = (X.T * (p * (1 - p))) @ X / n
    g, gt = _grads(th, X, y), _grads(th, Xt, yt)
    gold = np.zeros((steps + 1, len(Xt), n))
    paths = np.zeros((n, steps + 1, 2))
    traj = np.zeros((steps + 1, len(Xt), n))
    sched = np.zeros((steps + 1, len(Xt), n))
    for i in range(n):
        full, loo, d = th.copy(), th.copy(), np.zeros(2)
        paths[i, 0] = th
        for t in range(1, steps + 1):
            full = full - lr * _grads(full, X, y).mean(0)
            keep = np.arange(n) != i
            loo = loo - lr * _grads(loo, X[keep], y[keep]).sum(0) / n
            d = d - lr * (H @ d - g[i] / n)
            paths[i, t] = loo
            gold[t, :, i] = _losses(loo, Xt, yt) - _losses(full, Xt, yt)
            traj[t, :, i] = gt @ d
            sched[t, :, i] = gt @ np.linalg.solve(H + np.eye(2) / (lr * t), g[i]) / n
    return dict(theta=th, H=H, g=g, gt=gt, gold=gold, paths=paths, traj=traj, sched=sched,
                grad_dot=gt @ g.T, influence=gt @ np.linalg.solve(H, g.T) / n)


@pytest.fixture(scope="module")
def walk():
    """The walkthrough, and the hand computation from its theta^f (whose own accuracy
    :func:`test_final_model_is_the_minimiser` checks)."""
    w = wt.run(lr=wt.LR, steps=STEPS)
    return w, _reference(w.theta_f, wt.LR, STEPS)


def test_final_model_is_the_minimiser(walk):
    w, ref = walk
    np.testing.assert_allclose(w.theta_f, _newton(), rtol=0, atol=1e-7)   # |grad| < 1e-9
    np.testing.assert_allclose(w.hessian, ref["H"], rtol=1e-12)
    np.testing.assert_allclose(w.train_grads, ref["g"], rtol=1e-12)
    np.testing.assert_allclose(w.test_grads, ref["gt"], rtol=1e-12)


def test_exact_further_training_matches_a_plain_loop(walk):
    w, ref = walk
    assert w.gold.shape == (STEPS + 1, len(wt.TEST_X), len(wt.TRAIN_X))
    np.testing.assert_array_equal(w.steps, np.arange(STEPS + 1))
    np.testing.assert_allclose(w.gold, ref["gold"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.paths_loo, ref["paths"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.paths_full, np.broadcast_to(ref["theta"], (STEPS + 1, 2)),
                               rtol=0, atol=1e-7)      # theta^f is a minimum: the full run stays
    assert np.abs(w.gold[1:]).min() > 0


def test_approximations_match_their_closed_forms(walk):
    w, ref = walk
    n = len(wt.TRAIN_X)
    np.testing.assert_allclose(w.grad_dot, ref["grad_dot"], rtol=1e-12)
    # the influence function's damping IF_DAMPING shifts it by ~ lambda g^T Hbar^-2 g / n
    np.testing.assert_allclose(w.influence, ref["influence"], rtol=1e-9, atol=1e-10)
    t = np.arange(STEPS + 1)[:, None, None]
    np.testing.assert_allclose(w.first_order, wt.LR * t / n * ref["grad_dot"][None], rtol=1e-12)
    np.testing.assert_allclose(w.trajectory, ref["traj"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.schedule, ref["sched"], rtol=0, atol=1e-12)


def test_predicted_paths_are_the_scores_parameter_changes(walk):
    """theta^f + d_t of every approximation, dotted with a test gradient, is that approximation's
    score; the first-order path is the straight line along grad L(z_i)."""
    w, ref = walk
    n = len(wt.TRAIN_X)
    for i in (0, 4):
        pred = w.predicted_paths(i)
        for name, scores in (("trajectory", w.trajectory), ("schedule", w.schedule),
                             ("first_order", w.first_order)):
            d = pred[name] - ref["theta"]
            np.testing.assert_allclose(d @ ref["gt"].T, scores[:, :, i], rtol=0, atol=1e-12)
        np.testing.assert_allclose(pred["influence"] - ref["theta"],
                                   np.linalg.solve(ref["H"], ref["g"][i]) / n, rtol=1e-10)


def test_cosines_are_per_step_over_the_training_points(walk):
    w, ref = walk
    cos = w.cosines(("grad_dot", "influence"))
    for m, s in (("grad_dot", ref["grad_dot"]), ("influence", ref["influence"])):
        a, b = ref["gold"][1:], s[None]                       # (t, test, train)
        c = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        np.testing.assert_allclose(cos[m][0], c.mean(1), rtol=1e-7)
        np.testing.assert_allclose(cos[m][1], c.std(1, ddof=1) / np.sqrt(c.shape[1]), rtol=1e-6)
    # one step of further training is first order: Grad-Dot's direction, not the IF's
    assert cos["grad_dot"][0][0] > 0.99 > cos["influence"][0][0] + 0.3


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        wt.run(steps=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        wt.run(lr=-1.0)


def test_walkthrough_notebook_runs_first_and_needs_no_data(tmp_path, monkeypatch):
    """First in the plan, with no datasets parameter; under papermill on the smoke profile it
    runs without an error, with no data, in well under a minute of CPU, draws its three figures,
    and finds the paper's Figure-2 shape."""
    steps = pipeline.plan("smoke", ["concrete"])
    assert steps[0][0] == "00_walkthrough.ipynb" and steps[0][1] == {"profile": "smoke"}
    for var, sub in (("FIMODA_RESULTS_DIR", "results"), ("FIMODA_FIGURES_DIR", "figures"),
                     ("FIMODA_EXECUTED_DIR", "executed")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("FIMODA_DATA_DIR", str(tmp_path / "no-data-here"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pipeline.run("smoke", ["concrete"], only=["00_walkthrough"])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the kernel's CPU seconds (it has exited: a reaped child), what an idle laptop's wall time
    # would be; this machine's wall time depends on who else shares its cores
    seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    nb = json.loads((tmp_path / "executed" / "smoke" / "00_walkthrough.ipynb").read_text())
    outs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) for o in outs)
    assert "agree with the hand computation" in text and "overtakes Grad-Dot at t = " in text
    figs = {p.name for p in (tmp_path / "figures" / "smoke").glob("walkthrough_*.png")}
    assert figs == {"walkthrough_landscape.png", "walkthrough_difference.png",
                    "walkthrough_cosine.png"}
    assert not [p for p in (tmp_path / "results").rglob("*") if p.is_file()]   # no results
    assert seconds < 60, seconds
