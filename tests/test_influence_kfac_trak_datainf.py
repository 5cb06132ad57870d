"""TRAK_{M=1}, EK-FAC and DataInf against dense float64 references on tiny models."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from fimoda.settings import MethodConfig
from fimoda.gradients import Problem, block_slices
from fimoda.influence import Attributor, compute_scores
from fimoda.influence.datainf import DatainfConfig, datainf, datainf_lambdas
from fimoda.influence.ekfac import EkfacConfig, ekfac, fit_ekfac, positions_first, rotated
from fimoda.influence.trak import Projector, TrakConfig, trak
from fimoda.models import MLP
from tolerances import solve_error_bound

DT = torch.float64


def npy(t):
    return t.detach().cpu().numpy()


def cos_rows(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def make_mlp(task, n, d=3, hidden=4, depth=2, seed=0, n_test=5, n_loo=6, names=None):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(d, 1 if task == "regression" else 3, hidden=hidden, depth=depth).to(DT)
    with torch.no_grad():       # keep the ReLU units of these tiny nets alive (no zero columns)
        for layer in model.hidden:
            layer.weight.mul_(2.0)
            layer.bias.uniform_(0.0, 0.5, generator=g)
    X = torch.randn(n, d, generator=g, dtype=DT)
    Xt = torch.randn(n_test, d, generator=g, dtype=DT)
    if task == "regression":
        Y = torch.randn(n, generator=g, dtype=DT)
        Yt = torch.randn(n_test, generator=g, dtype=DT)
    else:
        Y = torch.randint(0, 3, (n,), generator=g)
        Yt = torch.randint(0, 3, (n_test,), generator=g)
    return attributor(model, X, Y, Xt, Yt, task, n_loo, names)


def attributor(model, X, Y, Xt, Yt, task, n_loo, names=None, chunk=7):
    prob = Problem(model, X, Y, task, names=names, chunk=chunk, batch_size=16, progress=False)
    loo = torch.arange(min(n_loo, len(X)))
    return Attributor(prob, X[loo], Y[loo], Xt, Yt)


# ----------------------------------------------------------------------------- dense references
def gn_jacobian(att):
    """sqrt(l'') grad f rows over the training set (the GN pseudo-gradients), numpy."""
    phi, _, _, d2 = att.problem.gn_pieces(att.problem.X, att.problem.Y)
    return npy(phi * d2.sqrt()[:, None])


def module_blocks(att, factors):
    """Index arrays (into the flat parameter vector) of each EK-FAC layer, in the [weight | bias]
    matrix's row-major order."""
    sl = block_slices(att.problem.params, att.problem.names)
    out = []
    for lf in factors.layers:
        o, i_w = lf.shape[0], lf.shape[1] - (lf.bias is not None)
        w = np.arange(sl[lf.weight].start, sl[lf.weight].stop).reshape(o, i_w)
        if lf.bias is not None:
            b = np.arange(sl[lf.bias].start, sl[lf.bias].stop).reshape(o, 1)
            w = np.concatenate([w, b], axis=1)
        out.append(w.reshape(-1))
    return out


def dense_block_gn_scores(att, blocks, lam):
    """sum_l grad_l g(z)^T (G_l + lam I)^{-1} grad_l L(z_i) with the exact GN blocks G_l."""
    J = gn_jacobian(att)
    te, tr = npy(att.test_grads), npy(att.train_grads)
    out = 0
    for idx in blocks:
        Gl = J[:, idx].T @ J[:, idx]
        out = out + te[:, idx] @ np.linalg.solve(Gl + lam * np.eye(len(idx)), tr[:, idx].T)
    return out


def dense_gn_scores(att, lam):
    """(12): grad g(z)^T (G + lam I)^{-1} grad L(z_i), full dense Gauss-Newton."""
    J = gn_jacobian(att)
    G = J.T @ J
    if lam == 0:    # ReLU nets: G is singular (unit-rescaling symmetry); the pseudo-inverse
        return npy(att.test_grads) @ np.linalg.pinv(G, rcond=1e-12, hermitian=True) \
            @ npy(att.train_grads).T
    return npy(att.test_grads) @ np.linalg.solve(G + lam * np.eye(len(G)), npy(att.train_grads).T)


# ----------------------------------------------------------------------------- models
class ConvNet(nn.Module):
    """Two convolutions with several output positions (padding, stride, dilation, bias)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 2, stride=2, dilation=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.bn(self.c2(h)))
        return self.fc(h.flatten(1))


class ConvNet1(nn.Module):
    """Convolutions with one output position each (so one example = one direction per layer)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)      # 2x2 -> 1x1, with zero padding
        self.c2 = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class TokenNet(nn.Module):
    """A Linear applied to every position of a sequence, then mean pooling (like a text model)."""

    def __init__(self, d=3, h=4):
        super().__init__()
        self.tok = nn.Linear(d, h)
        self.head = nn.Linear(h, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x)).mean(1))


def make_net(cls, shape, n, seed=0, n_test=4, n_loo=5, classes=3):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = cls().to(DT)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):       # non-trivial eval-mode statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    X = torch.randn(n, *shape, generator=g, dtype=DT)
    Xt = torch.randn(n_test, *shape, generator=g, dtype=DT)
    Y = torch.randint(0, classes, (n,), generator=g)
    Yt = torch.randint(0, classes, (n_test,), generator=g)
    return attributor(model, X, Y, Xt, Yt, "classification", n_loo)


# ----------------------------------------------------------------------------- EK-FAC
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_ekfac_exact_with_one_training_example(task):
    att = make_mlp(task, n=1, n_loo=1)
    factors = fit_ekfac(att.problem)
    assert [lf.module for lf in factors.layers] == ["hidden.0", "hidden.1", "out"]
    lam = 1e-3
    got = ekfac(att, EkfacConfig(risk="sum", damping=lam), factors=factors)
    want = dense_block_gn_scores(att, module_blocks(att, factors), lam)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_ekfac_exact_for_regression_output_layer():
    # S is 1x1 and ds = sqrt(2) for every example: G_out = 2 A exactly, so EK-FAC is exact
    att = make_mlp("regression", n=40, names=["out"])
    factors = fit_ekfac(att.problem, batch_size=9)
    lam = 1e-4
    got = ekfac(att, EkfacConfig(risk="sum", damping=lam), factors=factors)
    want = dense_block_gn_scores(att, module_blocks(att, factors), lam)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_ekfac_conv_exact_with_one_training_example():
    att = make_net(ConvNet1, (2, 2, 2), n=1, n_loo=1)
    factors = fit_ekfac(att.problem)
    assert [lf.kind for lf in factors.layers] == ["conv", "conv", "linear"]
    lam = 1e-3
    got = ekfac(att, EkfacConfig(risk="sum", damping=lam), factors=factors)
    want = dense_block_gn_scores(att, module_blocks(att, factors), lam)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("which", ["mlp", "conv", "tokens"])
def test_ekfac_corrected_eigenvalues_are_the_exact_kfe_diagonal(which):
    if which == "mlp":
        att = make_mlp("classification", n=30)
    elif which == "conv":
        att = make_net(ConvNet, (2, 4, 4), n=12)
    else:
        att = make_net(TokenNet, (5, 3), n=12, classes=2)
    factors = fit_ekfac(att.problem, batch_size=5)
    if which == "conv":    # BatchNorm affine is not attributed
        assert [lf.module for lf in factors.layers] == ["c1", "c2", "fc"]
        assert factors.layers[1].bias is None and factors.layers[0].shape == (3, 2 * 9 + 1)
    J = gn_jacobian(att)
    blocks = module_blocks(att, factors)
    lam = 0.05
    te, tr = npy(att.test_grads), npy(att.train_grads)
    want = 0
    for lf, idx in zip(factors.layers, blocks):
        K = np.kron(npy(lf.Q_S), npy(lf.Q_A))          # row-major vec of Q_S^T V Q_A = K^T vec V
        Gl = J[:, idx].T @ J[:, idx]                    # exact GN block from autograd gradients
        np.testing.assert_allclose(npy(lf.Lambda).reshape(-1), np.diag(K.T @ Gl @ K),
                                   rtol=1e-9, atol=1e-12 * np.abs(Gl).max())
        # the per-query application equals the dense EK-FAC block inverse
        Ginv = K @ np.diag(1.0 / (npy(lf.Lambda).reshape(-1) + lam)) @ K.T
        want = want + te[:, idx] @ Ginv @ tr[:, idx].T
    got = ekfac(att, EkfacConfig(risk="sum", damping=lam), factors=factors)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_ekfac_rotates_positions_or_the_layer_gradient_to_the_same_numbers():
    """Q_S^T (sum_t ds_t a_t^T) Q_A, by hand in numpy, equals both routes of ``rotated``; the
    cheaper route is chosen by the count of positions."""
    g = torch.Generator().manual_seed(3)
    a, ds = torch.randn(4, 5, 3, generator=g, dtype=DT), torch.randn(4, 5, 2, generator=g, dtype=DT)
    Q_A = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=DT))[0]
    Q_S = torch.linalg.qr(torch.randn(2, 2, generator=g, dtype=DT))[0]
    want = np.stack([npy(Q_S).T @ sum(np.outer(npy(ds[n, t]), npy(a[n, t])) for t in range(5))
                     @ npy(Q_A) for n in range(4)])
    for first in (True, False):
        np.testing.assert_allclose(npy(rotated(a, ds, Q_A, Q_S, first=first)), want,
                                   rtol=1e-12, atol=1e-14)
    assert positions_first(1, 30, 30) and positions_first(60, 384, 1537)
    assert not positions_first(1024, 64, 577)           # a convolution's patches


def test_ekfac_never_forms_a_whole_per_example_gradient():
    """With the damping given, neither the factors nor the scores take a per-example gradient
    of the model: every per-example quantity comes from layer captures of batched passes."""
    att = make_net(ConvNet, (2, 4, 4), n=12)
    want = ekfac(att, EkfacConfig(risk="sum", damping=0.05))
    fresh = make_net(ConvNet, (2, 4, 4), n=12)

    def forbidden(*args, **kwargs):
        raise AssertionError("a per-example gradient row was computed")
    fresh.problem.loss_grads = fresh.problem.output_grads = forbidden
    got = ekfac(fresh, EkfacConfig(risk="sum", damping=0.05))
    np.testing.assert_array_equal(got, want)


def test_ekfac_damping_modes_and_cache():
    att = make_mlp("classification", n=20)
    lam = att.lambda_G * MethodConfig.damping_grid[MethodConfig.damping_index]   # the default
    a = ekfac(att, EkfacConfig())                             # lambda_G x grid[index] on G/n
    b = ekfac(att, EkfacConfig(risk="mean", damping=lam))
    np.testing.assert_array_equal(a, b)
    # mean convention: (G/n + lambda)^-1 = n (G + n lambda)^-1
    n = len(att.problem.X)
    s = ekfac(att, EkfacConfig(risk="sum", damping=n * lam))
    np.testing.assert_allclose(a, n * s, rtol=1e-10, atol=1e-12 * np.abs(a).max())
    c = compute_scores("ekfac", att, damping_mode="heuristic")
    assert c.shape == a.shape and np.isfinite(c).all() and not np.allclose(c, a)
    # huge damping: EK-FAC -> Grad-Dot / lambda restricted to the attributed layers
    big = 1e8
    d = ekfac(att, EkfacConfig(risk="sum", damping=big)) * big
    gd = npy(att.test_grads @ att.train_grads.T)
    np.testing.assert_allclose(d, gd, rtol=1e-5, atol=1e-7 * np.abs(gd).max())


def test_ekfac_bad_inputs():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, 3, dtype=DT))

        def forward(self, x):
            return x @ self.w

    X = torch.randn(4, 3, dtype=DT)
    Y = torch.randint(0, 3, (4,))
    att = attributor(NoLayers(), X, Y, X, Y, "classification", 2)
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        ekfac(att, EkfacConfig(risk="sum", damping=1.0))
    att = make_mlp("regression", n=5)
    with pytest.raises(ValueError, match="damping_mode"):
        ekfac(att, EkfacConfig(damping_mode="nope"))
    with pytest.raises(ValueError, match="damping must be > 0"):
        ekfac(att, EkfacConfig(risk="sum", damping=0.0))
    with pytest.raises(ValueError, match="batch_size"):
        fit_ekfac(att.problem, batch_size=0)
    with pytest.raises(ValueError, match="damping_index"):
        ekfac(att, EkfacConfig(damping_index=7))

    class Functional(nn.Module):        # a Linear whose weight is used without calling it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return x @ self.lin.weight.T

    att = attributor(Functional().to(DT), X, Y, X, Y, "classification", 2)
    with pytest.raises(ValueError, match="not called as modules"):
        fit_ekfac(att.problem)

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 1, groups=2)

        def forward(self, x):
            return self.c(x).flatten(1)

    Xc = torch.randn(3, 2, 1, 1, dtype=DT)
    att = attributor(Grouped().to(DT), Xc, torch.tensor([0, 1, 0]), Xc, torch.tensor([0, 1, 0]),
                     "classification", 2)
    with pytest.raises(ValueError, match="groups"):
        fit_ekfac(att.problem)


# ----------------------------------------------------------------------------- TRAK
def trak_numpy(att, P=None, test_side="loss", ridge_rel=None):
    """phi(z)^T (Phi^T Phi)^{-1} phi_i (-l'_i) (times -l'(z) for the loss side), numpy."""
    prob = att.problem
    Phi, _, _, _ = prob.gn_pieces(prob.X, prob.Y)
    ptr, _, d1tr, _ = prob.gn_pieces(att.X_loo, att.Y_loo)
    pte, _, d1te, _ = prob.gn_pieces(att.X_test, att.Y_test)
    Phi, ptr, pte = npy(Phi), npy(ptr), npy(pte)
    if P is not None:
        Phi, ptr, pte = Phi @ P, ptr @ P, pte @ P
    M = Phi.T @ Phi
    if ridge_rel is None:
        # pseudo-inverse: Phi^T Phi of a ReLU net is singular (rescaling a unit's in/out weights)
        Minv = np.linalg.pinv(M, rcond=1e-12, hermitian=True)
    else:
        Minv = np.linalg.inv(M + ridge_rel * np.linalg.eigvalsh(M)[-1] * np.eye(len(M)))
    tau = pte @ Minv @ (ptr * -npy(d1tr)[:, None]).T
    return tau * -npy(d1te)[:, None] if test_side == "loss" else tau


def test_trak_unprojected_equals_dense_formula_and_gn_influence():
    att = make_mlp("regression", n=80, d=3, hidden=3, depth=1, n_test=6, n_loo=10)
    P = att.problem.n_params
    assert P < 80
    got = trak(att, TrakConfig(proj_dim=10 * P))             # k >= p: projection skipped
    tol = dict(rtol=1e-6, atol=1e-6 * np.abs(got).max())     # the automatic ridge: 1e-10 rel.
    np.testing.assert_allclose(got, trak_numpy(att), **tol)
    # regression: l'' = 2, so TRAK (lambda = 0, Q = I) is exactly 2 x (12) at lambda = 0
    np.testing.assert_allclose(got, 2 * dense_gn_scores(att, 0.0), **tol)
    # the output side is TRAK's tau: it differs by the signed test residual factor -l'(z)
    out = trak(att, TrakConfig(proj_dim=10 * P, test_side="output"))
    np.testing.assert_allclose(out, trak_numpy(att, test_side="output"), rtol=1e-6,
                               atol=1e-6 * np.abs(out).max())
    # a square (invertible) projection leaves the score unchanged (up to the tiny automatic
    # ridge, which P's conditioning amplifies: Phi^T Phi has the ReLU-rescaling null space)
    sq = trak(att, TrakConfig(proj_dim=P, skip_projection=False, seed=3))
    np.testing.assert_allclose(sq, got, rtol=1e-4, atol=1e-4 * np.abs(got).max())
    assert cos_rows(sq, got).min() > 1 - 1e-8


@pytest.mark.parametrize("proj_type", ["normal", "rademacher", "sjlt"])
def test_trak_projected_is_deterministic_and_matches_numpy(proj_type):
    att = make_mlp("classification", n=50, hidden=4, n_test=5, n_loo=7)
    p, k = att.problem.n_params, 12
    cfg = TrakConfig(proj_dim=k, proj_type=proj_type, seed=5, block_elems=4 * k)
    a = trak(att, cfg)
    b = trak(att, TrakConfig(proj_dim=k, proj_type=proj_type, seed=5, block_elems=4 * k,
                             cache_bytes=0))              # regenerated per chunk: same numbers
    np.testing.assert_array_equal(a, b)
    b = trak(att, TrakConfig(proj_dim=k, proj_type=proj_type, seed=5, block_elems=4 * k,
                             cache_bytes=0, chunk=3))     # other chunks: other rounding only
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(a).max())
    # the chunk: every row that fits in grad_bytes (at least one), else the memory budget's
    # rows: half of it over three copies of a row
    from fimoda.influence.trak import _projected_rows
    row = p * 8
    assert _projected_rows(att.problem, TrakConfig(grad_bytes=50 * row)) == 50
    assert _projected_rows(att.problem, TrakConfig(grad_bytes=1)) == 1
    assert _projected_rows(att.problem, TrakConfig(grad_bytes=9 * row + 1)) == 9
    tight = dataclasses.replace(att.problem, memory=2 * 3 * 7 * row + 5)
    assert _projected_rows(tight, TrakConfig()) == 7
    c = trak(att, TrakConfig(proj_dim=k, proj_type=proj_type, seed=6, block_elems=4 * k))
    assert np.abs(a - c).max() > 1e-3 * np.abs(a).max()
    proj = Projector(p, k, proj_type, 5, DT, "cpu", block_elems=4 * k)
    Pm = npy(proj(torch.eye(p, dtype=DT)))
    if proj_type == "rademacher":
        np.testing.assert_array_equal(np.abs(Pm) * np.sqrt(k), np.ones_like(Pm))
    if proj_type == "sjlt":             # one +-1 per parameter row, in a seeded column
        np.testing.assert_array_equal(np.abs(Pm).sum(1), np.ones(p))
        np.testing.assert_array_equal(np.abs(Pm).max(1), np.ones(p))
    np.testing.assert_allclose(a, trak_numpy(att, Pm), rtol=1e-7, atol=1e-9 * np.abs(a).max())


def test_trak_sign_agrees_with_gauss_newton_influence():
    att = make_mlp("classification", n=120, d=3, hidden=3, depth=1, n_test=8, n_loo=30, seed=1)
    p = att.problem.n_params
    tr = trak(att, TrakConfig(proj_dim=p))
    gn = dense_gn_scores(att, 1e-3 * att.lambda_G)
    c = cos_rows(tr, gn)
    assert (c > 0.98).all(), c             # Q = I instead of diag(l''): close, not equal
    # classification: the output side differs by the positive factor 1 - p(z) per test point
    out = trak(att, TrakConfig(proj_dim=p, test_side="output"))
    np.testing.assert_allclose(cos_rows(out, tr), 1.0, atol=1e-10)
    ratio = tr / out
    assert (ratio > 0).all() and np.allclose(ratio, ratio[:, :1], rtol=1e-8)
    # projected to half the dimension: still positively aligned with (12), both tasks
    for task in ("classification", "regression"):
        att = make_mlp(task, n=200, d=3, hidden=6, depth=2, n_test=8, n_loo=30, seed=2)
        k = att.problem.n_params // 2
        got = trak(att, TrakConfig(proj_dim=k, skip_projection=False))
        c = cos_rows(got, dense_gn_scores(att, 1e-3 * att.lambda_G))
        assert (c > 0.5).all(), (task, c)
    # regression: TRAK's own output side measures the change of the prediction, whose sign
    # relative to the loss is the sign of the test residual y - f(z)
    att = make_mlp("regression", n=120, d=3, hidden=3, depth=1, n_test=8, n_loo=30, seed=1)
    out = trak(att, TrakConfig(proj_dim=p, test_side="output"))
    c = cos_rows(out, dense_gn_scores(att, 1e-6 * att.lambda_G))
    resid = npy(att.Y_test - att.problem.f_values(att.X_test, att.Y_test))
    assert (resid > 0).any() and (resid < 0).any()
    np.testing.assert_allclose(c, np.sign(resid), atol=1e-6)
    # projected, fewer training instances than k: the automatic ridge
    small = make_mlp("classification", n=15, d=3, hidden=3, depth=1, n_test=8, n_loo=10, seed=1)
    cfg = TrakConfig(proj_dim=20, skip_projection=False)
    got = trak(small, cfg)
    Pm = npy(Projector(p, 20, "normal", 0, DT, "cpu")(torch.eye(p, dtype=DT)))
    want = trak_numpy(small, Pm, ridge_rel=1e-10)      # k > n: the automatic ridge is used
    # k - n null directions: Phi^T Phi + ridge has condition number 1 + 1 / ridge_rel = 1e10,
    # which bounds the accuracy of either side's solve (changing the ridge 3x moves the scores 5%)
    err = solve_error_bound(1 + 1 / 1e-10, cfg.proj_dim)
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * err * np.abs(want).max())


def test_trak_bad_inputs():
    att = make_mlp("regression", n=10)
    for bad in (dict(proj_dim=0), dict(proj_dim=2.5), dict(proj_type="sparse"),
                dict(test_side="grad"), dict(ridge=-1.0), dict(grad_bytes=0)):
        with pytest.raises(ValueError):
            trak(att, TrakConfig(**bad))


# ----------------------------------------------------------------------------- DataInf
def datainf_dense(att, c, idx=None):
    """Explicit per-layer d_l x d_l matrices (1/m) sum_k (1/lam)(I - g g^T / (lam + |g|^2))."""
    prob = att.problem
    G = npy(prob.loss_grads(prob.X, prob.Y))
    if idx is not None:
        G = G[idx]
    te, tr = npy(att.test_grads), npy(att.train_grads)
    out = 0
    for name, s in block_slices(prob.params, prob.names).items():
        g = G[:, s]
        lam = (g ** 2).mean() / c
        M = sum((np.eye(g.shape[1]) - np.outer(gk, gk) / (lam + gk @ gk)) / lam for gk in g)
        out = out + te[:, s] @ (M / len(g)) @ tr[:, s].T
    return out


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_datainf_equals_dense_formula(task):
    att = make_mlp(task, n=25)
    for ci in (0, 2):
        got = datainf(att, DatainfConfig(c_index=ci, chunk=4))
        want = datainf_dense(att, DatainfConfig().c_grid[ci])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    # subsampled average: seeded, and the dense formula on the same instances
    cfg = DatainfConfig(n_samples=9, seed=4)
    from fimoda.influence.datainf import datainf_indices
    idx = datainf_indices(25, cfg)
    assert len(idx) == 9 and len(set(idx)) == 9
    np.testing.assert_array_equal(datainf(att, cfg), datainf(att, cfg))
    np.testing.assert_allclose(datainf(att, cfg), datainf_dense(att, 10.0, idx), rtol=1e-9,
                               atol=1e-12)
    # the left-out rows (here rows 0..n'-1 of the training set) are always in the subsample
    att.loo_rows = torch.arange(len(att.X_loo))
    kept = datainf_indices(25, cfg, att.loo_rows.numpy())
    assert len(kept) == 9 and set(range(len(att.X_loo))) <= set(kept.tolist())
    np.testing.assert_allclose(datainf(att, cfg), datainf_dense(att, 10.0, kept), rtol=1e-9,
                               atol=1e-12)
    att.loo_rows = None
    lams = datainf_lambdas(att)
    G = npy(att.problem.loss_grads(att.problem.X, att.problem.Y))
    s = block_slices(att.problem.params, att.problem.names)["out.weight"]
    assert np.isclose(lams["out.weight"], (G[:, s] ** 2).mean() / 10.0, rtol=1e-12)


def test_datainf_is_sherman_morrison_for_one_example():
    att = make_mlp("classification", n=1, n_loo=1)
    got = datainf(att, DatainfConfig())
    prob = att.problem
    g = npy(prob.loss_grads(prob.X, prob.Y))[0]
    te, tr = npy(att.test_grads), npy(att.train_grads)
    want = 0
    for s in block_slices(prob.params, prob.names).values():
        lam = (g[s] ** 2).mean() / 10.0
        want = want + te[:, s] @ np.linalg.solve(np.outer(g[s], g[s]) + lam * np.eye(len(g[s])),
                                                 tr[:, s].T)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_datainf_large_lambda_is_grad_dot():
    att = make_mlp("classification", n=30, n_test=6, n_loo=12)
    cfg = DatainfConfig(c_grid=(1e-6,), c_index=0)
    got = datainf(att, cfg)
    lams = datainf_lambdas(att, cfg)
    sl = block_slices(att.problem.params, att.problem.names)
    te, tr = npy(att.test_grads), npy(att.train_grads)
    weighted = sum(te[:, s] @ tr[:, s].T / lams[n] for n, s in sl.items())
    assert cos_rows(got, weighted).min() > 0.9999
    # one layer: the layer weighting is a constant, DataInf -> Grad-Dot direction
    one = make_mlp("classification", n=30, n_test=6, n_loo=12, names=["out.weight"])
    got = datainf(one, cfg)
    gd = npy(one.test_grads @ one.train_grads.T)
    assert cos_rows(got, gd).min() > 0.99
    assert compute_scores("datainf", one, c_grid=(1e-6,)).shape == gd.shape


def test_datainf_bad_inputs():
    att = make_mlp("regression", n=5)
    for bad in (dict(c_index=4), dict(c_grid=(0.0,), c_index=0), dict(n_samples=0),
                dict(chunk=0)):
        with pytest.raises(ValueError):
            datainf(att, DatainfConfig(**bad))
