"""The unifying view (paper §3-5) on a model small enough to draw: notebook 00_walkthrough.

The model is logistic regression in two dimensions without a bias, p(y = 1 | x) = sigma(theta^T x),
trained on eight points. Two parameters make the loss landscape a picture; the classes overlap,
so the mean training loss Rbar(theta) = (1/n) sum_k L(z_k; theta) is convex with one finite
minimiser theta^f (every damping lambda > 0 satisfies Assumption 1, and lambda -> 0 is allowed);
and Rbar is not quadratic, so every second-order statement below is an approximation that the
exact further training can be seen to leave.

Further training from theta^f, full batch (no batch order, hence one run per left-out instance and
no seeds), learning rate eta, ``subtract`` leave-out (App. D.3: run i minimises
Rbar - L(z_i)/n, i.e. z_i's weight 1/n taken away), for t steps:

    theta_{t+1}     = theta_t     - eta grad Rbar(theta_t)                       (with z_i)
    theta^{-i}_{t+1} = theta^{-i}_t - eta (grad Rbar - grad L(z_i)/n)(theta^{-i}_t)  (without)

and the exact score of z_i for a test point z is the test-loss difference (eq. 17, one run)

    a_i(z, t) = L(z; theta^{-i}_t) - L(z; theta_t).

Linearised at theta^f (a minimum: theta_t = theta^f for all t; Hbar = Hessian of Rbar there),
theta^{-i}_t - theta^f ~ d_t(i) = (eta/n) sum_{k<t} (I - eta Hbar)^k grad L(z_i), so

    a_i(z, t) ~ grad L(z)^T d_t(i)                      (linearised; ``trajectory``)
    t small:   d_t ~ (eta t / n) grad L(z_i)             (first order: Grad-Dot x eta t/n, eq. 6
                                                         with lambda = n/(eta t) on the sum risk)
    t -> inf:  d_t -> (1/n) Hbar^{-1} grad L(z_i)        (second order: the influence function,
                                                         eq. 8 with lambda -> 0, mean risk)

and the damped influence function with the damping schedule lambda(t) = 1/(eta t),
(1/n) (Hbar + I/(eta t))^{-1} grad L(z_i), has both limits (:mod:`fimoda.influence.trajectory`).
Grad-Dot's direction is right while t is small, the influence function's once eta t is large
against 1/lambda_min(Hbar): the paper's Figure 2 in miniature.

Every score comes from fimoda's own functions pointed at this model (:func:`fimoda.gold_standard`,
:func:`fimoda.attribute`, :func:`fimoda.influence.trajectory.trajectory_curve`); the parameter
paths drawn in the landscape are recorded by :func:`further_train_paths` (the gold standard keeps
test losses only) and match the gold standard's losses. The pictures of notebook 00 are drawn by
:mod:`fimoda.paper.walkthrough_figures`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TRAIN_X", "TRAIN_Y", "TEST_X", "TEST_Y", "LR", "STEPS", "IF_DAMPING", "Logistic2D",
           "point_losses", "mean_loss", "train_final", "further_train_paths", "loss_surface",
           "Walkthrough", "run"]

# eight training points (x1, x2) with labels, drawn once (numpy seed 356, x1 ~ U(-2.5, 2.5),
# x2 ~ U(-0.8, 0.8), p(y = 1) = sigmoid(0.8 x1 + 2 x2), rounded) and written out: the classes
# overlap with and without any one point, so every minimum is finite, and x1 spreads wider than
# x2, so the Hessian is far from round (condition number ~ 10)
TRAIN_X = ((-1.1, 0.4), (-0.5, -0.8), (0.6, 0.7), (-1.2, 0.2), (-0.5, 0.4), (1.5, -0.5),
           (1.1, -0.3), (-2.1, -0.5))
TRAIN_Y = (1, 0, 1, 1, 0, 0, 1, 0)
# six test points drawn the same way
TEST_X = ((0.8, 0.4), (0.7, 0.4), (1.7, 0.7), (-0.1, 0.1), (-1.6, -0.6), (-1.9, 0.0))
TEST_Y = (1, 1, 1, 0, 1, 0)
LR = 2.0          # eta: eta lambda_max(Hbar) ~ 0.45, eta lambda_min(Hbar) ~ 0.044
STEPS = 150       # further-training steps: ~6 time constants 1/(eta lambda_min)
# the influence function's damping: fimoda's solvers need lambda > 0, and 1e-12 is ~5e-11 of
# lambda_min(Hbar), so the scores are the lambda -> 0 limit to about ten digits
IF_DAMPING = 1e-12


class Logistic2D(torch.nn.Module):
    """Logistic regression without bias, p(y = 1 | x) = sigmoid(theta^T x), theta in R^2 (float64).
    Its outputs are the two class logits (0, theta^T x), so fimoda's classification loss
    (cross-entropy) is the logistic loss log(1 + exp(-s theta^T x)), s = +-1, and every fimoda
    function takes it as any classifier."""

    def __init__(self, theta=(0.0, 0.0)):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.theta
        return torch.stack([torch.zeros_like(z), z], dim=-1)


def _data():
    f = torch.float64
    return (torch.tensor(TRAIN_X, dtype=f), torch.tensor(TRAIN_Y), torch.tensor(TEST_X, dtype=f),
            torch.tensor(TEST_Y))


def point_losses(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L(z_k; theta) = log(1 + exp(-s_k theta^T x_k)) (nats), s_k = +1 for y_k = 1 and -1 for
    y_k = 0, for every point k: shape (..., n) for ``theta`` (..., 2)."""
    z = torch.einsum("...p,np->...n", theta, X)
    return F.softplus(-(2 * y.to(z.dtype) - 1) * z)


def mean_loss(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """(1/n) sum_k w_k L(z_k; theta) (nats); ``weights`` default 1 (the full set); weight 0 on
    z_i is the ``subtract`` leave-out of z_i. ``theta`` (..., 2) broadcasts."""
    L = point_losses(theta, X, y)
    w = torch.ones(len(X), dtype=L.dtype) if weights is None else weights
    return (L * w).sum(-1) / len(X)


def train_final(tol: float = 1e-9) -> Logistic2D:
    """theta^f: the mean training loss minimised from theta = 0 by L-BFGS (how a logistic
    regression is usually fitted) until the gradient's norm is below ``tol``, so theta^f is the
    minimiser to ~tol / lambda_min(Hbar); an error if it is not reached."""
    X, y, _, _ = _data()
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=tol,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = mean_loss(theta, X, y)
        loss.backward()
        return loss
    for _ in range(10):                 # L-BFGS restarts from its last point until |grad| < tol
        opt.step(closure)
        g, = torch.autograd.grad(mean_loss(theta, X, y), theta)
        if float(g.norm()) < tol:
            break
    else:
        raise RuntimeError(f"L-BFGS did not reach |grad| < {tol} (|grad| = {float(g.norm()):.2e})")
    return Logistic2D(theta.detach())


def further_train_paths(theta_f: torch.Tensor, lr: float = LR, steps: int = STEPS):
    """The parameter paths of further training (module docstring): (full (steps+1, 2), without
    each z_i (n, steps+1, 2)), row t = after t full-batch steps of learning rate ``lr`` from
    ``theta_f``, the runs without z_i by the ``subtract`` leave-out (weight 0 on z_i)."""
    X, y, _, _ = _data()
    n = len(X)
    W = torch.ones(n + 1, n, dtype=torch.float64)      # row 0: the full run; row 1 + i: without i
    W[1:] -= torch.eye(n, dtype=torch.float64)
    theta = theta_f.detach().double().expand(n + 1, 2).clone()
    path = [theta]
    for _ in range(steps):
        theta = theta.detach().requires_grad_()
        g, = torch.autograd.grad(mean_loss(theta, X, y, W).sum(), theta)   # runs independent
        theta = theta.detach() - lr * g
        path.append(theta)
    P = torch.stack(path, 1).numpy()                    # (n + 1, steps + 1, 2)
    return P[0], P[1:]


def loss_surface(w1: np.ndarray, w2: np.ndarray, leave_out: int | None = None) -> np.ndarray:
    """The mean training loss (nats) on the grid ``w1`` x ``w2`` (shape (len(w2), len(w1)), as
    ``contour`` takes it); ``leave_out=i`` the ``subtract`` run's loss without z_i."""
    X, y, _, _ = _data()
    T1, T2 = np.meshgrid(w1, w2)
    theta = torch.as_tensor(np.stack([T1, T2], -1), dtype=torch.float64)
    w = None
    if leave_out is not None:
        w = torch.ones(len(X), dtype=torch.float64)
        w[leave_out] = 0.0
    return mean_loss(theta, X, y, w).numpy()


@dataclass
class Walkthrough:
    """Everything the walkthrough draws. Scores are (steps+1, test, train) arrays a[t, j, i]
    (test-loss change in nats when z_i is left out, after t further-training steps; t = 0 is
    theta^f itself, where all are 0), or (test, train) for the methods that do not depend on t.

    ``gold``: exact further training (fimoda.gold_standard, eq. 17); ``grad_dot``: grad L(z_j)^T
    grad L(z_i) (fimoda.attribute, unscaled); ``influence``: (1/n) grad L(z_j)^T Hbar^{-1}
    grad L(z_i) (fimoda.attribute "dense", true Hessian, damping :data:`IF_DAMPING`, divided by n:
    the t -> inf limit); ``schedule``: the damped influence function with lambda = 1/(eta t);
    ``trajectory``: the linearised further training. ``hessian``: Hbar at theta^f; ``train_grads`` /
    ``test_grads``: grad L at theta^f, (n, 2) / (J, 2); ``paths_full`` / ``paths_loo``: the
    parameter paths (:func:`further_train_paths`)."""
    model: Logistic2D
    lr: float
    steps: np.ndarray
    gold: np.ndarray
    grad_dot: np.ndarray
    influence: np.ndarray
    schedule: np.ndarray
    trajectory: np.ndarray
    hessian: np.ndarray
    train_grads: np.ndarray
    test_grads: np.ndarray
    paths_full: np.ndarray
    paths_loo: np.ndarray

    @property
    def theta_f(self) -> np.ndarray:
        return self.model.theta.detach().numpy().copy()

    @property
    def n(self) -> int:
        return len(self.train_grads)

    @property
    def first_order(self) -> np.ndarray:
        """Grad-Dot in the gold standard's units: (eta t / n) grad L(z_j)^T grad L(z_i)."""
        return (self.lr * self.steps / self.n)[:, None, None] * self.grad_dot[None]

    def curves(self) -> dict:
        """{name: a[t, j, i]} of the exact and every approximate score, the constant ones
        repeated over t."""
        T = len(self.steps)
        return {"gold": self.gold, "first_order": self.first_order,
                "schedule": self.schedule, "trajectory": self.trajectory,
                "grad_dot": np.broadcast_to(self.grad_dot, (T, *self.grad_dot.shape)),
                "influence": np.broadcast_to(self.influence, (T, *self.influence.shape))}

    def cosines(self, names=("grad_dot", "influence", "trajectory")) -> dict:
        """{name: (mean, se) over the test points, each (steps,)}: the cosine over the training
        points between the exact scores and ``name``'s at every step t >= 1 (the paper's metric,
        Figure 2, against the amount of further training)."""
        from ..metrics import cosine
        cur = self.curves()
        gold = self.gold.transpose(2, 0, 1)                       # (train, t, test)
        out = {}
        for m in names:
            c = np.stack([cosine(gold[:, t:t + 1], cur[m][t])[0]  # (t, test)
                          for t in range(1, len(self.steps))])
            se = c.std(axis=1, ddof=1) / np.sqrt(c.shape[1])
            out[m] = (c.mean(axis=1), se)
        return out

    def predicted_paths(self, i: int) -> dict:
        """{name: theta^f + d_t (steps+1, 2)}: where each approximation puts the run without
        z_i after t steps -- first order (eta t/n) g_i, the damped influence function
        (1/n)(Hbar + I/(eta t))^{-1} g_i and the linearised run (1/n) p_t(Hbar) g_i -- and the
        influence function's end point (1/n) Hbar^{-1} g_i (t -> inf, one (2,) point)."""
        from ..influence.trajectory import schedule_resolvent, trajectory_polynomial
        e, U = np.linalg.eigh(self.hessian)
        c = U.T @ self.train_grads[i]                        # g_i in Hbar's eigenbasis
        ev = torch.as_tensor(e)

        def along(fn):
            return np.stack([U @ (fn(ev, self.lr, int(t)).numpy() * c) for t in self.steps])

        th, eta_t = self.theta_f, self.lr * self.steps[:, None]
        return {"first_order": th + eta_t / self.n * self.train_grads[i],
                "schedule": th + along(schedule_resolvent) / self.n,
                "trajectory": th + along(trajectory_polynomial) / self.n,
                "influence": th + U @ (c / e) / self.n}


def run(lr: float = LR, steps: int = STEPS) -> Walkthrough:
    """Train theta^f (:func:`train_final`), further-train from it with and without every
    training point for ``steps`` full-batch steps of learning rate ``lr``, and score every
    (test, train) pair exactly and by each approximation (:class:`Walkthrough`)."""
    import fimoda
    from ..influence.trajectory import TrajectoryConfig, damping_schedule_curve, trajectory_curve
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (lr > 0 and np.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    model = train_final()
    X, y, Xt, yt = _data()
    n = len(X)
    rows = np.arange(n)
    task = "classification"
    gold, points = fimoda.gold_standard(model, X, y, rows, Xt, yt, task=task, lr=lr, seeds=1,
                                        batch_size=n, mechanism="subtract", adjust="full",
                                        at=None, max_steps=steps, eval_every=1)
    att = fimoda.attributor(model, X, y, rows, Xt, yt, task=task)
    grad_dot = fimoda.attribute(model, X, y, rows, Xt, yt, task=task, method="grad_dot", att=att)
    influence = fimoda.attribute(model, X, y, rows, Xt, yt, task=task, method="dense", att=att,
                                 hessian="true", damping=IF_DAMPING) / n
    tcfg = TrajectoryConfig(lr=lr, batch_size=n, hessian="true")
    t = np.arange(steps + 1)
    schedule = damping_schedule_curve(att, tcfg, t, progress=False)
    trajectory = trajectory_curve(att, tcfg, t, progress=False)
    theta_f = model.theta.detach()
    hessian = torch.func.hessian(mean_loss)(theta_f, X, y).numpy()
    full, loo = further_train_paths(theta_f, lr, steps)
    return Walkthrough(model=model, lr=float(lr), steps=np.asarray(points), gold=gold,
                       grad_dot=grad_dot, influence=influence, schedule=schedule,
                       trajectory=trajectory, hessian=hessian,
                       train_grads=att.train_grads.double().numpy(),
                       test_grads=att.test_grads.double().numpy(),
                       paths_full=full, paths_loo=loo)
