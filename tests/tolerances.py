"""Tolerances derived from floating-point error analysis, not from a slack that passed once.

Standard model (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., 2002, ch. 2-3):
every rounded operation is fl(a op b) = (a op b)(1 + d) with |d| <= u, the unit roundoff (eps/2).
A sum or dot product of n terms has error <= gamma_{n-1} sum |terms| in ANY summation order
(Higham eq. 3.5 and sec. 4.2), so the bounds below hold whatever blocking or SIMD split a BLAS
or a vectorised kernel uses: they need no safety factor for that. They are as good as the
magnitudes fed to them: pass the operands of the computation, not its result.
"""
import math

import numpy as np
import torch


def unit_roundoff(dtype) -> float:
    """u = eps / 2: the largest relative error of one rounded operation (Higham sec. 2.1).
    ``dtype``: a torch or numpy dtype, or an array / tensor."""
    if isinstance(dtype, torch.Tensor):
        dtype = dtype.dtype
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps / 2
    return float(np.finfo(getattr(dtype, "dtype", dtype)).eps) / 2


def gamma(n, dtype=torch.float64) -> float:
    """gamma_n = n u / (1 - n u) >= |prod_{i<=n} (1 + d_i)^(+-1) - 1| (Higham Lemma 3.1): the
    relative error of n successive roundings, e.g. a dot product of length n (eq. 3.4)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma_{n} undefined: n u = {nu} >= 1")
    return nu / (1 - nu)


def matmul_roundoff(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |fl(A B) - A B|: gamma_k |A| |B|, k the inner dimension
    (Higham eq. 3.13)."""
    return gamma(A.shape[-1], A.dtype) * (A.abs() @ B.abs())


def residual_roundoff(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Per column j, a bound on |computed - exact| of the relative residual
    ||b_j - A x_j|| / ||b_j|| evaluated in A's precision as ``(B - A @ X).norm(dim=0) /
    B.norm(dim=0)``: the residual vector's error, gamma_{P+1} || |b_j| + |A| |x_j| || (Higham
    sec. 12.1, eq. 12.8 without the solve), plus gamma_{P+3} times the value for the two norms
    (a sum of P squares: relative gamma_P; a square root and a division: two more roundings)."""
    P = A.shape[-1]
    bnorm = B.norm(dim=0)
    computed = (B - A @ X).norm(dim=0) / bnorm
    magnitude = (B.abs() + A.abs() @ X.abs()).norm(dim=0) / bnorm
    return gamma(P + 1, A.dtype) * magnitude + gamma(P + 3, A.dtype) * computed


def solve_error_bound(cond: float, n: int, dtype=torch.float64) -> float:
    """Relative (normwise) forward error of a backward-stable solve or inverse of an n x n system
    with condition number ``cond``: eta cond / (1 - eta cond) for the backward error eta = gamma_n
    (Higham Thm 7.2; Cholesky's and LU's backward errors are of this order, Thms 9.3 and 10.3)."""
    ec = gamma(n, dtype) * cond
    if ec >= 1:
        raise ValueError(f"no accuracy left: gamma_{n} cond = {ec} >= 1")
    return ec / (1 - ec)


def woodbury_residual_gap(G: torch.Tensor, lam: float, X: torch.Tensor,
                          B: torch.Tensor) -> torch.Tensor:
    """Per column j, the gap between the exact relative residual ||b - (a^T a + lam I) x|| /
    ||b|| of x = (b - a^T y) / lam and the value a dual (Woodbury) solver reports for it,
    ||a^T s|| / (lam ||b||) from the computed dual residual s = a b - (a a^T + lam I) y: the
    identity between the two is exact only in exact arithmetic. ``G`` = a^T a (P x P), so that
    ||a||_2^2 = ||G||_2 and y = a x up to s / lam, ||y|| = sqrt(x^T G x).

    To first order the round-off of s, ~ u (||a|| ||b|| + (||G|| + lam) ||y||), reaches the primal
    residual through a^T / lam, and that of forming x, ~ u (||b|| + ||a|| ||y||) / lam, through
    A = G + lam I: together u (||A|| / lam) (2 ||b|| + 2 ||a|| ||y||) / ||b||. Each norm stands for
    sums of up to P + n terms (the products a b, a a^T, K y, a^T y, a^T s): their errors grow
    like sqrt(P + n) u, not (P + n) u, when the roundings are independent and of mean zero
    (Higham & Mary, SIAM J. Sci. Comput. 41, 2019, Thm 3.1), so the estimate is multiplied by
    sqrt(P + n) with n <= P. The worst-case bound (gamma_{P+n} and |a^T| |a| |a^T| |y| products)
    is of the order of a 1e-10 residual itself and would make a check against it vacuous."""
    P = G.shape[0]
    u = unit_roundoff(G.dtype)
    g_norm = float(torch.linalg.matrix_norm(G, ord=2))
    a_norm = math.sqrt(g_norm)
    bnorm = B.norm(dim=0)
    ynorm = (X * (G @ X)).sum(0).clamp_min(0).sqrt()
    kappa = (g_norm + lam) / lam
    return math.sqrt(2 * P) * u * kappa * 2 * (bnorm + a_norm * ynorm) / bnorm
