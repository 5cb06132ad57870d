"""What every method computes once (kronfluence-style split): the :class:`Attributor` caches the
per-example gradients of the left-out and test sets at theta^f, lambda_G, and holds what is
fitted once per model (the materialised Gauss-Newton kernel and spectrum, EK-FAC factors);
methods then compute only their own per-query part."""
from __future__ import annotations

from functools import cached_property
from typing import Optional

import torch

from ..gradients import Problem, mean_sq_grad


class Attributor:
    """theta^f plus the instances to attribute: left-out set (X_loo, Y_loo), test set (X_test,
    Y_test). Training-set-wide operators (HVPs, factors) use ``problem.X/Y`` (the full set)."""

    def __init__(self, problem: Problem, X_loo, Y_loo, X_test, Y_test,
                 loo_rows: Optional[torch.Tensor] = None):
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
        #   "gauss_newton_kernel":   {c: inverse.Kernel}     a and K = a a^T of G/c
        #   "gauss_newton_spectrum": {c: inverse.Spectral}   the eigen-decomposition of G/c
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
