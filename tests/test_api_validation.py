"""Bad input to the front door (fimoda.attribute, fimoda.gold_standard) is one ValueError naming
the argument, before any work -- never a truncation, a raw index error or a StopIteration."""
import numpy as np
import pytest
import torch

import fimoda
from fimoda.paper.config import get_config
from fimoda.models import MLP


def regression(n=30, d=3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return MLP(d, 1, hidden=4).double(), X, X.sum(1), X[:4] + 0.1, X[:4].sum(1)


def classification(n=30, d=3, classes=10):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    torch.manual_seed(0)
    return MLP(d, classes, hidden=4).double(), X, y, X[:4], y[:4]


BOTH = [lambda *a, **k: fimoda.attribute(*a, method="grad_dot", **k),
        lambda *a, **k: fimoda.gold_standard(*a, epochs=1, seeds=1, **k)]


@pytest.mark.parametrize("entry", BOTH, ids=["attribute", "gold_standard"])
@pytest.mark.parametrize("case, match", [
    ("float indices", r"left_out must hold integer training indices.*float64"),
    ("short mask", r"left_out is a boolean mask of 3 entries; .*\(30\)"),
    ("label 11 of 10", r"y_train holds label 11 in row 0, outside \[0, 10\)"),
    ("test label -1", r"y_test holds label -1 in row 2"),
    ("string features", r"X_train holds strings or objects"),
    ("one output for classes", r"task 'classification' needs one logit per class"),
    ("frozen model", r"no trainable parameter"),
    ("empty test set", r"X_test is empty"),
    ("float16 model", r"float16, which fimoda does not support"),
])
def test_bad_input_is_named_before_any_work(entry, case, match):
    task = "classification"
    model, X, y, Xt, yt = classification()
    left = [0, 1, 2]
    if case == "float indices":
        left = [0.5, 1.7, 2.9]
    elif case == "short mask":
        left = [True, False, True]
    elif case == "label 11 of 10":
        y = y.clone()
        y[0] = 11
    elif case == "test label -1":
        yt = yt.clone()
        yt[2] = -1
    elif case == "string features":
        X = np.array([["a", "b", "c"]] * 30)
    elif case == "one output for classes":
        model = MLP(3, 1, hidden=4).double()
    elif case == "frozen model":
        model.requires_grad_(False)
    elif case == "empty test set":
        Xt, yt = Xt[:0], yt[:0]
    elif case == "float16 model":
        model = model.half()
    with pytest.raises(ValueError, match=match):
        entry(model, X, y, left, Xt, yt, task=task)


def test_a_boolean_mask_over_the_training_rows_is_a_mask():
    model, X, y, Xt, yt = regression()
    mask = np.zeros(30, dtype=bool)
    mask[[3, 7, 11]] = True
    by_mask = fimoda.attribute(model, X, y, mask, Xt, yt, task="regression")
    by_index = fimoda.attribute(model, X, y, [3, 7, 11], Xt, yt, task="regression")
    assert np.array_equal(by_mask, by_index)


def test_regression_model_with_two_outputs_and_an_out_of_range_at_are_named():
    model, X, y, Xt, yt = regression()
    with pytest.raises(ValueError, match=r"task 'regression' needs one output per row"):
        fimoda.attribute(MLP(3, 2, hidden=4).double(), X, y, [0, 1], Xt, yt, task="regression")
    for at in (99, -9, 1.5):
        with pytest.raises(ValueError, match=r"is not an evaluation point: there are 3"):
            fimoda.gold_standard(model, X, y, [0, 1], Xt, yt, task="regression", epochs=2,
                                 seeds=1, at=at)


def test_an_unsupported_dtype_is_named_not_reported_as_another_config():
    with pytest.raises(ValueError, match=r"dtype 'float16' is not supported: choose float32"):
        get_config("concrete", "smoke", dtype="float16")
