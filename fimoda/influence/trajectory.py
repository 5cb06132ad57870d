"""Trajectory-matched influence (beyond the paper; its §7 asks for a method with the high initial
similarity of first-order methods and without their decay): the linearised response of further
training itself, at each amount of it.

Further training with SGD at learning rate eta from theta^f, linearised there (Hessian fixed at
theta^f, the batch Hessian replaced by its expectation over batch orders, the mean-loss Hessian
Hbar = H_R/n (+ weight decay wd)), moves the parameters of the ``subtract`` run of z_i -- the
loss minus L(z_i)/n at every step -- away from the full run's by

    d_t = (eta/n) sum_{k<t} (I - eta A)^k grad L(z_i),      A = Hbar + wd I,

after t steps, so the test loss changes by

    scores_t[j, i] = grad g(z_j)^T d_t = (1/n) grad g(z_j)^T p_t(A) grad L(z_i),
    p_t(x) = eta sum_{k<t} (1 - eta x)^k = (1 - (1 - eta x)^t) / x.

p_t is LiSSA's truncated Neumann series with scale 1/eta and depth t - 1
(:func:`.solvers.lissa.lissa_polynomial`): t = 1 is (eta/n) Grad-Dot (eq. 6), and as t grows, for
a positive-definite A, p_t(A) -> A^{-1}: the damped influence function (eq. 8/12, ``risk="mean"``
with damping wd), reached through an effective damping ~ 1/(eta t). Scores are in the units of the
``subtract`` gold standard (z_i's weight 1/n), so they can be compared with it in magnitude, not
only in direction. With mini-batch SGD (batch B, K = ceil(n/B) steps per epoch) the expected
step's operator is exactly Hbar, so an evaluation after e epochs is t = e K steps.

The whole curve over t costs about one solve: every p_t is a function of A's spectrum, applied to
the coordinates of the test and left-out gradients in one eigenbasis --
* Gauss-Newton, materialised (:class:`.operators.DampedHessian`): the exact eigen-decomposition
  of the kernel K = a a^T (n <= P; for any f, g^T f(A) l = f(wd) g^T l +
  (U^T a g)^T diag((f(e + wd) - f(wd)) / e) (U^T a l), as :func:`.solvers.lissa.lissa_kernel`;
  where that eigen-decomposition would cost more than the Krylov route through the kernel's
  products, :func:`.solvers.lissa.kernel_eig_costlier`, the Krylov route) or of G/n (n > P);
* the true Hessian (``hessian="true"``; or a Gauss-Newton matrix too large to materialise):
  the block Krylov subspace that :func:`.solvers.lissa.krylov_lissa_solve` builds for the
  longest series, t_max - 1, re-used for every t by Rayleigh-Ritz (exact for every t <= the
  number of blocks, converged for the longest). The true Hessian has negative eigenvalues away
  from a minimum; along them (1 - eta x)^t grows, as further training itself departs from
  theta^f along them: the series is evaluated as it is (no divergence test), so what that does
  to the scores is shown, not hidden;
* the series' own recurrence (``route="recurrence"``, :mod:`.trajectory_recurrence`: t_max - 1
  full or mini-batch products, for models whose Hessian is not materialised and few steps).

Adam further training (``preconditioner="adam"``, :mod:`.preconditioner`): with Adam's state
frozen at what one epoch at theta^f builds, the step is preconditioned by D = diag(1/(sqrt(v) +
eps)), d_{k+1} = d_k - eta D (A d_k - grad L(z_i)/n), and

    scores_t = (1/n) (D^{1/2} grad g)^T p_t(D^{1/2} A D^{1/2}) (D^{1/2} grad L(z_i)):

every route above runs on the symmetrised A~ = D^{1/2} A D^{1/2} and the D^{1/2}-scaled
gradients (weight decay > 0: the Krylov route only).

:func:`damping_schedule_curve` is the simpler combination: the damped influence function with a
damping that shrinks as further training proceeds, lambda(t) = 1/(eta t) (+ wd),

    scores_t = (1/n) grad g^T (A + I / (eta t))^{-1} grad L(z_i)

(what CG converges to; same units, same p_t(0) = eta t on A's null space), evaluated in the same
eigenbasis, or by fimoda's CG per point (``solver="cg"``).

Scoring: ``trajectory`` in :data:`fimoda.influence.METHODS` returns the usual
``scores[test, left-out]`` at one configured amount of further training (``steps``, else
``epochs`` x K); :func:`trajectory_curve` returns ``scores[t, test, left-out]`` at every
evaluation point, each compared with the gold standard at the same point (notebook 07,
:func:`fimoda.paper.beyond.curves_at_points`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .common import Attributor
from .cost import trajectory_cost
from .errors import finite_trajectory
from .operators import HESSIANS, MATERIALIZE, DampedHessian
from .specs import MethodSpec
from .preconditioner import (ADAM_BETAS, ADAM_EPS, adam_preconditioner, check_preconditioner,
                             preconditioned)
from .solvers.lissa import kernel_eig_costlier, krylov_lissa_solve, lissa_polynomial
from .trajectory_nonstationary import nonstationary_curve
from .trajectory_recurrence import check_recurrence, recurrence_curve

SOLVERS = ("exact", "cg")
ROUTES = ("auto", "recurrence")


@dataclass(frozen=True)
class TrajectoryConfig:
    """The further training to match: ``lr`` (eta), ``batch_size`` B (K = ceil(n/B) steps per
    epoch), ``weight_decay`` (enters A), and the amount at which :func:`trajectory` scores:
    ``steps`` if given, else ``epochs`` x K. Defaults: :func:`fimoda.gold_standard`'s further
    training (SGD, lr 1e-2, batch 128, 5 epochs). ``hessian``: "gn" (Gauss-Newton) or "true".
    ``materialize``/``memory_gb``: as :class:`.common.DampedConfig` (Gauss-Newton only).
    ``krylov_tol``: the Krylov evaluation's relative change at which it stops (None: 1e-8 in
    float64); ``krylov_cols``: most basis columns (memory: P x cols). ``preconditioner``:
    "none" (SGD), "adam" (Adam's frozen state D) or "adam_dv" (D_eff, with the response of
    Adam's second moment), :mod:`.preconditioner`; ``adam_beta2``/``adam_eps``: the gold
    standard's Adam (:mod:`fimoda.gold.optim`).
    ``route``: how :func:`trajectory_curve` evaluates the series: "auto", one eigenbasis
    (:class:`SpectralPairs`); "recurrence", the series' own recurrence with t_max - 1 products
    (:mod:`.trajectory_recurrence`: models whose Hessian is not materialised, few steps), its
    ``products`` "full" (the mean-loss operator) or "batch" (seeded mini-batches of
    ``batch_size`` rows, seed ``seed``). :func:`damping_schedule_curve` always uses
    :class:`SpectralPairs` or CG. ``nonstationary``: add Prop. 1's term (Cor. 2 for "gn") along
    the linearised full run, theta^f not being a minimum (:mod:`.trajectory_nonstationary`;
    its own Krylov basis)."""
    lr: float = 1e-2                # eta, the further training's learning rate
    epochs: float = 5               # further-training epochs scored at (if steps is None)
    steps: Optional[int] = None     # further-training SGD steps scored at; None: epochs x K
    batch_size: int = 128           # B, rows per step: K = ceil(n / B) steps per epoch
    weight_decay: float = 0.0       # the further training's L2 coefficient (adds to A)
    hessian: str = "gn"             # "gn": Gauss-Newton | "true": the Hessian
    materialize: str = "auto"       # Gauss-Newton as an explicit Phi: "auto"|"always"|"never"
    memory_gb: float = 2.0          # GB for the materialised Phi and the Krylov basis
    krylov_tol: Optional[float] = None  # Krylov evaluation's relative change; None: by precision
    krylov_cols: int = 4000         # most Krylov basis columns (memory: P x cols)
    preconditioner: str = "none"    # "none" (SGD) | "adam" (D) | "adam_dv" (D_eff)
    adam_beta2: float = ADAM_BETAS[1]  # the gold standard's Adam second-moment decay
    adam_eps: float = ADAM_EPS      # the gold standard's Adam epsilon
    route: str = "auto"             # "auto" (one eigenbasis) | "recurrence" (t_max - 1 products)
    products: str = "full"          # the recurrence's products: "full" | "batch" (seeded)
    seed: int = 0                   # seed of the recurrence's mini-batches
    nonstationary: bool = False     # add Prop. 1's (Cor. 2's for "gn") non-stationary term


def _check(cfg: TrajectoryConfig) -> None:
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a positive number, got {cfg.lr!r}")
    if not (isinstance(cfg.batch_size, (int, np.integer)) and cfg.batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {cfg.batch_size!r}")
    if not cfg.weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay!r}")
    if cfg.hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {cfg.hessian!r}")
    if cfg.materialize not in MATERIALIZE:
        raise ValueError(f"materialize must be one of {MATERIALIZE}, got {cfg.materialize!r}")
    if cfg.steps is not None and not (isinstance(cfg.steps, (int, np.integer)) and cfg.steps >= 0):
        raise ValueError(f"steps must be None or an integer >= 0, got {cfg.steps!r}")
    if cfg.steps is None and not cfg.epochs >= 0:
        raise ValueError(f"epochs must be >= 0, got {cfg.epochs!r}")
    check_preconditioner(cfg)
    if cfg.route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {cfg.route!r}")
    check_recurrence(cfg)
    if not isinstance(cfg.nonstationary, bool):
        raise ValueError(f"nonstationary must be True or False, got {cfg.nonstationary!r}")
    if cfg.nonstationary and cfg.route != "auto":
        raise ValueError("nonstationary=True runs on its own Krylov basis, not "
                         "route='recurrence'")


def steps_per_epoch(att: Attributor, cfg: TrajectoryConfig) -> int:
    """K = ceil(n / B): SGD steps per epoch of further training on the n training rows."""
    return math.ceil(att.n_train / cfg.batch_size)


def _steps(steps) -> np.ndarray:
    t = np.asarray(steps)
    if t.ndim != 1 or len(t) == 0 or not np.issubdtype(t.dtype, np.integer) or (t < 0).any():
        raise ValueError(f"steps must be a non-empty 1-D sequence of integers >= 0, got {steps!r}")
    return t.astype(np.int64)


# ----------------------------------------------------------------------------- spectral functions
def trajectory_polynomial(x: torch.Tensor, lr: float, t: int) -> torch.Tensor:
    """p_t(x) = eta sum_{k<t} (1 - eta x)^k, elementwise: LiSSA's series with scale 1/eta and
    depth t - 1 (:func:`lissa_polynomial`, its divergence test off: along x < 0 or x > 2/eta the
    series grows, as further training does)."""
    if t == 0:
        return torch.zeros_like(x)
    if t == 1:
        return torch.full_like(x, lr)
    ones = torch.ones(len(x), 1, dtype=x.dtype, device=x.device)
    return lissa_polynomial(x, 1.0 / lr, int(t) - 1, ones, divergence_factor=math.inf)


def schedule_resolvent(x: torch.Tensor, lr: float, t: int) -> torch.Tensor:
    """1 / (x + 1/(eta t)): the damped inverse at the damping schedule lambda(t) = 1/(eta t)
    (t = 0: 0, no further training)."""
    if t == 0:
        return torch.zeros_like(x)
    return 1.0 / (x + 1.0 / (lr * t))


def ritz_basis(A, B: torch.Tensor, cfg: TrajectoryConfig, depth_hint: int, progress: bool = True):
    """The block Krylov subspace that :func:`krylov_lissa_solve` builds for the series of depth
    ``depth_hint`` on the right-hand sides B (P, k), recorded from its products A V; then
    T = Q^T A Q = U diag(theta) U^T. Returns (theta, the Ritz vectors V = Q U (P, r), the number
    of blocks): f(A) b ~= V f(theta) V^T b for b in span(B), exact for polynomials f of degree
    below the number of blocks."""
    blocks, prods = [], []

    def matmat(X):
        AX = A.matmat(X)
        blocks.append(X.clone())
        prods.append(AX.clone())
        return AX

    cap = int(min(cfg.krylov_cols,
                  cfg.memory_gb * 2 ** 30 / 2 / (A.P * (torch.finfo(B.dtype).bits // 8))))
    X = krylov_lissa_solve(matmat, B, 1.0 / cfg.lr, max(int(depth_hint), 1), math.inf,
                           cfg.krylov_tol, cap, progress, "trajectory")
    if X is None:
        raise MemoryError(f"trajectory: the Krylov basis would exceed {cap} columns "
                          f"(memory_gb={cfg.memory_gb}, krylov_cols={cfg.krylov_cols})")
    Q, AQ = torch.cat(blocks, 1), torch.cat(prods, 1)
    T = Q.T @ AQ
    theta, U = torch.linalg.eigh(0.5 * (T + T.T))
    return theta, Q @ U, len(blocks)


class SpectralPairs:
    """grad g(z_j)^T f(A) grad L(z_i) for every test j, left-out i and any spectral function f of
    A = M/n + wd I, from one eigenbasis (module docstring). ``route``: "kernel", "spectral" or
    "krylov"; ``ritz``: the eigenvalues the scores are built from (the Krylov route's Ritz values
    or the Gauss-Newton eigenvalues + wd)."""

    def __init__(self, att: Attributor, cfg: TrajectoryConfig, depth_hint: int,
                 progress: bool = True):
        _check(cfg)
        self.att = att
        A = DampedHessian(att, cfg.hessian, cfg.weight_decay, "mean", cfg.materialize,
                          cfg.memory_gb)
        G, W = att.test_grads, att.train_grads
        if cfg.preconditioner != "none":        # Adam: D^1/2 A D^1/2 and D^1/2-scaled gradients
            A, G, W = preconditioned(att, cfg, A, G, W)
        self.A, self.lam = A, float(cfg.weight_decay)
        # the kernel's eigen-decomposition unless it costs more than a Krylov evaluation through
        # the kernel's cheap products (the cost model of LiSSA's, e.g. FICO's n = 8,400 rows)
        if A.kernel is not None and not kernel_eig_costlier(A, min(len(G), len(W))):
            a = A.kernel.a
            e, U = A.kernel.eig()
            self.route, self.ritz = "kernel", e + self.lam
            self.e = e
            self.Cg, self.Cl = U.T @ (a @ G.T.to(a.dtype)), U.T @ (a @ W.T.to(a.dtype))
            self.base = (G @ W.T).to(a.dtype)
        elif A.kernel is None and A.spectral is not None:
            V, e = A.spectral.basis, A.spectral.eig
            self.route, self.ritz = "spectral", e + self.lam
            self.Zg, self.Zl = V @ G.T, V @ W.T
            self.base = G @ W.T - self.Zg.T @ self.Zl
        else:
            self.route = "krylov"
            self._krylov(cfg, G, W, depth_hint, progress)

    def _krylov(self, cfg, G, W, depth_hint, progress):
        """The Ritz basis of :func:`ritz_basis` for the smaller gradient set, and the
        coordinates of both sets in it."""
        rhs_test = len(G) <= len(W)
        B = (G if rhs_test else W).T.contiguous()
        other = W if rhs_test else G
        self.ritz, V, self.blocks = ritz_basis(self.A, B, cfg, depth_hint, progress)
        self.Zb = V.T @ B                                # coordinates of the right-hand sides
        self.Zo = V.T @ other.T                          # the other side, projected
        self.rhs_test = rhs_test

    def scores(self, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """scores[j, i] = grad g(z_j)^T f(A) grad L(z_i)."""
        if self.route == "kernel":
            lam = self.e.new_tensor([self.lam])
            fe, f0 = f(self.ritz), f(lam)[0]
            return f0 * self.base + self.Cg.T @ (((fe - f0) / self.e)[:, None] * self.Cl)
        if self.route == "spectral":
            lam = self.ritz.new_tensor([self.lam])
            return f(lam)[0] * self.base + self.Zg.T @ (f(self.ritz)[:, None] * self.Zl)
        S = self.Zo.T @ (f(self.ritz)[:, None] * self.Zb)       # (other, rhs)
        return S if not self.rhs_test else S.T


def _curve(pairs: SpectralPairs, steps: np.ndarray, fn, lr: float, n: int) -> np.ndarray:
    out = []
    for t in steps:
        s = pairs.scores(lambda x, t=int(t): fn(x, lr, t)) / n
        out.append(s.detach().cpu().double().numpy())
    return finite_trajectory(np.stack(out), pairs.route)


def trajectory_curve(att: Attributor, cfg: TrajectoryConfig, steps: Sequence[int],
                     progress: bool = True, pairs: Optional[SpectralPairs] = None) -> np.ndarray:
    """scores[t, j, i] = (1/n) grad g(z_j)^T p_t(A) grad L(z_i) at every number of SGD steps in
    ``steps`` (module docstring), from one eigenbasis (``pairs``, built here if None), or by the
    recurrence (``cfg.route == "recurrence"``; ``pairs`` unused)."""
    t = _steps(steps)
    if cfg.nonstationary:
        _check(cfg)
        return nonstationary_curve(att, cfg, t, progress)
    if cfg.route == "recurrence":
        _check(cfg)
        s = None
        if cfg.preconditioner != "none":      # the recurrence's D^{1/2} hook
            s = adam_preconditioner(att, cfg).sqrt()
        return recurrence_curve(att, cfg, t, progress, s)
    pairs = pairs or SpectralPairs(att, cfg, int(t.max()) - 1, progress)
    return _curve(pairs, t, trajectory_polynomial, float(cfg.lr), att.n_train)


def damping_schedule_curve(att: Attributor, cfg: TrajectoryConfig, steps: Sequence[int],
                           solver: str = "exact", progress: bool = True,
                           pairs: Optional[SpectralPairs] = None) -> np.ndarray:
    """scores[t, j, i] = (1/n) grad g(z_j)^T (A + I/(eta t))^{-1} grad L(z_i): the damped
    influence function with damping lambda(t) = 1/(eta t) + wd. ``solver="exact"``: in the
    eigenbasis of :class:`SpectralPairs` (what CG converges to); ``"cg"``: fimoda's CG method at
    every point (Gauss-Newton: :func:`fimoda.influence.cg.cg`)."""
    t = _steps(steps)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "exact":
        pairs = pairs or SpectralPairs(att, cfg, int(t.max()) - 1, progress)
        return _curve(pairs, t, schedule_resolvent, float(cfg.lr), att.n_train)
    _check(cfg)
    if cfg.preconditioner != "none":
        raise ValueError("solver='cg' solves the unpreconditioned A; use solver='exact' with "
                         f"preconditioner={cfg.preconditioner!r}")
    from .cg import CgConfig, cg
    out = []
    for k in t:
        if k == 0:
            out.append(np.zeros((len(att.test_grads), len(att.train_grads))))
            continue
        lam = 1.0 / (cfg.lr * int(k)) + cfg.weight_decay
        c = CgConfig(damping=lam, hessian=cfg.hessian, materialize=cfg.materialize,
                     memory_gb=cfg.memory_gb)
        out.append(cg(att, c) / att.n_train)
    return np.stack(out)


def configured_steps(att: Attributor, cfg: TrajectoryConfig) -> int:
    """The number of SGD steps :func:`trajectory` scores at: ``steps``, else round(epochs x K)."""
    _check(cfg)
    if cfg.steps is not None:
        return int(cfg.steps)
    return int(round(cfg.epochs * steps_per_epoch(att, cfg)))


def trajectory(att: Attributor, cfg: TrajectoryConfig = TrajectoryConfig()) -> np.ndarray:
    """Trajectory-matched influence at one amount of further training (``steps``, else
    ``epochs`` x ceil(n/B) SGD steps): scores[j, i] = (1/n) grad g(z_j)^T p_t(A) grad L(z_i)
    (module docstring); the whole curve is :func:`trajectory_curve`."""
    t = configured_steps(att, cfg)
    progress = att.problem.progress
    return trajectory_curve(att, cfg, [t], progress)[0]


def _further_training(cfg) -> dict:
    """The trajectory's fields from an experiment's further training (``cfg.further``: the gold
    standard's lr, epochs, steps, batch size and weight decay), scored at its end."""
    f = cfg.further
    return dict(lr=f.lr, epochs=f.epochs, steps=f.max_steps, batch_size=f.batch_size,
                weight_decay=f.weight_decay)


SPECS = (
    MethodSpec("trajectory", trajectory, TrajectoryConfig,
               "linearised SGD further training, (eta/n) sum_k (I-eta A)^k", paper=False,
               shared=("memory_gb",), from_experiment=_further_training,
               cost=lambda shape, cfg: trajectory_cost("trajectory", shape, cfg),
               large_model_skip="beyond the paper: its series needs full-batch Hessian "
                                "products, as CG's does; notebook 07 runs it per evaluation "
                                "point on the tabular datasets"),
)
