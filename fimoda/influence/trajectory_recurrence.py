"""Trajectory-matched influence by its own recurrence: the route for models whose Hessian is
neither materialised nor worth a Krylov basis (the images' ResNet-9, the text encoder's top
layers), where further training is evaluated after a few steps only.

The scores of :mod:`.trajectory`,

    scores_t[j, i] = (1/n) grad g(z_j)^T p_t(A) grad L(z_i),   p_t(x) = eta sum_{k<t} (1 - eta x)^k,

are the linearised further training itself: with b a column of one side (test gradients
g_j = grad g(z_j), or left-out gradients l_i = grad L(z_i)),

    h_0 = 0,   h_{k+1} = h_k + eta (b - A_k h_k)      =>   h_t = p_t(A) b   (A_k = A),

since h_{k+1} = eta b + (I - eta A) h_k unrolls to eta sum_{k<t} (I - eta A)^k b. With b = l_i,
h_t / n is the displacement d_t of the ``subtract`` run of z_i after t steps and
scores_t = g_j^T h_t / n; with b = g_j (A symmetric) scores_t = h_t^T l_i / n. The recurrence runs
on the smaller side as the columns of one (P, k) block and records the dot products with the other
side at every evaluation step, so one pass of t_max - 1 products (h_1 = eta b needs none) gives
the whole curve.

Products A_k V (``TrajectoryConfig.products``):
* ``"full"``: the mean-loss Hessian of the attributor's training rows (+ weight decay),
  :meth:`.operators.DampedHessian.matmat` (the materialised kernel where it fits, else
  per-chunk products): the expected step's operator, deterministic -- equal to the closed forms
  of :class:`.trajectory.SpectralPairs`;
* ``"batch"``: what one run of further training steps with: the unbiased estimate
  (n/B) M_B V / n + wd V from B = ``batch_size`` rows, step k on batch k of seeded epoch
  permutations (:func:`.solvers.lissa.batch_matmat`, LiSSA's stochastic products; seed
  ``TrajectoryConfig.seed``). Variance: one realisation of linearised SGD on random batches,
  not on the gold standard's own batches, so its batch noise is independent of the gold's and
  can only lower the expected cosine to it; over independent batches its mean is the full-batch
  curve exactly (E[prod (I - eta A_k)] = (I - eta A)^t), with an epoch's disjoint batches to
  O(eta^2 Var A_k) (and B = n is the full product). On the test side (b = g_j) a realisation is
  the adjoint of the left-out side's with the batch order reversed: the same distribution.

Preconditioned further training (a diagonal D, e.g. Adam's): theta <- theta - eta D grad gives
scores_t = (1/n) (D^1/2 g)^T p_t(D^1/2 A D^1/2) (D^1/2 l): ``sqrt_precond`` (the vector D^1/2)
multiplies both gradient sets and both sides of every product.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from ..progress import progress_bar

from .common import Attributor
from .errors import finite_trajectory
from .operators import DampedHessian
from .solvers.lissa import batch_matmat

if TYPE_CHECKING:
    from .trajectory import TrajectoryConfig

PRODUCTS = ("full", "batch")


def check_recurrence(cfg: "TrajectoryConfig") -> None:
    """ValueError naming an invalid recurrence field of a :class:`.trajectory.TrajectoryConfig`."""
    if cfg.products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {cfg.products!r}")
    if not (isinstance(cfg.seed, (int, np.integer)) and not isinstance(cfg.seed, bool)):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")


def recurrence_curve(att: Attributor, cfg: "TrajectoryConfig", steps: np.ndarray,
                     progress: bool = True,
                     sqrt_precond: Optional[torch.Tensor] = None) -> np.ndarray:
    """scores[t, j, i] = (1/n) grad g(z_j)^T p_t(A) grad L(z_i) at every step count in ``steps``
    (non-negative integers) by the recurrence h_{k+1} = h_k + eta (b - A_k h_k) (module
    docstring); ``sqrt_precond``: D^1/2 (P,) of a diagonal preconditioner, None: D = I."""
    check_recurrence(cfg)
    A = DampedHessian(att, cfg.hessian, cfg.weight_decay, "mean", cfg.materialize, cfg.memory_gb)
    G, W = att.test_grads, att.train_grads
    rhs_test = len(G) <= len(W)                        # the smaller side as columns
    B = (G if rhs_test else W).T.contiguous()          # (P, k)
    other = W if rhs_test else G                       # (m, P)
    if cfg.products == "batch" and cfg.batch_size < A.n:
        prod = batch_matmat(A, cfg.batch_size, cfg.seed)
    else:                                              # B >= n: the full product itself
        prod = lambda k, V: A.matmat(V)
    if sqrt_precond is not None:                       # D^1/2 A D^1/2 on D^1/2-scaled gradients
        s = sqrt_precond.to(B.dtype)[:, None]
        B, other = s * B, other * s.T
        op = lambda k, V: s * prod(k, s * V)
    else:
        op = prod
    eta, n = float(cfg.lr), att.n_train
    wanted = {int(t) for t in steps}
    t_max = max(wanted)
    rec, H = {}, torch.zeros_like(B)
    for k in progress_bar(range(t_max + 1), desc="trajectory (recurrence)", leave=False,
                  disable=not progress or t_max < 2):
        if k in wanted:
            S = other @ H / n                          # (m, k): the other side's dot products
            rec[k] = S.T if rhs_test else S            # scores[test, left-out]
        if k == t_max:
            break
        # h_{k+1} = h_k + eta (b - A_k h_k); A_0 h_0 = 0 costs no product
        H = H + eta * (B - op(k, H)) if k > 0 else eta * B
    out = np.stack([rec[int(t)].detach().cpu().double().numpy() for t in steps])
    return finite_trajectory(out, "recurrence")
