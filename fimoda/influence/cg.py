"""CG (koh2017inffunc; paper §4.3.3): the damped Gauss-Newton influence by conjugate gradients,

    scores[j, i] = grad g(z_j)^T (G/c + lambda I)^{-1} grad L(z_i)                        (12)

(``hessian="true"``: H in place of G, eq. 8), each solve to relative residual ``tol``.
Operator: :func:`~fimoda.influence.operators.damped_hessian`; solver:
:func:`~fimoda.influence.solvers.cg.cg_inverse` (block CG by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .common import Attributor, DampedConfig, scores_with
from .cost import damped_cost
from .specs import DAMPED, MethodSpec
from .operators import damped_hessian
from .solvers.cg import cg_inverse


@dataclass(frozen=True)
class CgConfig(DampedConfig):
    """CG on (G + lambda I) (paper: Gauss-Newton only; ``hessian="true"`` also works when H +
    lambda I is positive definite). ``tol``: relative residual ||b - A x|| / ||b|| per right-hand
    side (None: 1e-8 in float64, 1e-5 in lower precision). ``max_iter``: CG steps in total.
    ``cg_block``: block CG over all right-hand sides (default) or one CG recurrence per column
    (see :func:`.solvers.cg.cg_solve`); both stop at the same per-column tolerance."""
    hessian: str = "gn"             # "gn": Gauss-Newton G (eq. 12) | "true": the Hessian H (eq. 8)
    tol: Optional[float] = None     # relative residual per right-hand side; None: by precision
    max_iter: int = 2000            # CG steps in total
    cg_block: bool = True           # one block recurrence for all right-hand sides, else one each


def cg(att: Attributor, cfg: CgConfig = CgConfig()) -> np.ndarray:
    """CG (koh2017inffunc): scores = grad g(z_j)^T (G/c + lambda I)^{-1} grad L(z_i) (eq. 12;
    ``hessian="true"``: eq. 8), each solve to relative residual ``tol``."""
    if not isinstance(cfg.cg_block, bool):
        raise ValueError(f"cg_block must be True or False, got {cfg.cg_block!r}")
    A = damped_hessian(att, cfg, cfg.hessian)
    return scores_with(att, lambda B: cg_inverse(A, B, cfg.tol, cfg.max_iter,
                                                 block=cfg.cg_block)[0])


def cg_products(max_iter: int):
    """Products of CG on a block of k columns, at most: ``max_iter`` steps of at most k
    columns, and a true residual of k columns after each of at most ``max_iter`` restarts."""
    return lambda k: (2 * max_iter + 1) * k


def cg_cost(shape, cfg: CgConfig):
    """CG's :class:`~.cost.Cost` (:func:`~.cost.damped_cost`)."""
    return damped_cost("cg", shape, cfg, cfg.hessian, cg_products(cfg.max_iter))


SPECS = (
    MethodSpec("cg", cg, CgConfig, "(12) by conjugate gradients on G + lambda I", figure2=4,
               shared=DAMPED, cost=cg_cost,
               large_model_skip="CG needs full-batch Hessian products to convergence; the paper "
                                "could not run it on ResNet-9 or BERT"),
)
