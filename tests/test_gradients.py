"""The shared base against exact dense autograd references (float64)."""
import pytest
import torch
import torch.nn.functional as F

from fimoda.gradients import Problem, param_names
from fimoda.losses import gn_output, loss_derivatives, loss_from_f
from fimoda.models import MLP


def _setup(task, n_out, vmap_ok=True):
    torch.manual_seed(0)
    m = MLP(4, n_out, hidden=5).double()
    if not vmap_ok:
        m.supports_vmap = False
    X = torch.randn(30, 4, dtype=torch.float64)
    Y = torch.randn(30, dtype=torch.float64) if task == "regression" else torch.randint(0, n_out, (30,))
    return m, X, Y, Problem(m, X, Y, task, batch_size=7, chunk=8, progress=False)


def _loss(task, out, y):
    return ((out.reshape(-1) - y) ** 2).sum() if task == "regression" else \
        F.cross_entropy(out, y, reduction="sum")


CASES = [("regression", 1, True), ("classification", 2, True), ("classification", 3, True),
         ("classification", 3, False)]


@pytest.mark.parametrize("task,n_out,vmap_ok", CASES)
def test_per_example_gradients_equal_an_autograd_loop(task, n_out, vmap_ok):
    m, X, Y, pb = _setup(task, n_out, vmap_ok)
    G = pb.loss_grads(X, Y)
    for i in range(len(X)):
        ref = torch.autograd.grad(_loss(task, m(X[i:i + 1]), Y[i:i + 1]), list(m.parameters()))
        assert torch.allclose(G[i], torch.cat([g.reshape(-1) for g in ref]), atol=1e-13)
    assert torch.allclose(pb.risk_grad(), G.sum(0), atol=1e-12)


@pytest.mark.parametrize("task,n_out,vmap_ok", CASES)
def test_hessians_and_gauss_newton_equal_dense(task, n_out, vmap_ok):
    m, X, Y, pb = _setup(task, n_out, vmap_ok)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone() for p in m.parameters())
    R = lambda *ps: _loss(task, torch.func.functional_call(m, dict(zip(names, ps)), (X,)), Y)
    blocks = torch.autograd.functional.hessian(R, params)
    H = torch.cat([torch.cat([blocks[i][j].reshape(params[i].numel(), params[j].numel())
                              for j in range(len(params))], 1) for i in range(len(params))])
    assert torch.allclose(pb.dense_hessian(), H, atol=1e-12)
    phi, f, d1, d2 = pb.gn_pieces(X, Y)
    assert torch.allclose(pb.dense_hessian(gauss_newton=True), phi.T @ (d2[:, None] * phi), atol=1e-12)
    assert torch.allclose(pb.loss_grads(X, Y), d1[:, None] * phi, atol=1e-13)      # eq. (9)
    v = torch.randn(pb.n_params, dtype=torch.float64)
    assert torch.allclose(pb.per_example_hvp(X, Y, v).sum(0), H @ v, atol=1e-11)


def test_gauss_newton_output_is_the_logit_of_the_true_class():
    out = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([1])
    p = torch.softmax(out, -1)[0, 1]
    f = gn_output(out, y, "classification")
    assert torch.allclose(f, torch.log(p / (1 - p)))
    assert torch.allclose(loss_from_f(f, y, "classification"), F.cross_entropy(out, y, reduction="none"))
    d1, d2 = loss_derivatives(f, y, "classification")
    assert torch.allclose(d1, -(1 - p)) and torch.allclose(d2, p * (1 - p))


def test_parameter_selection_by_name_or_module_prefix():
    m = MLP(3, 1, hidden=4)
    assert param_names(m, ["out"]) == ["out.weight", "out.bias"]
    assert param_names(m, ["hidden.0.weight"]) == ["hidden.0.weight"]
    with pytest.raises(ValueError, match="no parameter named"):
        param_names(m, ["fc"])
    X, Y = torch.randn(5, 3), torch.randn(5)
    pb = Problem(m, X, Y, "regression", names=["out"], progress=False)
    assert pb.loss_grads(X, Y).shape == (5, 5)
