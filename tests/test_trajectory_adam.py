"""The Adam option of the trajectory-matched influence (fimoda.influence.preconditioner): Adam's
state against torch.optim.Adam's own, the preconditioned curve against the explicit recurrence
d_{k+1} = d_k - eta D (A d_k - grad L(z_i)/n) with a dense A built by autograd, the reduction to
the SGD curve, and bad input."""
import numpy as np
import pytest
import torch
from torch.func import functional_call

import fimoda
from small_models import near_minimum_mlp
from fimoda.influence import compute_scores
from fimoda.influence.preconditioner import BATCH_SEED, adam_moments, adam_preconditioner
from fimoda.influence.trajectory import (SpectralPairs, TrajectoryConfig, damping_schedule_curve,
                                         trajectory_curve)


def _problem(n, hidden=6, seed=0):
    rng = np.random.default_rng(seed)
    X, Xt = rng.normal(size=(n, 3)), rng.normal(size=(12, 3))
    w = np.array([1.0, -2.0, 0.5])
    y, yt = np.sin(X @ w), np.sin(Xt @ w)
    model = near_minimum_mlp(X, y, hidden=hidden, seed=seed)
    att = fimoda.attributor(model, X, y, np.arange(0, n, 7), Xt, yt, task="regression")
    return att, model, X, y


def _torch_adam_state(model, X, y, batch_size, wd):
    """torch.optim.Adam run with lr = 0 (theta^f stays) over one epoch of the batches of
    BATCH_SEED's permutation: (mean gradient incl. wd theta, bias-corrected exp_avg_sq)."""
    params = [p for p in model.parameters()]
    opt = torch.optim.Adam(params, lr=0.0, weight_decay=wd)
    n = len(X)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(BATCH_SEED))
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    K, gsum = 0, torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        opt.zero_grad()
        ((model(Xt[idx])[:, 0] - yt[idx]) ** 2).mean().backward()
        gsum += torch.cat([(p.grad + wd * p.detach()).reshape(-1) for p in params])
        opt.step()
        K += 1
    b2 = opt.param_groups[0]["betas"][1]
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params]) / (1 - b2 ** K)
    return gsum / K, v


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adam_state_equals_torch_adams_after_one_epoch_at_theta_f(wd):
    att, model, X, y = _problem(37)                       # 37 = 4 x 8 + 5: a short last batch
    gbar, v = adam_moments(att, 8, wd, progress=False)
    gref, vref = _torch_adam_state(model, X, y, 8, wd)
    np.testing.assert_allclose(gbar.numpy(), gref.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(v.numpy(), vref.numpy(), rtol=1e-12, atol=1e-18)
    cfg = TrajectoryConfig(batch_size=8, weight_decay=wd, preconditioner="adam")
    d = adam_preconditioner(att, cfg).numpy()
    np.testing.assert_allclose(d, 1 / (np.sqrt(vref.numpy()) + 1e-8), rtol=1e-12)
    dv = adam_preconditioner(att, TrajectoryConfig(batch_size=8, weight_decay=wd,
                                                   preconditioner="adam_dv")).numpy()
    r = np.sqrt(vref.numpy())
    live = r > 0                                          # dead ReLU units: v = gbar = 0, D = 1/eps
    corr = np.ones_like(r)
    corr[live] = np.clip(1 - gref.numpy()[live] ** 2 / (r[live] * (r[live] + 1e-8)), 0, None)
    np.testing.assert_allclose(dv, d * corr, rtol=1e-10)
    assert (dv <= d).all() and (dv >= 0).all()


def _dense_A(att, model, X, y, hessian, wd):
    """The mean-loss Hessian (+ wd I) by torch.autograd.functional on the flattened parameters:
    "true": hessian of the mean loss; "gn": (2/n) J^T J, J the Jacobian of the outputs."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def unflat(t):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = t[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out
    out = lambda t: functional_call(model, unflat(t), (Xt,))[:, 0]
    if hessian == "true":
        A = torch.autograd.functional.hessian(lambda t: ((out(t) - yt) ** 2).mean(), theta)
    else:
        J = torch.autograd.functional.jacobian(out, theta)
        A = 2.0 * J.T @ J / len(X)
    return A + wd * torch.eye(len(theta), dtype=A.dtype)


@pytest.mark.parametrize("n,hessian,materialize,wd,pre,route", [
    (60, "gn", "auto", 0.0, "adam", "kernel"),          # n <= P: a s and its kernel
    (100, "gn", "auto", 0.0, "adam_dv", "spectral"),    # n > P: s G s / n's spectrum
    (60, "gn", "auto", 0.01, "adam", "krylov"),         # wd s^2 is no multiple of I
    (60, "true", "auto", 0.0, "adam", "krylov"),        # the true Hessian
])
def test_preconditioned_curve_equals_the_explicit_recurrence(n, hessian, materialize, wd, pre,
                                                              route):
    att, model, X, y = _problem(n)
    A = _dense_A(att, model, X, y, hessian, wd)
    cfg0 = TrajectoryConfig(batch_size=16, hessian=hessian, materialize=materialize,
                            weight_decay=wd, preconditioner=pre)
    D = adam_preconditioner(att, cfg0)
    lr = 1.0 / float(torch.linalg.eigvals(D[:, None] * A).real.max())   # eta lambda_max(DA) = 1
    cfg = TrajectoryConfig(lr=lr, batch_size=16, hessian=hessian, materialize=materialize,
                           weight_decay=wd, preconditioner=pre)
    steps = [0, 1, 2, 5, 40, 300]
    pairs = SpectralPairs(att, cfg, max(steps) - 1, progress=False)
    assert pairs.route == route
    curve = trajectory_curve(att, cfg, steps, pairs=pairs)
    Wl, G = att.train_grads.T, att.test_grads
    d, ref = torch.zeros_like(Wl), []
    for k in range(max(steps) + 1):
        if k in steps:
            ref.append((G @ d).numpy())
        d = d - lr * D[:, None] * (A @ d - Wl / att.n_train)
    ref = np.stack(ref)
    assert np.abs(curve - ref).max() < 1e-8 * np.abs(ref).max()


@pytest.mark.parametrize("hessian", ["gn", "true"])
def test_adam_with_a_huge_eps_is_sgd_with_lr_over_eps(hessian):
    # D = 1/(sqrt(v) + eps) = (1/eps)(1 + O(sqrt(v)/eps)): Adam at lr eta eps is SGD at lr eta
    att, _, _, _ = _problem(60)
    steps = [1, 3, 40]
    sgd = trajectory_curve(att, TrajectoryConfig(lr=0.1, hessian=hessian), steps, progress=False)
    adam = trajectory_curve(att, TrajectoryConfig(lr=0.1 * 1e10, hessian=hessian,
                                                  preconditioner="adam", adam_eps=1e10),
                            steps, progress=False)
    assert np.abs(adam - sgd).max() < 1e-7 * np.abs(sgd).max()


def test_unknown_preconditioner_is_one_clear_error_before_any_work():
    att, _, _, _ = _problem(30)
    for bad in (dict(preconditioner="adamw"), dict(preconditioner="adam", adam_eps=0.0),
                dict(preconditioner="adam", adam_beta2=1.0)):
        with pytest.raises(ValueError, match="preconditioner|adam_eps|adam_beta2"):
            trajectory_curve(att, TrajectoryConfig(**bad), [1])
        with pytest.raises(ValueError, match="preconditioner|adam_eps|adam_beta2"):
            compute_scores("trajectory", att, **bad)
    assert att.fitted == {}                               # nothing fitted
    with pytest.raises(ValueError, match="solver='exact'"):
        damping_schedule_curve(att, TrajectoryConfig(preconditioner="adam"), [1], solver="cg")


def test_notebook_07s_adam_run_uses_adams_lr_and_epochs_and_can_skip_part_1():
    from fimoda.paper import beyond
    from fimoda.paper.config import get_config
    cfg = get_config("concrete", "cpu")
    t = beyond.trajectory_config(cfg, "adam", preconditioner="adam")
    assert (t.lr, t.epochs, t.preconditioner) == (cfg.further.adam_lr, cfg.further.adam_epochs,
                                                  "adam")
    assert beyond.trajectory_config(cfg).lr == cfg.further.lr
    runs, why = beyond.infinitesimal_applies(cfg, False)
    assert not runs and "infinitesimal=False" in why
