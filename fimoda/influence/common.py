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

from ..gradients import Problem, mean_sq_grad
from ..memory import storable
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
        again, so the methods sharing A get bit-identical solutions at the cost of one. A block
        is remembered only while it and its solution fit a quarter of the memory budget."""
        done = self.shared.setdefault(key, [])
        p = self.problem

        def shared(B):
            for B0, X0 in done:
                if B0.shape == B.shape and torch.equal(B0, B):
                    return X0
            X = solve(B)
            if storable(p.memory, 2 * B.shape[1], p.n_params, p.dtype):   # B and X
                done.append((B, X))
            return X
        return shared

    def cost(self, method: str, cfg=None, **options):
        """What ``method`` (config ``cfg`` or its defaults, updated by ``options``) will cost
        here, estimated without any work: a :class:`fimoda.influence.cost.Cost` (peak memory in
        bytes, per-example gradients, Hessian products, or a refusal naming the setting to
        change); None for a registered method without a cost hook."""
        from . import method_config
        from .cost import shape_of
        from .specs import method_spec
        return method_spec(method).estimate(shape_of(self), method_config(method, cfg,
                                                                          **options))

    @property
    def n_train(self) -> int:
        return len(self.problem.X)

    @property
    def description(self) -> str:
        """One line: how many of the model's parameters are attributed, and which modules."""
        from ..parameters import describe
        return describe(self.problem.model, self.problem.names)

    def __repr__(self) -> str:
        return (f"Attributor({self.n_train} training rows, {len(self.X_loo)} left out, "
                f"{len(self.X_test)} test points; {self.description})")

    @cached_property
    def train_grads(self) -> torch.Tensor:
        """grad L(z_i; theta^f) for the left-out instances, (n', P)."""
        return self.problem.loss_grads(self.X_loo, self.Y_loo, desc="left-out gradients")

    @cached_property
    def test_grads(self) -> torch.Tensor:
        """grad g(z; theta^f) = grad L(z; theta^f) for the test instances, (T, P)."""
        return self.problem.loss_grads(self.X_test, self.Y_test, desc="test gradients")

    def _side(self, side: str):
        if side == "left":
            return "train_grads", self.X_loo, self.Y_loo, "left-out gradients"
        if side == "test":
            return "test_grads", self.X_test, self.Y_test, "test gradients"
        raise ValueError(f"side must be 'left' or 'test', got {side!r}")

    def keeps(self, side: str) -> bool:
        """Whether the loss gradients of ``side`` ("left": the left-out set, "test") are, or
        may be, kept whole under the memory budget (:func:`fimoda.memory.storable`)."""
        name, X, _, _ = self._side(side)
        p = self.problem
        return name in self.__dict__ or storable(p.memory, len(X), p.n_params, p.dtype)

    def grad_blocks(self, side: str):
        """``(rows, G)`` blocks covering the loss gradients of ``side`` ("left" | "test"): the
        whole cached matrix as one block when it is kept (:meth:`keeps`), else chunks streamed
        under the memory budget (:meth:`fimoda.gradients.Problem.stream`), recomputed on every
        pass and never held together."""
        name, X, Y, desc = self._side(side)
        if self.keeps(side):
            yield slice(None), getattr(self, name)
        else:
            yield from self.problem.stream(self.problem.loss_grads, X, Y, desc=desc)

    def rows(self, side: str, rows: slice) -> torch.Tensor:
        """The loss gradients of the rows ``rows`` of ``side`` ("left" | "test"): a slice of the
        kept matrix when :meth:`keeps` allows, else computed for those rows alone."""
        name, X, Y, _ = self._side(side)
        if self.keeps(side):
            return getattr(self, name)[rows]
        return self.problem.loss_grads(X[rows], Y[rows], desc=None)

    def pairwise(self, transform: Callable = lambda G: G,
                 left: Optional[Callable] = None) -> torch.Tensor:
        """``out[j, i] = transform(g_j)^T left(l_i)`` (T, n') over test gradients g_j and
        left-out gradients l_i (``left`` defaults to ``transform``; both map (B, P) row blocks
        to (B, K)), each side kept or streamed (:meth:`grad_blocks`); with both kept this is one
        product of the two matrices."""
        left = transform if left is None else left
        out = None
        for ts, Gt in self.grad_blocks("test"):
            Gt = transform(Gt)
            for ls, Gl in self.grad_blocks("left"):
                block = Gt @ left(Gl).T
                if out is None and ts == slice(None) and ls == slice(None):
                    return block
                if out is None:
                    out = block.new_empty(len(self.X_test), len(self.X_loo))
                out[ts, ls] = block
        return out

    @cached_property
    def lambda_G(self) -> float:
        """Mean squared element of the left-out training gradients (the reference's lambda_G);
        summed chunk by chunk (float64) when they are not kept."""
        if self.keeps("left"):
            return mean_sq_grad(self.train_grads)
        total = sum(float((G.to(torch.float64) ** 2).sum()) for _, G in self.grad_blocks("left"))
        return total / (len(self.X_loo) * self.problem.n_params)


# The damping grid of the paper (App. D.4): lambda = lambda_G x grid[index], the largest plotted
# (the reference notebooks compute CG and LiSSA over the grid and plot index 3)
DAMPING_GRID = (0.1, 1.0, 10.0, 100.0)
DAMPING_INDEX = 3


def damping_value(att: Attributor, grid, index: int, damping: Optional[float] = None) -> float:
    """lambda = damping (if given) else lambda_G * grid[index]."""
    if damping is not None:
        return float(damping)
    return att.lambda_G * float(grid[index])


@dataclass(frozen=True)
class DampedConfig:
    """Fields shared by every method that inverts a damped Hessian: lambda = ``damping`` if
    given, else ``att.lambda_G * damping_grid[damping_index]``."""
    damping_grid: tuple = DAMPING_GRID  # multiples of lambda_G (the mean squared gradient element)
    damping_index: int = DAMPING_INDEX  # which multiple (the paper's: the largest)
    damping: Optional[float] = None     # absolute lambda, overriding the grid; None: the grid's
    risk: str = "mean"                  # the Hessian of the "mean" or the "sum" of the losses
    #                                     (fimoda.influence.operators; "sum" scales lambda by 1/n)
    materialize: str = "auto"           # Gauss-Newton as an explicit Phi: "auto"|"always"|"never"
    memory_gb: float = 2.0              # GB for the materialised Phi, its eigen-decomposition and
    #                                     any dense P x P matrix


def scores_with(att: Attributor, solve: Callable, left: Optional[Callable] = None) -> np.ndarray:
    """scores[j, i] = grad g(z_j)^T A^{-1} w_i for a symmetric A given as ``solve(B) = A^{-1}B``
    on (P, k) blocks; w_i = ``left(rows)[i]``, the rows ``rows`` (a slice) of the left-hand
    matrix W (n', P), by default the left-out loss gradients (:meth:`Attributor.rows`).

    A = M/c + lambda I is symmetric, so g_j^T A^{-1} w_i = (A^{-1} g_j)^T w_i = g_j^T (A^{-1} w_i):
    this solves for whichever of the T test gradients or the n' rows of W is fewer (test
    gradients on a tie: torch-influence's s_test), which gives the same numbers up to round-off
    (full-batch LiSSA's truncated series p(A) is also symmetric; stochastic LiSSA only in
    expectation).

    Under the memory budget (:mod:`fimoda.memory`): the side solved for is one block of
    right-hand sides when it fits :meth:`fimoda.gradients.Problem.solve_cols`, else blocks of
    that many columns solved in turn (block solvers then round differently, to their
    tolerance); the other side is kept whole when :meth:`Attributor.keeps` allows, else streamed
    in chunks of per-example gradient rows, recomputed for each solved block. With both sides
    whole this is one solve and one product, as it always was."""
    left = (lambda rows: att.rows("left", rows)) if left is None else left
    test = lambda rows: att.rows("test", rows)                         # noqa: E731
    T, n_left = len(att.X_test), len(att.X_loo)
    solved_test = T <= n_left
    get_s, get_o = (test, left) if solved_test else (left, test)
    k, m = (T, n_left) if solved_test else (n_left, T)
    cols = att.problem.solve_cols()
    other_kept = att.keeps("left" if solved_test else "test")
    other = get_o(slice(None)) if other_kept else None
    out = None
    for a in range(0, k, cols):
        rows = slice(None) if k <= cols else slice(a, a + cols)
        U = solve(get_s(rows).T.contiguous())                          # (P, k_s)
        if other_kept:
            block = U.T @ other.T if solved_test else other @ U
            if k <= cols:
                out = block
                break
            pieces = [(slice(None), block)]
        else:
            pieces = ((r, U.T @ O.T if solved_test else O @ U)
                      for r, O in _row_blocks(att, get_o, m))
        for r, block in pieces:
            if out is None:
                out = block.new_empty(T, n_left)
            if solved_test:
                out[rows, r] = block
            else:
                out[r, rows] = block
        del U
    out = out.detach().cpu().numpy()
    if not np.isfinite(out).all():
        raise FloatingPointError("non-finite scores: check the damping and the model")
    return out


def _row_blocks(att: Attributor, get: Callable, m: int):
    """``(rows, get(rows))`` over consecutive slices of at most the budget's streamed gradient
    rows (:meth:`fimoda.gradients.Problem.grad_rows`) covering ``m`` rows."""
    step = att.problem.grad_rows()
    for a in range(0, m, step):
        rows = slice(a, a + step)
        yield rows, get(rows)
