"""First-order approximation of further training (paper eq. 6): Grad-Dot and Grad-Cos.

Dropping the Hessian in (4) leaves Delta-theta(D') = -grad R(D')/lambda, so leaving z_i out changes
the parameters by +grad L(z_i)/lambda and the test loss by

    a_i(z) ~ (1/lambda) grad g(z; theta^f)^T grad L(z_i; theta^f)                        (6)

(charpiat2019similarity; TracIn at the final checkpoint only). 1/lambda is a positive scale that
does not change the cosine with the gold standard; it is applied only when ``scale=True`` (with
lambda of the damping grid, i.e. the lambda -> infinity limit of the second-order scores of
``cg.py``, ``lissa.py``, ``dense.py`` under ``risk="mean"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .common import DAMPING_GRID, DAMPING_INDEX, Attributor, damping_value
from .cost import pairwise_cost
from .specs import DAMPING, MethodSpec


@dataclass(frozen=True)
class GradDotConfig:
    """Grad-Dot's settings: the scores are grad g^T grad L, times 1/lambda only if ``scale``."""
    scale: bool = False                 # multiply by 1/lambda (lambda -> infinity limit of eq. 12)
    damping_grid: tuple = DAMPING_GRID  # multiples of lambda_G; lambda = lambda_G x grid[index]
    damping_index: int = DAMPING_INDEX  # which multiple (the paper's: the largest)
    damping: Optional[float] = None     # absolute lambda (units of the loss's Hessian); None: grid


@dataclass(frozen=True)
class GradCosConfig:
    """Grad-Cos's settings."""
    eps: float = 0.0    # gradient norm at or below which a row scores 0 instead of 0/0


def grad_dot(att: Attributor, cfg: GradDotConfig = GradDotConfig()) -> np.ndarray:
    """Grad-Dot, eq. (6): scores[j, i] = grad g(z_j)^T grad L(z_i) (times 1/lambda if ``scale``);
    the gradients of either side stream in chunks when the memory budget cannot keep them."""
    scores = att.pairwise()
    if cfg.scale:
        lam = damping_value(att, cfg.damping_grid, cfg.damping_index, cfg.damping)
        if not lam > 0:
            raise ValueError(f"scale=True needs a positive lambda, got {lam}")
        scores = scores / lam
    return scores.detach().cpu().numpy()


def _normalised(G: torch.Tensor, eps: float) -> torch.Tensor:
    norms = G.norm(dim=1, keepdim=True)
    return torch.where(norms > eps, G / torch.where(norms > eps, norms, torch.ones_like(norms)),
                       torch.zeros_like(G))


def grad_cos(att: Attributor, cfg: GradCosConfig = GradCosConfig()) -> np.ndarray:
    """Grad-Cos: scores[j, i] = grad g(z_j)^T grad L(z_i) / (||grad g(z_j)|| ||grad L(z_i)||)
    (eq. 6 with both gradients normalised; a zero gradient gives 0)."""
    if cfg.eps < 0:
        raise ValueError(f"eps must be >= 0, got {cfg.eps}")
    scores = att.pairwise(lambda G: _normalised(G, cfg.eps))
    return scores.detach().cpu().numpy()


def grad_dot_cost(shape, cfg: GradDotConfig):
    """Grad-Dot's :class:`~.cost.Cost`: one pass over each side (the left-out side again for
    each streamed test block), and with ``scale`` lambda_G's pass when not kept."""
    import dataclasses
    cost = pairwise_cost("grad_dot", shape)
    if cfg.scale and cfg.damping is None and not shape.keeps("left") and not cost.refusal:
        cost = dataclasses.replace(cost, gradient_rows=cost.gradient_rows + shape.n_left)
    return cost


def grad_cos_cost(shape, cfg: GradCosConfig):
    """Grad-Cos's :class:`~.cost.Cost`: Grad-Dot's, with the normalised copies of a block."""
    return pairwise_cost("grad_cos", shape, copies=3)


SPECS = (
    MethodSpec("grad_dot", grad_dot, GradDotConfig, "(6)", figure2=1, shared=DAMPING,
               cost=grad_dot_cost),
    MethodSpec("grad_cos", grad_cos, GradCosConfig, "(6), both gradients normalised", figure2=2,
               cost=grad_cos_cost),
)
