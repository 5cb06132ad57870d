"""The front door (fimoda.api): the README example, input conversion, the caller's model left as
it was, the common score layout of methods and gold standard."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import fimoda
from fimoda.gold import GoldConfig, further_train, gold_scores
from fimoda.models import MLP

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.filterwarnings("ignore:LiSSA.*used scale")
def test_readme_example_runs_every_method_on_a_residual_model(capsys):
    text = README.read_text()
    block = re.search(r"<!-- example: own-model -->\n```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README example", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(fimoda.METHODS)
    cos = {ln.split()[0]: float(ln.split()[-1]) for ln in lines}
    assert all(np.isfinite(list(cos.values())))
    assert cos["grad_dot"] > 0.3 and cos["cg"] > 0.3            # they do track the gold standard


def test_public_api_is_listed():
    assert set(fimoda.__all__) >= {"attribute", "attributor", "gold_standard", "cosine_to_gold",
                                   "METHODS", "TASKS"}
    for name in fimoda.__all__:
        assert hasattr(fimoda, name), name


@pytest.fixture
def small():
    torch.manual_seed(0)
    model = MLP(3, 1, hidden=8).double()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=40)
    return model, X, y


def test_inputs_are_converted_and_the_model_is_left_as_it_was(small):
    model, X, y = small
    model.train()
    model.hidden[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # numpy float32 inputs, y as an (N, 1) column: converted to the model's float64
    s = fimoda.attribute(model, X.astype(np.float32), y[:, None], [0, 5, 7], X[:4], y[:4],
                         task="regression", method="grad_dot")
    assert s.shape == (4, 3) and s.dtype == np.float64
    assert model.training and not model.hidden[0].weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "hidden.0.weight")
    g = fimoda.gold_standard(model, X, y, [0, 5, 7], X[:4], y[:4], task="regression",
                             epochs=1, seeds=2)
    assert g.shape == (4, 3) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same numbers as the lower-level path
    Xt = torch.as_tensor(X)
    res = further_train(model, "regression", Xt, torch.as_tensor(y), Xt[:4],
                        torch.as_tensor(y[:4]), np.array([0, 5, 7]),
                        GoldConfig(lr=1e-2, epochs=1, seeds=2, mechanism="remove",
                                   progress=False))
    np.testing.assert_allclose(g, gold_scores(res.loss_full, res.loss_loo)[:, -1, :].T,
                               rtol=1e-12, atol=1e-15)


def test_bad_inputs_fail_before_any_work(small):
    model, X, y = small
    call = lambda **kw: fimoda.attribute(model, **{**dict(X_train=X, y_train=y, left_out=[0, 1],
                                                          X_test=X[:2], y_test=y[:2],
                                                          task="regression"), **kw})
    with pytest.raises(ValueError, match="task must be one of"):
        call(task="regresion")
    with pytest.raises(ValueError, match="unknown method"):
        call(method="influence")
    with pytest.raises(ValueError, match=r"left_out indices must lie in \[0, 40\)"):
        call(left_out=[3, 40])
    with pytest.raises(ValueError, match="distinct"):
        call(left_out=[3, 3])
    with pytest.raises(ValueError, match="differ in length"):
        call(y_train=y[:-1])
    with pytest.raises(ValueError, match="whole numbers"):
        fimoda.attribute(MLP(3, 2, hidden=4).double(), X, np.full(40, 0.5), [0], X[:2],
                         np.zeros(2), task="classification")


def test_classification_labels_and_cosine_layout(small):
    _, X, _ = small
    torch.manual_seed(1)
    model = MLP(3, 3, hidden=8).double()
    y = np.arange(40) % 3
    s = fimoda.attribute(model, X, y.astype(np.float64), [1, 2, 9], X[:5], y[:5],
                         task="classification", method="cg")
    assert s.shape == (5, 3)
    # cosine_to_gold: one cosine per test point, over the left-out set
    c = fimoda.cosine_to_gold(s, 2 * s)
    np.testing.assert_allclose(c, 1.0)
    np.testing.assert_allclose(fimoda.cosine_to_gold(s, -s), -1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        fimoda.cosine_to_gold(s, s.T)


def huber(out, y):
    """A per-example Huber loss (delta 1), twice differentiable almost everywhere; written out,
    as torch's own huber_loss has no forward-mode derivative (the true-Hessian products)."""
    r = (out.reshape(y.shape) - y).abs()
    return torch.where(r <= 1.0, 0.5 * r ** 2, r - 0.5)


def mse(out, y):
    """The task's own regression loss, given as a custom one."""
    return (out.reshape(y.shape) - y) ** 2


GN_METHODS = ("cg", "lissa", "dense", "trak", "ekfac", "cor2")
LOSS_METHODS = ("grad_dot", "grad_cos", "datainf", "lissa_h", "arnoldi", "prop1", "eq16")


def test_a_custom_loss_is_used_where_the_maths_allows_and_refused_by_gauss_newton(small):
    from fimoda.gradients import CustomLossError
    model, X, y = small
    args = (model, X, y, [0, 5, 7, 11], X[30:34], y[30:34])
    for method in ("grad_dot", "lissa_h"):         # the task's loss given as custom: same scores
        opts = {"damping": 10.0} if method == "lissa_h" else {}
        np.testing.assert_allclose(
            fimoda.attribute(*args, task="regression", method=method, loss=mse, **opts),
            fimoda.attribute(*args, task="regression", method=method, **opts), rtol=1e-8)
    att = fimoda.attributor(*args, task="regression", loss=huber)
    assert not np.allclose(fimoda.attribute(*args, task="regression", att=att),
                           fimoda.attribute(*args, task="regression"))
    for method in LOSS_METHODS:
        s = fimoda.attribute(*args, task="regression", method=method, att=att,
                             **({"damping": 10.0} if method in ("lissa_h", "prop1", "eq16") else {}))
        assert s.shape == (4, 4) and np.all(np.isfinite(s)), method
    s = fimoda.attribute(*args, task="regression", method="cg", att=att, hessian="true",
                         damping=10.0)
    assert np.all(np.isfinite(s))
    for method in GN_METHODS:
        with pytest.raises(CustomLossError, match="Gauss-Newton"):
            fimoda.attribute(*args, task="regression", method=method, att=att)


def test_the_gold_standard_takes_a_custom_loss(small):
    model, X, y = small
    args = (model, X, y, [0, 5, 7], X[30:34], y[30:34])
    kw = dict(task="regression", epochs=1, seeds=2)
    np.testing.assert_allclose(fimoda.gold_standard(*args, loss=mse, **kw),
                               fimoda.gold_standard(*args, **kw), rtol=1e-8, atol=1e-12)
    g = fimoda.gold_standard(*args, loss=huber, **kw)
    assert np.all(np.isfinite(g)) and not np.allclose(g, fimoda.gold_standard(*args, **kw))
    with pytest.raises(ValueError, match="one loss per example"):
        fimoda.attribute(*args, task="regression", loss=lambda out, t: mse(out, t).mean())


class _HFStyle(torch.nn.Module):
    """A model that returns an output object with ``.logits``, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.net = MLP(3, 2, hidden=8).double()

    def forward(self, x):
        from types import SimpleNamespace
        return SimpleNamespace(logits=self.net(x))


def test_a_model_returning_an_output_object_is_taken_as_it_is():
    """A model whose output holds ``.logits`` gives the scores and gold standard of its
    ``.logits`` network itself, under the same parameter names."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), rng.integers(0, 2, 20)
    model = _HFStyle()
    for method in ("grad_dot", "cg"):
        a = fimoda.attribute(model, X, y, [0, 1], X[:3], y[:3], task="classification",
                             method=method, names=["net.out"])
        b = fimoda.attribute(model.net, X, y, [0, 1], X[:3], y[:3], task="classification",
                             method=method, names=["out"])
        np.testing.assert_array_equal(a, b)
    kw = dict(task="classification", epochs=1, seeds=1, batch_size=8)
    np.testing.assert_allclose(fimoda.gold_standard(model, X, y, [0, 1], X[:3], y[:3], **kw),
                               fimoda.gold_standard(model.net, X, y, [0, 1], X[:3], y[:3], **kw),
                               rtol=1e-12, atol=1e-15)


def torch_huber(out, y):
    """torch's own Huber loss, per example: it has no forward-mode derivative in torch."""
    return torch.nn.functional.huber_loss(out.reshape(y.shape), y, reduction="none", delta=1.0)


def torch_smooth_l1(out, y):
    """torch's smooth L1 (beta 1, the same function as Huber with delta 1 here)."""
    return torch.nn.functional.smooth_l1_loss(out.reshape(y.shape), y, reduction="none",
                                              beta=1.0)


@pytest.mark.parametrize("library_loss", [torch_huber, torch_smooth_l1])
def test_library_losses_work_for_every_method_that_takes_a_loss(small, library_loss):
    """Every method documented as accepting ``loss=`` runs with a torch loss that lacks a
    forward-mode derivative (the true-Hessian products fall back to reverse-over-reverse) and
    gives the hand-written Huber's scores; the trajectory method with the true Hessian too."""
    model, X, y = small
    args = (model, X, y, [0, 5, 7, 11], X[30:34], y[30:34])
    att_lib = fimoda.attributor(*args, task="regression", loss=library_loss)
    att_hand = fimoda.attributor(*args, task="regression", loss=huber)
    cases = [(m, {"damping": 10.0} if m in ("lissa_h", "prop1", "eq16") else {})
             for m in LOSS_METHODS]
    cases += [("cg", {"hessian": "true", "damping": 10.0}),
              ("dense", {"hessian": "true", "damping": 10.0}),
              ("trajectory", {"hessian": "true", "lr": 0.01, "epochs": 2})]
    for method, opts in cases:
        lib = fimoda.attribute(*args, task="regression", method=method, att=att_lib, **opts)
        hand = fimoda.attribute(*args, task="regression", method=method, att=att_hand, **opts)
        np.testing.assert_allclose(lib, hand, rtol=1e-7, atol=1e-12, err_msg=method)
