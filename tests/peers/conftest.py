"""Shared set-up of the peer cross-checks (run with ``bash tests/peers/run.sh``).

Every test builds the SAME float64 model on the same data, asks a peer library and fimoda for the
same formula, and compares the score matrices test point by test point (cosine over the left-out
set). The model: fimoda's 2-hidden-layer ReLU MLP (width 8) trained briefly with Adam on synthetic
data, n = 200 training, n' = 20 left-out (every 10th training instance), T = 10 test instances.

Scales. fimoda's risk R is a SUM over the training set; pyDVL, dattri (with a mean loss) and
kronfluence work with the Hessian of the MEAN loss, (H/n + lambda_mean I)^{-1} =
n (H + lambda_sum I)^{-1} with lambda_mean = lambda_sum / n. fimoda's inverse-Hessian methods and
ekfac run with ``risk="mean"`` and ``damping=lambda_mean``: the same numbers as the peers (scale
ratio 1). lambda_sum is chosen so that H + lambda_sum I is positive definite (the briefly trained
model has negative curvature), which CG needs.

Wall times of both sides are printed per test and collected in a summary table printed at the end
of the session (``-s`` is not needed: the table goes through pytest's terminal summary).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fimoda.gradients import Problem
from fimoda.influence import Attributor, compute_scores
from fimoda.models import MLP

N_TRAIN, N_TEST, N_FEATURES, HIDDEN, LOO_STRIDE = 200, 10, 5, 8, 10
RESULTS: list = []           # rows of the summary table


@dataclass
class Setup:
    task: str
    model: torch.nn.Module
    X: torch.Tensor          # training set (n, d)
    Y: torch.Tensor
    X_loo: torch.Tensor      # left-out instances (n', d): every LOO_STRIDE-th training instance
    Y_loo: torch.Tensor
    X_test: torch.Tensor
    Y_test: torch.Tensor
    loo_index: np.ndarray    # rows of the training set that are X_loo
    lam_sum: float           # damping on the SUM-risk scale (H + lam_sum I positive definite)
    eig: torch.Tensor        # eigenvalues of the true Hessian H of the sum risk (ascending)

    @property
    def n(self) -> int:
        return len(self.X)

    @property
    def lam_mean(self) -> float:
        return self.lam_sum / self.n

    def attributor(self, names=None) -> Attributor:
        """A fresh fimoda Attributor (nothing cached: timings include its gradients)."""
        problem = Problem(self.model, self.X, self.Y, self.task, names=names, progress=False)
        return Attributor(problem, self.X_loo, self.Y_loo, self.X_test, self.Y_test)

    def loss_mean(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss as a batch MEAN (peers' convention): squared error / cross-entropy,
        the per-example losses of fimoda.losses.per_example_loss."""
        if self.task == "regression":
            return ((out.reshape(y.shape) - y) ** 2).mean()
        return torch.nn.functional.cross_entropy(out, y.long())


def make_setup(task: str, seed: int = 0) -> Setup:
    """The task's data, briefly trained model, left-out / test sets and damping. Built with one
    thread and torch's default dtype float32 (the model is initialised as fimoda's build_model
    does, then cast to float64), whatever the caller's settings: the same numbers every time."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    try:
        return _make_setup(task, seed)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def _make_setup(task: str, seed: int) -> Setup:
    g = torch.Generator().manual_seed(seed)
    n_all = N_TRAIN + N_TEST
    X = torch.randn(n_all, N_FEATURES, generator=g, dtype=torch.float64)
    w = torch.randn(N_FEATURES, generator=g, dtype=torch.float64)
    if task == "regression":
        Y = torch.sin(X @ w) + 0.1 * torch.randn(n_all, generator=g, dtype=torch.float64)
        n_out, lr, steps = 1, 1e-2, 300
    else:
        Y = ((X @ w + torch.randn(n_all, generator=g, dtype=torch.float64)) > 0).long()
        n_out, lr, steps = 2, 3e-3, 150     # brief: keeps test gradients away from 0
    torch.manual_seed(seed)
    model = MLP(N_FEATURES, n_out, hidden=HIDDEN).double()
    Xtr, Ytr = X[:N_TRAIN], Y[:N_TRAIN]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        out = model(Xtr)
        loss = (((out.squeeze(-1) - Ytr) ** 2).mean() if task == "regression"
                else torch.nn.functional.cross_entropy(out, Ytr))
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    H = Problem(model, Xtr, Ytr, task, progress=False).dense_hessian()
    eig = torch.linalg.eigvalsh(H)
    lam_sum = 2.0 * max(0.0, -float(eig[0])) + 1.0
    loo = np.arange(0, N_TRAIN, LOO_STRIDE)
    return Setup(task, model, Xtr, Ytr, Xtr[loo], Ytr[loo], X[N_TRAIN:], Y[N_TRAIN:], loo,
                 lam_sum, eig)


@pytest.fixture(autouse=True)
def _float64_single_thread():
    """Per peer test: torch's default dtype float64 (peers allocate some buffers in it: pyDVL's
    K-FAC blocks, dattri's score and DataInf accumulators) and one thread; restored after."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


_CACHE: dict = {}


@pytest.fixture(scope="session", params=["regression", "classification"])
def setup(request) -> Setup:
    if request.param not in _CACHE:
        _CACHE[request.param] = make_setup(request.param)
    return _CACHE[request.param]


@pytest.fixture(scope="session")
def regression() -> Setup:
    if "regression" not in _CACHE:
        _CACHE["regression"] = make_setup("regression")
    return _CACHE["regression"]


@pytest.fixture(scope="session")
def classification() -> Setup:
    if "classification" not in _CACHE:
        _CACHE["classification"] = make_setup("classification")
    return _CACHE["classification"]


# ----------------------------------------------------------------------------- helpers
def timed(fn, *args, **kwargs):
    """(result, wall seconds)."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def to_np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def row_cosines(a, b) -> np.ndarray:
    """Cosine between a[j] and b[j] for each test point j (rows: test, columns: left-out)."""
    a, b = to_np(a), to_np(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    assert (na > 0).all() and (nb > 0).all(), "a score row is identically zero"
    return (a * b).sum(1) / (na * nb)


def ours(setup: Setup, method: str, names=None, **cfg):
    """fimoda's scores (T, n') and wall time, with a fresh Attributor."""
    def run():
        return compute_scores(method, setup.attributor(names), **cfg)
    return timed(run)


def record(peer: str, peer_method: str, ours_method: str, task: str, cos: np.ndarray,
           t_peer: float, t_ours: float, note: str = "", ratio=None) -> None:
    """Print one comparison and keep it for the summary table."""
    row = dict(peer=peer, peer_method=peer_method, ours=ours_method, task=task,
               cos_min=float(np.min(cos)), cos_mean=float(np.mean(cos)), t_peer=t_peer,
               t_ours=t_ours, ratio=ratio, note=note)
    RESULTS.append(row)
    r = "" if ratio is None else f" scale peer/ours {ratio:.4g}"
    print(f"\n[{peer} {peer_method} vs fimoda {ours_method}, {task}] cosine min "
          f"{row['cos_min']:.9f} (1 - cos = {1 - row['cos_min']:.1e}) mean {row['cos_mean']:.9f};"
          f" wall peer {t_peer:.3f}s, fimoda "
          f"{t_ours:.3f}s{r}{' (' + note + ')' if note else ''}")


def scale_ratio(peer, ref) -> float:
    """Median elementwise ratio peer / ref (the expected convention factor, e.g. n)."""
    peer, ref = to_np(peer), to_np(ref)
    mask = np.abs(ref) > 1e-8 * np.abs(ref).max()
    return float(np.median(peer[mask] / ref[mask]))


@pytest.fixture(scope="session")
def peer():
    """The helpers above, as a fixture (test modules cannot import this conftest by name: the
    main tests/conftest.py shares it)."""
    from types import SimpleNamespace
    return SimpleNamespace(ours=ours, record=record, row_cosines=row_cosines,
                           scale_ratio=scale_ratio, timed=timed, to_np=to_np)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("peer cross-checks (cosine per test point; wall seconds)")
    head = (f"{'peer':<12}{'peer method':<22}{'fimoda':<15}{'task':<15}{'cos min':>10}"
            f"{'1-cos min':>10}{'cos mean':>10}{'t peer':>8}{'t fimoda':>9}  note")
    tr.write_line(head)
    tr.write_line("-" * len(head))
    for r in RESULTS:
        tr.write_line(f"{r['peer']:<12}{r['peer_method']:<22}{r['ours']:<15}{r['task']:<15}"
                      f"{r['cos_min']:>10.6f}{1 - r['cos_min']:>10.1e}{r['cos_mean']:>10.6f}"
                      f"{r['t_peer']:>8.3f}{r['t_ours']:>9.3f}  {r['note']}")
