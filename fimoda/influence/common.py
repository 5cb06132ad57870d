"""What every method computes once (kronfluence-style split): the :class:`Attributor` caches the
per-example gradients of the left-out and test sets at theta^f, lambda_G, and exposes the Hessian
operators of the shared base; methods then compute only their own per-query part."""
from __future__ import annotations

from functools import cached_property
from typing import Optional

import torch

from ..gradients import Problem, mean_sq_grad


class Attributor:
    """theta^f plus the instances to attribute: left-out set (X_loo, Y_loo), test set (X_test,
    Y_test). Training-set-wide operators (HVPs, factors) use ``problem.X/Y`` (the full set)."""

    def __init__(self, problem: Problem, X_loo, Y_loo, X_test, Y_test):
        self.problem = problem
        self.X_loo, self.Y_loo, self.X_test, self.Y_test = X_loo, Y_loo, X_test, Y_test

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
