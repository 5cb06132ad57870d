"""Arnoldi influence (schioppa2022scalingarnoldi): eq. (8) in the top-k eigenspace of the Hessian.

Arnoldi iteration (Lanczos for a symmetric matrix, here with full re-orthogonalisation so that it
is plain Arnoldi) from a seeded random start vector builds an orthonormal Krylov basis Q (P x m)
and the projected matrix Q^T M Q; its eigenpairs give Ritz pairs (mu_j, u_j) of M (the undamped
Hessian of the mean, or with ``risk="sum"`` the sum, training loss; true by default). Keeping the
k of largest |mu_j| (as schioppa2022scalingarnoldi do: their Arnoldi returns the largest-magnitude
eigenvalues, which for an indefinite H may include negative ones),

    (M + lambda I)^{-1} ~ sum_{j<=k} u_j u_j^T / (mu_j + lambda)        (docs/equations.md)

    scores[j, i] = sum_l (u_l^T grad g(z_j)) (u_l^T grad L(z_i)) / (mu_l + lambda).

Everything outside span(u_1..u_k) is dropped (not damped by 1/lambda). With k = m = P the
expansion is complete and equals the dense solve. When the Krylov space becomes invariant
(breakdown, e.g. repeated eigenvalues), the iteration continues from a fresh random vector
orthogonal to Q, so m = P always spans everything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from ..progress import progress_bar

from .common import Attributor, DampedConfig, damping_value
from .cost import arnoldi_cost
from .errors import MemoryBudgetError
from .operators import DampedHessian, check_damped
from .specs import DAMPED, MethodSpec


@dataclass(frozen=True)
class ArnoldiConfig(DampedConfig):
    """``rank``: eigenpairs kept (k, capped at P); ``n_iter``: Arnoldi steps m (capped at P,
    raised to at least ``rank``); ``seed``: of the start vector. Damping may be 0 here."""
    hessian: str = "true"   # "true": the Hessian H (eq. 8) | "gn": Gauss-Newton G
    rank: int = 50          # eigenpairs kept, k (capped at the P parameters)
    n_iter: int = 200       # Arnoldi steps m: Hessian-vector products and basis columns
    seed: int = 0           # seed of the random start vector


def arnoldi_eig(matvec: Callable, P: int, n_iter: int, seed: int, dtype, device,
                progress: bool = True):
    """Ritz pairs of a symmetric P x P operator after m = min(n_iter, P) Arnoldi steps.

    q_1 = random unit vector (seeded); for each step w = M q_j, h = Q^T w, w -= Q h (twice:
    classical Gram-Schmidt with re-orthogonalisation), q_{j+1} = w / ||w||. Returns (mu (m,),
    U (P, m)) with mu ascending, from the eigen-decomposition of the symmetrised Q^T M Q.
    """
    m = min(int(n_iter), P)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(P, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    Q = torch.zeros(P, m, dtype=dtype, device=device)
    Hm = torch.zeros(m, m, dtype=dtype, device=device)
    q = rand()
    q = q / q.norm()
    anorm = 0.0
    for j in progress_bar(range(m), desc="Arnoldi", leave=False, disable=not progress):
        Q[:, j] = q
        w = matvec(q)
        anorm = max(anorm, float(w.norm()))
        Qj = Q[:, :j + 1]
        h = Qj.T @ w
        w = w - Qj @ h
        h2 = Qj.T @ w
        w = w - Qj @ h2
        Hm[:j + 1, j] = h + h2
        if j + 1 == m:
            break
        b = float(w.norm())
        if b > 1e-10 * max(anorm, 1e-300):
            Hm[j + 1, j] = b
            q = w / b
        else:                                   # invariant subspace: restart orthogonally
            q = rand()
            for _ in range(2):
                q = q - Qj @ (Qj.T @ q)
            q = q / q.norm()
    mu, S = torch.linalg.eigh(0.5 * (Hm + Hm.T))
    return mu, Q @ S


def arnoldi_basis_bytes(P: int, cfg: ArnoldiConfig, itemsize: int) -> int:
    """Bytes of the Arnoldi basis Q and its Ritz vectors Q S (P x m each), m the steps run."""
    m = min(max(cfg.n_iter, min(cfg.rank, P)), P)
    return 2 * P * m * itemsize


def arnoldi(att: Attributor, cfg: ArnoldiConfig = ArnoldiConfig()) -> np.ndarray:
    """scores[j, i] = sum_{l <= k} (u_l . grad g(z_j)) (u_l . grad L(z_i)) / (mu_l + lambda)
    over the k largest-|mu| Ritz pairs of the (true by default) Hessian (eq. 8 in that subspace);
    the gradients of either side are kept or streamed under the memory budget, projected on
    the k Ritz vectors as they come."""
    check_damped(cfg, cfg.hessian)
    if cfg.rank < 1 or cfg.n_iter < 1:
        raise ValueError(f"rank and n_iter must be >= 1, got {cfg.rank}, {cfg.n_iter}")
    P = att.problem.n_params
    k = min(cfg.rank, P)
    m = min(max(cfg.n_iter, k), P)
    need = arnoldi_basis_bytes(P, cfg, att.problem.dtype.itemsize)
    if need > cfg.memory_gb * 2 ** 30:                  # before any work
        raise MemoryBudgetError(f"the Arnoldi basis (P={P} x m={m}) needs {need / 2**30:.1f} "
                                f"GiB > memory_gb={cfg.memory_gb}; lower n_iter")
    lam = damping_value(att, cfg.damping_grid, cfg.damping_index, cfg.damping)
    if lam < 0:
        raise ValueError(f"damping must be >= 0, got {lam}")
    A = DampedHessian(att, cfg.hessian, lam, cfg.risk, cfg.materialize, cfg.memory_gb)
    mu, U = arnoldi_eig(lambda v: A.hess(v[:, None])[:, 0], P, m, cfg.seed, A.dtype, A.device,
                        att.problem.progress)
    keep = torch.argsort(mu.abs(), descending=True)[:k]
    mu, U = mu[keep], U[:, keep]
    denom = mu + lam
    if bool((denom.abs() <= 1e-12 * max(float(mu.abs().max()), 1e-300)).any()):
        raise ValueError("an eigenvalue mu + lambda is ~0: increase the damping")
    projected = lambda side: torch.cat([G @ U for _, G in att.grad_blocks(side)])  # noqa: E731
    left = projected("left") / denom                          # (n', k)
    out = (projected("test") @ left.T).detach().cpu().numpy()
    if not np.isfinite(out).all():
        raise FloatingPointError("non-finite Arnoldi scores")
    return out


def arnoldi_cost_hook(shape, cfg: ArnoldiConfig):
    """Arnoldi's :class:`~.cost.Cost` (:func:`~.cost.arnoldi_cost`)."""
    return arnoldi_cost("arnoldi", shape, cfg,
                        arnoldi_basis_bytes(shape.P, cfg, shape.dtype.itemsize))


SPECS = (
    MethodSpec("arnoldi", arnoldi, ArnoldiConfig, "(8) in the top-k eigenspace of H",
               shared=DAMPED, cost=arnoldi_cost_hook),
)
