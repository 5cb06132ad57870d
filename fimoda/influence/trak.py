"""TRAK with a single model (TRAK_{M=1}, park2023trak), the Gauss-Newton special case of (12).

TRAK projects the gradients of the Gauss-Newton output f (the logit of p_y for classification,
the prediction for regression; ``Problem.output_grads``) with a random matrix P (p x k):
phi_i = P^T grad f(z_i). Over ALL n training instances Phi_p (n x k) has rows phi_i, and

    tau(z, z_i) = phi(z)^T (Phi_p^T Phi_p)^{-1} phi_i * (-l'_i)                      (TRAK)

(lambda = 0, Q = I in (12); -l'_i = 1 - p_i for classification, 2 (y_i - f_i) for the squared
error of regression, App. D.4). tau > 0 means z_i raises f(z).

Sign and test side. Our scores follow the gold standard: positive = the test LOSS rises when z_i is
left out, i.e. the test side is grad g(z) = grad L(z) = l'(z) grad f(z). Writing (12) with
Phi_p in place of Phi, lambda = 0 and Q = I gives

    scores[j, i] = (-l'(z_j)) * tau(z_j, z_i)
                 = [l'(z_j) phi(z_j)]^T (Phi_p^T Phi_p)^{-1} [l'_i phi_i]     (test_side="loss")

For classification -l'(z) = 1 - p(z) > 0, so every test column is TRAK's own score times a positive
number (the same cosine / ranking per test point). For regression the factor 2 (y - f(z)) carries
the sign of the test residual: without it TRAK measures the change of the prediction, not of the
loss. ``test_side="output"`` returns TRAK's tau unchanged.

The score is invariant to P -> P M for any invertible M, so with k >= p the projection can be
skipped exactly (``skip_projection``). P is generated in row blocks from a seeded generator and
applied per data chunk, so the n x p gradient matrix is never held; Phi_p^T Phi_p is accumulated in
float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from ..progress import progress_bar

from ..losses import loss_derivatives
from ..memory import row_bytes
from .common import Attributor
from .cost import trak_cost
from .specs import MethodSpec

PROJ_TYPES = ("normal", "rademacher", "sjlt")
TEST_SIDES = ("loss", "output")


@dataclass(frozen=True)
class TrakConfig:
    """TRAK's settings (a single model, M = 1)."""
    proj_dim: int = 2048               # k, the dimension the output gradients are projected to
    # normal (Gaussian) | rademacher (+-1) | sjlt (sparse: one +-1 per parameter, P kept as
    # p bucket indices and signs, for models whose dense p x k matrix is too large to keep)
    proj_type: str = "normal"
    seed: int = 0                      # seed of the projection matrix
    skip_projection: bool = True       # k >= p: use the identity (exact, see module docstring)
    ridge: Optional[float] = None      # absolute ridge added to Phi_p^T Phi_p; None: automatic
    ridge_rel: float = 1e-10           # automatic ridge = ridge_rel * largest eigenvalue, used only
    max_cond: float = 1e12             # ... if k > n or cond(Phi_p^T Phi_p) > max_cond
    test_side: str = "loss"            # loss: grad g = l'(z) grad f (our sign) | output: TRAK's tau
    # instances projected at once (None: as many gradient rows as fit in grad_bytes): a P too
    # large to keep is regenerated once per projected chunk
    chunk: Optional[int] = None
    # bytes of one projected chunk of gradient rows (None: the problem's memory budget,
    # fimoda.memory.chunk_rows)
    grad_bytes: Optional[int] = None
    block_elems: int = 2 ** 24         # elements of P generated at once (rows * k)
    cache_bytes: int = 2 ** 29         # bytes: keep P in memory if it is at most this large


def _check(cfg: TrakConfig) -> None:
    if not isinstance(cfg.proj_dim, (int, np.integer)) or isinstance(cfg.proj_dim, bool) \
            or cfg.proj_dim < 1:
        raise ValueError(f"TRAK proj_dim must be an integer >= 1, got {cfg.proj_dim!r}")
    if cfg.proj_type not in PROJ_TYPES:
        raise ValueError(f"TRAK proj_type must be one of {PROJ_TYPES}, got {cfg.proj_type!r}")
    if cfg.test_side not in TEST_SIDES:
        raise ValueError(f"TRAK test_side must be one of {TEST_SIDES}, got {cfg.test_side!r}")
    if cfg.ridge is not None and not cfg.ridge >= 0:
        raise ValueError(f"TRAK ridge must be >= 0 or None, got {cfg.ridge!r}")
    if not cfg.ridge_rel > 0 or not cfg.max_cond > 1:
        raise ValueError(f"TRAK needs ridge_rel > 0 and max_cond > 1, got {cfg.ridge_rel!r}, "
                         f"{cfg.max_cond!r}")
    if cfg.chunk is not None and cfg.chunk < 1:
        raise ValueError(f"TRAK chunk must be >= 1 or None, got {cfg.chunk!r}")
    if cfg.grad_bytes is not None and cfg.grad_bytes < 1:
        raise ValueError(f"TRAK grad_bytes must be >= 1, got {cfg.grad_bytes!r}")
    if cfg.block_elems < 1:
        raise ValueError(f"TRAK block_elems must be >= 1, got {cfg.block_elems!r}")


class Projector:
    """x -> x P for a p x k random matrix P (entries N(0, 1/k) or +-1/sqrt(k); ``"sjlt"``: the
    sparse Johnson-Lindenstrauss transform, row i of P is +-1 in one column h(i), so P is
    p bucket indices and signs and x P is a scatter-add), generated in row blocks, block b from
    seed (seed, b): the same seed gives the same P on a given device."""

    def __init__(self, p: int, k: int, kind: str, seed: int, dtype, device,
                 block_elems: int = 2 ** 24, cache_bytes: int = 2 ** 29):
        self.p, self.k, self.kind, self.seed = p, k, kind, seed
        self.dtype, self.device = dtype, torch.device(device)
        rows = max(1, block_elems // k) if kind != "sjlt" else block_elems
        self.starts = list(range(0, p, rows))
        self.rows = rows
        itemsize = torch.empty((), dtype=dtype).element_size()
        size = p * (8 + itemsize) if kind == "sjlt" else p * k * itemsize   # index + sign
        self.cache = [] if size <= cache_bytes else None
        if self.cache is not None:
            self.cache = [self._block(b) for b in range(len(self.starts))]

    def _block(self, b: int) -> torch.Tensor:
        start = self.starts[b]
        shape = (min(self.rows, self.p - start), self.k)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + b)
        if self.kind == "sjlt":
            h = torch.randint(0, self.k, shape[:1], generator=gen, device=self.device)
            sign = torch.randint(0, 2, shape[:1], generator=gen, device=self.device)
            return h, (2 * sign - 1).to(self.dtype)
        if self.kind == "normal":
            R = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
        else:
            R = torch.randint(0, 2, shape, generator=gen, device=self.device)
            R = (2 * R - 1).to(self.dtype)
        return R / self.k ** 0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.k, dtype=x.dtype, device=x.device)
        for b, start in enumerate(self.starts):
            R = self.cache[b] if self.cache is not None else self._block(b)
            if self.kind == "sjlt":
                h, sign = R
                out.index_add_(1, h, x[:, start:start + len(h)] * sign.to(x.dtype))
            else:
                out += x[:, start:start + R.shape[0]] @ R.to(x.dtype)
        return out


def _projected_rows(problem, cfg: TrakConfig) -> int:
    """Gradient rows projected at once: as many as fit in ``cfg.grad_bytes`` (at least one), or
    under the problem's memory budget (:meth:`fimoda.gradients.Problem.grad_rows`). The random
    blocks of an uncached P are generated once per chunk, so the chunk should be large."""
    if cfg.grad_bytes is None:
        return problem.grad_rows()
    return max(1, int(cfg.grad_bytes // row_bytes(problem.n_params, problem.dtype)))


def _features(problem, X, Y, project, chunk, desc):
    """Projected output gradients phi = P^T grad f (rows, float64) and l'(f) of (X, Y)."""
    rows = []
    it = range(0, len(X), chunk)
    if problem.progress and len(X) > chunk:
        it = progress_bar(it, desc=desc, total=(len(X) + chunk - 1) // chunk, leave=False)
    for s in it:
        g = problem.output_grads(X[s:s + chunk], Y[s:s + chunk], desc=None)
        rows.append(project(g).to(torch.float64))
    d1, _ = loss_derivatives(problem.f_values(X, Y), Y, problem.task)
    return torch.cat(rows), d1.to(torch.float64)


def trak_kernel(att: Attributor, cfg: TrakConfig):
    """(Phi_p^T Phi_p + ridge I) over all n training instances as its eigendecomposition
    (eigenvalues, eigenvectors), the ridge used, and the projector."""
    problem = att.problem
    p, k = problem.n_params, cfg.proj_dim
    if cfg.skip_projection and k >= p:
        project, k = (lambda g: g), p
    else:
        project = Projector(p, k, cfg.proj_type, cfg.seed, problem.dtype, problem.device,
                            cfg.block_elems, cfg.cache_bytes)
    chunk = cfg.chunk or _projected_rows(problem, cfg)
    n = len(problem.X)
    XtX = torch.zeros(k, k, dtype=torch.float64, device=problem.device)
    it = range(0, n, chunk)
    if problem.progress and n > chunk:
        it = progress_bar(it, desc="TRAK: projected training gradients",
                          total=(n + chunk - 1) // chunk, leave=False)
    for s in it:
        g = problem.output_grads(problem.X[s:s + chunk], problem.Y[s:s + chunk], desc=None)
        phi = project(g).to(torch.float64)
        XtX += phi.T @ phi
    evals, evecs = torch.linalg.eigh(0.5 * (XtX + XtX.T))
    top = float(evals[-1])
    if top <= 0:
        raise ValueError("TRAK: the projected training gradients are all zero")
    if cfg.ridge is not None:
        ridge = float(cfg.ridge)
    elif k > n or float(evals[0]) <= top / cfg.max_cond:
        ridge = cfg.ridge_rel * top
    else:
        ridge = 0.0
    if float(evals[0]) + ridge <= 0:
        raise ValueError("TRAK: Phi_p^T Phi_p is singular; set ridge > 0")
    return evals + ridge, evecs, ridge, project


def trak(att: Attributor, cfg: TrakConfig = TrakConfig()) -> np.ndarray:
    """TRAK_{M=1} scores in the gold standard's sign (see the module docstring):

        scores[j, i] = w_j * phi(z_j)^T (Phi_p^T Phi_p + ridge I)^{-1} phi_i * (-l'_i),
        w_j = -l'(z_j) (test_side="loss", default) or 1 (test_side="output": TRAK's tau),

    with phi = P^T grad f, Phi_p over all n training instances, and ridge = 0 unless
    Phi_p^T Phi_p is singular or ill-conditioned (or ``cfg.ridge`` is given).
    """
    _check(cfg)
    problem = att.problem
    evals, evecs, ridge, project = trak_kernel(att, cfg)
    chunk = cfg.chunk or _projected_rows(problem, cfg)
    phi_tr, d1_tr = _features(problem, att.X_loo, att.Y_loo, project, chunk,
                              "TRAK: left-out features")
    phi_te, d1_te = _features(problem, att.X_test, att.Y_test, project, chunk,
                              "TRAK: test features")
    right = (phi_tr * (-d1_tr)[:, None]) @ evecs                       # (n', k) in the eigenbasis
    left = phi_te @ evecs
    if cfg.test_side == "loss":
        left = left * (-d1_te)[:, None]
    scores = (left / evals) @ right.T
    return scores.cpu().numpy()


SPECS = (MethodSpec("trak", trak, TrakConfig, "TRAK_{M=1}", figure2=7,
                    cost=lambda shape, cfg: trak_cost("trak", shape, cfg)),)
