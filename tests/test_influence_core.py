"""Gradient-based methods, part A (first_order, inverse, arnoldi, generalized) against exact dense
references built independently of fimoda.gradients: flat-parameter closures differentiated with
torch.autograd.functional (per-example Hessians), float64, small trained MLPs."""
import copy

import types

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from fimoda.settings import MethodConfig
from fimoda.gradients import Problem
from fimoda.influence import Attributor, compute_scores
from fimoda.influence.arnoldi import arnoldi_eig
from fimoda.influence.errors import LissaDivergedError, NotConvergedError
from fimoda.influence.operators import DampedHessian, gram_spectrum
from fimoda.influence.solvers.cg import cg_inverse, cg_solve
from fimoda.influence.solvers.lissa import krylov_lissa_solve, lissa_diagonal, lissa_solve
from fimoda.models import MLP
from tolerances import gamma, residual_roundoff, woodbury_residual_gap

DT = torch.float64
# the damping multiple of lambda_G that every damped method uses by default (the paper's choice)
DEFAULT_DAMPING = MethodConfig.damping_grid[MethodConfig.damping_index]


# ----------------------------------------------------------------------------- fixtures
class Ref:
    """theta^f of a small trained MLP with everything computed by brute force."""

    def __init__(self, task, n=40, n_loo=10, n_test=6, seed=0, depth=2, hidden=8, steps=400,
                 lstsq=False):
        g = torch.Generator().manual_seed(seed)
        self.task = task
        k = 1 if task == "regression" else 3
        torch.manual_seed(seed)
        model = MLP(3, k, hidden=hidden, depth=depth).to(DT)
        Xall = torch.randn(n + n_test, 3, generator=g, dtype=DT)
        w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
        if task == "regression":
            Yall = torch.sin(Xall @ w) + 0.1 * torch.randn(n + n_test, generator=g, dtype=DT)
        else:
            W = torch.randn(3, 3, generator=g, dtype=DT)
            Yall = (Xall @ W + 0.5 * torch.randn(n + n_test, 3, generator=g, dtype=DT)).argmax(1)
        X, Y, Xt, Yt = Xall[:n], Yall[:n], Xall[n:], Yall[n:]
        if lstsq:   # linear regression at its exact stationary point
            sol = torch.linalg.lstsq(torch.cat([X, torch.ones(n, 1, dtype=DT)], 1), Y[:, None]).solution
            with torch.no_grad():
                model.out.weight.copy_(sol[:3].T)
                model.out.bias.copy_(sol[3])
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(steps):
                opt.zero_grad()
                self._loss(model(X), Y).mean().backward()
                opt.step()
        self.model, self.X, self.Y = model, X, Y
        self.problem = Problem(model, X, Y, task, progress=False)
        self.att = Attributor(self.problem, X[:n_loo], Y[:n_loo], Xt, Yt)
        self.loo = (X[:n_loo], Y[:n_loo])
        self.test = (Xt, Yt)
        # flat closures
        self.names = [nm for nm, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self.P = self.theta.numel()
        self.n = n
        # per-example quantities at theta^f
        self.gL = lambda Xs, Ys, th=None: torch.stack(
            [jacobian(lambda t: self.loss_i(t, x, y), self.theta if th is None else th)
             for x, y in zip(Xs, Ys)])
        self.H_i = torch.stack([hessian(lambda t: self.loss_i(t, x, y), self.theta, vectorize=True)
                                for x, y in zip(X, Y)])
        self.H = self.H_i.sum(0)
        fx = [(self.f_i(self.theta, x, y),
               jacobian(lambda t: self.f_i(t, x, y), self.theta)) for x, y in zip(X, Y)]
        self.f = torch.stack([a for a, _ in fx]).detach()
        self.phi = torch.stack([b for _, b in fx])
        self.d1, self.d2 = self._dl(self.f, Y)
        self.G = self.phi.T @ (self.d2[:, None] * self.phi)
        self.gR = self.gL(X, Y).sum(0)
        self.G_test = self.gL(*self.test)
        self.G_loo = self.gL(*self.loo)
        self.lamG = float((self.G_loo ** 2).mean())
        self.lamD = self.lamG * DEFAULT_DAMPING      # what the methods use when not told

    def _loss(self, out, y):
        if self.task == "regression":
            return (out.squeeze(-1) - y) ** 2
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    def params(self, t):
        out, k = {}, 0
        for nm, sh in zip(self.names, self.shapes):
            m = int(np.prod(sh))
            out[nm] = t[k:k + m].view(sh)
            k += m
        return out

    def out(self, t, x):
        return functional_call(self.model, self.params(t), (x[None],))[0]

    def loss_i(self, t, x, y):
        return self._loss(self.out(t, x)[None], y[None])[0]

    def f_i(self, t, x, y):
        o = self.out(t, x)
        if self.task == "regression":
            return o[0]
        others = torch.cat([o[:y], o[y + 1:]])
        return o[y] - torch.logsumexp(others, 0)

    def _dl(self, f, y):
        if self.task == "regression":
            return 2 * (f - y), torch.full_like(f, 2.0)
        s = torch.sigmoid(f)
        return -(1 - s), s * (1 - s)

    def A(self, hessian, lam, risk="mean"):
        M = self.G if hessian == "gn" else self.H
        c = self.n if risk == "mean" else 1
        return M / c + lam * torch.eye(self.P, dtype=DT)

    def dense(self, hessian, lam, risk="mean", left=None):
        left = self.G_loo if left is None else left
        return (self.G_test @ torch.linalg.solve(self.A(hessian, lam, risk), left.T)).numpy()

    def pd_damping(self):
        """A damping making H/n + lambda I positive definite (>= lambda_G)."""
        lmin = float(torch.linalg.eigvalsh(self.H / self.n)[0])
        return max(self.lamG, 1.5 * max(-lmin, 0.0) + self.lamG)




@pytest.fixture(scope="module")
def reg():
    return Ref("regression")


@pytest.fixture(scope="module")
def clf():
    return Ref("classification", seed=1)


@pytest.fixture(scope="module", params=["regression", "classification"])
def ref(request, reg, clf):
    return reg if request.param == "regression" else clf


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def cos_rows(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ----------------------------------------------------------------------------- first order
def test_grad_dot_and_cos_match_autograd_loop(ref):
    p = ref.problem
    params = [q for q in ref.model.parameters()]

    def loop(Xs, Ys):
        rows = []
        for x, y in zip(Xs, Ys):
            loss = ref._loss(ref.model(x[None]), y[None])[0]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    gt, gl = loop(*ref.test), loop(*ref.loo)
    want = (gt @ gl.T).numpy()
    got = compute_scores("grad_dot", ref.att)
    assert got.shape == (6, 10)
    assert rel_err(got, want) < 1e-12
    lam = ref.att.lambda_G * 10.0
    assert rel_err(compute_scores("grad_dot", ref.att, scale=True, damping_index=2), want / lam) < 1e-12
    cosw = (gt / gt.norm(dim=1, keepdim=True)) @ (gl / gl.norm(dim=1, keepdim=True)).T
    got_cos = compute_scores("grad_cos", ref.att)
    # each side knows a gradient's direction to 6 gamma_{K+3} ||J|| / ||g|| (J: the K logits'
    # Jacobian): the logit gradient softmax - e_y is formed to gamma_{K+3} absolutely, a large
    # relative error for a confident example, ||g|| ~ (1 - p_y) ||J|| (regression: a scalar factor,
    # no direction error); dots and normalisations of unit P-vectors add 6 gamma_{P+2}, which also
    # covers the backward passes' rounding of these 2-layer width-8 nets (~3 gamma_10 per entry)
    dir_err = lambda Xs, Gs: np.array([
        0.0 if ref.task == "regression" else
        6 * gamma(ref.model.out.out_features + 3) * float(torch.linalg.matrix_norm(
            jacobian(lambda t: ref.out(t, x), ref.theta), ord=2)) / float(g.norm())
        for x, g in zip(Xs, Gs)])
    tol = 6 * gamma(ref.P + 2) + dir_err(ref.test[0], gt)[:, None] + dir_err(ref.loo[0], gl)[None]
    assert (np.abs(got_cos - cosw.numpy()) <= tol).all()
    assert p.n_params == ref.P


# ----------------------------------------------------------------------------- dense + CG
def test_dense_matches_hand_built(ref):
    lam = ref.lamD                                            # the default damping
    for mat in ("auto", "never"):                             # spectral formula and dense solve
        got = compute_scores("dense", ref.att, hessian="gn", materialize=mat)
        assert rel_err(got, ref.dense("gn", lam)) < 1e-9, mat
    lam_h = ref.pd_damping()
    got = compute_scores("dense", ref.att, hessian="true", damping=lam_h)
    assert rel_err(got, ref.dense("true", lam_h)) < 1e-9
    # risk="sum" with n lambda is the same method, n times smaller
    s_sum = compute_scores("dense", ref.att, hessian="gn", risk="sum", damping=ref.n * lam)
    assert rel_err(ref.n * s_sum, ref.dense("gn", lam)) < 1e-9


def test_cg_matches_dense_to_tolerance(ref):
    lam, lam_h = ref.lamD, ref.pd_damping()
    for hess, damp, mat in (("gn", None, "auto"), ("gn", None, "never"), ("true", lam_h, "never")):
        got = compute_scores("cg", ref.att, hessian=hess, damping=damp, materialize=mat)
        want = ref.dense(hess, lam if damp is None else damp)
        assert cos_rows(got, want).min() >= 0.999999
        assert rel_err(got, want) < 1e-6, (hess, mat)
    # the solver's own guarantee: true relative residual <= tol, checked on the explicit matrix
    A_ref = ref.A("gn", lam)
    op = DampedHessian(ref.att, "gn", lam, materialize="never")
    B = ref.G_test.T.contiguous()
    X, info = cg_solve(op.matmat, B, tol=1e-8, max_iter=500, progress=False)
    res = (B - A_ref @ X).norm(dim=0) / B.norm(dim=0)
    assert float(res.max()) <= 1e-8 and info["rel_residual"].max() <= 1e-8
    assert 0 < info["iterations"] < 500


def test_cg_errors(reg):
    with pytest.raises(NotConvergedError, match="max_iter"):
        compute_scores("cg", reg.att, max_iter=2)
    lmin = float(torch.linalg.eigvalsh(reg.H / reg.n)[0])
    assert lmin < 0, "the fixture should have an indefinite true Hessian"
    with pytest.raises(ValueError, match="not positive definite"):
        compute_scores("cg", reg.att, hessian="true", damping=1e-6 * reg.lamG, materialize="never")


def true_residual(A, B, X):
    return float(((B - A @ X).norm(dim=0) / B.norm(dim=0)).max())


def test_block_cg_matches_dense_in_fewer_steps(ref):
    """Block CG on both Hessians (operators built by autograd, checked on the explicit matrices):
    the dense solution to cos 0.999999, true residual <= tol, and no more CG steps (nor products)
    than the per-column recurrences; cg_block=False gives the same scores."""
    lam_h = ref.pd_damping()
    B = ref.G_loo.T.contiguous()                                       # k = 10 right-hand sides
    for hess, lam in (("gn", ref.lamG), ("true", lam_h)):
        A_ref = ref.A(hess, lam)
        op = DampedHessian(ref.att, hess, lam, materialize="never")
        want = torch.linalg.solve(A_ref, B)
        Xb, ib = cg_solve(op.matmat, B, tol=1e-8, max_iter=500, progress=False)
        Xc, ic = cg_solve(op.matmat, B, tol=1e-8, max_iter=500, progress=False, block=False)
        assert ib["block"] and not ic["block"]
        for X in (Xb, Xc):
            assert true_residual(A_ref, B, X) <= 1e-8, hess
            assert cos_rows(X.T.numpy(), want.T.numpy()).min() >= 0.999999, hess
        assert ib["iterations"] <= ic["iterations"], (hess, ib, ic)
        assert ib["products"] <= ic["products"], (hess, ib, ic)
        kw = dict(hessian=hess, damping=lam, materialize="never")
        assert rel_err(compute_scores("cg", ref.att, **kw),
                       compute_scores("cg", ref.att, cg_block=False, **kw)) < 1e-6, hess
    # on an explicit SPD matrix with a wide spectrum the block advantage is large
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=DT))
    A = (Q * torch.logspace(-3, 0, 300, dtype=DT)) @ Q.T
    Bx = torch.randn(300, 8, generator=g, dtype=DT)
    _, ib = cg_solve(lambda V: A @ V, Bx, tol=1e-8, max_iter=2000, progress=False)
    _, ic = cg_solve(lambda V: A @ V, Bx, tol=1e-8, max_iter=2000, progress=False, block=False)
    assert 2 * ib["iterations"] <= ic["iterations"], (ib, ic)


def test_block_cg_rank_deficient_right_hand_sides(reg):
    """Repeated, proportional and zero columns (a rank-2 block of 5): the block recurrence must
    not break down (orthonormalised, rank-revealing search blocks) and every column is solved."""
    lam = reg.lamG
    A_ref = reg.A("gn", lam)
    op = DampedHessian(reg.att, "gn", lam, materialize="never")
    b1, b2 = reg.G_test[0], reg.G_test[1]
    B = torch.stack([b1, b2, b1, -3.0 * b2, torch.zeros_like(b1)], dim=1)
    X, info = cg_solve(op.matmat, B, tol=1e-8, max_iter=500, progress=False)
    want = torch.linalg.solve(A_ref, B)
    assert torch.equal(X[:, 4], torch.zeros_like(b1)) and info["rel_residual"][4] == 0
    assert true_residual(A_ref, B[:, :4], X[:, :4]) <= 1e-8
    assert rel_err(X.numpy(), want.numpy()) < 1e-6
    # every step multiplies at most rank(B) = 2 search directions (+ 5 for the final check)
    assert info["products"] <= 2 * info["iterations"] + 5


def test_block_cg_indefinite_and_budget_errors(reg):
    """A symmetric indefinite matrix is reported by both variants (block: the Cholesky factor of
    P^T A P fails), and so is an exhausted step budget."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=DT))
    ev = torch.linspace(0.1, 2.0, 50, dtype=DT)
    ev[7] = -0.5
    A = (Q * ev) @ Q.T
    Bx = torch.randn(50, 4, generator=g, dtype=DT)
    for block in (True, False):
        with pytest.raises(ValueError, match="not positive definite"):
            cg_solve(lambda V: A @ V, Bx, max_iter=200, progress=False, block=block)
    lmin = float(torch.linalg.eigvalsh(reg.H / reg.n)[0])
    for block in (True, False):
        with pytest.raises(ValueError, match="not positive definite"):
            compute_scores("cg", reg.att, hessian="true", damping=0.1 * -lmin,
                           materialize="never", cg_block=block)
        with pytest.raises(NotConvergedError, match="max_iter"):
            compute_scores("cg", reg.att, hessian="true", damping=reg.pd_damping(),
                           materialize="never", max_iter=2, cg_block=block)


def test_cg_on_the_materialised_gauss_newton(ref):
    """Materialised G, n <= P: CG on the dual n x n system reaches the same PRIMAL relative
    residual (checked against the dense matrix) in about as many steps as CG on A itself, with the
    same solution. n > P (forced here): block and per-column CG in the coordinates of span(V) +
    span(B) are the recurrences of R^P in an orthonormal basis: the same number of steps (up to
    round-off, which CG amplifies over ~80 steps) and the same solution to the tolerance."""
    A = DampedHessian(ref.att, "gn", ref.lamG)                         # materialised
    assert A.kernel is not None and A._spectral is None               # no spectrum for CG
    A_ref = ref.A("gn", ref.lamG)
    B = ref.G_loo.T.contiguous()
    for block in (True, False):
        Xd, idual = cg_inverse(A, B, 1e-8, 500, block=block)
        Xp, ip = cg_solve(A.matmat, B, tol=1e-8, max_iter=500, progress=False, block=block)
        assert idual["iterations"] <= 1.25 * ip["iterations"] + 2, (idual, ip)
        assert rel_err(Xd.numpy(), Xp.numpy()) < 1e-6
        # the reported residual is the exact one or a certified upper bound of it, up to the
        # round-off of evaluating it through the dual residual and of this dense re-evaluation
        slack = float((woodbury_residual_gap(ref.G / ref.n, ref.lamG, Xd, B)
                       + residual_roundoff(A_ref, Xd, B)).max())
        assert true_residual(A_ref, B, Xp) <= 1e-8
        assert true_residual(A_ref, B, Xd) <= 1e-8 + slack
        assert (idual["rel_residual"] <= 1e-8).all()
        assert true_residual(A_ref, B, Xd) <= idual["rel_residual"].max() + slack
    A.kernel = None                                   # the n > P route
    assert A.spectral is not None
    # its spectrum drops G's eigenvalues <= m eps e_max, m = min(n, P) (gram_spectrum), and the
    # eigensolver's backward error is ~u ||G|| (Golub & Van Loan sec. 8.3; taken as gamma_P ||G||):
    # the operator of its residuals differs from A_ref by that much, times ||x|| / ||b|| on them
    e_max = float(torch.linalg.matrix_norm(ref.G / ref.n, ord=2))
    dropped = (min(ref.n, ref.P) * torch.finfo(DT).eps + gamma(ref.P)) * e_max
    for block in (True, False):
        Xz, iz = cg_inverse(A, B, 1e-8, 500, block=block)
        Xp, ip = cg_solve(A.matmat, B, tol=1e-8, max_iter=500, progress=False, block=block)
        assert abs(iz["iterations"] - ip["iterations"]) <= max(1, 0.05 * ip["iterations"])
        assert rel_err(Xz.numpy(), Xp.numpy()) < 1e-6
        slack = float((dropped * Xz.norm(dim=0) / B.norm(dim=0)
                       + residual_roundoff(A_ref, Xz, B)).max())
        assert true_residual(A_ref, B, Xp) <= 1e-8
        assert true_residual(A_ref, B, Xz) <= 1e-8 + slack


# ----------------------------------------------------------------------------- G spectrum
def test_gram_from_lower_blocks():
    from fimoda.influence.operators import gram
    g = torch.Generator().manual_seed(0)
    for n in (5, 600, 1100):
        a = torch.randn(n, 40, generator=g, dtype=DT)
        K = gram(a)
        assert torch.equal(K, K.T)
        assert rel_err(K, a @ a.T) < 1e-14


def test_gram_spectrum_is_exact_and_orthonormal():
    """gram_spectrum(a) = eigen-decomposition of a^T a: both routes (n <= P: Gram matrix a a^T;
    n > P: a^T a), a rank-deficient a (its null space is dropped), and an a whose a^T a has
    condition number 1e16: eigenvalues under the cut-off are dropped, and the damped inverse is
    still that of an SVD to the accuracy of a dense solve."""
    g = torch.Generator().manual_seed(0)
    for n, P, rank in ((40, 120, 40), (40, 120, 25), (150, 60, 60), (150, 60, 30)):
        a = torch.randn(n, rank, generator=g, dtype=DT) @ torch.randn(rank, P, generator=g,
                                                                       dtype=DT)
        sp = gram_spectrum(a)
        V, e = sp.basis, sp.eig
        assert V.shape == (rank, P) and e.shape == (rank,)
        assert float((V @ V.T - torch.eye(rank, dtype=DT)).abs().max()) < 1e-13
        assert bool((e[:-1] >= e[1:]).all()) and float(e[-1]) > 0
        G = a.T @ a
        assert float((V.T @ (e[:, None] * V) - G).abs().max()) < 1e-12 * float(G.abs().max())
        ev = torch.linalg.eigvalsh(G).flip(0)[:rank]
        assert float((e - ev).abs().max()) < 1e-12 * float(ev[0])
    # singular values 1 ... 1e-8: e = s^2 spans 16 decades, the tail is below round-off
    n, P = 60, 200
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    W, _ = torch.linalg.qr(torch.randn(P, n, generator=g, dtype=DT))
    s = torch.logspace(0, -8, n, dtype=DT)
    a = (U * s) @ W.T
    sp = gram_spectrum(a)
    cut = n * torch.finfo(DT).eps                                      # e_max = 1
    assert len(sp.eig) == int((s ** 2 > cut).sum()) < n                # the tail is dropped
    assert float((sp.basis @ sp.basis.T - torch.eye(len(sp.eig), dtype=DT)).abs().max()) < 1e-13
    for lam in (1e-3, 1e-8):
        B = torch.randn(P, 3, generator=g, dtype=DT)
        C = W.T @ B
        want = W @ (C / (s[:, None] ** 2 + lam)) + (B - W @ C) / lam    # exact (G + lam I)^-1 B
        C2 = sp.basis @ B
        got = sp.basis.T @ (C2 / (sp.eig + lam)[:, None]) + (B - sp.basis.T @ C2) / lam
        # the dropped eigenvalues (< cut) act as 0: relative error <= cut / lam
        assert float((got - want).norm() / want.norm()) < cut / lam


def test_float32_model_spectrum_is_accurate():
    """A float32 model: the Gram matrix is formed in float64 (in float32 its round-off,
    ~1e-7 ||G||, would exceed the damping), so the spectral solve is as accurate as a float32
    dense solve of the same damped matrix."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=g)
    Y = torch.sin(X @ torch.tensor([1.0, -2.0, 0.5]))
    model = MLP(3, 1, hidden=8, depth=2)
    att = Attributor(Problem(model, X, Y, "regression", progress=False), X[:5], Y[:5], X[5:9],
                     Y[5:9])
    ref64 = Problem(copy.deepcopy(model).double(), X.double(), Y.double(), "regression",
                    progress=False)
    phi, _, _, d2 = ref64.gn_pieces(ref64.X, ref64.Y)
    G = phi.T @ (d2[:, None] * phi) / len(X)                           # G/n, exact reference
    lam = 1e-4 * float(torch.linalg.eigvalsh(G)[-1])
    Aref = G + lam * torch.eye(len(G), dtype=DT)
    A = DampedHessian(att, "gn", lam)
    assert A.spectral is not None and A.spectral.basis.dtype == torch.float32
    B = torch.randn(len(G), 3, generator=g, dtype=DT)
    want = torch.linalg.solve(Aref, B)
    err = lambda x: float((x.double() - want).norm() / want.norm())
    dense32 = err(torch.linalg.solve(A.dense(), B.float()))             # float32 dense solve
    ours = err(A.solve(B.float()))
    assert ours <= max(2 * dense32, 1e-6), (ours, dense32)
    # the same Gram route in float32 would be far off: its round-off is above the damping
    sp32 = gram_spectrum(phi.float() * torch.sqrt(d2.float() / len(X))[:, None])
    C = sp32.basis @ B.float()
    bad = sp32.basis.T @ (C / (sp32.eig + lam)[:, None]) + (B.float() - sp32.basis.T @ C) / lam
    assert err(bad) > 100 * ours


def test_solving_either_side_gives_the_same_scores(reg):
    att2 = Attributor(reg.problem, reg.test[0], reg.test[1], reg.loo[0], reg.loo[1])  # T > n'
    for name, kw in (("dense", {}), ("cg", {}), ("lissa", dict(scale=100.0, depth=200))):
        kw = dict(kw, damping=reg.lamG)        # lambda_G would differ: it uses the left-out set
        a = compute_scores(name, reg.att, **kw)
        b = compute_scores(name, att2, **kw)
        assert rel_err(b.T, a) < 1e-7, name


# ----------------------------------------------------------------------------- LiSSA
def lissa_closed_form(A, B, scale, depth):
    """v_depth / scale with v_t = sum_{s<=t} (I - A/scale)^s b, in A's eigenbasis."""
    ev, U = torch.linalg.eigh(A)
    r = 1 - ev / scale
    poly = (1 - r ** (depth + 1)) / (1 - r)
    return U @ ((poly / scale)[:, None] * (U.T @ B))


def test_lissa_is_its_recurrence_and_converges_to_dense(ref):
    lam = ref.lamD
    A = ref.A("gn", lam)
    lmax = float(torch.linalg.eigvalsh(A)[-1])
    scale = 1.05 * lmax
    # (a) short run: both operator paths reproduce the truncated series exactly
    want = (ref.G_test @ lissa_closed_form(A, ref.G_loo.T, scale, 40)).numpy()
    for mat in ("auto", "never"):
        got = compute_scores("lissa", ref.att, scale=scale, depth=40, materialize=mat)
        assert rel_err(got, want) < 1e-9, mat
    # (b) a long run (spectral path: cheap) converges to the dense solve; depth for ~1e-6 error
    lam = 10 * ref.lamG
    ev = torch.linalg.eigvalsh(ref.A("gn", lam))
    scale = 1.05 * float(ev[-1])
    depth = int(np.ceil(np.log(1e-6) / np.log(1 - float(ev[0]) / scale)))
    assert depth < 30000, depth
    got = compute_scores("lissa", ref.att, scale=scale, depth=depth, damping_index=2)
    dense = ref.dense("gn", lam)
    assert cos_rows(got, dense).min() >= 0.999
    assert rel_err(got, dense) < 1e-5


def test_gauss_newton_routes_with_more_data_than_parameters():
    """n > P: the materialised G goes through its P-dimensional spectrum (no n x n kernel); CG,
    the exact solve and LiSSA agree with the dense references there too."""
    r = Ref("regression", n=40, hidden=2, depth=1)
    assert r.P < r.n
    A = DampedHessian(r.att, "gn", r.lamD)
    assert A.kernel is None and A.spectral is not None
    dense = r.dense("gn", r.lamD)
    assert rel_err(compute_scores("dense", r.att), dense) < 1e-9
    assert rel_err(compute_scores("cg", r.att), dense) < 1e-6
    Ad = r.A("gn", r.lamD)
    scale = 1.05 * float(torch.linalg.eigvalsh(Ad)[-1])
    want = (r.G_test @ lissa_closed_form(Ad, r.G_loo.T, scale, 60)).numpy()
    assert rel_err(compute_scores("lissa", r.att, scale=scale, depth=60), want) < 1e-9


def test_gauss_newton_lissa_kernel_and_krylov_agree(ref, monkeypatch):
    """Three evaluations of the same full-batch series on the Gauss-Newton matrix: the closed
    form from the n x n kernel's eigen-decomposition (materialised), the block Krylov subspace of
    Hessian-vector products (materialize="never"), and the Krylov subspace of the materialised
    kernel's products (what large n takes, where K's eigen-decomposition costs more), at the
    paper's depth."""
    from fimoda.influence.solvers import lissa as lissa_solvers
    lmax = float(torch.linalg.eigvalsh(ref.A("gn", ref.lamG))[-1])
    kw = dict(scale=1.05 * lmax, depth=5000, damping_index=1)
    a = compute_scores("lissa", ref.att, **kw)
    b = compute_scores("lissa", ref.att, materialize="never", **kw)
    assert rel_err(a, b) < 1e-9
    calls = []
    monkeypatch.setattr(lissa_solvers, "krylov_lissa_solve",
                        lambda *x, **k: calls.append(1) or krylov_lissa_solve(*x, **k))
    monkeypatch.setattr(lissa_solvers, "kernel_eig_costlier", lambda A, k: True)
    c = compute_scores("lissa", ref.att, **kw)
    assert calls and rel_err(a, c) < 1e-9



def test_kernel_lissa_route_follows_the_cost_model(reg):
    """Small n: K's eigen-decomposition is the cheaper exact evaluation; n^2 >> P k: Krylov."""
    from fimoda.influence.solvers.lissa import kernel_eig_costlier
    A = DampedHessian(reg.att, "gn", reg.lamG)
    assert A.kernel is not None and not kernel_eig_costlier(A, 10)
    shape = types.SimpleNamespace(shape=(9000, 20000))              # FICO-sized a: n x P
    big = types.SimpleNamespace(kernel=types.SimpleNamespace(_eig=None, a=shape))
    assert kernel_eig_costlier(big, 100)
    big.kernel._eig = ("cached",)
    assert not kernel_eig_costlier(big, 100)


def test_lissa_h_converges_to_dense_true(reg):
    lam = reg.pd_damping() + 0.02 * float(torch.linalg.eigvalsh(reg.H / reg.n)[-1])
    A = reg.A("true", lam)
    ev = torch.linalg.eigvalsh(A)
    assert float(ev[0]) > 0
    scale = 1.05 * float(ev[-1])
    depth = int(np.ceil(np.log(1e-6) / np.log(1 - float(ev[0]) / scale)))   # error ~1e-6
    assert depth < 1500, depth
    got = compute_scores("lissa_h", reg.att, scale=scale, depth=depth, damping=lam)
    want = (reg.G_test @ lissa_closed_form(A, reg.G_loo.T, scale, depth)).numpy()
    assert rel_err(got, want) < 1e-9
    assert cos_rows(got, reg.dense("true", lam)).min() >= 0.999


def test_lissa_divergence_raises(ref):
    lmax = float(torch.linalg.eigvalsh(ref.A("gn", ref.lamG))[-1])
    for mat in ("auto", "never"):
        with pytest.raises(LissaDivergedError, match="increase `scale`"):
            compute_scores("lissa", ref.att, scale=0.4 * lmax, depth=3000, materialize=mat,
                           scale_grid=())
    # the paper's rule: the smallest scale of a grid that does not diverge
    with pytest.warns(UserWarning, match="used scale"):
        got = compute_scores("lissa", ref.att, scale=0.4 * lmax, depth=300,
                             scale_grid=(0.2 * lmax, 0.45 * lmax, 1.2 * lmax, 5 * lmax))
    assert np.array_equal(got, compute_scores("lissa", ref.att, scale=1.2 * lmax, depth=300))
    # a bare recurrence with a valid scale never trips the detector
    A = ref.A("gn", ref.lamG)
    out = lissa_solve(lambda t, V: A @ V, ref.G_test.T, 1.01 * lmax, 2000, progress=False)
    assert torch.isfinite(out).all()


def test_lissa_h_indefinite_hessian_diverges(reg):
    # H/n + lambda I with lambda below |lambda_min(H/n)|: no scale can make LiSSA converge
    H = reg.H / reg.n
    ev = torch.linalg.eigvalsh(H)
    lam = 0.1 * float(-ev[0])
    A = H + lam * torch.eye(reg.P, dtype=DT)
    with pytest.raises(LissaDivergedError):
        lissa_solve(lambda t, V: A @ V, reg.G_test.T, 1.1 * float(ev[-1] + lam), 5000,
                    progress=False)


def test_lissa_diagonal_is_the_recurrence_with_its_divergence_test():
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(30, 3, generator=g, dtype=DT)
    base = torch.cat([torch.zeros(1, dtype=DT), torch.logspace(-12, 0, 29, dtype=DT)])
    for theta, scale, depth in ((base, 1.0, 1), (base, 1.0, 37), (base, 0.6, 5000),
                                (base * 1.9, 1.0, 800)):
        want = lissa_solve(lambda t, W: theta[:, None] * W, Z, scale, depth, progress=False)
        got = lissa_diagonal(theta, Z, scale, depth)
        assert rel_err(got, want) < 1e-11, (scale, depth)
    # diverging directions: the closed form raises exactly when the recurrence does
    outcomes = []
    for theta, scale, depth in ((base * 2.2, 1.0, 60), (base * 2.2, 1.0, 30),
                                (base * 2.2, 1.0, 3), (base - 1e-3, 1.0, 5000),
                                (base - 1e-3, 1.0, 100)):
        try:
            lissa_solve(lambda t, W: theta[:, None] * W, Z, scale, depth, progress=False)
            diverged = False
        except LissaDivergedError:
            diverged = True
        if diverged:
            with pytest.raises(LissaDivergedError):
                lissa_diagonal(theta, Z, scale, depth)
        else:
            lissa_diagonal(theta, Z, scale, depth)
        outcomes.append(diverged)
    assert outcomes == [True, False, False, True, False]


def test_krylov_lissa_is_the_truncated_series():
    """The block-Krylov evaluation of full-batch LiSSA equals the closed-form truncated series:
    exactly for depth < number of blocks, to its tolerance for long series, with far fewer
    products than the recurrence; divergence is detected as in the recurrence."""
    g = torch.Generator().manual_seed(0)
    P, k = 120, 4
    Qm, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    ev = torch.logspace(-3, 0, P, dtype=DT)                  # condition number 1000
    A = (Qm * ev) @ Qm.T
    B = torch.randn(P, k, generator=g, dtype=DT)
    calls = []

    def matmat(V):
        calls.append(V.shape[1])
        return A @ V
    scale = 1.05
    for depth in (1, 3, 7):                                  # exact: depth + 1 blocks
        calls.clear()
        got = krylov_lissa_solve(matmat, B, scale, depth, progress=False)
        assert rel_err(got, lissa_closed_form(A, B, scale, depth)) < 1e-12, depth
        assert len(calls) == depth + 1
    for depth in (200, 5000):                                # long series: converged subspace
        calls.clear()
        got = krylov_lissa_solve(matmat, B, scale, depth, tol=1e-10, progress=False)
        want = lissa_closed_form(A, B, scale, depth)
        assert rel_err(got, want) < 1e-8, depth
        rec = lissa_solve(lambda t, V: A @ V, B, scale, depth, progress=False)
        assert rel_err(got, rec) < 1e-8, depth
        assert sum(calls) < depth * k / 2, (depth, sum(calls))
    # invariant subspace: A with 5 distinct eigenvalues -> exact after 5 products per column
    A5 = (Qm * ev[torch.arange(P) % 5]) @ Qm.T
    got = krylov_lissa_solve(lambda V: A5 @ V, B, scale, 5000, progress=False)
    assert rel_err(got, lissa_closed_form(A5, B, scale, 5000)) < 1e-10
    # low rank + damping (a materialised Gauss-Newton's shape): the space becomes invariant after
    # rank + k directions, and what is left of A Q is round-off that must not enter the basis
    g2 = torch.Generator().manual_seed(3)
    Phi = torch.randn(30, P, generator=g2, dtype=DT) * torch.logspace(0, -4, 30, dtype=DT)[:, None]
    Alow = Phi.T @ Phi + 1e-4 * torch.eye(P, dtype=DT)
    s_low = 1.05 * float(torch.linalg.eigvalsh(Alow)[-1])
    got = krylov_lissa_solve(lambda V: Alow @ V, B, s_low, 5000, progress=False)
    assert rel_err(got, lissa_closed_form(Alow, B, s_low, 5000)) < 1e-9
    # divergence: a scale below lambda_max / 2, and an indefinite matrix
    with pytest.raises(LissaDivergedError):
        krylov_lissa_solve(matmat, B, 0.4, 5000, progress=False)
    Aneg = (Qm * (ev - 0.01)) @ Qm.T
    with pytest.raises(LissaDivergedError):
        krylov_lissa_solve(lambda V: Aneg @ V, B, scale, 5000, progress=False)
    # a basis that would not fit: None (the caller runs the recurrence)
    assert krylov_lissa_solve(matmat, B, scale, 5000, max_cols=8, progress=False) is None


def test_lissa_h_krylov_matches_recurrence(reg):
    lam = reg.pd_damping() + 0.02 * float(torch.linalg.eigvalsh(reg.H / reg.n)[-1])
    scale = 1.05 * float(torch.linalg.eigvalsh(reg.A("true", lam))[-1])
    kw = dict(scale=scale, damping=lam)
    for depth in (12, 400):
        a = compute_scores("lissa_h", reg.att, depth=depth, **kw)
        b = compute_scores("lissa_h", reg.att, depth=depth, full_batch="recurrence", **kw)
        assert rel_err(a, b) < 1e-7, depth
    # too little memory for the basis: the recurrence, with a warning
    with pytest.warns(UserWarning, match="running the recurrence"):
        c = compute_scores("lissa_h", reg.att, depth=400, memory_gb=1e-6, **kw)
    assert rel_err(c, b) < 1e-12
    with pytest.raises(ValueError, match="full_batch"):
        compute_scores("lissa_h", reg.att, depth=5, full_batch="lanczos", **kw)


@pytest.mark.parametrize("fx", ["reg", "clf"])
def test_batch_hessian_products_are_the_rows_hessian(fx, request):
    """A mini-batch product (n/|B|) M_B V / n, by the per-example rows of the batch (k > 2
    columns) and by two backward passes per column (k <= 2), against the brute-force Hessian of
    those rows (G: l'' phi phi^T; H: the per-example Hessians)."""
    r = request.getfixturevalue(fx)
    idx = torch.tensor([3, 17, 5, 30, 11])
    scale = r.n / (len(idx) * r.n)
    G_B = r.phi[idx].T @ (r.d2[idx, None] * r.phi[idx]) * scale
    H_B = r.H_i[idx].sum(0) * scale
    V = torch.randn(r.P, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    for hessian, M in (("gn", G_B), ("true", H_B)):
        A = DampedHessian(r.att, hessian, lam=0.0, materialize="never")
        assert A.kernel is None
        for k in (1, 2, 4):
            got = A.batch_hess(V[:, :k], idx)
            assert torch.allclose(got, M @ V[:, :k], rtol=1e-10, atol=1e-12), (hessian, k)


def test_stochastic_lissa(reg):
    lam = reg.lamD
    lmax = float(torch.linalg.eigvalsh(reg.A("gn", lam))[-1])
    kw = dict(scale=2 * lmax, depth=150, batch_size=20)
    a = compute_scores("lissa", reg.att, **kw)
    b = compute_scores("lissa", reg.att, **kw)
    assert np.array_equal(a, b)                                       # seeded
    c = compute_scores("lissa", reg.att, **kw, seed=1)
    assert not np.array_equal(a, c)
    full = compute_scores("lissa", reg.att, scale=2 * lmax, depth=150, materialize="never")
    assert cos_rows(a, full).min() > 0.9                              # unbiased batch products
    same = compute_scores("lissa", reg.att, scale=2 * lmax, depth=30, batch_size=reg.n)
    assert rel_err(same, compute_scores("lissa", reg.att, scale=2 * lmax, depth=30)) < 1e-9


# ----------------------------------------------------------------------------- Arnoldi
def test_arnoldi_full_rank_is_dense(ref):
    lam = ref.pd_damping()
    got = compute_scores("arnoldi", ref.att, rank=ref.P, n_iter=ref.P, damping=lam)
    assert rel_err(got, ref.dense("true", lam)) < 1e-8
    got = compute_scores("arnoldi", ref.att, hessian="gn", rank=ref.P, n_iter=ref.P)
    assert rel_err(got, ref.dense("gn", ref.lamD)) < 1e-8   # rank-deficient G: restarts


def test_arnoldi_small_rank_is_the_projection(reg):
    lam, k = reg.pd_damping(), 5
    mu, U = torch.linalg.eigh(reg.H / reg.n)
    top = torch.argsort(mu.abs(), descending=True)[:k]
    assert float(mu.abs()[top[-1]] / mu.abs()[torch.argsort(mu.abs(), descending=True)[k]]) > 1.05
    Uk, mk = U[:, top], mu[top]
    want = ((reg.G_test @ Uk) / (mk + lam)) @ (reg.G_loo @ Uk).T
    got = compute_scores("arnoldi", reg.att, rank=k, n_iter=reg.P, damping=lam)
    assert rel_err(got, want.numpy()) < 1e-8
    # Ritz values after a few steps approximate the extreme eigenvalues (the Arnoldi property)
    op = lambda v: (reg.H / reg.n) @ v
    ritz, _ = arnoldi_eig(op, reg.P, 40, 0, DT, "cpu", progress=False)
    assert abs(float(ritz[-1] - mu[-1])) < 1e-6 * float(mu.abs().max())


# ----------------------------------------------------------------------------- generalized
def test_generalized_match_hand_built(ref):
    lam_h, lam = ref.pd_damping(), ref.lamD
    Xl, Yl = ref.loo
    n_loo = len(Xl)
    # prop1 (true H)
    A = ref.A("true", lam_h)
    step = -torch.linalg.solve(A, ref.gR / ref.n)
    W = ref.G_loo + torch.einsum("ipq,q->ip", ref.H_i[:n_loo], step)
    want = ref.dense("true", lam_h, left=W)
    for solver in ("dense", "cg"):
        got = compute_scores("prop1", ref.att, damping=lam_h, solver=solver, materialize="never")
        assert rel_err(got, want) < 1e-6, solver
    # cor2 (Gauss-Newton)
    Ag = ref.A("gn", lam)
    step_g = -torch.linalg.solve(Ag, ref.gR / ref.n)
    coef = ref.d1[:n_loo] + ref.d2[:n_loo] * (ref.phi[:n_loo] @ step_g)
    want = ref.dense("gn", lam, left=coef[:, None] * ref.phi[:n_loo])
    for solver in ("dense", "cg"):
        got = compute_scores("cor2", ref.att, solver=solver)
        assert rel_err(got, want) < 1e-6, solver
    # eq16 (true H; gradients at theta^f + step)
    W16 = ref.gL(Xl, Yl, ref.theta + step)
    want = ref.dense("true", lam_h, left=W16)
    got = compute_scores("eq16", ref.att, damping=lam_h, solver="dense")
    assert rel_err(got, want) < 1e-8
    # the extra term matters at a non-stationary theta^f
    assert rel_err(compute_scores("dense", ref.att, hessian="true", damping=lam_h),
                   compute_scores("prop1", ref.att, damping=lam_h, solver="dense")) > 1e-3


def test_generalized_methods_share_their_solves(reg, monkeypatch):
    """Prop. 1 and eq. 16 on the same damped true Hessian solve the same two systems (the Newton
    step and the test side): the second method reuses both, bit-identically to solving anew."""
    from fimoda.influence import generalized
    lam = reg.pd_damping()
    fresh = {m: compute_scores(m, Attributor(reg.att.problem, *reg.loo, *reg.test),
                               damping=lam, materialize="never") for m in ("prop1", "eq16")}
    calls = []
    real = generalized.cg_inverse
    monkeypatch.setattr(generalized, "cg_inverse", lambda *a, **k: calls.append(1) or real(*a, **k))
    att = Attributor(reg.att.problem, *reg.loo, *reg.test)
    a = compute_scores("prop1", att, damping=lam, materialize="never")
    assert len(calls) == 2                               # Newton step + test-side solve
    b = compute_scores("eq16", att, damping=lam, materialize="never")
    assert len(calls) == 2                               # both reused
    assert np.array_equal(a, fresh["prop1"]) and np.array_equal(b, fresh["eq16"])
    compute_scores("eq16", att, damping=2 * lam, materialize="never")
    assert len(calls) == 4                               # another operator: solved anew


def test_stationary_point_reduces_to_classical_influence():
    lin = Ref("regression", depth=0, lstsq=True, seed=3)
    assert float(lin.gR.norm()) < 1e-10 * float(lin.G_loo.norm())
    base = compute_scores("dense", lin.att, hessian="true")
    assert rel_err(base, lin.dense("true", lin.lamD)) < 1e-10
    assert rel_err(base, compute_scores("dense", lin.att, hessian="gn")) < 1e-10   # H = G here
    for name in ("prop1", "cor2", "eq16"):
        for solver in ("dense", "cg"):
            assert rel_err(compute_scores(name, lin.att, solver=solver), base) < 1e-7, (name, solver)


# ----------------------------------------------------------------------------- sign + errors
def test_sign_positive_when_removing_an_agreeing_point():
    """1-D linear regression at least squares: a training point and a test point at the same x,
    both above the line. Leaving the training point out lowers the fit there, so the test loss
    rises (checked by exact LOO refits) and every method must give a positive score."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 30, dtype=DT)[:, None]
    y = 2 * x[:, 0] + 0.3 * torch.randn(30, generator=g, dtype=DT)
    x = torch.cat([x, torch.tensor([[1.5]], dtype=DT)])
    y = torch.cat([y, torch.tensor([3.0 + 1.0], dtype=DT)])
    Xd = torch.cat([x, torch.ones_like(x)], 1)
    fit = lambda Xm, ym: torch.linalg.lstsq(Xm, ym[:, None]).solution[:, 0]
    w = fit(Xd, y)
    model = MLP(1, 1, depth=0).to(DT)
    with torch.no_grad():
        model.out.weight.copy_(w[:1][None])
        model.out.bias.copy_(w[1:])
    xt, yt = torch.tensor([[1.5]], dtype=DT), torch.tensor([3.0 + 1.5], dtype=DT)
    test_loss = lambda ww: float((torch.cat([xt, torch.ones(1, 1, dtype=DT)], 1) @ ww - yt) ** 2)
    i = len(x) - 1
    keep = torch.arange(len(x)) != i
    assert test_loss(fit(Xd[keep], y[keep])) - test_loss(w) > 0          # the gold sign
    prob = Problem(model, x, y, "regression", progress=False)
    att = Attributor(prob, x[[i, 0]], y[[i, 0]], xt, yt)
    for name in ("grad_dot", "grad_cos", "dense", "cg", "lissa", "lissa_h", "arnoldi", "prop1",
                 "cor2", "eq16"):
        # LiSSA at damping lambda_G (grid index 1), where scale 10 converges on this problem
        kw = dict(scale=10.0, depth=300, damping_index=1) if name.startswith("lissa") else {}
        s = compute_scores(name, att, **kw)
        assert s.shape == (1, 2) and s[0, 0] > 0, name
    # and with little damping the influence function predicts the LOO change itself
    deltas = np.array([test_loss(fit(Xd[torch.arange(len(x)) != j], y[torch.arange(len(x)) != j]))
                       - test_loss(w) for j in range(len(x))])
    att_all = Attributor(prob, x, y, xt, yt)
    s = compute_scores("dense", att_all, hessian="true", risk="sum", damping=1e-10)[0]
    assert cos_rows(s[None], deltas[None])[0] > 0.95


def test_bad_configs_raise(reg):
    for name, kw in (("cg", dict(hessian="hutch")), ("dense", dict(risk="median")),
                     ("lissa", dict(materialize="yes")), ("cg", dict(damping_index=7)),
                     ("dense", dict(damping=-1.0)), ("lissa", dict(scale=0.0)),
                     ("lissa", dict(depth=0)), ("prop1", dict(solver="lu")),
                     ("arnoldi", dict(rank=0)), ("grad_cos", dict(eps=-1.0)),
                     ("cg", dict(cg_block="yes"))):
        with pytest.raises(ValueError):
            compute_scores(name, reg.att, **kw)
