"""The trajectory method's non-stationarity option (Prop. 1 / Cor. 2 along the linearised further
training): its Krylov evaluation against an explicit recurrence built from dense Hessians that
torch.func computes here, independently of fimoda's operators."""
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, hessian, jacrev

import fimoda
from small_models import near_minimum_mlp
from fimoda.influence.trajectory import TrajectoryConfig, trajectory_curve


def _setup(n=60, n_test=10, seed=0):
    g = np.random.default_rng(seed)
    X, Xt = g.normal(size=(n, 3)), g.normal(size=(n_test, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 * np.sin(3 * X[:, 0]) + 0.1 * g.normal(size=n)
    yt = Xt @ np.array([1.0, -2.0, 0.5]) + 0.3 * np.sin(3 * Xt[:, 0])
    model = near_minimum_mlp(X, y, seed=seed, steps=40)   # not at a minimum: gbar far from 0
    loo = np.arange(0, n, 6)
    return model, X, y, Xt, yt, loo


def _dense_reference(model, X, y, Xt, yt, loo, hess, lr, wd, steps, D=None):
    """d_{k+1} = d_k - lr D (A d_k - (grad L_i + M_i Delta_k)/n),
    Delta_{k+1} = Delta_k - lr D (gbar + A Delta_k); scores_t = grad g_j^T d_t, with A, gbar, M_i
    and the gradients from torch.func on the flat parameter vector (D: diagonal, None: I)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def out(v, x):
        parts, s = {}, 0
        for k, sh in zip(names, shapes):
            m = int(np.prod(sh))
            parts[k] = v[s:s + m].reshape(sh)
            s += m
        return functional_call(model, parts, (x,))[:, 0]

    X, y, Xt, yt = map(torch.as_tensor, (X, y, Xt, yt))
    n = len(X)
    risk = lambda v: ((out(v, X) - y) ** 2).mean() + 0.5 * wd * (v ** 2).sum()
    loss = lambda v, i: ((out(v, X[i:i + 1]) - y[i]) ** 2).sum()
    A, gbar = hessian(risk)(theta), grad(risk)(theta)
    L = torch.stack([grad(loss)(theta, int(i)) for i in loo], 1)                 # (P, n_loo)
    G = torch.stack([grad(lambda v: ((out(v, Xt[j:j + 1]) - yt[j]) ** 2).sum())(theta)
                     for j in range(len(Xt))])                                     # (m, P)
    if hess == "true":
        M = torch.stack([hessian(loss)(theta, int(i)) for i in loo])
    else:            # Gauss-Newton, l'' = 2 for the squared error: A and M_i alike
        J = jacrev(lambda v: out(v, X))(theta)                                    # (n, P)
        A = 2 * J.T @ J / n + wd * torch.eye(len(theta), dtype=J.dtype)
        M = 2 * J[loo][:, :, None] * J[loo][:, None, :]
    D = torch.ones_like(theta) if D is None else D
    d, delta, res = torch.zeros_like(L), torch.zeros_like(theta), {}
    for k in range(max(steps) + 1):
        if k in steps:
            res[k] = (G @ d).numpy()
        d = d - lr * D[:, None] * (A @ d - (L + torch.einsum("ipq,q->pi", M, delta)) / n)
        delta = delta - lr * D * (gbar + A @ delta)
    return np.stack([res[k] for k in steps]), float(gbar.norm()), theta


@pytest.mark.parametrize("hess,wd", [("true", 0.0), ("gn", 0.01), ("true", 0.01)])
def test_nonstationary_trajectory_equals_the_dense_recurrence(hess, wd):
    model, X, y, Xt, yt, loo = _setup()
    att = fimoda.attributor(model, X, y, loo, Xt, yt, task="regression")
    steps = [0, 1, 2, 5, 40, 200]
    cfg = TrajectoryConfig(lr=0.02, hessian=hess, weight_decay=wd, nonstationary=True)
    curve = trajectory_curve(att, cfg, steps, progress=False)
    ref, gnorm, _ = _dense_reference(model, X, y, Xt, yt, loo, hess, 0.02, wd, steps)
    assert gnorm > 1e-2                           # theta^f is not stationary here
    assert np.abs(curve - ref).max() < 1e-8 * np.abs(ref).max()
    # and the term matters: without it the curve is the stationary series, measurably off
    plain = trajectory_curve(att, TrajectoryConfig(lr=0.02, hessian=hess, weight_decay=wd),
                             steps, progress=False)
    assert np.abs(plain - ref).max() > 1e-3 * np.abs(ref).max()
    np.testing.assert_array_equal(curve[0], 0.0)  # no further training, no change


@pytest.mark.parametrize("hess", ["true", "gn"])
def test_nonstationary_trajectory_with_adams_preconditioner_equals_the_dense_recurrence(hess):
    """Adam's frozen D (fimoda.influence.preconditioner, itself checked against torch.optim.Adam
    in test_trajectory_adam.py) taken as given: the preconditioned recurrences, dense."""
    from fimoda.gradients import flatten
    from fimoda.influence.preconditioner import adam_preconditioner
    model, X, y, Xt, yt, loo = _setup()
    att = fimoda.attributor(model, X, y, loo, Xt, yt, task="regression")
    steps = [0, 1, 3, 30, 150]
    cfg = TrajectoryConfig(lr=1e-3, hessian=hess, batch_size=16, nonstationary=True,
                           preconditioner="adam")
    D = adam_preconditioner(att, cfg)
    curve = trajectory_curve(att, cfg, steps, progress=False)
    ref, _, theta = _dense_reference(model, X, y, Xt, yt, loo, hess, 1e-3, 0.0, steps, D)
    p = att.problem
    assert torch.equal(flatten(p.params, p.names), theta)     # the same parameter order
    assert float(D.max() / D.min()) > 10                      # D is far from a multiple of I
    assert np.abs(curve - ref).max() < 1e-8 * np.abs(ref).max()


def test_nonstationary_option_rejects_what_it_cannot_combine_before_any_work():
    model, X, y, Xt, yt, loo = _setup()
    att = fimoda.attributor(model, X, y, loo, Xt, yt, task="regression")
    for bad in (dict(route="recurrence"), dict(nonstationary=1)):
        kw = {"nonstationary": True, **bad}
        with pytest.raises(ValueError, match="nonstationary"):
            trajectory_curve(att, TrajectoryConfig(lr=0.1, **kw), [1, 2], progress=False)


@pytest.mark.parametrize("kw,route", [(dict(), "kernel"), (dict(hessian="true"), "krylov"),
                                      (dict(route="recurrence"), "recurrence"),
                                      (dict(nonstationary=True), "non-stationary")])
def test_an_overflowing_trajectory_is_an_error_naming_its_route(kw, route):
    """lr far above 2/lambda_max: (1 - lr x)^t overflows float64 on every route, and the scores
    are refused instead of returned as inf/nan."""
    model, X, y, Xt, yt, loo = _setup()
    att = fimoda.attributor(model, X, y, loo, Xt, yt, task="regression")
    with pytest.raises(FloatingPointError, match=rf"trajectory \({route}\): non-finite"):
        trajectory_curve(att, TrajectoryConfig(lr=50.0, **kw), [1, 400], progress=False)
