"""The optimizers of further training: SGD, Adam and AdamW applied by hand to stacked parameters
(a leading run dimension) with exactly the arithmetic of ``torch.optim`` (single-tensor path),
per-run gradient-norm clipping with that of ``clip_grad_norm_``, and the ``torch.optim``
optimizer the one-model reference loop uses."""
from __future__ import annotations

import numpy as np
import torch

from .config import GoldConfig

ADAM_BETAS = (0.9, 0.999)   # torch.optim.Adam/AdamW defaults
ADAM_EPS = 1e-8
CLIP_EPS = 1e-6             # clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


class StackedOptimizer:
    """SGD / Adam / AdamW on tensors with a leading run dimension, with exactly the per-element
    arithmetic of ``torch.optim`` (``_single_tensor_sgd`` / ``_single_tensor_adam``):

        SGD:   g <- g + wd theta;  theta <- theta - lr g
        Adam:  g <- g + wd theta (Adam) | theta <- theta (1 - lr wd) (AdamW);
               m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2;
               theta <- theta - lr/(1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)

    with k the run's own step count. A run that idles in a step keeps its parameters, moments
    and step count unchanged (``active`` False).
    """

    def __init__(self, cfg: GoldConfig, params: list, groups: list):
        self.kind, self.lr, self.wd = cfg.optimizer, float(cfg.lr), float(cfg.weight_decay)
        R = params[0].shape[0]
        self.count = np.zeros(R, dtype=np.int64)
        self.m = [torch.zeros_like(p) for p in params] if self.kind != "sgd" else []
        self.v = [torch.zeros_like(p) for p in params] if self.kind != "sgd" else []
        self.groups = groups
        self.mg = [[t[sl] for t in self.m] for sl in groups]
        self.vg = [[t[sl] for t in self.v] for sl in groups]

    def _apply(self, params, grads, m, v, k: int):
        lr, wd = self.lr, self.wd
        if self.kind == "sgd":
            for p, g in zip(params, grads):
                if wd != 0:
                    g = g.add(p, alpha=wd)
                p.add_(g, alpha=-lr)
            return
        b1, b2 = ADAM_BETAS
        step = float(k)
        bias_correction1 = 1 - b1 ** step
        bias_correction2 = 1 - b2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        for p, g, ma, va in zip(params, grads, m, v):
            if wd != 0:
                if self.kind == "adamw":
                    p.mul_(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            ma.lerp_(g, 1 - b1)
            va.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (va.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
            p.addcdiv_(ma, denom, value=-step_size)

    def update(self, gi: int, params: list, grads: list, active: np.ndarray):
        sl = self.groups[gi]
        m, v = self.mg[gi], self.vg[gi]
        counts = self.count[sl]
        if active.all() and (self.kind == "sgd" or (counts == counts[0]).all()):
            self._apply(params, grads, m, v, int(counts[0]) + 1)   # the common case
            self.count[sl] += 1
            return
        new = counts + active                       # some runs idle, or step counts differ
        ks = np.unique(new[active])[:1 if self.kind == "sgd" else None]
        tensors = list(params) + list(m) + list(v)
        saved = [t.clone() for t in tensors]
        result = [t.clone() for t in tensors]
        for k in ks:
            rows = active & (new == k) if self.kind != "sgd" else active
            rows = torch.as_tensor(rows, device=params[0].device)
            for t, s in zip(tensors, saved):
                t.copy_(s)
            self._apply(params, grads, m, v, int(k))
            for r, t in zip(result, tensors):
                r[rows] = t[rows]
        for t, r in zip(tensors, result):
            t.copy_(r)
        self.count[sl] = new


def clip_per_run_(grads: list, max_norm: float):
    """Per run: g <- g * min(1, max_norm / (||g|| + 1e-6)), ||g|| over all tensors (the norm of
    the per-tensor norms, as ``torch.nn.utils.clip_grad_norm_``)."""
    G = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(G, -1), dim=1) for g in grads], 1)
    total = torch.linalg.vector_norm(norms, dim=1)
    coef = torch.clamp(float(max_norm) / (total + CLIP_EPS), max=1.0)
    for g in grads:
        g.mul_(coef.view(G, *([1] * (g.dim() - 1))))


def torch_optimizer(cfg: GoldConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=cfg.weight_decay)
