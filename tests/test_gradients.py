"""The shared base against exact dense autograd references (float64)."""
import pytest
import torch
import torch.nn.functional as F

from fimoda.gradients import Problem, gn_output, loss_derivatives, loss_from_f, param_names
from fimoda.models import MLP
from tolerances import gamma


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


def _dense_hessian(task, model, X, Y, names):
    """The Hessian of the summed loss in the parameters ``names`` (others fixed), by
    torch.autograd.functional.hessian: independent of fimoda's product code."""
    full = dict(model.named_parameters())
    params = tuple(full[n].detach().clone() for n in names)
    fixed = {n: p.detach() for n, p in full.items() if n not in names}
    R = lambda *ps: _loss(task, torch.func.functional_call(model, {**fixed, **dict(zip(names, ps))},
                                                           (X,)), Y)
    blocks = torch.autograd.functional.hessian(R, params)
    return torch.cat([torch.cat([blocks[i][j].reshape(params[i].numel(), params[j].numel())
                                 for j in range(len(params))], 1) for i in range(len(params))])


@pytest.mark.parametrize("task,n_out", [("regression", 1), ("classification", 2),
                                        ("classification", 3)])
@pytest.mark.parametrize("kind", ["mlp", "sequential"])
@pytest.mark.parametrize("names", [None, ["hidden.1", "out.weight"]])
def test_linear_relu_r_operator_is_the_true_hessian(task, n_out, kind, names):
    """The hand-written R-operator (taken by block_products for Linear-ReLU stacks) applies the
    exact Hessian of the summed loss, over all or a subset of the parameters, on several data
    chunks and column blocks; autograd (the path of every other model) gives the same."""
    from fimoda.influence import inverse
    from fimoda.influence.rop import LinearReluHessian
    torch.manual_seed(1)
    if kind == "mlp":
        m = MLP(4, n_out, hidden=6).double()
    else:
        m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5),
                                torch.nn.ReLU(), torch.nn.Linear(5, n_out)).double()
        names = None if names is None else ["2", "4.weight"]
    X = torch.randn(30, 4, dtype=torch.float64)
    Y = torch.randn(30, dtype=torch.float64) if task == "regression" else torch.randint(0, n_out, (30,))
    pb = Problem(m, X, Y, task, names=names, batch_size=7, progress=False)
    assert LinearReluHessian.build(pb) is not None
    H = _dense_hessian(task, m, X, Y, pb.names)
    V = torch.randn(pb.n_params, inverse.BATCHED_COLUMNS + 3, dtype=torch.float64)
    want = H @ V
    scale = float(want.abs().max())
    got = inverse.block_products(pb, X, Y, V, "true")
    # each entry of either side is a sum over the n rows of chains of length-P products:
    # gamma_{nP} of the largest entry bounds the round-off of both (Higham eq. 3.5)
    tol = gamma(len(X) * pb.n_params) * scale
    assert float((got - want).abs().max()) <= tol
    auto = inverse.block_products(pb, X, Y, V, "true", autograd=True)
    assert float((auto - want).abs().max()) <= tol


def test_r_operator_only_for_linear_relu_stacks():
    from fimoda.influence.rop import LinearReluHessian
    X, Y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    tanh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    assert LinearReluHessian.build(Problem(tanh, X, Y, "regression", progress=False)) is None
    two = MLP(4, 2, hidden=3).double()                 # two outputs cannot be a regression
    assert LinearReluHessian.build(Problem(two, X, Y, "regression", progress=False)) is None
