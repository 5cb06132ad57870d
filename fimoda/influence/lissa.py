"""LiSSA (agarwal2017second, as in torch-influence; paper §4.3.3): the damped influence by
LiSSA's truncated Neumann series,

    v_0 = b,   v_{t+1} = b + (I - A/scale) v_t,   A^{-1} b ~ v_depth / scale,
    scores[j, i] = grad g(z_j)^T A^{-1} grad L(z_i),   A = G/c + lambda I                (12)

and LiSSA-H the same with the true Hessian, A = H/c + lambda I (eq. 8). Operator:
:func:`~fimoda.influence.operators.damped_hessian`; solver:
:func:`~fimoda.influence.solvers.lissa.lissa_inverse`, at the smallest scale of ``scale_grid``
that does not diverge (the paper's choice).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .common import Attributor, DampedConfig, scores_with
from .cost import damped_cost, gauss_newton_materialised
from .errors import LissaDivergedError
from .operators import damped_hessian
from .solvers.lissa import lissa_inverse
from .specs import DAMPED, MethodSpec

FULL_BATCH = ("krylov", "recurrence")
# The scales of the reference's grid: the paper took the smallest at which LiSSA did not diverge
SCALE_GRID = (10.0, 20.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 400.0, 500.0)


@dataclass(frozen=True)
class LissaConfig(DampedConfig):
    """LiSSA (agarwal2017second) as in torch-influence: v_0 = b,
    v_{t+1} = b + (I - (M + lambda I)/scale) v_t, result v_depth / scale, averaged over ``repeat``.
    ``batch_size=None``: full-batch products (what the paper's tabular runs used); an integer:
    stochastic LiSSA with one seeded random batch of the training set per step.
    ``divergence_factor``: see :func:`.solvers.lissa.lissa_solve`. ``scale_grid``: if non-empty
    and LiSSA diverges at ``scale``, retry with the larger values of the grid in increasing order
    (the paper's choice: the smallest scale that did not diverge; default: the paper's grid 10,
    20, 50, ..., 500); a warning names the scale used. Empty: raise instead.
    ``full_batch``: how a full-batch run through Hessian-vector products is evaluated (the
    materialised Gauss-Newton matrix always runs the recurrence in its exact spectral
    coordinates): "krylov" (default) computes the same truncated series in a block Krylov
    subspace (:func:`.solvers.lissa.krylov_lissa_solve`; exact once the subspace holds it, else
    to relative change ``krylov_tol``, default 1e-8 in float64), "recurrence" applies the
    recurrence with ``depth`` products (the reference; also used for depths below
    ``KRYLOV_MIN_DEPTH`` = 10, and when the Krylov basis would not fit in ``memory_gb``).
    The values of ``scale_grid`` below ``scale`` are never tried and are dropped."""
    depth: int = 5000               # steps of the recurrence (Hessian products per solve)
    repeat: int = 1                 # independent runs averaged (stochastic LiSSA)
    scale: float = 10.0             # divides M + lambda I (units of the Hessian); must exceed its
    #                                 largest eigenvalue for the series to converge
    scale_grid: tuple = SCALE_GRID  # larger scales retried in turn after a divergence
    batch_size: Optional[int] = None  # training rows per Hessian product; None: all (full batch)
    seed: int = 0                   # seed of the stochastic batches
    divergence_factor: float = 100.0  # diverged once ||v_t|| exceeds this times its start
    full_batch: str = "krylov"      # full-batch evaluation: "krylov" | "recurrence"
    krylov_tol: Optional[float] = None  # Krylov evaluation's relative change; None: by precision

    def __post_init__(self):
        object.__setattr__(self, "scale_grid",
                           tuple(s for s in self.scale_grid if s >= self.scale))


@dataclass(frozen=True)
class LissaHConfig(LissaConfig):
    """LiSSA on the damped *true* Hessian (LiSSA-H, eq. 8); same fields as :class:`LissaConfig`."""


def _lissa(att: Attributor, cfg: LissaConfig, hessian: str, desc: str) -> np.ndarray:
    if cfg.repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {cfg.repeat}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"batch_size must be None or >= 1, got {cfg.batch_size}")
    if not cfg.divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {cfg.divergence_factor}")
    if cfg.full_batch not in FULL_BATCH:
        raise ValueError(f"full_batch must be one of {FULL_BATCH}, got {cfg.full_batch!r}")
    if cfg.krylov_tol is not None and not cfg.krylov_tol > 0:
        raise ValueError(f"krylov_tol must be positive, got {cfg.krylov_tol}")
    A = damped_hessian(att, cfg, hessian)
    progress = att.problem.progress
    stochastic = cfg.batch_size is not None and cfg.batch_size < A.n
    scales = [cfg.scale] + sorted(float(s) for s in cfg.scale_grid if float(s) > cfg.scale)
    for i, scale in enumerate(scales):
        try:
            out = scores_with(att, lambda B: lissa_inverse(A, B, replace(cfg, scale=scale),
                                                           stochastic, progress, desc))
        except LissaDivergedError as e:
            if i + 1 == len(scales):
                tried = ", ".join(f"{v:g}" for v in scales)
                raise LissaDivergedError(f"{e}. Tried scale(s) {tried}; the next to try: "
                                         f"scale={next_scale(scale):g}") from e
            continue
        if i > 0:
            tried = ", ".join(f"{v:g}" for v in scales[:i])
            warnings.warn(f"{desc} diverged at scale {tried}; used scale={scale:g}")
        return out


def next_scale(scale: float) -> float:
    """The next LiSSA scale above ``scale`` on the paper's 1-2-5 grid (10, 20, 50, 100, ...)."""
    import math
    decade = 10.0 ** math.floor(math.log10(scale))
    for m in (1, 2, 5, 10):
        if m * decade > scale * (1 + 1e-12):
            return m * decade
    return 20 * decade


def lissa(att: Attributor, cfg: LissaConfig = LissaConfig()) -> np.ndarray:
    """LiSSA on the damped Gauss-Newton Hessian (eq. 12): scores = grad g(z_j)^T v, where v is
    the LiSSA estimate of (G/c + lambda I)^{-1} grad L(z_i) (see :mod:`.solvers.lissa`)."""
    return _lissa(att, cfg, "gn", "LiSSA")


def lissa_h(att: Attributor, cfg: LissaHConfig = LissaHConfig()) -> np.ndarray:
    """LiSSA-H: LiSSA on the damped true Hessian (eq. 8), (H/c + lambda I)^{-1} grad L(z_i)."""
    return _lissa(att, cfg, "true", "LiSSA-H")


def lissa_cost(shape, cfg: LissaConfig, hessian: str = "gn", name: str = "lissa"):
    """LiSSA's :class:`~.cost.Cost` at its first scale (each further scale tried after a
    divergence costs as much again): stochastic, ``depth`` x ``repeat`` products of a batch per
    column; full batch by the recurrence, ``depth`` products per column; by the Krylov series,
    at most a basis of ``cap`` columns (:func:`.solvers.lissa.lissa_inverse`: at most half of
    ``memory_gb``, allocated whole), each one product, falling back to the recurrence beyond
    it; none on the materialised Gauss-Newton matrix."""
    from .solvers.lissa import KRYLOV_MIN_DEPTH, krylov_cap
    stochastic = cfg.batch_size is not None and cfg.batch_size < shape.n
    if stochastic:
        return damped_cost(name, shape, cfg, hessian, lambda k: cfg.depth * cfg.repeat * k,
                           bound=False, product_rows=cfg.batch_size)
    if cfg.full_batch != "krylov" or cfg.depth < KRYLOV_MIN_DEPTH or \
            gauss_newton_materialised(shape, hessian, cfg):
        return damped_cost(name, shape, cfg, hessian, lambda k: cfg.depth * k, bound=False)
    item = shape.dtype.itemsize
    cap = min(krylov_cap(shape.P, item, cfg.memory_gb), shape.P)

    def products(k):             # one per basis column and the first block's k
        basis = (cfg.depth + 1) * k
        if basis <= cap or cap >= shape.P:     # no fallback: a basis of P columns is invariant
            return min(basis, cap) + k
        return cap + cfg.depth * k             # the basis overflows: then the recurrence
    # the basis is allocated whole (P x cap, cap x cap); writing its first columns already
    # touches most of its pages
    return damped_cost(name, shape, cfg, hessian, products,
                       fixed=cap * shape.P * item + cap * cap * item)


def lissa_h_cost(shape, cfg: LissaHConfig):
    """LiSSA-H's :class:`~.cost.Cost`: :func:`lissa_cost` on the true Hessian."""
    return lissa_cost(shape, cfg, "true", "lissa_h")


SPECS = (
    MethodSpec("lissa", lissa, LissaConfig, "(12) by LiSSA on G + lambda I", figure2=5,
               shared=DAMPED, cost=lissa_cost),
    MethodSpec("lissa_h", lissa_h, LissaHConfig, "(8) by LiSSA on the true H + lambda I",
               figure2=6, shared=DAMPED, cost=lissa_h_cost),
)
