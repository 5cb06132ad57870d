"""Adam's diagonal preconditioner at theta^f for the trajectory-matched influence
(:mod:`.trajectory`, ``preconditioner="adam"`` / ``"adam_dv"``).

Adam further training (:mod:`fimoda.gold.optim`: coupled weight decay g <- g + wd theta,
betas (0.9, 0.999), eps 1e-8, bias correction) starts from theta^f with a fresh state. Its second
moment after one epoch of K = ceil(n/B) batches, the gradients taken at theta^f, is

    v = (1 - b2) sum_{k=1..K} b2^(K-k) g_k^2 / (1 - b2^K),
    g_k = grad mean_{z in batch k} L(z) + wd theta^f

(elementwise; bias-corrected: a weighted mean of the squared batch gradients, ~ the plain mean
for b2 = 0.999), and its first moment m ~ gbar, the mean gradient (b1's EMA equals its
expectation gbar on average; its fluctuation is ignored). The batches are one epoch of a fixed
permutation of the training rows (:data:`BATCH_SEED`): deterministic, and as representative as
the gold standard's own random orders.

The ``subtract`` run of z_i differs from the full run by delta g_k = A d_k - grad L(z_i)/n
(A = Hbar + wd I, linearised as in :mod:`.trajectory`). With Adam's state frozen (``"adam"``),

    d_{k+1} = d_k - eta D (A d_k - grad L(z_i)/n),      D = diag(1 / (sqrt(v) + eps)).

``"adam_dv"`` adds the first-order response of the state itself: at steady state delta m =
delta g and delta v = 2 gbar delta g (the EMA of 2 g delta g), and the step m / (sqrt(v) + eps)
changes by delta g / (sqrt(v) + eps) - gbar delta v / (2 sqrt(v) (sqrt(v) + eps)^2), i.e. D
becomes

    D_eff = diag((1 - gbar^2 / (sqrt(v) (sqrt(v) + eps))) / (sqrt(v) + eps)) >= 0,

non-negative since gbar^2 <= v (Jensen, for the b2-weighted mean only approximately: clamped at
0). Either way, with s = D^{1/2},

    g^T eta sum_{k<t} (I - eta D A)^k D l = (s g)^T p_t(A~) (s l),      A~ = s A s,

so the trajectory's spectral routes run unchanged on A~ = s Hbar s + wd s^2 and the s-scaled test
and left-out gradients (:class:`PreconditionedHessian`): the Gauss-Newton kernel a -> a s (the
Jacobian's columns), its K = (a s)(a s)^T; the true Hessian's products V -> s A (s V). With
wd > 0, A~'s damping wd s^2 is no multiple of I, so the kernel and spectral formulas (which
need A = a^T a + lambda I) do not apply and the Krylov route is taken.

Which of the two: on the cpu profile's Adam gold standards (notebook 07) neither was better
everywhere (D_eff by one evaluation point on Concrete, D by its margins on Energy and Adult), so
D, the simpler, is the default (``"adam"``) and D_eff is kept as ``"adam_dv"``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.func import grad
from ..progress import progress_bar

from ..gold.optim import ADAM_BETAS, ADAM_EPS
from ..gradients import flatten
from .common import Attributor
from .operators import DampedHessian, Kernel, Spectral, gauss_newton_kernel, gram, gram_spectrum

PRECONDITIONERS = ("none", "adam", "adam_dv")
BATCH_SEED = 0          # the permutation of the training rows whose epoch of batches gives v, gbar


def adam_moments(att: Attributor, batch_size: int, weight_decay: float = 0.0,
                 beta2: float = ADAM_BETAS[1], progress: bool = True):
    """(gbar, v), each (P,): the mean batch gradient and Adam's bias-corrected second moment
    after one epoch of batches of ``batch_size`` rows at theta^f (module docstring)."""
    p = att.problem
    n = len(p.X)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(BATCH_SEED)).to(p.X.device)
    batch_grad = grad(lambda params, x, y: p.loss(params, x, y).mean())
    theta = flatten(p.params, p.names)
    K = -(-n // batch_size)
    gsum, v = torch.zeros_like(theta), torch.zeros_like(theta)
    it = range(K)
    if progress and K > 1:
        it = progress_bar(it, desc="Adam's state at theta^f", leave=False)
    for k in it:
        idx = order[k * batch_size:(k + 1) * batch_size]
        g = flatten(batch_grad(p.params, p.trim(p.X[idx]), p.Y[idx]), p.names).detach()
        g = g + weight_decay * theta                           # Adam's coupled weight decay
        gsum += g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)           # v_k = b2 v_{k-1} + (1-b2) g_k^2
    return gsum / K, v / (1 - beta2 ** K)                      # bias correction 1 - b2^K


def adam_preconditioner(att: Attributor, cfg) -> torch.Tensor:
    """The diagonal of D (``cfg.preconditioner == "adam"``) or D_eff (``"adam_dv"``), (P,), in
    the problem's dtype, from :func:`adam_moments` with the config's batch size, weight decay,
    ``adam_beta2`` and ``adam_eps``. Kept in ``att.fitted`` per setting."""
    key = (cfg.preconditioner, int(cfg.batch_size), float(cfg.weight_decay),
           float(cfg.adam_beta2), float(cfg.adam_eps))
    cache = att.fitted.setdefault("adam_preconditioner", {})
    if key not in cache:
        gbar, v = adam_moments(att, int(cfg.batch_size), float(cfg.weight_decay),
                               float(cfg.adam_beta2), att.problem.progress)
        root = v.sqrt()
        d = 1.0 / (root + cfg.adam_eps)
        if cfg.preconditioner == "adam_dv":
            # 1 - gbar^2 / (sqrt(v)(sqrt(v) + eps)): 0/0 where v = 0 (then gbar = 0): no change
            denom = root * (root + cfg.adam_eps)
            corr = torch.where(denom > 0, gbar ** 2 / torch.where(denom > 0, denom, 1.0), 0.0)
            d = d * (1.0 - corr).clamp_min(0.0)        # >= 0 by Jensen, up to the EMA weights
        cache[key] = d
    return cache[key]


class PreconditionedHessian:
    """A~ = s (M/c + wd I) s, s = D^{1/2}, with the interface :class:`.trajectory.SpectralPairs`
    uses of a :class:`.operators.DampedHessian`: ``kernel`` (a s and its Gram matrix; wd = 0),
    ``spectral`` (n > P, materialised, wd = 0), ``matmat`` and ``P``."""

    def __init__(self, base: DampedHessian, d: torch.Tensor):
        self.base, self.P, self.lam = base, base.P, base.lam
        self.s = d.sqrt().to(base.dtype)
        self.kernel: Optional[Kernel] = None
        self._spectral: Optional[Spectral] = None
        if base.kernel is not None and self.lam == 0:
            a = base.kernel.a * self.s.to(base.kernel.a.dtype)     # the Jacobian's columns x s
            self.kernel = Kernel(a=a, K=gram(a))

    @property
    def spectral(self) -> Optional[Spectral]:
        """Eigen-decomposition of s (G/c) s (n > P, materialised G, wd = 0), on first use."""
        if self._spectral is None and self.base.materialized and self.base.kernel is None \
                and self.lam == 0:
            a = gauss_newton_kernel(self.base.att, self.base.c).a
            sp = gram_spectrum(a * self.s.to(a.dtype))
            self._spectral = Spectral(basis=sp.basis.to(self.base.dtype),
                                      eig=sp.eig.to(self.base.dtype))
        return self._spectral

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        s = self.s[:, None]
        return s * self.base.hess(s * V) + self.lam * (s * s) * V    # s (M/c) s V + wd s^2 V


def preconditioned(att: Attributor, cfg, A: DampedHessian, G: torch.Tensor, W: torch.Tensor):
    """(A~, s G, s W) for ``cfg.preconditioner`` (module docstring): the operator and the test
    and left-out gradients (rows) the spectral routes run on."""
    d = adam_preconditioner(att, cfg)
    op = PreconditionedHessian(A, d)
    return op, G * op.s, W * op.s


def check_preconditioner(cfg) -> None:
    """ValueError for an unknown ``preconditioner`` or Adam constants out of range."""
    if cfg.preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, "
                         f"got {cfg.preconditioner!r}")
    if not (isinstance(cfg.adam_beta2, (int, float)) and 0 <= cfg.adam_beta2 < 1):
        raise ValueError(f"adam_beta2 must be in [0, 1), got {cfg.adam_beta2!r}")
    if not (isinstance(cfg.adam_eps, (int, float)) and cfg.adam_eps > 0
            and np.isfinite(cfg.adam_eps)):
        raise ValueError(f"adam_eps must be a finite number > 0, got {cfg.adam_eps!r}")
