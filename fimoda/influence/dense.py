"""The exact reference (paper §4.3.3): the damped influence by a dense solve,

    scores[j, i] = grad g(z_j)^T (M/c + lambda I)^{-1} grad L(z_i),   M = G (12) or H (8),

small models only; for the materialised Gauss-Newton matrix the exact Woodbury or spectral
formula instead (:meth:`~fimoda.influence.operators.DampedHessian.solve`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import Attributor, DampedConfig, scores_with
from .specs import DAMPED, MethodSpec
from .operators import damped_hessian


@dataclass(frozen=True)
class DenseConfig(DampedConfig):
    """Exact solve with the damped ``hessian`` ("gn": eq. 12, "true": eq. 8) — the reference."""
    hessian: str = "gn"     # "gn": Gauss-Newton G (eq. 12) | "true": the Hessian H (eq. 8)


def dense(att: Attributor, cfg: DenseConfig = DenseConfig()) -> np.ndarray:
    """Exact reference: scores = grad g(z_j)^T (M/c + lambda I)^{-1} grad L(z_i) with M = G
    (eq. 12) or H (eq. 8), by a dense solve (or the exact spectral formula of the materialised
    Gauss-Newton matrix)."""
    A = damped_hessian(att, cfg, cfg.hessian)
    return scores_with(att, A.solve)


SPECS = (
    MethodSpec("dense", dense, DenseConfig,
               "(8)/(12) by a dense solve (small models; the reference)", run_by_default=False,
               shared=DAMPED),
)
