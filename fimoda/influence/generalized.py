"""The paper's generalised influence functions (§4.2, App. B.3): influence at a final model that
need not be a stationary point of the training risk.

With A = M + lambda I (M the Hessian of the training risk at theta^f; see ``operators.py`` for the
``risk`` convention, under which M = H_R/n and the Newton step below is that of R/n) and the
damped Newton step of the full data

    Delta-theta(D) = -A^{-1} grad R(D; theta^f)                                        (15)

leaving z_i out moves the parameters, to first order in its weight, by

    prop1:  A^{-1} ( grad L(z_i) + grad^2 L(z_i) Delta-theta(D) )           (7), M = H
    cor2:   A^{-1} ( l'_i + l''_i grad f_i^T Delta-theta(D) ) grad f_i      Cor. 2, M = G
    eq16:   A^{-1} grad L(z_i; theta^f + Delta-theta(D))                    (16), M = H (or G)

and scores[j, i] = grad g(z_j; theta^f)^T (that change). With Delta-theta(D) = 0 (theta^f
stationary) all three reduce to the classical damped influence (8)/(12).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..gradients import flatten, unflatten
from .common import Attributor, DampedConfig, scores_with
from .cost import damped_cost
from .operators import DampedHessian, damped_hessian
from .solvers.cg import cg_inverse
from .specs import DAMPED, MethodSpec

SOLVERS = ("cg", "dense")


@dataclass(frozen=True)
class Prop1Config(DampedConfig):
    """``solver``: "cg" (to relative residual ``tol``; None: 1e-8 in float64) or "dense"."""
    solver: str = "cg"              # "cg" (iterative) | "dense" (exact solve, small models)
    tol: Optional[float] = None     # CG's relative residual per right-hand side; None: 1e-8 (f64)
    max_iter: int = 2000            # CG steps in total per solve


@dataclass(frozen=True)
class Cor2Config(Prop1Config):
    """Same fields as :class:`Prop1Config`; the Hessian is Gauss-Newton."""


@dataclass(frozen=True)
class Eq16Config(Prop1Config):
    """Prop. 1's fields, and the Hessian of both A and Delta-theta(D)."""
    hessian: str = "true"   # "true": eq. 16 as written | "gn": Gauss-Newton


def _solver(A: DampedHessian, cfg: Prop1Config) -> Callable:
    """B -> A^{-1} B with the configured solver, shared with the other generalized methods on
    the same A (their Newton step and test-side solve are the same linear systems)."""
    if cfg.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {cfg.solver!r}")
    if cfg.solver == "dense":
        solve = A.solve
    else:
        solve = lambda B: cg_inverse(A, B, cfg.tol, cfg.max_iter)[0]      # noqa: E731
    key = ("generalized", A.hessian, A.lam, A.c, A.materialized, cfg.solver, cfg.tol,
           cfg.max_iter, cfg.memory_gb)
    return A.att.shared_solve(key, solve)


def newton_step(A: DampedHessian, solve: Callable) -> torch.Tensor:
    """Delta-theta(D) = -A^{-1} grad R(D; theta^f) / c (eq. 15 for the risk R/c), flattened."""
    g = A.problem.risk_grad() / A.c
    return -solve(g[:, None])[:, 0]


def prop1(att: Attributor, cfg: Prop1Config = Prop1Config()) -> np.ndarray:
    """Prop. 1, eq. (7): scores[j, i] = grad g(z_j)^T (H + lambda I)^{-1}
    (grad L(z_i) + grad^2 L(z_i) Delta-theta(D)), Delta-theta(D) = -(H + lambda I)^{-1} grad R."""
    A = damped_hessian(att, cfg, "true")
    solve = _solver(A, cfg)
    step = newton_step(A, solve)
    p = att.problem
    # rows of W, whole or streamed under the memory budget (scores_with)
    W = lambda rows: att.rows("left", rows) + p.per_example_hvp(att.X_loo[rows],   # noqa: E731
                                                                att.Y_loo[rows], step)
    return scores_with(att, solve, left=W)


def cor2(att: Attributor, cfg: Cor2Config = Cor2Config()) -> np.ndarray:
    """Cor. 2: scores[j, i] = grad g(z_j)^T (G + lambda I)^{-1}
    (l'_i + l''_i grad f_i^T Delta-theta(D)) grad f_i, Delta-theta(D) = -(G + lambda I)^{-1} grad R."""
    A = damped_hessian(att, cfg, "gn")
    solve = _solver(A, cfg)
    step = newton_step(A, solve)

    def W(rows):
        phi, _, d1, d2 = att.problem.gn_pieces(att.X_loo[rows], att.Y_loo[rows],
                                               desc="left-out Phi")
        return (d1 + d2 * (phi @ step))[:, None] * phi
    return scores_with(att, solve, left=W)


def eq16(att: Attributor, cfg: Eq16Config = Eq16Config()) -> np.ndarray:
    """Eq. (16): scores[j, i] = grad g(z_j; theta^f)^T (H + lambda I)^{-1}
    grad L(z_i; theta^f + Delta-theta(D)), Delta-theta(D) = -(H + lambda I)^{-1} grad R(D; theta^f)."""
    A = damped_hessian(att, cfg, cfg.hessian)
    solve = _solver(A, cfg)
    p = att.problem
    step = newton_step(A, solve)
    moved = unflatten(flatten(p.params, p.names) + step, p.params, p.names)
    W = lambda rows: p.loss_grads(att.X_loo[rows], att.Y_loo[rows], params=moved,  # noqa: E731
                                  desc="left-out gradients at theta^f + step")
    return scores_with(att, solve, left=W)


def _cost(name: str, hessian: Optional[str], **kw):
    """The generalized method's :class:`~.cost.Cost` hook: its solver's products on the scores'
    columns and the Newton step's one (:func:`~.cost.damped_cost`); the dense solver's P
    products and P x P matrices (:func:`.dense.dense_cost`) instead of CG's."""
    import dataclasses
    from .cg import cg_products
    from .dense import DenseConfig, dense_cost

    def cost(shape, cfg: Prop1Config):
        h = cfg.hessian if hessian is None else hessian
        if cfg.solver != "dense":
            return damped_cost(name, shape, cfg, h, cg_products(cfg.max_iter), extra_columns=1,
                               **kw)
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DampedConfig)}
        dense = dense_cost(shape, DenseConfig(**shared, hessian=h))
        if dense.refusal:
            return dataclasses.replace(dense, method=name)
        own = damped_cost(name, shape, cfg, h, lambda k: 0, **kw)
        matrices = dense.peak_bytes - damped_cost("dense", shape, cfg, h, lambda k: 0).peak_bytes
        return dataclasses.replace(own, products=dense.products, products_bound=False,
                                   peak_bytes=own.peak_bytes + matrices)
    return cost


_LARGE = "as Prop. 1: tabular datasets only in the paper"
SPECS = (
    MethodSpec("prop1", prop1, Prop1Config, "(7) with Delta-theta(D) of (15)", shared=DAMPED,
               assumption1=True, cost=_cost("prop1", "true", left_copies=1,
                                            example_products=True),
               large_model_skip="the generalized influence functions (Prop. 1, Cor. 2, eq. 16) "
                                "need full-batch solves with the summed risk; the paper ran "
                                "them on the tabular datasets only"),
    MethodSpec("cor2", cor2, Cor2Config, "Cor. 2 (Gauss-Newton form of (7))", shared=DAMPED,
               large_model_skip=_LARGE, cost=_cost("cor2", "gn", left_copies=1,
                                                   left_fresh=True)),
    MethodSpec("eq16", eq16, Eq16Config, "(16) near-stationary", shared=DAMPED,
               assumption1=True, cost=_cost("eq16", None, left_fresh=True),
               large_model_skip=_LARGE),
)
