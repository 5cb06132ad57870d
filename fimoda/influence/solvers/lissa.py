"""LiSSA's truncated Neumann series for A^{-1} B (agarwal2017second, as in torch-influence):

    v_0 = b,   v_{t+1} = b + (I - A/scale) v_t  (t < depth),   result v_depth / scale,

by the recurrence (:func:`lissa_solve`, full-batch or stochastic), in closed form for a diagonal
A or the materialised Gauss-Newton kernel (:func:`lissa_diagonal`, :func:`lissa_kernel`), or in a
block Krylov subspace (:func:`krylov_lissa_solve`); :func:`lissa_inverse` picks the route.

**Full-batch LiSSA through products** (the true Hessian, or a Gauss-Newton matrix too large to
materialise): the same truncated series is evaluated in a block Krylov subspace
(:func:`krylov_lissa_solve`): exact once the subspace holds it, otherwise converged like CG, so
the paper's depth 5000 costs a few dozen block products instead of 5000 (on the true Hessian of
a Concrete MLP with 100 right-hand sides, a dozen blocks). ``full_batch="recurrence"`` keeps the
plain recurrence (the reference).
"""
from __future__ import annotations

import math

import warnings
from typing import TYPE_CHECKING, Callable, Optional

import torch
from ...progress import progress_bar

from ..errors import LissaDivergedError
from ..operators import DampedHessian
from .cg import default_tol

if TYPE_CHECKING:
    from ..lissa import LissaConfig

# below this depth the recurrence's depth block products cost less than the Krylov evaluation's
# up to depth + 1 blocks and its re-orthogonalisation (measured on the Concrete MLP at depth 5)
KRYLOV_MIN_DEPTH = 10


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
    for t in progress_bar(range(depth), desc=desc, leave=False, disable=not progress):
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
    ||R^depth z_j|| > divergence_factor ||R z_j||; non-finite values are divergence too
    (``divergence_factor`` = inf: no test, the series as it is, possibly inf)."""
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
    if math.isinf(divergence_factor):      # no test: the series as it is (the trajectory's)
        return p
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

    bar = progress_bar(desc=f"{desc} (Krylov blocks)", leave=False, disable=not progress)
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


def krylov_cap(P: int, itemsize: int, memory_gb: float) -> int:
    """Columns the Krylov basis of full-batch LiSSA may have: at most half of ``memory_gb``
    (GB) of P-vectors, and 4000 (so that the eigen-decomposition of T stays cheap)."""
    return int(min(4000, memory_gb * 2 ** 30 / 2 / (P * itemsize)))


def lissa_inverse(A: DampedHessian, B: torch.Tensor, cfg: LissaConfig, stochastic: bool,
                  progress: bool, desc: str) -> torch.Tensor:
    """A^{-1} B by LiSSA with the settings of ``cfg`` (see :class:`LissaConfig`)."""
    if not stochastic:                          # deterministic: every repeat is identical
        krylov = cfg.full_batch == "krylov" and cfg.depth >= KRYLOV_MIN_DEPTH
        cap = krylov_cap(A.P, torch.finfo(A.dtype).bits // 8, cfg.memory_gb)
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
        total += lissa_solve(batch_matmat(A, cfg.batch_size, cfg.seed + r), B, cfg.scale,
                             cfg.depth, cfg.divergence_factor, stochastic=True, lam=A.lam,
                             progress=progress, desc=desc)
    return total / cfg.repeat


def batch_matmat(A: DampedHessian, batch_size: int, seed: int) -> Callable:
    """``matmat(t, V)``: the unbiased mini-batch estimate (n/B) M_B V / c + lambda V of A V at
    step t (:meth:`.operators.DampedHessian.batch_hess`), batches of ``batch_size`` rows taken in
    order from one ``torch.randperm(n)`` per epoch of n // B steps (a ``torch.Generator`` seeded
    with ``seed``; the last n % B rows of a permutation are not used). Steps must be asked for in
    non-decreasing epoch order (a recurrence does)."""
    if not 1 <= batch_size <= A.n:
        raise ValueError(f"batch_size must be in [1, n = {A.n}], got {batch_size}")
    gen = torch.Generator().manual_seed(int(seed))
    per_epoch = A.n // batch_size
    perm = {}

    def matmat(t, W):
        e = t // per_epoch
        if e not in perm:
            perm.clear()
            perm[e] = torch.randperm(A.n, generator=gen)
        s = (t % per_epoch) * batch_size
        idx = perm[e][s:s + batch_size].to(A.device)
        return A.batch_hess(W, idx) + A.lam * W

    return matmat
