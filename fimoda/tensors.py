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


def check_finite(name: str, t) -> None:
    """ValueError naming ``name`` and the first bad row when a floating tensor (or array) holds
    NaN or inf; integer data (token ids, class labels) passes."""
    t = as_tensor(t)
    if not t.is_floating_point() or t.numel() == 0:
        return
    ok = torch.isfinite(t)
    if not bool(ok.all()):
        row = int((~ok.reshape(len(t), -1).all(1)).nonzero()[0, 0]) if t.dim() else 0
        raise ValueError(f"{name} contains NaN or inf (first in row {row}); remove or impute "
                         "those values first")


def check_data(task: str, X, Y, X_test=None, Y_test=None, padded: bool = False) -> None:
    """One clear ValueError, before any work, for data that cannot be trained or attributed on:
    NaN/inf in the inputs or targets, inputs and targets of different lengths, regression targets
    not of shape (N,), test inputs whose rows have another shape than the training rows (floating
    features; token ids, and with ``padded`` -- a model that trims its padded sequences, see
    :func:`fimoda.models.input_trimmer` -- the sequence length in dimension 1, may differ)."""
    pairs = [("X_train", X, "y_train", Y)]
    if X_test is not None:
        pairs.append(("X_test", X_test, "y_test", Y_test))
    for xn, x, yn, y in pairs:
        x, y = as_tensor(x), as_tensor(y)
        check_finite(xn, x)
        check_finite(yn, y)
        if len(x) != len(y):
            raise ValueError(f"{xn} and {yn} differ in length: {len(x)} vs {len(y)} rows")
        if task == "regression" and y.dim() != 1:
            raise ValueError(f"{yn} must have shape (N,) for regression, got {tuple(y.shape)}")
    if X_test is not None:
        x, xt = as_tensor(X), as_tensor(X_test)
        row = slice(2 if padded else 1, None)       # a padded sequence's length may differ
        if x.is_floating_point() and xt.is_floating_point() and x.shape[row] != xt.shape[row]:
            raise ValueError(f"X_test rows have shape {tuple(xt.shape[1:])} but X_train rows "
                             f"{tuple(x.shape[1:])}: the test inputs must have the training "
                             "inputs' features")
