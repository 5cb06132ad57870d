"""The damped Hessian and Gauss-Newton operators of the influence methods (paper §4.3.3)

    A = M/c + lambda I

with M the true Hessian H (eq. 8) or the Gauss-Newton Hessian G = Phi^T diag(l'') Phi (eq. 12) of
the training risk at theta^f; the solvers (:mod:`.solvers`) invert A, the method modules say
which A and which solver a method uses.

Conventions
-----------
* **Which Hessian is damped.** ``risk="mean"`` (default): M is the Hessian of the *mean* training
  loss, H_R / n, as in torch-influence (the implementation the paper used for CG/LiSSA, App. D.4);
  lambda = lambda_G x grid[index] is then on the scale of a per-example curvature, and LiSSA's
  ``scale`` refers to the eigenvalues of H_R/n + lambda I. ``risk="sum"``: M = H_R, the Hessian of
  the sum R of docs/equations.md. The two are the same method with lambda_sum = n lambda_mean; scores differ
  by the positive factor n only. (On a Concrete final model, lambda_max(G/n) = 6.6, so the
  paper's LiSSA scale 10 is valid for the mean and would diverge for the sum, ~6100.)
* **Operators.** The Gauss-Newton matrix is "materialised" when the full-training-set output-
  gradient matrix Phi (n x P) fits in ``memory_gb`` (``materialize="auto"``): with
  a = diag(sqrt(l''/c)) Phi, G/c = a^T a, and (fitted once per model, :func:`gauss_newton_kernel`)
  its n x n Gram matrix K = a a^T. For n <= P, CG runs on the equivalent n-dimensional system
  (K + lambda I) Y = a B, X = (B - a^T Y) / lambda (Woodbury), stopping on the exact residual
  of X in R^P (:func:`.solvers.cg.cg_dual`), and the exact solve is the Woodbury formula with a
  Cholesky factor of K + lambda I. Full-batch LiSSA's truncated series is a fixed polynomial p
  of A = G/c + lambda I, evaluated in closed form from K's eigen-decomposition,
  p(A) B = p(lambda) B + a^T U diag((p(e + lambda) - p(lambda)) / e) U^T a B, with the
  recurrence's divergence test (:func:`.solvers.lissa.lissa_kernel`,
  :func:`.solvers.lissa.lissa_diagonal`). For n > P the same is done with the spectrum
  G/c = V^T diag(e) V (orthonormal rows V, :func:`gauss_newton_spectrum`), in which A is
  diagonal, diag(e + lambda) on span(V) and lambda on its complement: a block of right-hand
  sides B is represented by its coordinates (V B, Q^T B) in an orthonormal basis [V; Q^T] of the
  invariant subspace span(V) + span(B), where CG runs the same recurrence (identical iterates,
  residuals and norms in exact arithmetic, O((r + k) k) per iteration instead of O(n P k)) and
  LiSSA's series is diagonal. Otherwise (and always for the true Hessian) a block of right-hand
  sides is multiplied by :func:`block_products`: per data chunk, the autograd graph of the
  gradient is built once and differentiated once per column (reverse-over-reverse; cheaper than
  forward-over-reverse HVPs, looped or vmapped, and than the backward pass batched over the
  columns: ``benchmarks/hessian_products.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..gradients import Problem
from ..losses import loss_derivatives
from .common import Attributor, DampedConfig, damping_value
from .errors import MemoryBudgetError, NotPositiveDefiniteError

HESSIANS = ("gn", "true")
RISKS = ("mean", "sum")
MATERIALIZE = ("auto", "always", "never")


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


def gauss_newton_bytes(n: int, P: int, work_itemsize: int) -> int:
    """Bytes of the materialised Gauss-Newton matrix at its peak with the spectrum: a and its
    basis (n x P), K and U (min(n, P) squared), floats of ``work_itemsize`` bytes."""
    m = min(n, P)
    return (2 * n * P + 2 * m * m) * work_itemsize


def gauss_newton_fits(att: Attributor, memory_gb: float) -> bool:
    """Whether ``materialize="auto"`` materialises the Gauss-Newton matrix: its peak
    (:func:`gauss_newton_bytes`, in :func:`work_dtype`) fits in ``memory_gb``."""
    p = att.problem
    work = torch.finfo(work_dtype(p.dtype, p.device)).bits // 8
    return gauss_newton_bytes(att.n_train, p.n_params, work) <= memory_gb * 2 ** 30


def dense_bytes(P: int, itemsize: int) -> int:
    """Bytes a dense P x P damped Hessian needs besides its products: A and one more."""
    return 2 * P ** 2 * itemsize


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
        self._dense: Optional[torch.Tensor] = None     # A as a P x P matrix, once formed
        if hessian == "gn" and materialize != "never":
            if materialize == "always" or gauss_newton_fits(att, memory_gb):
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
        """A as a P x P matrix (small models only), formed once per operator."""
        if self._dense is not None:
            return self._dense
        need = dense_bytes(self.P, torch.finfo(self.dtype).bits // 8)
        if need > self.memory_gb * 2 ** 30:
            raise MemoryBudgetError(f"a dense {self.P} x {self.P} Hessian needs "
                                    f"{need / 2**30:.1f} GiB > memory_gb={self.memory_gb}; "
                                    f"use an iterative method (cg, lissa)")
        eye = torch.eye(self.P, dtype=self.dtype, device=self.device)
        M = self.hess(eye)
        self._dense = 0.5 * (M + M.T) + self.lam * eye
        return self._dense

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
        A = self.dense()
        if int(torch.linalg.cholesky_ex(A).info) != 0:     # checked only: the solve is LU's
            raise NotPositiveDefiniteError(
                f"the damped Hessian (lambda = {self.lam:g}) is not positive definite: "
                "Assumption 1 needs lambda > -lambda_min of the Hessian; increase the damping")
        return torch.linalg.solve(A, B)

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
