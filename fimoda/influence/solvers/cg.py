"""Conjugate gradients for A X = B, A symmetric positive definite: on the products of a
:class:`~fimoda.influence.operators.DampedHessian`, on the n-dimensional dual system of the
materialised Gauss-Newton matrix (:func:`cg_dual`), or in its invariant-subspace coordinates
(see :mod:`fimoda.influence.operators`).

**Block CG.** By default (``cg_block=True``) CG solves all k right-hand sides together (O'Leary
1980, in the breakdown-free form of Ji & Li 2017): one block Krylov space shared by the k
columns, so each step's k products serve every column and far fewer steps are needed than by k
independent CG runs (true Hessian of a Concrete MLP, k = 100, tol 1e-8: 8 steps instead of 42).
``cg_block=False`` runs k independent CG recurrences (the textbook method, kept as the
reference).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from ...progress import progress_bar

from ..errors import NotConvergedError, NotPositiveDefiniteError
from ..operators import DampedHessian, orth


def default_tol(dtype: torch.dtype) -> float:
    """CG's default relative residual: 1e-8 in float64; 1e-5 where 1e-8 is below round-off."""
    return 1e-8 if dtype == torch.float64 else 1e-5


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
    bar = progress_bar(desc=f"{desc} ({k} right-hand sides)", unit="step", leave=False,
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
    subspace coordinates when materialised with n > P (same iterates and residual norms, see
    :mod:`fimoda.influence.operators`), else with Hessian-vector products."""
    tol = default_tol(A.dtype) if tol is None else tol
    progress = A.problem.progress
    if A.kernel is not None:
        return cg_dual(A, B, tol, max_iter, desc, block)
    if A.spectral is not None:
        Z, diag, decode = A.coords(B)
        Y, info = cg_solve(lambda W: diag[:, None] * W, Z, tol, max_iter, progress, desc, block)
        return decode(Y), info
    return cg_solve(A.matmat, B, tol, max_iter, progress, desc, block)
