"""The infinitesimal gold standard: the exact derivative of further training with respect to the
weight of one training instance (beyond the paper: its §7 asks what to do about the cost and noise
of the finite leave-one-out difference).

The ``subtract`` mechanism (:class:`fimoda.gold.mechanisms.Subtract`; a mechanism whose
``infinitesimal`` is True) trains run i on ``mean_{z in batch} L(z) - L(z_i)/n``
at every step. Give the subtracted term a weight eps,

    R_k(theta; eps) = mean_{z in batch_k} L(z; theta) - eps L(z_i; theta) / n,

so that eps = 1 is the finite ``subtract`` run and eps = 0 the full run, and differentiate the
test losses after t steps at eps = 0:

    d[s, i, t, j] = d/d eps  g(z_j; theta_{s,t}(eps)) |_{eps=0}
                  = lim_{eps -> 0} (finite subtract gold with weight eps/n) / eps.

It is computed exactly by forward-mode AD (``torch.func.jvp``) through every optimizer step of
the full run, with the state (theta, and Adam's moments m, v) carrying a tangent per left-out
instance: with g_k the batch gradient (after weight decay for SGD/Adam),

    d g_k = H_k d theta_k - grad L(z_i; theta_k) / n,

then through gradient clipping and the optimizer's update (SGD, Adam, AdamW: the arithmetic of
:class:`fimoda.gold.optim.StackedOptimizer`, run under ``jvp``), one tangent per left-out
instance, ``vmap``-ed over the tangents (the primal step is computed once). The batches are the
full run's batches of :func:`fimoda.gold.schedule.batch_plan`, so every seed's batch order is the
finite gold standard's. No difference of two nearly equal losses is taken, so there is no
cancellation: float32 suffices where the finite difference needs float64.

The result plugs into :func:`fimoda.gold.gold_scores` like the finite one:
``loss_loo = loss_full + d`` is the first-order (eps = 1) estimate of the ``subtract`` runs' test
losses, so eqs. (13) and (17) give mean_s (d - mean_i d) and mean_s d.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap
from ..progress import progress_bar

from ..losses import per_example_loss
from .config import GoldConfig, GoldResult
from .engines import FuncEngine, used_parameters
from .mechanisms import mechanism, mechanism_names
from .optim import ADAM_BETAS, ADAM_EPS, clip_per_run_, StackedOptimizer
from .runner import prepare_inputs, checked_test_indices
from .schedule import batch_plan, epoch_permutations, make_schedule

PLAN_STEPS = 64             # steps whose batch indices are built at once


@dataclass
class InfinitesimalResult(GoldResult):
    """A :class:`GoldResult` whose ``loss_loo`` is ``loss_full + derivative`` (the first-order
    subtract runs), with the derivative itself, d[s, i, t, j] = d g(z_j; theta_{s,t}) / d eps
    (``derivative``), and ||d theta_{s,t} / d eps|| (``tangent_norm``, (S, n', T))."""
    derivative: Optional[np.ndarray] = None
    tangent_norm: Optional[np.ndarray] = None


class _Step:
    """One optimizer step of the full run as a function of the state, for ``jvp``:
    ``(theta, m, v, u) -> (theta', m', v')`` with the batch gradient shifted by ``u`` (primal 0,
    tangent grad L(z_i)/n), clipped, and applied with ``StackedOptimizer._apply``."""

    def __init__(self, engine: FuncEngine, cfg: GoldConfig):
        self.engine, self.cfg = engine, cfg
        # the optimizer arithmetic of the finite engine; its own state is not used
        self.opt = StackedOptimizer(cfg, [torch.zeros(1)], [slice(0, 1)])
        names, fixed, model, loss_fn = engine.names, engine.fixed, engine.model, engine.loss_fn

        def forward(plist, x):
            return functional_call(model, {**dict(zip(names, plist)), **fixed}, (x,))

        def batch_loss(plist, x, y, w):         # sum_m w_m L(z_m): the batch mean
            return (w * loss_fn(forward(plist, x), y)).sum()

        def test_losses(plist, x, y):
            return loss_fn(forward(plist, x), y)

        def one_loss(plist, x, y):               # L(z) of one instance
            return loss_fn(forward(plist, x[None]), y[None]).sum()

        self.batch_grad = grad(batch_loss)
        self.test_losses = test_losses
        self.example_grads = vmap(grad(one_loss), in_dims=(None, 0, 0))

    def __call__(self, k: int, x, y, w):
        cfg, opt = self.cfg, self.opt

        def step(theta, m, v, u):
            g = [gi - ui for gi, ui in zip(self.batch_grad(list(theta), x, y, w), u)]
            if cfg.grad_clip is not None:
                g1 = [gi.unsqueeze(0) for gi in g]
                clip_per_run_(g1, cfg.grad_clip)
                g = [gi.squeeze(0) for gi in g1]
            theta = [t.clone() for t in theta]
            m = [t.clone() for t in m]
            v = [t.clone() for t in v]
            opt._apply(theta, g, m, v, k)
            return tuple(theta), tuple(m), tuple(v)
        return step


def _zero_moment_fix(cfg: GoldConfig, k: int, dth_old, dth, dm, v):
    """Adam's tangent where the second moment is exactly 0. There every gradient so far was 0
    (v starts at 0 and only adds squares), so m = 0 too and the update's term
    m d(denom) / denom^2 is 0; but d sqrt(v) = dv / (2 sqrt(v)) is 0/0 = NaN (a unit that is dead
    on every input, e.g. a ReLU, under AdamW, where no weight decay enters the gradient). The
    exact tangent there is d theta (1 - lr wd [AdamW]) - lr / (1 - b1^k) dm / eps."""
    out = []
    for d_old, d, dmi, vi in zip(dth_old, dth, dm, v):
        zero = vi == 0
        if bool(zero.any()):
            decay = 1 - cfg.lr * cfg.weight_decay if cfg.optimizer == "adamw" else 1.0
            fixed = d_old * decay - (cfg.lr / (1 - ADAM_BETAS[0] ** k)) * dmi / ADAM_EPS
            d = torch.where(zero, fixed, d)
        out.append(d)
    return tuple(out)


def _check(cfg: GoldConfig, augment) -> None:
    if not mechanism(cfg.mechanism).infinitesimal:
        limits = " or ".join(repr(m) for m in mechanism_names() if mechanism(m).infinitesimal)
        raise ValueError("the infinitesimal gold standard is the eps -> 0 limit of a mechanism "
                         "that weights z_i's loss by -eps/n; got mechanism="
                         f"{cfg.mechanism!r}: pass a GoldConfig with mechanism={limits}")
    if augment is not None:
        raise ValueError("the infinitesimal gold standard does not augment inputs (images: run "
                         "the finite gold standard)")


def infinitesimal_further_train(model: torch.nn.Module, task: str, X_train, y_train, X_test,
                                y_test, loo_indices, cfg: GoldConfig, test_indices=None,
                                tangent_chunk: Optional[int] = None,
                                augment=None) -> InfinitesimalResult:
    """The infinitesimal gold standard (module docstring) for every seed of ``cfg`` and every
    left-out index: the full run from ``model``'s parameters with the seed's batch order (the
    finite engine's), and the derivative of every test loss at every evaluation point with
    respect to each left-out instance's weight. ``tangent_chunk``: left-out instances carried
    at once (None: all; smaller chunks repeat the primal run, saving memory). Runs on
    ``cfg.device`` in the model's dtype."""
    _check(cfg, augment)
    if tangent_chunk is not None and not (isinstance(tangent_chunk, int) and tangent_chunk >= 1):
        raise ValueError(f"tangent_chunk must be None or a positive int, got {tangent_chunk!r}")
    t_start = time.perf_counter()
    model, X, Y, Xt, Yt, loo = prepare_inputs(model, task, X_train, y_train, X_test, y_test,
                                              loo_indices, cfg, groups=False)
    n, J, n_loo = len(X), len(Xt), len(loo)
    test_idx = checked_test_indices(test_indices, J)
    loss_fn = per_example_loss(task)
    used = used_parameters(model, loss_fn, X, Y)
    if not used:
        raise ValueError("the loss does not depend on any trainable parameter of the model")
    engine = FuncEngine(model, loss_fn, used)
    sched = make_schedule(n, cfg)
    seeds = cfg.seed_list
    T = len(sched.eval_steps)
    chunk = n_loo if tangent_chunk is None else min(tangent_chunk, n_loo)
    chunks = [np.arange(a, min(a + chunk, n_loo)) for a in range(0, n_loo, chunk)]
    loss_full = np.empty((len(seeds), T, J))
    deriv = np.empty((len(seeds), n_loo, T, J))
    dist = np.empty((len(seeds), T))
    tnorm = np.empty((len(seeds), n_loo, T))
    stepper = _Step(engine, cfg)
    loo_t = torch.as_tensor(loo, device=X.device)
    adam = cfg.optimizer != "sgd"
    bar = progress_bar(total=len(seeds) * len(chunks) * sched.total, unit="step",
                       disable=not cfg.progress,
                       desc=f"infinitesimal gold ({cfg.optimizer}, {n_loo} tangents)")
    try:
        for si, seed in enumerate(seeds):
            perms = epoch_permutations(n, seed, sched.n_epochs, cfg.shuffle)
            inv = torch.argsort(perms, dim=1)
            for rows in chunks:
                L, D, Dn, Tn = _run_seed(stepper, engine, sched, perms, inv, X, Y, Xt, Yt,
                                         loo_t[torch.as_tensor(rows, device=X.device)], n,
                                         adam, bar)
                loss_full[si], dist[si] = L, Dn
                deriv[si, rows], tnorm[si, rows] = D, Tn
    finally:
        bar.close()
    config = dict(dataclasses.asdict(cfg), engine="jvp", tangent_chunk=chunk)
    return InfinitesimalResult(loss_full, loss_full[:, None] + deriv, dist, dist[:, None].repeat(
        n_loo, 1), sched.eval_points, "epoch" if sched.by_epoch else "step", np.asarray(seeds),
        loo, test_idx, config, time.perf_counter() - t_start, derivative=deriv,
        tangent_norm=tnorm)


def _run_seed(stepper: _Step, engine: FuncEngine, sched, perms, inv, X, Y, Xt, Yt, rows, n,
              adam: bool, bar):
    """One seed, the tangents of the left-out rows ``rows``: (test losses (T, J), derivatives
    (R, T, J), parameter distance (T,), tangent norms (R, T)) as numpy float64."""
    R = len(rows)
    theta = tuple(p.detach().clone() for p in engine.start)
    start = [p.clone() for p in theta]
    zeros = lambda: tuple(torch.zeros_like(p) for p in theta)
    m, v = (zeros(), zeros()) if adam else ((), ())
    stack = lambda ts: tuple(torch.zeros((R,) + tuple(p.shape), dtype=p.dtype, device=p.device)
                             for p in ts)
    dth, dm, dv = stack(theta), stack(m), stack(v)
    u0 = zeros()
    Xl, Yl = X[rows], Y[rows]
    T, J = len(sched.eval_steps), len(Xt)
    losses = np.empty((T, J))
    deriv = np.empty((R, T, J))
    dist = np.empty(T)
    tnorm = np.empty((R, T))
    left = torch.tensor([-1])
    B = sched.batch_size

    def evaluate(t):
        f = lambda d: jvp(lambda th: stepper.test_losses(list(th), engine.trim(Xt), Yt),
                          (theta,), (d,))
        val, dval = vmap(f, out_dims=(None, 0))(dth)
        losses[t] = val.double().cpu().numpy()
        deriv[:, t] = dval.double().cpu().numpy()
        dist[t] = float(torch.sqrt(sum(((p - p0).double() ** 2).sum()
                                       for p, p0 in zip(theta, start))))
        tnorm[:, t] = torch.sqrt(sum((d.double() ** 2).reshape(R, -1).sum(1)
                                     for d in dth)).cpu().numpy()

    evaluate(0)
    k = 0
    for t in range(1, T):
        for c0 in range(int(sched.eval_steps[t - 1]), int(sched.eval_steps[t]), PLAN_STEPS):
            c1 = min(c0 + PLAN_STEPS, int(sched.eval_steps[t]))
            idx, w, _, _ = batch_plan(sched, perms, inv, left, c0, c1)
            idx, w = idx[:, 0, :B].to(X.device), w[:, 0, :B].to(X.device, X.dtype)
            for s in range(c1 - c0):
                keep = w[s] > 0
                ii, ws = idx[s][keep], w[s][keep]
                x, y = engine.trim(X[ii]), Y[ii]
                k += 1
                step = stepper(k, x, y, ws)
                # d u = grad L(z_i; theta_k) / n: the eps-derivative of the subtracted term
                du = tuple(g / n for g in stepper.example_grads(list(theta), Xl, Yl))
                f = lambda a, b, c, d: jvp(step, (theta, m, v, u0), (a, b, c, d))
                old = dth
                (theta, m, v), (dth, dm, dv) = vmap(f, out_dims=(None, 0))(dth, dm, dv, du)
                if adam:
                    dth = _zero_moment_fix(stepper.cfg, k, old, dth, dm, v)
            bar.update(c1 - c0)
        evaluate(t)
    return losses, deriv, dist, tnorm
