"""The exact reference (paper §4.3.3): the damped influence by a dense solve,

    scores[j, i] = grad g(z_j)^T (M/c + lambda I)^{-1} grad L(z_i),   M = G (12) or H (8),

small models only; for the materialised Gauss-Newton matrix the exact Woodbury or spectral
formula instead (:meth:`~fimoda.influence.operators.DampedHessian.solve`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import Attributor, DampedConfig, scores_with
from .cost import GIB, damped_cost, fmt_bytes, gauss_newton_materialised
from .specs import DAMPED, MethodSpec
from .operators import damped_hessian, dense_bytes


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


def dense_cost(shape, cfg: DenseConfig):
    """The dense solve's :class:`~.cost.Cost`: P products forming A once, and A with its
    symmetrised copies (four P x P matrices at once); refused when A does not fit
    ``memory_gb``. The materialised Gauss-Newton matrix needs neither."""
    import dataclasses
    if gauss_newton_materialised(shape, cfg.hessian, cfg):
        return damped_cost("dense", shape, cfg, cfg.hessian, lambda k: 0)
    need = dense_bytes(shape.P, shape.dtype.itemsize)
    if need > cfg.memory_gb * GIB:
        return dataclasses.replace(
            damped_cost("dense", shape, cfg, cfg.hessian), refusal=(
                f"a dense {shape.P:,} x {shape.P:,} Hessian needs {fmt_bytes(need)} > "
                f"memory_gb={cfg.memory_gb}: raise memory_gb=, attribute fewer parameters "
                f"(names=) or use an iterative method (cg, lissa)"))
    cost = damped_cost("dense", shape, cfg, cfg.hessian, lambda k: 0,
                       fixed=4 * shape.P ** 2 * shape.dtype.itemsize)
    return dataclasses.replace(cost, products=shape.P, products_bound=False) \
        if not cost.refusal else cost


SPECS = (
    MethodSpec("dense", dense, DenseConfig,
               "(8)/(12) by a dense solve (small models; the reference)", run_by_default=False,
               shared=DAMPED, cost=dense_cost),
)
