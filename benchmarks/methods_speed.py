"""Wall-time benchmark: fimoda's CG / LiSSA / EK-FAC / DataInf against pyDVL, kronfluence and
dattri on one float64 model of the Concrete shape (MLP 8 -> 128 -> 128 -> 1, P = 17,793).

    .venv-peers/bin/python benchmarks/methods_speed.py            # after bash tests/peers/run.sh
    FIMODA_DATA_DIR=/path/to/data .venv-peers/bin/python benchmarks/methods_speed.py --threads 2

Data: UCI Concrete through ``fimoda.data.load_dataset`` when FIMODA_DATA_DIR (or ``--data-dir``)
holds it (927 training / 103 test rows, standardized), otherwise synthetic data of that shape.
The model is trained briefly (full-batch Adam); left-out set: every 9th training instance, the
first n' = 100 (the paper's Concrete selection); test set: all T = 103.

Each row runs the SAME formula on both sides (fresh state: the timings include the per-example
gradients) and reports the wall times, their ratio and the cosine of the two score matrices per
test point (min / mean over the T test points):

* CG on the true Hessian, (H/n + lam I)^{-1} (pyDVL: CgInfluence, block CG; fimoda: cg with
  hessian="true"). pyDVL stops when ||r|| < rtol^2 ||b|| (rtol is squared in its code), so it is
  given rtol = sqrt(tol) for the same relative residual tol as fimoda.
* LiSSA on the true Hessian, the same truncated series at the same depth ``--lissa-h-depth``
  (pyDVL LissaInfluence with the whole training set as one batch, running the recurrence;
  fimoda lissa_h, evaluating the series in a block Krylov subspace -- exact once the subspace
  holds it, else to relative change 1e-8 -- and, as the reference, fimoda's own recurrence); then
  fimoda at the paper's depth 5000 (measured) next to pyDVL's time extrapolated from the
  measured depth (marked EXTRAP).
  The damping lam of these two rows makes H/n + lam I positive definite (CG needs it); it is
  max(lambda_G, 5 |lambda_min(H/n)|), lambda_min estimated by Lanczos.
* CG and LiSSA in the paper's configuration: the Gauss-Newton matrix of the mean loss,
  (G/n + lambda_G I)^{-1} (fimoda: cg / lissa, risk="mean", damping lambda_G = att.lambda_G,
  i.e. damping index 1 of the grid). pyDVL runs on EXACTLY this matrix: its CgInfluence /
  LissaInfluence with the operator of tests/peers/pydvl_exact_gn.py (pyDVL's Gauss-Newton
  operator fed
  the pseudo-loss sqrt(l'') f, whose outer products are l'' grad f grad f^T; pyDVL's own
  GAUSS_NEWTON mode is the empirical Fisher, and its CG operator in that mode divides by the
  number of right-hand sides, corrected here), while the scores' gradients are of the real loss.
  CG: block CG to the same relative residual tol of (G/n + lambda I) X = B, run fully (pyDVL:
  on that system, rtol = sqrt(tol), ``--gn-cg-maxiter`` caps it and its iteration count is
  printed in the note; fimoda: on the equivalent n x n dual system, stopping on the exact
  residual in R^P, see fimoda.influence.solvers.cg.cg_dual). LiSSA: same
  scale 1.1 (lambda_max(G/n) + lambda_G) and same depth ``--gn-lissa-depth`` on both sides, both
  measured; then fimoda at the paper's depth 5000 (measured: it evaluates the same truncated
  series in closed form from the eigen-decomposition of K = a a^T, so its cost hardly depends
  on the depth) next to pyDVL's time extrapolated linearly from the measured depth (each pyDVL step is
  one full-batch Gauss-Newton product); that row is marked EXTRAP and has no cosine.
  Then CG over the paper's damping grid lambda_G x {0.1, 1, 10, 100} on one model (fimoda's
  n x n Gram matrix K = a a^T is computed once per model; pyDVL refits per damping).
* EK-FAC (kronfluence with the exact Gauss-Newton Fisher pseudo-loss, float64; fimoda ekfac).
* DataInf on the three weight matrices (dattri, one run per layer with fimoda's lambda_l; fimoda
  datainf): see tests/peers/test_dattri.py for why this is the same formula.

A peer that cannot be imported is skipped with a message. One run; nothing is written.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")      # the peers' progress bars (fimoda's are off)
import torch  # noqa: E402

from fimoda.settings import DAMPING_GRID  # noqa: E402
from fimoda.gradients import Problem  # noqa: E402
from fimoda.losses import gn_output, loss_derivatives, loss_from_f  # noqa: E402
from fimoda.influence import Attributor, compute_scores  # noqa: E402
from fimoda.influence.arnoldi import arnoldi_eig  # noqa: E402
from fimoda.models import MLP  # noqa: E402

F64 = torch.float64


# ----------------------------------------------------------------------------- set-up
def load_data(data_dir, seed):
    """(X, y, X_test, y_test, source) of Concrete, or synthetic data of its shape."""
    if data_dir:
        try:
            from fimoda.data import load_dataset
            ds = load_dataset("concrete", data_dir=data_dir, download=False)
            return (torch.tensor(ds.X_train, dtype=F64), torch.tensor(ds.y_train, dtype=F64),
                    torch.tensor(ds.X_test, dtype=F64), torch.tensor(ds.y_test, dtype=F64),
                    f"UCI Concrete from {data_dir}")
        except Exception as e:                      # noqa: BLE001 - fall back, with the reason
            print(f"[data] Concrete not loaded ({type(e).__name__}: {e}); using synthetic data")
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1030, 8, generator=g, dtype=F64)
    w = torch.randn(8, generator=g, dtype=F64)
    y = torch.tanh(X @ w / 2) + 0.3 * torch.sin(X[:, 0] * X[:, 1]) \
        + 0.1 * torch.randn(1030, generator=g, dtype=F64)
    y = (y - y[:927].mean()) / y[:927].std()
    return X[:927], y[:927], X[927:], y[927:], "synthetic (Concrete-shaped: 927/103 x 8)"


def train(X, y, steps, seed):
    torch.manual_seed(seed)
    model = MLP(X.shape[1], 1).to(F64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X).squeeze(-1) - y) ** 2).mean()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, float(loss)


class Bench:
    def __init__(self, model, X, y, Xl, yl, Xt, yt):
        self.model, self.X, self.y, self.Xl, self.yl, self.Xt, self.yt = \
            model, X, y, Xl, yl, Xt, yt
        self.n = len(X)
        self.rows = []

    def attributor(self, names=None):
        problem = Problem(self.model, self.X, self.y, "regression", names=names, progress=False)
        return Attributor(problem, self.Xl, self.yl, self.Xt, self.yt)

    def ours(self, method, names=None, **cfg):
        t = time.perf_counter()
        s = compute_scores(method, self.attributor(names), **cfg)
        return s, time.perf_counter() - t

    @staticmethod
    def loss_mean(out, y):
        return ((out.reshape(y.shape) - y) ** 2).mean()

    def add(self, what, peer_name, ours_s, t_ours, peer_s, t_peer, note=""):
        """One row; ``peer_s=None`` (no peer scores, e.g. an extrapolated time): cosine nan."""
        a = np.asarray(ours_s, dtype=np.float64)
        if peer_s is None:
            cos = np.full(len(a), np.nan)
        else:
            b = np.asarray(peer_s.detach().cpu().numpy() if torch.is_tensor(peer_s) else peer_s,
                           dtype=np.float64)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        self.rows.append(dict(what=what, peer=peer_name, t_ours=t_ours, t_peer=t_peer,
                              ratio=t_peer / t_ours, cos_min=float(cos.min()),
                              cos_mean=float(cos.mean()), note=note))
        cos_txt = ("cosine n/a (no peer scores)" if peer_s is None else
                   f"cosine min {cos.min():.6f} (1 - min {1 - cos.min():.1e}) "
                   f"mean {cos.mean():.6f}")
        print(f"  {what:<24} fimoda {t_ours:8.2f}s | {peer_name:<30} {t_peer:9.2f}s | "
              f"speed-up {t_peer / t_ours:7.1f}x | {cos_txt} {note}", flush=True)


def skip(peer, err):
    print(f"  [skip] {peer}: cannot import ({type(err).__name__}: {err})", flush=True)


# ----------------------------------------------------------------------------- rows
class _LogCapture(logging.Handler):
    """Keeps the messages of pyDVL's operator logger (its CG reports its iteration count at DEBUG
    level: 'Terminated block cg after k iterations' / 'Reached max number of iterations')."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def paper_depth_row(b: Bench, name, method, cfg, t_peer, depth, paper_depth=5000):
    """fimoda's LiSSA at the paper's depth (measured) next to pyDVL's time extrapolated linearly
    from its measured run at ``depth`` (each of its steps is one full-batch product, a constant
    cost; not run). Same truncated series as the measured row above it; no peer scores."""
    mine, t_mine = b.ours(method, depth=paper_depth, **cfg)
    b.add(name, "pyDVL (EXTRAPOLATED time)", mine, t_mine, None, t_peer * paper_depth / depth,
          f"fimoda measured at depth {paper_depth}; pyDVL {t_peer:.1f}s at depth {depth} "
          f"x {paper_depth / depth:g} (not run)")


def pydvl_rows(b: Bench, lam_h, lam_max_h, lam_g, lam_max_g, args):
    try:
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import CgInfluence, LissaInfluence
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "tests", "peers"))
        from pydvl_exact_gn import ExactGNCg, ExactGNLissa, gn_pseudo_loss
        pseudo = gn_pseudo_loss("regression")
    except Exception as e:                          # noqa: BLE001
        return skip("pyDVL", e)
    from torch.utils.data import DataLoader, TensorDataset
    logging.getLogger("pydvl").setLevel(logging.ERROR)
    loader = DataLoader(TensorDataset(b.X, b.y), batch_size=b.n)

    def run(inf):
        t = time.perf_counter()
        s = inf.fit(loader).influences(b.Xt, b.yt, b.Xl, b.yl, mode=InfluenceMode.Up)
        return s, time.perf_counter() - t

    tol = args.cg_tol
    mine, t_mine = b.ours("cg", hessian="true", risk="mean", damping=lam_h, tol=tol, max_iter=10_000)
    theirs, t_peer = run(CgInfluence(b.model, b.loss_mean, regularization=lam_h, rtol=tol ** 0.5,
                                     atol=0.0, maxiter=10_000, solve_simultaneously=True,
                                     warn_on_max_iteration=False))
    b.add("CG (true H)", "pyDVL CgInfluence (block)", mine, t_mine, theirs, t_peer,
          f"lam={lam_h:.3g}, tol {tol:g}")

    depth = args.lissa_h_depth
    scale = 1.1 * (lam_max_h + lam_h)
    mine, t_mine = b.ours("lissa_h", risk="mean", damping=lam_h, scale=scale, depth=depth)
    theirs, t_peer = run(LissaInfluence(b.model, b.loss_mean, regularization=lam_h,
                                        maxiter=depth, scale=scale, rtol=0.0,
                                        warn_on_max_iteration=False))
    b.add(f"LiSSA-H (true H, {depth})", "pyDVL LissaInfluence", mine, t_mine, theirs, t_peer,
          f"depth {depth}, scale {scale:.3g}; fimoda: block-Krylov evaluation of the series")
    ref, t_ref = b.ours("lissa_h", risk="mean", damping=lam_h, scale=scale, depth=depth,
                        full_batch="recurrence")
    b.add(f"LiSSA-H recurrence ({depth})", "pyDVL LissaInfluence", ref, t_ref, theirs, t_peer,
          "fimoda's plain recurrence (the reference): the ratio of product costs")
    paper_depth_row(b, "LiSSA-H (5000) EXTRAP", "lissa_h",
                    dict(risk="mean", damping=lam_h, scale=scale), t_peer, depth)

    # The paper's configuration: the Gauss-Newton matrix, lam = lambda_G. pyDVL runs on exactly
    # fimoda's G/n + lam I through the pseudo-loss operator of tests/peers/pydvl_exact_gn.py (its
    # own
    # GAUSS_NEWTON mode is the empirical Fisher, and its CG operator in that mode divides by the
    # number of right-hand sides).
    print(f"  -- paper configuration: Gauss-Newton G/n + lambda_G I (lambda_G = {lam_g:.3g}); "
          f"pyDVL on the same matrix (pseudo-loss operator)", flush=True)
    mine, t_mine = b.ours("cg", risk="mean", damping=lam_g, tol=tol, max_iter=10_000)
    cap = _LogCapture()
    op_log = logging.getLogger("pydvl.influence.torch.operator")
    op_log.addHandler(cap)
    op_log.setLevel(logging.DEBUG)
    try:
        theirs, t_peer = run(ExactGNCg(b.model, b.loss_mean, pseudo, regularization=lam_g,
                                       rtol=tol ** 0.5, atol=0.0, maxiter=args.gn_cg_maxiter,
                                       solve_simultaneously=True, warn_on_max_iteration=False))
    finally:
        op_log.removeHandler(cap)
        op_log.setLevel(logging.NOTSET)
    cg_log = [m.split("\n")[0].strip() for m in cap.messages if "cg" in m.lower()]
    b.add("CG (GN, lambda_G)", "pyDVL CgInfluence (block, GN)", mine, t_mine, theirs, t_peer,
          f"tol {tol:g}; pyDVL: {'; '.join(cg_log) or 'no CG log'}")

    # The paper's protocol evaluates CG over a damping grid (App. D.4: lambda_G x {0.1, 1, 10,
    # 100}). fimoda computes a and K = a a^T of the materialised Gauss-Newton matrix once per
    # model (cached on the Attributor, the "computed once" part) and runs each damping's CG on the
    # n x n dual system; pyDVL refits.
    grid = DAMPING_GRID
    t = time.perf_counter()
    att = b.attributor()
    mine = [compute_scores("cg", att, risk="mean", damping=lam_g * c, tol=tol, max_iter=10_000)
            for c in grid]
    t_mine = time.perf_counter() - t
    t = time.perf_counter()
    theirs = [run(ExactGNCg(b.model, b.loss_mean, pseudo, regularization=lam_g * c,
                            rtol=tol ** 0.5,
                            atol=0.0, maxiter=args.gn_cg_maxiter, solve_simultaneously=True,
                            warn_on_max_iteration=False))[0] for c in grid]
    t_peer = time.perf_counter() - t
    b.add("CG (GN, grid of 4)", "pyDVL CgInfluence (block, GN)", np.concatenate(mine), t_mine,
          torch.cat([th.detach() for th in theirs]), t_peer,
          "lambda_G x {0.1, 1, 10, 100}, one model: fimoda's K = a a^T computed once")

    depth = args.gn_lissa_depth
    scale_g = 1.1 * (lam_max_g + lam_g)
    mine, t_mine = b.ours("lissa", risk="mean", damping=lam_g, scale=scale_g, depth=depth)
    theirs, t_peer = run(ExactGNLissa(b.model, b.loss_mean, pseudo, regularization=lam_g,
                                      maxiter=depth,
                                      scale=scale_g, dampen=0.0, rtol=0.0,
                                      warn_on_max_iteration=False))
    b.add(f"LiSSA (GN, depth {depth})", "pyDVL LissaInfluence (GN)", mine, t_mine, theirs,
          t_peer, f"scale {scale_g:.3g}; both measured")
    paper_depth_row(b, "LiSSA (GN, 5000) EXTRAP", "lissa",
                    dict(risk="mean", damping=lam_g, scale=scale_g), t_peer, depth)


def kronfluence_row(b: Bench, lam, tmp):
    """lam: damping of the MEAN Gauss-Newton (kronfluence's damping_factor)."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except Exception as e:                          # noqa: BLE001
        return skip("kronfluence", e)
    from torch.utils.data import TensorDataset

    class GNTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            f = gn_output(model(x), y, "regression")
            if not sample:
                return loss_from_f(f, y, "regression").sum()
            _, d2 = loss_derivatives(f.detach(), y, "regression")
            return (d2.sqrt() * f).sum()           # exact Fisher: Gauss-Newton pseudo-loss

        def compute_measurement(self, batch, model):
            x, y = batch
            return loss_from_f(gn_output(model(x), y, "regression"), y, "regression").sum()

    mine, t_mine = b.ours("ekfac", risk="mean", damping=lam)
    t = time.perf_counter()
    task = GNTask()
    model = prepare_model(copy.deepcopy(b.model), task)
    analyzer = Analyzer("bench", model, task, cpu=True, output_dir=tmp, disable_tqdm=True,
                        disable_model_save=True)
    analyzer.fit_all_factors(
        "ekfac", TensorDataset(b.X, b.y), per_device_batch_size=b.n, overwrite_output_dir=True,
        factor_args=FactorArguments(
            strategy="ekfac", covariance_max_examples=None, lambda_max_examples=None,
            activation_covariance_dtype=F64, gradient_covariance_dtype=F64,
            eigendecomposition_dtype=F64, lambda_dtype=F64, per_sample_gradient_dtype=F64))
    analyzer.compute_pairwise_scores(
        "scores", "ekfac", query_dataset=TensorDataset(b.Xt, b.yt),
        train_dataset=TensorDataset(b.Xl, b.yl), per_device_query_batch_size=len(b.Xt),
        per_device_train_batch_size=len(b.Xl), overwrite_output_dir=True,
        score_args=ScoreArguments(damping_factor=lam, per_sample_gradient_dtype=F64,
                                  precondition_dtype=F64, score_dtype=F64))
    theirs = analyzer.load_pairwise_scores("scores")["all_modules"]
    b.add("EK-FAC", "kronfluence (exact Fisher)", mine, t_mine, theirs,
          time.perf_counter() - t, f"lam={lam:.3g} (mean scale)")


def dattri_row(b: Bench, c=10.0, args_bs=None):
    try:
        from dattri.algorithm.influence_function import IFAttributorDataInf
        from dattri.task import AttributionTask
    except Exception as e:                          # noqa: BLE001
        return skip("dattri", e)
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    weights = ["hidden.0.weight", "hidden.1.weight", "out.weight"]
    mine, t_mine = b.ours("datainf", names=weights, c_grid=(c,), c_index=0)
    # lambda_l as fimoda's (mean squared element of the layer's training gradients / c),
    # computed outside both timings
    G = b.attributor(weights).problem.loss_grads(b.X, b.y, desc=None)
    sizes = [dict(b.model.named_parameters())[w].numel() for w in weights]
    lams = [float((g ** 2).mean()) / c for g in torch.split(G, sizes, dim=1)]
    loader = lambda X, Y, bs=None: DataLoader(TensorDataset(X, Y), batch_size=bs or len(X),
                                              shuffle=False)
    t = time.perf_counter()
    total = 0
    for w, lam in zip(weights, lams):
        model = copy.deepcopy(b.model)
        for name, p in model.named_parameters():
            p.requires_grad_(name == w)

        def loss_func(params, data, model=model):
            x, y = data
            return b.loss_mean(functional_call(model, params, (x,)), y)
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        att = IFAttributorDataInf(task, regularization=lam)
        att.cache(loader(b.X, b.y))
        # a small test batch bounds dattri's (test x train-chunk x layer) intermediate
        total = total + att.attribute(loader(b.Xl, b.yl), loader(b.Xt, b.yt, args_bs)).T
    b.add("DataInf (weights)", "dattri IFAttributorDataInf", mine, t_mine, total,
          time.perf_counter() - t, "3 per-layer runs summed")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("FIMODA_DATA_DIR"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cg-tol", type=float, default=1e-6, help="relative residual of CG")
    ap.add_argument("--lissa-h-depth", type=int, default=100,
                    help="LiSSA-H steps on both sides (each is a full-batch HVP per RHS)")
    ap.add_argument("--gn-lissa-depth", type=int, default=100,
                    help="Gauss-Newton LiSSA steps run on both sides (pyDVL's time is also "
                         "extrapolated from it to the paper's depth 5000)")
    ap.add_argument("--gn-cg-maxiter", type=int, default=10_000,
                    help="cap on pyDVL's block-CG iterations on the Gauss-Newton matrix")
    ap.add_argument("--dattri-test-batch", type=int, default=None,
                    help="dattri DataInf test batch (default all T; its peak memory grows with "
                         "its square)")
    ap.add_argument("--only", default="pydvl,kronfluence,dattri",
                    help="comma list of peers to run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(F64)      # peers allocate some buffers in the default dtype
    warnings.filterwarnings("ignore")

    X, y, Xt, yt, source = load_data(args.data_dir, args.seed)
    t = time.perf_counter()
    model, loss = train(X, y, args.train_steps, args.seed)
    loo = np.arange(0, len(X), 9)[:100]
    b = Bench(model, X, y, X[loo], y[loo], Xt, yt)
    P = sum(p.numel() for p in model.parameters())
    print(f"data: {source}; n={b.n}, n'={len(loo)}, T={len(Xt)}, P={P}; "
          f"{args.train_steps} Adam steps -> train MSE {loss:.4f} ({time.perf_counter() - t:.1f}s)"
          f"; torch threads {args.threads}; torch {torch.__version__}", flush=True)

    att = b.attributor()
    lam_g = att.lambda_G
    p = att.problem
    mu, _ = arnoldi_eig(lambda v: p.hvp(v) / b.n, P, 60, 0, F64, "cpu", False)
    mu_g, _ = arnoldi_eig(lambda v: p.gnvp(v) / b.n, P, 60, 0, F64, "cpu", False)
    lam_h = max(lam_g, 5.0 * max(0.0, -float(mu[0])))
    print(f"lambda_G = {lam_g:.3g}; Lanczos on H/n: [{float(mu[0]):.3g}, {float(mu[-1]):.3g}], "
          f"on G/n: top {float(mu_g[-1]):.3g}; true-H damping lam = {lam_h:.3g}", flush=True)

    peers = set(args.only.split(","))
    if "pydvl" in peers:
        pydvl_rows(b, lam_h, float(mu[-1]), lam_g, float(mu_g[-1]), args)
    if "kronfluence" in peers:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            kronfluence_row(b, lam_g, tmp)
    if "dattri" in peers:
        dattri_row(b, args_bs=args.dattri_test_batch)

    print("\nsummary (wall seconds; speed-up = peer / fimoda; cosine per test point)")
    head = (f"{'method':<24}{'fimoda s':>10}  {'peer':<30}{'peer s':>10}{'speed-up':>10}"
            f"{'cos min':>10}{'cos mean':>10}")
    print(head)
    print("-" * len(head))
    for r in b.rows:
        cos = ("       n/a       n/a" if np.isnan(r["cos_min"]) else
               f"{r['cos_min']:>10.6f}{r['cos_mean']:>10.6f}")
        print(f"{r['what']:<24}{r['t_ours']:>10.2f}  {r['peer']:<30}{r['t_peer']:>10.2f}"
              f"{r['ratio']:>9.1f}x{cos}")
    return b.rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
