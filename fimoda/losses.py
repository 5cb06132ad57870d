"""The per-example loss L(z; theta) = l(model output, y) of the paper, in its two forms. On the
model's outputs (:func:`per_example_loss`): squared error for regression, cross-entropy on the
logits for classification -- what training, further training and the gold standard minimise. In
the Gauss-Newton form (``docs/equations.md``) a loss l(f) of one scalar output f per example
(:func:`gn_output`): f = the prediction with l(f) = (f - y)^2 for regression, f = the logit of the
true class's probability, log(p_y / (1 - p_y)), with l(f) = log(1 + e^{-f}) for classification --
the same loss written so that l is convex in f, with the derivatives l', l'' the Gauss-Newton
pieces of every approximation need (:func:`loss_derivatives`)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


TASKS = ("regression", "classification")


def check_task(task: str) -> None:
    """ValueError unless ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def per_example_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(outputs, targets) -> (B,)``: squared error (the MSE of the paper, per example) for
    regression, cross-entropy for classification."""
    if task == "regression":
        return lambda out, y: (out.reshape(y.shape) - y) ** 2
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    raise ValueError(f"unknown task {task!r}")


def gn_output(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """The scalar model output f of the Gauss-Newton framework (per example)."""
    if task == "regression":
        return out.reshape(y.shape)
    # logit of p_y: out_y - logsumexp over the other classes (TRAK §3.3)
    oy = out.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    is_y = torch.arange(out.shape[-1], device=out.device) == y.unsqueeze(-1)
    others = out.masked_fill(is_y, float("-inf"))
    return oy - torch.logsumexp(others, dim=-1)


def loss_from_f(f: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """l(f): squared error (f - y)^2 for regression, log(1 + e^{-f}) (= cross-entropy)."""
    if task == "regression":
        return (f - y) ** 2
    return torch.nn.functional.softplus(-f)


def loss_derivatives(f: torch.Tensor, y: torch.Tensor, task: str):
    """(l'(f), l''(f)) per example."""
    if task == "regression":
        return 2.0 * (f - y), torch.full_like(f, 2.0)
    s = torch.sigmoid(f)                  # p_y
    return -(1.0 - s), s * (1.0 - s)
