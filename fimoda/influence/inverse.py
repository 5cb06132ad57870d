"""Damped inverse-Hessian-gradient products (paper §4.3.3): CG, LiSSA, LiSSA-H and the dense
reference solve.

    scores[j, i] = grad g(z_j)^T (M + lambda I)^{-1} grad L(z_i)              (8) / (12)

with M the true Hessian H (eq. 8) or the Gauss-Newton Hessian G = Phi^T diag(l'') Phi (eq. 12) of
the training risk at theta^f.

Conventions
-----------
* **Which Hessian is damped.** ``risk="mean"`` (default): M is the Hessian of the *mean* training
  loss, H_R / n, as in torch-influence (the implementation the paper used for CG/LiSSA, App. D.4);
  lambda = lambda_G x grid[index] is then on the scale of a per-example curvature, and LiSSA's
  ``scale`` refers to the eigenvalues of H_R/n + lambda I. ``risk="sum"``: M = H_R, the Hessian of
  the sum R of docs/equations.md. The two are the same method with lambda_sum = n lambda_mean; scores differ
  by the positive factor n only. (On a Concrete final model, lambda_max(G/n) = 6.6, so the
  paper's LiSSA scale 10 is valid for the mean and would diverge for the sum, ~6100.)
* **Which side is solved.** (M + lambda I) is symmetric, so
  g_j^T A^{-1} l_i = (A^{-1} g_j)^T l_i = g_j^T (A^{-1} l_i). We solve for whichever of the T test
  gradients or the n' left-out gradients is fewer (test gradients on a tie: torch-influence's
  s_test), which gives the same numbers up to round-off (full-batch LiSSA's truncated series
  p(A) is also symmetric; stochastic LiSSA only in expectation).
* **Operators.** The Gauss-Newton matrix is "materialised" when the full-training-set output-
  gradient matrix Phi (n x P) fits in ``memory_gb`` (``materialize="auto"``): with
  a = diag(sqrt(l''/c)) Phi, G/c = a^T a, and (fitted once per model, :func:`gauss_newton_kernel`)
  its n x n Gram matrix K = a a^T. For n <= P, CG runs on the equivalent n-dimensional system
  (K + lambda I) Y = a B, X = (B - a^T Y) / lambda (Woodbury), stopping on the exact residual
  of X in R^P (:func:`cg_dual`), and the exact solve is the Woodbury formula with a Cholesky
  factor of K + lambda I. Full-batch LiSSA's truncated series is a fixed polynomial p of
  A = G/c + lambda I, evaluated in closed form from K's eigen-decomposition,
  p(A) B = p(lambda) B + a^T U diag((p(e + lambda) - p(lambda)) / e) U^T a B, with the
  recurrence's divergence test (:func:`lissa_kernel`, :func:`lissa_diagonal`). For n > P the same
  is done with the spectrum G/c = V^T diag(e) V (orthonormal rows V, :func:`gauss_newton_spectrum`),
  in which A is diagonal, diag(e + lambda) on span(V) and lambda on its complement: a block of
  right-hand sides B is represented by its coordinates (V B, Q^T B) in an orthonormal basis
  [V; Q^T] of the invariant subspace span(V) + span(B), where CG runs the same recurrence
  (identical iterates, residuals and norms in exact arithmetic, O((r + k) k) per iteration
  instead of O(n P k)) and LiSSA's series is diagonal. Otherwise (and always for
  the true Hessian) a block of right-hand sides is multiplied by :func:`block_products`: per data
  chunk, the autograd graph of the gradient is built once and differentiated once per column
  (reverse-over-reverse; cheaper than forward-over-reverse HVPs, looped or vmapped, and than the
  backward pass batched over the columns: ``benchmarks/hessian_products.py``).
* **Full-batch LiSSA through products** (the true Hessian, or a Gauss-Newton matrix too large to
  materialise): the same truncated series is evaluated in a block Krylov subspace
  (:func:`krylov_lissa_solve`): exact once the subspace holds it, otherwise converged like CG, so
  the paper's depth 5000 costs a few dozen block products instead of 5000 (on the true Hessian
  of a Concrete MLP with 100 right-hand sides, a dozen blocks).
  ``full_batch="recurrence"`` keeps the plain recurrence (the reference).
* **Block CG.** By default (``cg_block=True``) CG solves all k right-hand sides together
  (O'Leary 1980, in the breakdown-free form of Ji & Li 2017): one block Krylov space shared by
  the k columns, so each step's k products serve every column and far fewer steps are needed
  than by k independent CG runs (true Hessian of a Concrete MLP, k = 100, tol 1e-8: 8 steps
  instead of 42). ``cg_block=False`` runs k independent CG recurrences
  (the textbook method, kept as the reference).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..gradients import Problem, loss_derivatives
from ..config import MethodConfig
from .common import Attributor, damping_value
from .errors import (LissaDivergedError, MemoryBudgetError, NotConvergedError,
                     NotPositiveDefiniteError)

HESSIANS = ("gn", "true")
RISKS = ("mean", "sum")
MATERIALIZE = ("auto", "always", "never")
FULL_BATCH = ("krylov", "recurrence")
# below this depth the recurrence's depth block products cost less than the Krylov evaluation's
# up to depth + 1 blocks and its re-orthogonalisation (Concrete MLP, depth 5: 2.8 s vs 4.2 s)
KRYLOV_MIN_DEPTH = 10


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class DampedConfig:
    """Fields shared by every method that inverts a damped Hessian.

    lambda = ``damping`` if given, else ``att.lambda_G * damping_grid[damping_index]``.
    ``risk``: "mean" | "sum" (see the module docstring). ``materialize``: "auto" | "always" |
    "never" (Gauss-Newton only); ``memory_gb``: budget for the materialised Phi and its
    eigen-decomposition (and for dense P x P matrices).
    """
    damping_grid: tuple = MethodConfig.damping_grid   # lambda = lambda_G x grid[index]
    damping_index: int = MethodConfig.damping_index   # the paper's: the largest
    damping: Optional[float] = None
    risk: str = "mean"
    materialize: str = "auto"
    memory_gb: float = 2.0


@dataclass(frozen=True)
class CgConfig(DampedConfig):
    """CG on (G + lambda I) (paper: Gauss-Newton only; ``hessian="true"`` also works when H +
    lambda I is positive definite). ``tol``: relative residual ||b - A x|| / ||b|| per right-hand
    side (None: 1e-8 in float64, 1e-5 in lower precision). ``max_iter``: CG steps in total.
    ``cg_block``: block CG over all right-hand sides (default) or one CG recurrence per column
    (see :func:`cg_solve`); both stop at the same per-column tolerance."""
    hessian: str = "gn"
    tol: Optional[float] = None
    max_iter: int = 2000
    cg_block: bool = True


@dataclass(frozen=True)
class LissaConfig(DampedConfig):
    """LiSSA (agarwal2017second) as in torch-influence: v_0 = b,
    v_{t+1} = b + (I - (M + lambda I)/scale) v_t, result v_depth / scale, averaged over ``repeat``.
    ``batch_size=None``: full-batch products (what the paper's tabular runs used); an integer:
    stochastic LiSSA with one seeded random batch of the training set per step. ``divergence_factor``:
    see :func:`lissa_solve`. ``scale_grid``: if non-empty and LiSSA diverges at ``scale``, retry with
    the larger values of the grid in increasing order (the paper's choice: the smallest scale
    that did not diverge; default: the paper's grid 10, 20, 50, ..., 500); a warning names the
    scale used. Empty: raise instead.
    ``full_batch``: how a full-batch run through Hessian-vector products is evaluated (the
    materialised Gauss-Newton matrix always runs the recurrence in its exact spectral
    coordinates): "krylov" (default) computes the same truncated series in a block Krylov
    subspace (:func:`krylov_lissa_solve`; exact once the subspace holds it, else to relative
    change ``krylov_tol``, default 1e-8 in float64), "recurrence" applies the recurrence with
    ``depth`` products (the reference; also used for depths below ``KRYLOV_MIN_DEPTH`` = 10, and
    when the Krylov basis would not fit in ``memory_gb``)."""
    depth: int = 5000
    repeat: int = 1
    scale: float = 10.0
    scale_grid: tuple = MethodConfig.lissa_scale_grid
    batch_size: Optional[int] = None
    seed: int = 0
    divergence_factor: float = 100.0
    full_batch: str = "krylov"
    krylov_tol: Optional[float] = None


@dataclass(frozen=True)
class LissaHConfig(LissaConfig):
    """LiSSA on the damped *true* Hessian (LiSSA-H, eq. 8); same fields as :class:`LissaConfig`."""


@dataclass(frozen=True)
class DenseConfig(DampedConfig):
    """Exact solve with the damped ``hessian`` ("gn": eq. 12, "true": eq. 8) — the reference."""
    hessian: str = "gn"


# ----------------------------------------------------------------------------- the operator
def check_damped(cfg: DampedConfig, hessian: str) -> None:
    """ValueError naming the first invalid field of a :class:`DampedConfig` (nothing computed)."""
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    if cfg.risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {cfg.risk!r}")
    if cfg.materialize not in MATERIALIZE:
        raise ValueError(f"materialize must be one of {MATERIALIZE}, got {cfg.materialize!r}")
    if cfg.memory_gb <= 0:
        raise ValueError(f"memory_gb must be positive, got {cfg.memory_gb}")
    if cfg.damping is None and not -len(cfg.damping_grid) <= cfg.damping_index < len(cfg.damping_grid):
        raise ValueError(f"damping_index {cfg.damping_index} is outside damping_grid "
                         f"{cfg.damping_grid}")


def block_products(problem: Problem, X: torch.Tensor, Y: torch.Tensor, V: torch.Tensor,
                   hessian: str) -> torch.Tensor:
    """M V for a (P, k) block, M = sum over the rows of (X, Y) of the per-example Hessian:
    "true": grad^2 L(z) (column j: the gradient of grad L . v_j, reverse over reverse);
    "gn": l''(f) grad f grad f^T (J v_j as the derivative in u of J^T u, then J^T (l'' J v_j)).
    Chunks of ``problem.batch_size`` rows (text: groups of similar length); one graph per chunk,
    one backward pass per column."""
    params = {n: t.detach().requires_grad_(True) for n, t in problem.params.items()}
    plist = [params[n] for n in problem.names]
    flat = lambda gs: torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1)
                                 for g, q in zip(gs, plist)])
    out = torch.zeros_like(V)
    for s in problem.groups(X, problem.batch_size):
        x, y = problem.trim(X[s]), Y[s]
        with torch.enable_grad():
            if hessian == "true":
                loss = problem.loss(params, x, y).sum()
                g = flat(torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True))
                for j in range(V.shape[1]):
                    out[:, j] += flat(torch.autograd.grad(g, plist, grad_outputs=V[:, j],
                                                          retain_graph=True, allow_unused=True))
            else:
                f = problem.f(params, x, y)
                _, d2 = loss_derivatives(f.detach(), y, problem.task)
                u = torch.zeros_like(f, requires_grad=True)
                jtu = flat(torch.autograd.grad(f, plist, grad_outputs=u, create_graph=True,
                                               allow_unused=True))
                for j in range(V.shape[1]):
                    jv = torch.autograd.grad(jtu, u, grad_outputs=V[:, j], retain_graph=True)[0]
                    out[:, j] += flat(torch.autograd.grad(f, plist, grad_outputs=d2 * jv,
                                                          retain_graph=True, allow_unused=True))
    return out


@dataclass
class Spectral:
    """G/c = basis^T diag(eig) basis with orthonormal rows ``basis`` (r, P), eig > 0."""
    basis: torch.Tensor
    eig: torch.Tensor


def work_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """float64 for the spectrum wherever the device has it: the Gram matrix squares the
    condition number, which float32 cannot afford (its round-off, ~1e-7 ||G||, exceeds typical
    dampings); the result is cast back to the model's dtype."""
    return dtype if torch.device(device).type == "mps" else torch.float64


def gram_spectrum(a: torch.Tensor, K: Optional[torch.Tensor] = None) -> Spectral:
    """a^T a = basis^T diag(eig) basis for a (n, P) matrix a, by symmetric eigen-decompositions
    (an SVD of the n x P matrix gives the same spectrum at several times the cost: 12 s vs 2 s
    for n = 927, P = 17,793 on one CPU thread).

    n <= P: K = a a^T = U diag(e) U^T (n x n), and with B = diag(e^{-1/2}) U^T a,
    a^T a = a^T U U^T a = B^T diag(e) B -- an identity for any orthonormal U, so it holds to
    round-off whatever the accuracy of the eigenvectors. The rows of B are orthonormal only up to
    ~||dK|| / sqrt(e_i e_j) (dK: the round-off of K), so B is re-orthonormalised: with
    B B^T = Q diag(s) Q^T, the rows of B_o = diag(s^{-1/2}) Q^T B are orthonormal and
    B = Q diag(s^{1/2}) B_o, hence a^T a = B_o^T M B_o with M = diag(s^{1/2}) Q^T diag(e) Q
    diag(s^{1/2}) (r x r); M = W diag(eig) W^T gives basis = W^T B_o (Rayleigh-Ritz).
    n > P: the P x P matrix a^T a directly.

    Eigenvalues e <= e_max m eps (m = min(n, P), the order of K) are dropped: that is numpy's
    matrix_rank tolerance for K, the size of the perturbation for which eigh's result is exact,
    so they are indistinguishable from 0 (and dividing by sqrt(e) would amplify noise into B).
    A dropped direction is then treated as an exact null direction of G, on which
    (G/c + lambda I)^{-1} acts as 1/lambda: relative error e/(e + lambda) <= m eps e_max / lambda
    <= m eps cond(G/c + lambda I), the worst-case error of a dense solve of the damped matrix
    (an SVD of a would resolve e to ~eps sqrt(e e_max) instead; in float64 this matters only
    for dampings near e_max m eps, where no dense solve is accurate either).
    Eigenvalues come out in decreasing order. ``K``: a a^T when already computed."""
    n, P = a.shape
    eps = torch.finfo(a.dtype).eps
    cut = lambda e: e > e.max().clamp_min(0) * min(n, P) * eps
    if n > P:
        e, V = torch.linalg.eigh(a.T @ a)
        keep = cut(e)
        return Spectral(basis=V[:, keep].T.flip(0).contiguous(), eig=e[keep].flip(0))
    e, U = torch.linalg.eigh(gram(a) if K is None else K)
    keep = cut(e)
    e, U = e[keep], U[:, keep]
    if len(e) == 0:
        return Spectral(basis=a.new_zeros(0, P), eig=e)
    B = (U / e.sqrt()).T @ a                               # (r, P), a^T a = B^T diag(e) B
    s, Q = torch.linalg.eigh(B @ B.T)                     # ~1: B's rows are nearly orthonormal
    ok = s > s.max() * len(s) * eps
    s, Q = s[ok], Q[:, ok]
    R = s.sqrt()[:, None] * Q.T                            # B = Q diag(s^1/2) B_o = R^T B_o
    M = R @ (e[:, None] * R.T)
    eig, W = torch.linalg.eigh(0.5 * (M + M.T))
    T = (W.T @ (Q / s.sqrt()).T).flip(0)                   # basis = W^T B_o = T B
    if T.shape[0] < B.shape[0]:                            # rows of B were dependent (rare)
        return Spectral(basis=T @ B, eig=eig.clamp_min(0).flip(0))
    for j in range(0, P, 4096):                            # in place: no third r x P array
        B[:, j:j + 4096] = T @ B[:, j:j + 4096]
    return Spectral(basis=B, eig=eig.clamp_min(0).flip(0))


@dataclass
class Kernel:
    """G/c = a^T a for the (n, P) matrix a = diag(sqrt(l''/c)) Phi (Phi: output gradients of the
    whole training set), with its n x n Gram matrix K = a a^T (None when n > P); both in
    :func:`work_dtype`."""
    a: torch.Tensor
    K: Optional[torch.Tensor]
    _eig: Optional[tuple] = None

    def eig(self):
        """(e, U): eigen-decomposition of K, eigenvalues <= e_max n eps dropped (as in
        :func:`gram_spectrum`: indistinguishable from 0). Computed once."""
        if self._eig is None:
            e, U = torch.linalg.eigh(self.K)
            keep = e > e.max().clamp_min(0) * len(e) * torch.finfo(e.dtype).eps
            self._eig = (e[keep], U[:, keep])
        return self._eig


def gram(a: torch.Tensor) -> torch.Tensor:
    """a a^T for an (n, P) matrix, from the blocks on and below the diagonal only (~2/3 of the
    full product's flops for four row blocks), mirrored: exactly symmetric."""
    n = len(a)
    K = a.new_empty(n, n)
    step = max(256, -(-n // 4))
    for i in range(0, n, step):
        j = min(i + step, n)
        K[i:j, :j] = a[i:j] @ a[:j].T
        K[:i, i:j] = K[i:j, :i].T
    return torch.tril(K) + torch.tril(K, -1).T


def gauss_newton_kernel(att: Attributor, c: float) -> Kernel:
    """a and K = a a^T of the materialised G/c (fitted once per Attributor and c, kept in
    ``att.fitted``)."""
    cache = att.fitted.setdefault("gauss_newton_kernel", {})
    if c not in cache:
        p = att.problem
        phi, _, _, d2 = p.gn_pieces(p.X, p.Y, desc="materialising Phi")
        if bool((d2 < 0).any()):
            raise ValueError("l'' < 0: the loss is not convex in f, Gauss-Newton is not PSD")
        w = work_dtype(phi.dtype, phi.device)
        a = phi.to(w).mul_(torch.sqrt(d2.to(w) / c)[:, None])    # in place when phi is in w
        del phi
        cache[c] = Kernel(a=a, K=gram(a) if len(a) <= a.shape[1] else None)
    return cache[c]


def gauss_newton_spectrum(att: Attributor, c: float) -> Spectral:
    """Exact eigen-decomposition of G/c = a^T a (:func:`gram_spectrum` of the kernel's a and K;
    computed in :func:`work_dtype`, fitted once per Attributor and c, kept in ``att.fitted``)."""
    cache = att.fitted.setdefault("gauss_newton_spectrum", {})
    if c not in cache:
        kern = gauss_newton_kernel(att, c)
        sp = gram_spectrum(kern.a, kern.K)
        dt = att.problem.dtype
        cache[c] = Spectral(basis=sp.basis.to(dt), eig=sp.eig.to(dt))
    return cache[c]


class DampedHessian:
    """A = M/c + lambda I with M = H_R ("true") or G_R ("gn") of the sum risk R at theta^f and
    c = n ("mean") or 1 ("sum"). ``matmat`` applies A to a (P, k) block."""

    def __init__(self, att: Attributor, hessian: str, lam: float, risk: str = "mean",
                 materialize: str = "auto", memory_gb: float = 2.0):
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
        if not np.isfinite(lam):
            raise ValueError(f"damping must be finite, got {lam}")
        self.att, self.problem, self.hessian, self.lam = att, att.problem, hessian, float(lam)
        self.P, self.n = self.problem.n_params, att.n_train
        self.c = float(self.n) if risk == "mean" else 1.0
        self.memory_gb = memory_gb
        self.dtype, self.device = self.problem.dtype, self.problem.device
        self.materialized = False
        self.kernel: Optional[Kernel] = None          # a and K = a a^T when n <= P
        self._spectral: Optional[Spectral] = None
        if hessian == "gn" and materialize != "never":
            # peak with the spectrum: a and its basis (n x P), K and U (n x n), work dtype
            work = torch.finfo(work_dtype(self.dtype, self.device)).bits // 8
            m = min(self.n, self.P)
            fits = (2 * self.n * self.P + 2 * m * m) * work <= memory_gb * 2 ** 30
            if materialize == "always" or fits:
                self.materialized = True
                if self.n <= self.P:
                    self.kernel = gauss_newton_kernel(att, self.c)

    @property
    def spectral(self) -> Optional[Spectral]:
        """The exact eigen-decomposition of the materialised G/c (None otherwise), computed on
        first use and cached per model."""
        if self.materialized and self._spectral is None:
            self._spectral = gauss_newton_spectrum(self.att, self.c)
        return self._spectral

    # -- products
    def hess(self, V: torch.Tensor) -> torch.Tensor:
        """(M/c) V for a (P, k) block (undamped)."""
        if self.kernel is not None:
            a = self.kernel.a
            return (a.T @ (a @ V.to(a.dtype))).to(V.dtype)
        if self.spectral is not None:
            B, e = self.spectral.basis, self.spectral.eig
            return B.T @ (e[:, None] * (B @ V))
        p = self.problem
        return block_products(p, p.X, p.Y, V, self.hessian) / self.c

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.hess(V) + self.lam * V

    def batch_hess(self, V: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Unbiased estimate of (M/c) V from the training rows ``idx``: (n/|B|) M_B V / c."""
        if self.kernel is not None:       # rows of the materialised a: a_B^T a_B V, exactly
            a = self.kernel.a[idx]
            return (a.T @ (a @ V.to(a.dtype))).to(V.dtype) * (self.n / len(idx))
        p = self.problem
        item = torch.finfo(self.dtype).bits // 8
        fits = len(idx) * self.P * item <= self.memory_gb * 2 ** 30
        if self.hessian == "gn" and V.shape[1] > 2 and fits:
            # the batch's own rows of a: one per-example pass instead of two backward passes per
            # column of V (k test points: 2k passes)
            phi, _, _, d2 = p.gn_pieces(p.X[idx], p.Y[idx], desc=None)
            phi.mul_(torch.sqrt(d2 * (self.n / (len(idx) * self.c)))[:, None])
            return phi.T @ (phi @ V)
        out = block_products(p, p.X[idx], p.Y[idx], V, self.hessian)
        return out * (self.n / (len(idx) * self.c))

    # -- exact
    def dense(self) -> torch.Tensor:
        """A as a P x P matrix (small models only)."""
        need = 2 * self.P ** 2 * (torch.finfo(self.dtype).bits // 8)
        if need > self.memory_gb * 2 ** 30:
            raise MemoryBudgetError(f"a dense {self.P} x {self.P} Hessian needs "
                                    f"{need / 2**30:.1f} GiB > memory_gb={self.memory_gb}; "
                                    f"use an iterative method (cg, lissa)")
        eye = torch.eye(self.P, dtype=self.dtype, device=self.device)
        M = self.hess(eye)
        return 0.5 * (M + M.T) + self.lam * eye

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """A^{-1} B exactly: when G is materialised with n <= P, the Woodbury identity
        (a^T a + lambda I)^{-1} B = (B - a^T (K + lambda I)^{-1} a B) / lambda (an n x n
        Cholesky solve); for n > P the spectral formula; else a dense solve."""
        if self.lam <= 0:
            raise ValueError(f"damping must be positive for an inverse, got {self.lam}")
        if self.kernel is not None:
            a, K = self.kernel.a, self.kernel.K
            Bw = B.to(a.dtype)
            return ((Bw - a.T @ kernel_solve(K, self.lam, a @ Bw)) / self.lam).to(B.dtype)
        if self.spectral is not None:
            V, e = self.spectral.basis, self.spectral.eig
            C = V @ B
            return V.T @ (C / (e + self.lam)[:, None]) + (B - V.T @ C) / self.lam
        return torch.linalg.solve(self.dense(), B)

    # -- the invariant-subspace coordinates of the materialised case
    def coords(self, B: torch.Tensor):
        """(Z, diag, decode): coordinates Z ((r + m), k) of B's columns in the orthonormal basis
        [V; Q^T] of span(V) + span(B) (Q, P x m: an orthonormal basis of the parts of B's
        columns orthogonal to span(V)), the diagonal of A in it, and the map back to (P, k)."""
        V, e = self.spectral.basis, self.spectral.eig
        C = V @ B
        perp = B - V.T @ C
        Q = orth(perp, rtol=max(perp.shape) * torch.finfo(B.dtype).eps)
        Z = torch.cat([C, Q.T @ perp], dim=0)
        diag = torch.cat([e + self.lam, e.new_full((Q.shape[1],), self.lam)])
        r = len(e)
        decode = lambda Zs: V.T @ Zs[:r] + Q @ Zs[r:]
        return Z, diag, decode


# ----------------------------------------------------------------------------- solvers
def default_tol(dtype: torch.dtype) -> float:
    """CG's default relative residual: 1e-8 in float64; 1e-5 where 1e-8 is below round-off."""
    return 1e-8 if dtype == torch.float64 else 1e-5


def orth(Z: torch.Tensor, rtol: float) -> torch.Tensor:
    """Orthonormal basis (P, m) of the span of Z's columns, each first scaled to unit norm (so
    that a small column counts as much as a large one); directions whose singular value is
    <= rtol x the largest are dropped (rank-revealing SVD, the ``orth`` of breakdown-free block
    CG). Zero columns are ignored."""
    norms = Z.norm(dim=0)
    nz = norms > 0
    if not bool(nz.any()):
        return Z[:, :0]
    U, sv, _ = torch.linalg.svd(Z[:, nz] / norms[nz], full_matrices=False)
    return U[:, sv > rtol * sv[0]]


def block_drop_tol(dtype: torch.dtype) -> float:
    """Block CG drops search directions weaker than this (relative, see :func:`orth`): sqrt(eps),
    below which a direction of R + P beta is dominated by the cancellation round-off of forming
    it. Dropping one only defers its component of the residual to the next step."""
    return float(torch.finfo(dtype).eps) ** 0.5


def _not_pd():
    return NotPositiveDefiniteError("CG met a search direction with p^T A p <= 0: the damped "
                                    "Hessian is not positive definite; increase the damping or "
                                    "use a dense solve")


def _cg_columns(matmat, X, R, bnorm, tol, budget, bar, norm=None):
    """Per-column CG from (X, R): x += alpha p, r -= alpha A p, p = r + (r_new^T r_new / r^T r) p
    with alpha = r^T r / p^T A p, every column its own recurrence, all active columns multiplied
    in one block; a column stops when ``norm`` of its residual (default: its 2-norm) is at most
    tol x bnorm. Updates X, R in place; returns (steps, products)."""
    norm = norm or (lambda Z: Z.norm(dim=0))
    Pd, rs = R.clone(), (R * R).sum(0)
    thresh = tol * bnorm
    live = norm(R) > thresh
    steps = products = 0
    while bool(live.any()) and steps < budget:
        cols = torch.nonzero(live).flatten()
        AP = matmat(Pd[:, cols])
        pap = (Pd[:, cols] * AP).sum(0)
        if not bool(torch.isfinite(pap).all()):
            raise FloatingPointError("CG: non-finite Hessian-vector products")
        if bool((pap <= 0).any()):
            raise _not_pd()
        alpha = rs[cols] / pap
        X[:, cols] += alpha * Pd[:, cols]
        R[:, cols] -= alpha * AP
        rs_new = (R[:, cols] ** 2).sum(0)
        Pd[:, cols] = R[:, cols] + (rs_new / rs[cols]) * Pd[:, cols]
        rs[cols] = rs_new
        live[cols] = norm(R[:, cols]) > thresh[cols]
        steps, products = steps + 1, products + len(cols)
        bar.update(1)
    return steps, products


def _cg_block(matmat, X, R, bnorm, tol, budget, bar, norm=None):
    """Breakdown-free block CG (O'Leary 1980; Ji & Li 2017) from (X, R), with deflation:

        P_0 = orth(R_0);  Q = A P;  alpha = (P^T Q)^{-1} P^T R;  X += P alpha;  R -= Q alpha;
        beta = -(P^T Q)^{-1} Q^T R;  P = orth(R + P beta),

    R restricted to the columns not yet converged (||r_j|| > tol ||b_j||), P with orthonormal
    columns (so P^T A P is well conditioned whenever A is, and rank deficiency of R + P beta
    drops directions instead of breaking down). P^T A P must be positive definite (Cholesky):
    a failure means A is not. Updates X, R in place; returns (steps, products)."""
    norm = norm or (lambda Z: Z.norm(dim=0))
    active = torch.nonzero(norm(R) > tol * bnorm).flatten()
    drop = block_drop_tol(R.dtype)
    Ra = R[:, active]
    Pd = orth(Ra, drop)
    steps = products = 0
    while len(active) and Pd.shape[1] and steps < budget:
        AP = matmat(Pd)
        steps, products = steps + 1, products + Pd.shape[1]
        bar.update(1)
        C = Pd.T @ AP
        if not bool(torch.isfinite(C).all()):
            raise FloatingPointError("CG: non-finite Hessian-vector products")
        L, info = torch.linalg.cholesky_ex(0.5 * (C + C.T))
        if int(info) != 0:
            raise _not_pd()
        alpha = torch.cholesky_solve(Pd.T @ Ra, L)
        X[:, active] += Pd @ alpha
        Ra = Ra - AP @ alpha
        R[:, active] = Ra
        live = norm(Ra) > tol * bnorm[active]
        active, Ra = active[live], Ra[:, live]
        if len(active) == 0 or steps >= budget:
            break
        beta = -torch.cholesky_solve(AP.T @ Ra, L)
        Pd = orth(Ra + Pd @ beta, drop)
    return steps, products


def cg_solve(matmat: Callable, B: torch.Tensor, tol: float = 1e-8, max_iter: int = 2000,
             progress: bool = True, desc: str = "CG", block: bool = True,
             norm: Optional[Callable] = None, true_norm: Optional[Callable] = None,
             ref: Optional[torch.Tensor] = None):
    """Solve A X = B for a symmetric positive definite A (x_0 = 0).

    ``block=True``: breakdown-free block CG over all k columns (:func:`_cg_block`; each step
    applies A to an orthonormal search block of at most k columns); ``block=False``: k independent
    CG recurrences run in lockstep (:func:`_cg_columns`; each step applies A to the block of
    still-active columns). Either way a column is converged when its *true* residual satisfies
    ||b - A x|| <= tol ||b||: after the recursive residuals converge, B - A X is recomputed for the
    columns that moved and CG restarted from X on those that drifted.
    ``norm`` / ``true_norm`` / ``ref`` (default: column 2-norms of the residual, and of B) change
    what "converged" measures: column j is converged when true_norm(B - A X)_j <= tol ref_j
    (``norm``, default ``true_norm``, is the cheaper estimate used inside the recurrences); the
    recurrences themselves are CG's, whatever the norms.
    Returns (X, info) with info = {"iterations" (CG steps: products with a block),
    "products" (matrix-vector products, restarts and residual checks included),
    "rel_residual" (per column, numpy), "columns", "block"}.
    Raises :class:`NotConvergedError` after ``max_iter`` steps and
    :class:`NotPositiveDefiniteError` (a ValueError) if A is found not positive definite
    (p^T A p <= 0, or P^T A P not positive definite in block CG).
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    k = B.shape[1]
    true_norm = true_norm or (lambda Z: Z.norm(dim=0))
    norm = norm or true_norm
    bnorm = B.norm(dim=0) if ref is None else ref
    safe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    X = torch.zeros_like(B)
    R = B.clone()
    it = products = 0
    run = _cg_block if block else _cg_columns
    # CG stops when the residual does, usually long before max_iter: the bar counts steps and
    # shows their rate, with no total (max_iter as a total would give a meaningless ETA)
    bar = tqdm(desc=f"{desc} ({k} right-hand sides)", unit="step", leave=False,
               disable=not progress)
    try:
        rnorm = norm(R)                       # X = 0: R = B exactly, the estimate suffices
        while True:
            moving = torch.nonzero(rnorm > tol * bnorm).flatten()
            if len(moving) == 0:
                break
            if it >= max_iter:
                rel = rnorm / safe
                raise NotConvergedError(
                    f"CG did not reach relative residual {tol:g} in {max_iter} steps "
                    f"(worst column: {float(rel.max()):.3g}); raise max_iter or the damping")
            Xm, Rm = X[:, moving], R[:, moving]
            steps, prods = run(matmat, Xm, Rm, bnorm[moving], tol, max_iter - it, bar, norm)
            X[:, moving] = Xm
            R[:, moving] = B[:, moving] - matmat(Xm)               # the true residual
            rnorm = true_norm(R)
            it, products = it + steps, products + prods + len(moving)
    finally:
        bar.close()
    rel = rnorm / safe
    return X, {"iterations": it, "products": products, "rel_residual": rel.cpu().numpy(),
               "columns": k, "block": block}


def _diverged(where: str, scale: float) -> str:
    """The message of a LiSSA divergence: what to change."""
    return (f"LiSSA diverged {where} with scale={scale:g}: increase `scale` or give a "
            f"`scale_grid` of larger scales to try (the scale must exceed half the largest "
            f"eigenvalue of the damped Hessian; the paper took the smallest of 10, 20, 50, 100, "
            f"200, ... that did not diverge), or the damping if the damped Hessian is not "
            f"positive definite")


def lissa_solve(matmat: Callable, B: torch.Tensor, scale: float, depth: int,
                divergence_factor: float = 100.0, stochastic: bool = False,
                lam: Optional[float] = None, progress: bool = True, desc: str = "LiSSA"):
    """LiSSA's truncated Neumann series for A^{-1} B:

        v_0 = b,   v_{t+1} = b + (I - A/scale) v_t  (t < depth),   result v_depth / scale.

    ``matmat(t, V)`` returns A V (step t: a batch estimate when stochastic). Divergence (raises
    :class:`LissaDivergedError`, never returns non-finite values): any non-finite iterate; full
    batch: an increment ||v_{t+1} - v_t|| above ``divergence_factor`` x the first one (for a
    convergent iteration, ||I - A/scale|| <= 1, the increments never grow); stochastic: an iterate
    above ``divergence_factor`` x (scale/lambda) ||b||, the bound of a convergent run with PSD A.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    V = B.clone()
    bnorm = B.norm(dim=0)
    inc0 = None
    bound = None
    if stochastic:
        bound = divergence_factor * max(1.0, scale / lam) * bnorm if lam and lam > 0 else None
    for t in tqdm(range(depth), desc=desc, leave=False, disable=not progress):
        Vn = B + V - matmat(t, V) / scale
        bad = not bool(torch.isfinite(Vn).all())
        if not bad and not stochastic:
            inc = (Vn - V).norm(dim=0)
            if inc0 is None:
                inc0 = inc
            bad = bool((inc > divergence_factor * inc0 + 1e-300).any())
        elif not bad and bound is not None:
            bad = bool((Vn.norm(dim=0) > bound).any())
        if bad:
            raise LissaDivergedError(_diverged(f"at step {t + 1}/{depth}", scale))
        V = Vn
    return V / scale


def lissa_diagonal(theta: torch.Tensor, Z: torch.Tensor, scale: float, depth: int,
                   divergence_factor: float = 100.0) -> torch.Tensor:
    """:func:`lissa_solve` for a diagonal matrix diag(theta), in closed form: row i of the result
    is p(theta_i) Z_i with p(x) = (1/scale) sum_{t<=depth} r^t, r = 1 - x/scale, i.e.
    (1 - r^(depth+1)) / x, computed as -expm1((depth+1) log1p(-x/scale)) / x for 0 <= r (no
    cancellation near x = 0; (depth+1)/scale at x = 0).

    Divergence is the recurrence's test, exactly: its increment at step t is R^(t+1) z_j for
    column j (R = diag(r)), and ||R^(t+1) z_j||^2 = sum_i r_i^(2t+2) z_ij^2 is convex in t, so it
    exceeds ``divergence_factor`` x its first value at some step iff it does at the last one,
    ||R^depth z_j|| > divergence_factor ||R z_j||; non-finite values are divergence too."""
    p = lissa_polynomial(theta, scale, depth, Z, divergence_factor)
    return p[:, None] * Z


def lissa_polynomial(theta: torch.Tensor, scale: float, depth: int, Z: torch.Tensor,
                     divergence_factor: float = 100.0) -> torch.Tensor:
    """p(theta) of :func:`lissa_diagonal`, after its divergence test on the coordinates Z."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    r = 1 - theta / scale
    with torch.no_grad():
        first = (r[:, None] * Z).norm(dim=0)
        last = (r.pow(depth)[:, None] * Z).norm(dim=0)
        bad = not bool(torch.isfinite(last).all()) or \
            bool((last > divergence_factor * first + 1e-300).any())
        pos = r >= 0
        x = torch.where(theta == 0, torch.ones_like(theta), theta)
        p_pos = -torch.expm1((depth + 1) * torch.log1p(-theta.clamp(max=scale) / scale)) / x
        p_neg = (1 - r.pow(depth + 1)) / x
        p = torch.where(pos, p_pos, p_neg)
        p = torch.where(theta == 0, torch.full_like(theta, (depth + 1) / scale), p)
    if bad or not bool(torch.isfinite(p).all()):
        raise LissaDivergedError(_diverged(f"within {depth} steps", scale))
    return p


def krylov_lissa_solve(matmat: Callable, B: torch.Tensor, scale: float, depth: int,
                       divergence_factor: float = 100.0, tol: Optional[float] = None,
                       max_cols: int = 4000, progress: bool = True, desc: str = "LiSSA"):
    """Full-batch LiSSA's output p(A) B, p(x) = (1/scale) sum_{t<=depth} (1 - x/scale)^t (what
    :func:`lissa_solve` returns for a fixed A), evaluated in a block Krylov subspace instead of
    by ``depth`` products with A.

    With Q an orthonormal basis of K_m(A, B) = span{B, AB, ..., A^{m-1} B} (block Lanczos with
    full re-orthogonalisation) and T = Q^T A Q, the Rayleigh-Ritz approximation
    p(A) B ~= Q p(T) Q^T B is EXACT once m > depth (p has degree depth, so p(A) B lies in
    K_{depth+1}) or once the subspace is invariant under A, and in between converges like the
    best polynomial approximation of p of degree m - 1 on A's spectrum -- for LiSSA's depths
    (5000 in the paper) after a few tens of blocks, like CG. p(T) is applied by running the
    same recurrence, with the same divergence test, on the eigen-coordinates of T, in closed form
    (:func:`lissa_diagonal`; a Ritz value outside (0, 2 scale) diverges as the corresponding
    eigen-direction of A would).
    Stops when the result changed by at most ``tol`` (relative, per column; default: CG's
    :func:`default_tol`) since the previous evaluation. Returns None when the basis would exceed
    ``max_cols`` columns (the caller then runs the recurrence). Raises
    :class:`LissaDivergedError` like :func:`lissa_solve`."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    tol = default_tol(B.dtype) if tol is None else tol
    P, k = B.shape
    cap = min(max_cols, P)
    drop = float(torch.finfo(B.dtype).eps) ** 0.75
    bnorm = B.norm(dim=0)
    if not bool((bnorm > 0).any()):
        return torch.zeros_like(B)

    def new_block(W, ref):
        """Orthonormal directions of W stronger than ``drop`` x ``ref`` (rank-revealing SVD),
        and whether the weakest is below 1e-4 x ref (then W is mostly cancellation)."""
        U, sv, _ = torch.linalg.svd(W, full_matrices=False)
        keep = sv > drop * ref
        return U[:, keep], bool(keep.any()) and float(sv[keep].min()) < 1e-4 * ref

    Q = B.new_empty(P, cap)
    T = B.new_zeros(cap, cap)
    Q0 = new_block(B, float(bnorm.max()))[0]
    if Q0.shape[1] > cap:
        return None
    n = Q0.shape[1]
    Q[:, :n] = Q0
    C0 = Q0.T @ B                                     # B = Q0 C0
    blocks = [(0, n)]
    X_prev, last_eval = None, 0

    def evaluate(m):
        theta, U = torch.linalg.eigh(0.5 * (T[:m, :m] + T[:m, :m].T))
        Z = U[:C0.shape[0]].T @ C0                    # coordinates of B in T's eigenbasis
        return Q[:, :m] @ (U @ lissa_diagonal(theta, Z, scale, depth, divergence_factor))

    bar = tqdm(desc=f"{desc} (Krylov blocks)", leave=False, disable=not progress)
    try:
        while True:
            s, e = blocks[-1]
            AQ = matmat(Q[:, s:e])
            if not bool(torch.isfinite(AQ).all()):
                raise FloatingPointError(f"{desc}: non-finite Hessian-vector products")
            bar.update(1)
            ref = float(AQ.norm(dim=0).max())
            W, C = AQ, 0
            for _ in range(2):                            # Gram-Schmidt, twice is enough
                c = Q[:, :e].T @ W
                W, C = W - Q[:, :e] @ c, C + c
            T[:e, s:e] = C
            T[s:e, :e] = C.T
            Qn, weak = new_block(W, ref) if ref > 0 else (W[:, :0], False)
            if weak:
                # W is partly cancellation round-off (a nearly invariant subspace): then its
                # normalised weak directions are not orthogonal to Q to working accuracy. Project
                # them once more (twice) and keep only those that survive with most of their
                # norm; the others lay in span(Q) already.
                for _ in range(2):
                    Qn = Qn - Q[:, :e] @ (Q[:, :e].T @ Qn)
                U_, sv, _ = torch.linalg.svd(Qn, full_matrices=False)
                Qn = U_[:, sv > 0.5]
            exact = Qn.shape[1] == 0 or len(blocks) >= depth + 1
            if not exact and e + Qn.shape[1] > cap:
                return None
            if not exact:
                e2 = e + Qn.shape[1]
                Q[:, e:e2] = Qn
                Cn = Qn.T @ W
                T[e:e2, s:e] = Cn
                T[s:e, e:e2] = Cn.T
                blocks.append((e, e2))
            # evaluate on the blocks whose T-columns are complete (all but a new one)
            if exact or e >= 1.25 * last_eval or e - last_eval >= 256:
                X = evaluate(e)
                last_eval = e
                if exact:
                    return X
                if X_prev is not None:
                    change = (X - X_prev).norm(dim=0)
                    if bool((change <= tol * X.norm(dim=0)).all()):
                        return X
                X_prev = X
    finally:
        bar.close()


# ----------------------------------------------------------------------------- score assembly
def scores_with(att: Attributor, solve: Callable, left: Optional[torch.Tensor] = None) -> np.ndarray:
    """scores[j, i] = grad g(z_j)^T A^{-1} left_i for a symmetric A given as ``solve(B) = A^{-1}B``
    on (P, k) blocks; ``left`` (n', P) defaults to the left-out loss gradients. Solves for the
    smaller side (see the module docstring)."""
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


def damped_hessian(att: Attributor, cfg: DampedConfig, hessian: str) -> DampedHessian:
    """A = M/c + lambda I of a config, lambda = damping_value(...) > 0 (validated first)."""
    check_damped(cfg, hessian)
    lam = damping_value(att, cfg.damping_grid, cfg.damping_index, cfg.damping)
    if not lam > 0:
        raise ValueError(f"damping must be positive, got lambda = {lam}")
    return DampedHessian(att, hessian, lam, cfg.risk, cfg.materialize, cfg.memory_gb)


def kernel_solve(K: torch.Tensor, lam: float, Z: torch.Tensor) -> torch.Tensor:
    """(K + lam I)^{-1} Z for a PSD K: Cholesky, or (if round-off made K + lam I indefinite)
    eigen-decomposition with K's negative round-off eigenvalues clamped to 0."""
    n = len(K)
    L, info = torch.linalg.cholesky_ex(K + lam * torch.eye(n, dtype=K.dtype, device=K.device))
    if int(info) == 0:
        return torch.cholesky_solve(Z, L)
    e, U = torch.linalg.eigh(K)
    return U @ ((U.T @ Z) / (e.clamp_min(0) + lam)[:, None])


def cg_dual(A: DampedHessian, B: torch.Tensor, tol: float, max_iter: int, desc: str = "CG",
            block: bool = True):
    """(a^T a + lambda I)^{-1} B by CG on the n-dimensional dual system of the materialised
    Gauss-Newton matrix (n <= P): the Woodbury identity gives
    X = (B - a^T Y) / lambda with (K + lambda I) Y = a B, K = a a^T, and the residual of X is
    exactly B - (a^T a + lambda I) X = -a^T S / lambda for the dual residual S = a B - (K + lambda
    I) Y. CG (block or per column) runs on the dual system and stops when that PRIMAL residual
    satisfies ||b_j - A x_j|| <= tol ||b_j|| for every column -- the criterion of CG on A itself
    (inside the recurrence estimated as sqrt(s^T K s) / lambda, the final check with a^T S
    formed). Each step costs an n x n product instead of two n x P ones, after K (computed once
    per model)."""
    a, K, lam = A.kernel.a, A.kernel.K, A.lam
    Bw = B.to(a.dtype)
    ref = Bw.norm(dim=0)
    # s^T K s = ||a^T s||^2 up to (P + n) eps tr(K) ||s||^2 (the round-off of K's length-P dot
    # products and of s^T (K s)): a column whose upper bound already meets the tolerance is
    # certified without forming a^T s (its reported residual is that upper bound)
    slack = (A.P + A.n) * float(torch.finfo(a.dtype).eps) * float(torch.trace(K))
    est = lambda S: (S * (K @ S)).sum(0).clamp_min(0).sqrt() / lam

    def certified(S):
        q = (S * (K @ S)).sum(0)
        upper = (q.clamp_min(0) + slack * (S * S).sum(0)).sqrt() / lam
        out = upper.clone()
        unsure = torch.nonzero(upper > tol * ref).flatten()
        if len(unsure):
            out[unsure] = (a.T @ S[:, unsure]).norm(dim=0) / lam
        return out

    Y, info = cg_solve(lambda Z: K @ Z + lam * Z, a @ Bw, tol, max_iter, A.problem.progress,
                       desc, block, norm=est, true_norm=certified, ref=ref)
    return ((Bw - a.T @ Y) / lam).to(B.dtype), info


def cg_inverse(A: DampedHessian, B: torch.Tensor, tol: Optional[float], max_iter: int,
               desc: str = "CG", block: bool = True):
    """(A^{-1} B, info) by :func:`cg_solve` (block CG unless ``block=False``) to relative residual
    ``tol``: on the dual system when G is materialised with n <= P (:func:`cg_dual`), in invariant-
    subspace coordinates when materialised with n > P (same iterates and residual norms, see the
    module docstring), else with Hessian-vector products."""
    tol = default_tol(A.dtype) if tol is None else tol
    progress = A.problem.progress
    if A.kernel is not None:
        return cg_dual(A, B, tol, max_iter, desc, block)
    if A.spectral is not None:
        Z, diag, decode = A.coords(B)
        Y, info = cg_solve(lambda W: diag[:, None] * W, Z, tol, max_iter, progress, desc, block)
        return decode(Y), info
    return cg_solve(A.matmat, B, tol, max_iter, progress, desc, block)


# ----------------------------------------------------------------------------- methods
def cg(att: Attributor, cfg: CgConfig = CgConfig()) -> np.ndarray:
    """CG (koh2017inffunc): scores = grad g(z_j)^T (G/c + lambda I)^{-1} grad L(z_i) (eq. 12;
    ``hessian="true"``: eq. 8), each solve to relative residual ``tol``."""
    if not isinstance(cfg.cg_block, bool):
        raise ValueError(f"cg_block must be True or False, got {cfg.cg_block!r}")
    A = damped_hessian(att, cfg, cfg.hessian)
    return scores_with(att, lambda B: cg_inverse(A, B, cfg.tol, cfg.max_iter,
                                                 block=cfg.cg_block)[0])


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
            out = scores_with(att, lambda B: _lissa_solve(A, B, replace(cfg, scale=scale),
                                                          stochastic, progress, desc))
        except LissaDivergedError:
            if i + 1 == len(scales):
                raise
            continue
        if i > 0:
            warnings.warn(f"{desc} diverged at scale {scales[:i]}; used scale={scale:g}")
        return out


def _lissa_solve(A: DampedHessian, B: torch.Tensor, cfg: LissaConfig, stochastic: bool,
                 progress: bool, desc: str) -> torch.Tensor:
    """A^{-1} B by LiSSA with the settings of ``cfg`` (see :class:`LissaConfig`)."""
    if not stochastic:                          # deterministic: every repeat is identical
        krylov = cfg.full_batch == "krylov" and cfg.depth >= KRYLOV_MIN_DEPTH
        # basis columns: at most half the memory budget, and 4000 (T's eigh stays cheap)
        item = torch.finfo(A.dtype).bits // 8
        cap = int(min(4000, cfg.memory_gb * 2 ** 30 / 2 / (A.P * item)))
        if A.kernel is not None:
            if krylov and kernel_eig_costlier(A, B.shape[1]):
                # the same series in a Krylov subspace of the kernel's cheap products
                X = krylov_lissa_solve(A.matmat, B, cfg.scale, cfg.depth, cfg.divergence_factor,
                                       cfg.krylov_tol, cap, progress, desc)
                if X is not None:
                    return X
            return lissa_kernel(A, B, cfg.scale, cfg.depth, cfg.divergence_factor)
        if A.spectral is not None:
            Z, diag, decode = A.coords(B)
            return decode(lissa_diagonal(diag, Z, cfg.scale, cfg.depth, cfg.divergence_factor))
        if krylov:
            X = krylov_lissa_solve(A.matmat, B, cfg.scale, cfg.depth, cfg.divergence_factor,
                                   cfg.krylov_tol, cap, progress, desc)
            if X is not None:
                return X
            warnings.warn(f"{desc}: the Krylov basis would exceed {cap} columns "
                          f"(memory_gb={cfg.memory_gb}); running the recurrence ({cfg.depth} "
                          f"products per column)")
        return lissa_solve(lambda t, W: A.matmat(W), B, cfg.scale, cfg.depth,
                           cfg.divergence_factor, progress=progress, desc=desc)

    total = torch.zeros_like(B)
    for r in range(cfg.repeat):
        gen = torch.Generator().manual_seed(cfg.seed + r)
        per_epoch = A.n // cfg.batch_size
        perm = {}

        def matmat(t, W):
            e = t // per_epoch
            if e not in perm:
                perm.clear()
                perm[e] = torch.randperm(A.n, generator=gen)
            s = (t % per_epoch) * cfg.batch_size
            idx = perm[e][s:s + cfg.batch_size].to(A.device)
            return A.batch_hess(W, idx) + A.lam * W

        total += lissa_solve(matmat, B, cfg.scale, cfg.depth, cfg.divergence_factor,
                             stochastic=True, lam=A.lam, progress=progress, desc=desc)
    return total / cfg.repeat


# Cost model of the two exact evaluations of full-batch LiSSA on the materialised kernel, in
# matmul-equivalent flops: a symmetric eigen-decomposition with eigenvectors is ~9 n^3 flops run
# at a fraction of the matmul rate (tridiagonal reduction is memory-bound), counted as 5x; a
# Krylov block costs the product a^T (a V): 4 n P k flops, and the series at the paper's dampings
# needs a few dozen blocks (KRYLOV_BLOCKS_EXPECTED), plus the orthogonalisation against the basis.
EIGH_FLOP_FACTOR = 9 * 5
KRYLOV_BLOCKS_EXPECTED = 30


def kernel_eig_costlier(A: "DampedHessian", k: int) -> bool:
    """True when K's eigen-decomposition (not yet computed) is expected to cost more than a
    Krylov evaluation of the series for k right-hand sides (see the cost model above)."""
    kern = A.kernel
    if kern is None or kern._eig is not None:
        return False
    n, P = kern.a.shape
    eig = EIGH_FLOP_FACTOR * float(n) ** 3
    m = KRYLOV_BLOCKS_EXPECTED * k                      # basis columns
    krylov = KRYLOV_BLOCKS_EXPECTED * 4.0 * n * P * k + 4.0 * P * m * m
    return eig > krylov


def lissa_kernel(A: DampedHessian, B: torch.Tensor, scale: float, depth: int,
                 divergence_factor: float = 100.0) -> torch.Tensor:
    """Full-batch LiSSA's series p(A) B for the materialised A = a^T a + lambda I (n <= P), from
    the eigen-decomposition K = U diag(e) U^T of the n x n kernel only: for any f,
    a^T f(a a^T) a = (x f(x))(a^T a), so with f(e) = (p(e + lambda) - p(lambda)) / e

        p(A) B = p(lambda) B + a^T U diag(f(e)) U^T (a B)

    (f is a divided difference: bounded, and its round-off is damped by the sqrt(e) sizes of
    a^T U and U^T a B). The divergence test of :func:`lissa_diagonal` runs on the coordinates of
    B in the eigenbasis of A: V B = diag(e^-1/2) U^T a B on span(V) (eigenvalues e + lambda) and
    the norm of the rest (eigenvalue lambda)."""
    a, lam = A.kernel.a, A.lam
    e, U = A.kernel.eig()
    Bw = B.to(a.dtype)
    C = U.T @ (a @ Bw)                                     # diag(sqrt e) V B
    VB = C / e.sqrt()[:, None]
    perp = ((Bw * Bw).sum(0) - (VB * VB).sum(0)).clamp_min(0).sqrt()
    theta = torch.cat([e + lam, e.new_tensor([lam])])
    p = lissa_polynomial(theta, scale, depth, torch.cat([VB, perp[None]]), divergence_factor)
    f = (p[:-1] - p[-1]) / e
    return (p[-1] * Bw + a.T @ (U @ (f[:, None] * C))).to(B.dtype)


def lissa(att: Attributor, cfg: LissaConfig = LissaConfig()) -> np.ndarray:
    """LiSSA on the damped Gauss-Newton Hessian (eq. 12): scores = grad g(z_j)^T v, where v is
    the LiSSA estimate of (G/c + lambda I)^{-1} grad L(z_i) (see :func:`lissa_solve`)."""
    return _lissa(att, cfg, "gn", "LiSSA")


def lissa_h(att: Attributor, cfg: LissaHConfig = LissaHConfig()) -> np.ndarray:
    """LiSSA-H: LiSSA on the damped true Hessian (eq. 8), (H/c + lambda I)^{-1} grad L(z_i)."""
    return _lissa(att, cfg, "true", "LiSSA-H")


def dense(att: Attributor, cfg: DenseConfig = DenseConfig()) -> np.ndarray:
    """Exact reference: scores = grad g(z_j)^T (M/c + lambda I)^{-1} grad L(z_i) with M = G
    (eq. 12) or H (eq. 8), by a dense solve (or the exact spectral formula of the materialised
    Gauss-Newton matrix)."""
    A = damped_hessian(att, cfg, cfg.hessian)
    return scores_with(att, A.solve)
