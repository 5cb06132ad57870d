"""Trajectory-matched influence at a final model that is not a stationary point: the term of
Prop. 1 (eq. 7; Cor. 2 for Gauss-Newton) along the linearised further training.

:mod:`.trajectory` linearises further training at theta^f as if theta^f were a minimum. It is
not: the full run itself moves, and z_i's gradient moves with it. Linearised at theta^f (mean
risk gradient gbar = grad R(D; theta^f)/n + wd theta^f, A = its Hessian), the full run after k
steps of lr eta has moved by

    Delta_k = -p_k(A) gbar,             p_k(x) = eta sum_{m<k} (1 - eta x)^m,

(the trajectory's analogue of the Newton step, eq. 15: p_k(A) -> A^{-1}), and the ``subtract``
run of z_i (its loss weighted by -1/n) departs from the full run by d_t, with

    d_{k+1} = (I - eta A) d_k + (eta/n) (grad L(z_i) + M_i Delta_k),

M_i the Hessian of z_i's loss at theta^f (``hessian="true"``: grad^2 L(z_i), Prop. 1;
``"gn"``: l''_i grad f_i grad f_i^T, Cor. 2) -- the first-order change of z_i's gradient along
the full run, exactly the extra term of Prop. 1. So

    scores_t[j, i] = grad g_j^T d_t = (1/n) grad g_j^T p_t(A) grad L(z_i)              (trajectory)
                   + (eta/n) sum_{k<t} grad g_j^T (I - eta A)^{t-1-k} M_i Delta_k.     (this term)

With gbar = 0 it is :func:`.trajectory.trajectory_curve`. As t grows with A positive definite,
d_t -> (1/n) A^{-1}(grad L(z_i) + M_i Delta_inf): Prop. 1's generalised influence with damping wd.

Evaluation (one Krylov basis, no product per step): the Ritz basis V, theta of
:func:`.trajectory.ritz_basis` for the right-hand sides [test gradients, gbar], so that
(I - eta A)^m g_j = V diag((1 - eta theta)^m) V^T g_j and Delta_k = -V (p_k(theta) * V^T gbar).
The coefficients pi_k = p_k(theta) * V^T gbar of every k < t_max form an r x t_max matrix of
low numerical rank q (its SVD, pi_k = U_q c_k): then Delta_k = -W c_k with W = V U_q (P, q), and
only V^T M_i W (r x q per left-out instance: q per-example Hessian products) is needed. The
second term's coordinates then follow the recurrence e_{k+1} = (1 - eta theta) e_k -
eta (V^T M_i W) c_k, and scores_t = (V^T g_j)^T (p_t(theta) V^T l_i + e_t) / n. The Ritz
approximation is that of the trajectory's true-Hessian route (exact once the number of blocks
exceeds the series' degree, converged for the longest series before).

Adam (``preconditioner="adam"``, :mod:`.preconditioner`): with the step preconditioned by D, both
recurrences become Delta_{k+1} = Delta_k - eta D (gbar + A Delta_k) and
d_{k+1} = d_k - eta D (A d_k - (grad L(z_i) + M_i Delta_k)/n); in the variables D^{-1/2} Delta,
D^{-1/2} d they are the recurrences above with A~ = D^{1/2} A D^{1/2}, M~_i = D^{1/2} M_i D^{1/2}
and D^{1/2}-scaled gbar, grad L(z_i) and grad g_j, which is how they are evaluated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from ..progress import progress_bar

from ..gradients import flatten
from .common import Attributor
from .errors import finite_trajectory
from .operators import DampedHessian
from .preconditioner import PreconditionedHessian, adam_preconditioner

if TYPE_CHECKING:
    from .trajectory import TrajectoryConfig

# singular values of the Delta_k coefficients below this fraction of the largest are dropped
RANK_RTOL = 1e-10


def mean_risk_gradient(att: Attributor, weight_decay: float) -> torch.Tensor:
    """gbar = grad R(D; theta^f)/n + wd theta^f: the gradient of the mean training loss (with
    weight decay) that the full further-training run starts with, flattened."""
    p = att.problem
    g = p.risk_grad() / att.n_train
    if weight_decay:
        g = g + weight_decay * flatten(p.params, p.names)
    return g


def projected_products(att: Attributor, hessian: str, V: torch.Tensor,
                       W: torch.Tensor) -> torch.Tensor:
    """(n_loo, r, q): V^T M_i W for every left-out instance i, with M_i Prop. 1's
    grad^2 L(z_i) (``"true"``: one per-example Hessian product per column of W) or Cor. 2's
    l''_i grad f_i grad f_i^T (``"gn"``)."""
    p = att.problem
    if hessian == "true":
        return torch.stack([p.per_example_hvp(att.X_loo, att.Y_loo, w, desc="M_i w") @ V
                            for w in W.T], -1)
    phi, _, _, d2 = p.gn_pieces(att.X_loo, att.Y_loo, desc="left-out Phi")
    return (phi @ V)[:, :, None] * (d2[:, None] * (phi @ W))[:, None, :]


def nonstationary_curve(att: Attributor, cfg: "TrajectoryConfig", steps: np.ndarray,
                        progress: bool = True) -> np.ndarray:
    """scores[t, j, i] at every step count in ``steps``: the trajectory series plus Prop. 1's
    non-stationarity term along the linearised full run (module docstring); ``cfg.hessian``
    picks A and M_i (true: Prop. 1, gn: Cor. 2). Returns (len(steps), n_test, n_loo)."""
    from .trajectory import ritz_basis
    A = DampedHessian(att, cfg.hessian, cfg.weight_decay, "mean", "never", cfg.memory_gb)
    G, L = att.test_grads, att.train_grads
    gbar = mean_risk_gradient(att, cfg.weight_decay).to(G.dtype)
    sq = torch.ones_like(gbar)                         # D^{1/2}: 1 for SGD
    if cfg.preconditioner != "none":                   # Adam: every vector x D^{1/2}, A -> A~
        A = PreconditionedHessian(A, adam_preconditioner(att, cfg))
        sq = A.s.to(G.dtype)
        G, L, gbar = G * sq, L * sq, gbar * sq
    t_max = int(np.max(steps))
    B = torch.cat([G.T, gbar[:, None]], 1).contiguous()
    theta, V, _ = ritz_basis(A, B, cfg, max(t_max - 1, 1), progress)
    eta, n = float(cfg.lr), att.n_train
    x = 1.0 - eta * theta                              # (I - eta A) on the Ritz vectors
    Zg, Zl, zb = V.T @ G.T, V.T @ L.T, V.T @ gbar      # (r, m), (r, n_loo), (r,)
    # pi_k = p_k(theta) * zb for k < t_max, p_{k+1} = (1 - eta theta) p_k + eta, p_0 = 0
    pk, cols = torch.zeros_like(theta), []
    for _ in range(t_max):
        cols.append(pk * zb)
        pk = x * pk + eta
    Pi = finite_trajectory(torch.stack(cols, 1), "non-stationary")   # (r, t_max)
    Uq, S, Vh = torch.linalg.svd(Pi, full_matrices=False)
    q = max(int((S > RANK_RTOL * S[0]).sum()) if S[0] > 0 else 0, 1)
    C = S[:q, None] * Vh[:q]                           # c_k, (q, t_max): pi_k = U_q c_k
    Wq = V @ Uq[:, :q]                                 # (P, q): Delta_k = -Wq c_k
    # V^T M~_i Wq with M~_i = D^{1/2} M_i D^{1/2}, (n_loo, r, q)
    R = projected_products(att, cfg.hessian, sq[:, None] * V, sq[:, None] * Wq)
    wanted, out = {int(t) for t in steps}, {}
    e, p_t = torch.zeros_like(Zl), torch.zeros_like(theta)
    for k in progress_bar(range(t_max + 1), desc="trajectory (non-stationary)", leave=False,
                  disable=not progress or t_max < 2):
        if k in wanted:
            s = Zg.T @ (p_t[:, None] * Zl + e) / n     # (m, n_loo)
            out[k] = s.detach().cpu().double().numpy()
        if k == t_max:
            break
        # e_{k+1} = (1 - eta theta) e_k - eta V^T M_i W c_k ; p_{k+1} = (1 - eta theta) p_k + eta
        e = x[:, None] * e - eta * torch.einsum("irq,q->ri", R, C[:, k])
        p_t = x * p_t + eta
    return finite_trajectory(np.stack([out[int(t)] for t in steps]), "non-stationary")
