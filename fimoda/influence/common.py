"""What every method computes once (kronfluence-style split): the :class:`Attributor` caches the
per-example gradients of the left-out and test sets at theta^f, lambda_G, and holds what is
fitted once per model (the materialised Gauss-Newton kernel and spectrum, EK-FAC factors);
methods then compute only their own per-query part. Also the config fields and the score
assembly that every damped-inverse method shares (:class:`DampedConfig`, :func:`scores_with`)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import numpy as np
import torch

from ..config import MethodConfig
from ..gradients import Problem, mean_sq_grad
from ..tensors import check_data


class Attributor:
    """theta^f plus the instances to attribute: left-out set (X_loo, Y_loo), test set (X_test,
    Y_test). Training-set-wide operators (HVPs, factors) use ``problem.X/Y`` (the full set)."""

    def __init__(self, problem: Problem, X_loo, Y_loo, X_test, Y_test,
                 loo_rows: Optional[torch.Tensor] = None):
        check_data(problem.task, X_loo, Y_loo, X_test, Y_test,
                   padded=hasattr(problem.model, "trim_inputs"))
        self.problem = problem
        self.X_loo, self.Y_loo, self.X_test, self.Y_test = X_loo, Y_loo, X_test, Y_test
        # where the left-out instances sit among problem.X (None: unknown); subsamples of the
        # training set that must contain them (DataInf's) use it
        self.loo_rows = None if loo_rows is None else torch.as_tensor(loo_rows)
        # what several methods compute identically, keyed by what it depends on: linear solves
        # (Prop. 1 and eq. 16 solve the same damped true Hessian for the same right-hand sides),
        # the smallest Hessian eigenvalue behind Assumption 1's damping
        self.shared: dict = {}
        # the fit step: what is computed once per model and reused by every query and damping,
        # released with the Attributor. Keys, each mapping to {setting: fitted object}:
        #   "gauss_newton_kernel":   {c: operators.Kernel}   a and K = a a^T of G/c
        #   "gauss_newton_spectrum": {c: operators.Spectral} the eigen-decomposition of G/c
        #   "ekfac":                 {batch_size: ekfac.EkfacFactors}
        self.fitted: dict = {}

    def shared_solve(self, key, solve):
        """``solve`` (B -> A^{-1} B) remembering its results under ``key`` (which must name A
        and the solver's settings): a right-hand side equal to one solved before is not solved
        again, so the methods sharing A get bit-identical solutions at the cost of one."""
        done = self.shared.setdefault(key, [])

        def shared(B):
            for B0, X0 in done:
                if B0.shape == B.shape and torch.equal(B0, B):
                    return X0
            X = solve(B)
            done.append((B, X))
            return X
        return shared

    @property
    def n_train(self) -> int:
        return len(self.problem.X)

    @cached_property
    def train_grads(self) -> torch.Tensor:
        """grad L(z_i; theta^f) for the left-out instances, (n', P)."""
        return self.problem.loss_grads(self.X_loo, self.Y_loo, desc="left-out gradients")

    @cached_property
    def test_grads(self) -> torch.Tensor:
        """grad g(z; theta^f) = grad L(z; theta^f) for the test instances, (T, P)."""
        return self.problem.loss_grads(self.X_test, self.Y_test, desc="test gradients")

    @cached_property
    def lambda_G(self) -> float:
        """Mean squared element of the left-out training gradients (the reference's lambda_G)."""
        return mean_sq_grad(self.train_grads)


def damping_value(att: Attributor, grid, index: int, damping: Optional[float] = None) -> float:
    """lambda = damping (if given) else lambda_G * grid[index]."""
    if damping is not None:
        return float(damping)
    return att.lambda_G * float(grid[index])


@dataclass(frozen=True)
class DampedConfig:
    """Fields shared by every method that inverts a damped Hessian.

    lambda = ``damping`` if given, else ``att.lambda_G * damping_grid[damping_index]``.
    ``risk``: "mean" | "sum" (see :mod:`fimoda.influence.operators`). ``materialize``: "auto" |
    "always" | "never" (Gauss-Newton only); ``memory_gb``: budget for the materialised Phi and
    its eigen-decomposition (and for dense P x P matrices).
    """
    damping_grid: tuple = MethodConfig.damping_grid   # lambda = lambda_G x grid[index]
    damping_index: int = MethodConfig.damping_index   # the paper's: the largest
    damping: Optional[float] = None
    risk: str = "mean"
    materialize: str = "auto"
    memory_gb: float = 2.0


def scores_with(att: Attributor, solve: Callable, left: Optional[torch.Tensor] = None) -> np.ndarray:
    """scores[j, i] = grad g(z_j)^T A^{-1} left_i for a symmetric A given as ``solve(B) = A^{-1}B``
    on (P, k) blocks; ``left`` (n', P) defaults to the left-out loss gradients.

    A = M/c + lambda I is symmetric, so g_j^T A^{-1} l_i = (A^{-1} g_j)^T l_i = g_j^T (A^{-1} l_i):
    this solves for whichever of the T test gradients or the n' left-out gradients is fewer (test
    gradients on a tie: torch-influence's s_test), which gives the same numbers up to round-off
    (full-batch LiSSA's truncated series p(A) is also symmetric; stochastic LiSSA only in
    expectation)."""
    G_test = att.test_grads
    W = att.train_grads if left is None else left
    if len(G_test) <= len(W):
        U = solve(G_test.T.contiguous())                 # (P, T)
        out = U.T @ W.T
    else:
        out = G_test @ solve(W.T.contiguous())           # (T, n')
    out = out.detach().cpu().numpy()
    if not np.isfinite(out).all():
        raise FloatingPointError("non-finite scores: check the damping and the model")
    return out
