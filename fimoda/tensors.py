"""Tensor conversion: data given as numpy arrays or tensors, as the tensors a model takes. Inputs
go to the model's floating dtype (integer inputs such as token ids and attention masks stay
integer), targets to its dtype for regression and to int64 class labels for classification, both
on the model's device."""
from __future__ import annotations

import numpy as np
import torch


def as_tensor(a) -> torch.Tensor:
    """A tensor sharing ``a``'s memory (detached), or a copy when ``a`` is a read-only array (the
    cached datasets are) that torch must not alias."""
    if torch.is_tensor(a):
        return a.detach()
    return torch.from_numpy(np.require(np.asarray(a), requirements=["W"]))


def as_inputs(a, dtype, device) -> torch.Tensor:
    t = as_tensor(a)
    return (t.to(dtype) if t.is_floating_point() else t).to(device)


def as_targets(a, task, dtype, device) -> torch.Tensor:
    t = as_tensor(a)
    return (t.to(dtype) if task == "regression" else t.long()).to(device)
