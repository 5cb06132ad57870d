"""DataInf (kwon2024datainf, eq. (5)), with the sign change of the paper's eq. (18).

Layer-wise (each parameter tensor of ``problem.names`` is a layer l with d_l elements), with
g_k = grad_l L(z_k) over the training instances k = 1..m (all n, or a seeded subsample of
``n_samples`` that includes the left-out instances), DataInf replaces the inverse of the mean
(G_l / m + lambda_l I) by the mean of the
rank-one inverses (Sherman-Morrison):

    (G_l / m + lambda_l I)^{-1} ~ (1/m) sum_k (1/lambda_l) (I - g_k g_k^T / (lambda_l + ||g_k||^2))

    lambda_l = mean over k and elements of g_k^2 / c,   c = c_grid[c_index] (default 10: the
               reference code's lambda_const_param = 10, i.e. 0.1 x the mean squared element)

and scores (positive = the test loss rises when z_i is left out, as (12))

    scores[j, i] = sum_l (1/lambda_l) [ <t_jl, v_il>
                   - (1/m) sum_k <t_jl, g_k> <g_k, v_il> / (lambda_l + ||g_k||^2) ]      (18)

with t_jl = grad_l g(z_j) (test loss) and v_il = grad_l L(z_i) (left-out). Only inner products
are formed: <t_jl, g_k>, <g_k, v_il>, ||g_k||^2 per chunk of k (memory (T + n') x m x layers),
never a d_l x d_l matrix. A layer whose training gradients are all zero (a parameter that does not
affect the loss, or only through round-off: lambda_l at most eps^2 times the largest) has no
meaningful lambda_l and is left out with a warning. The training set streams in chunks sized by
the memory budget (:mod:`fimoda.memory`). The test and left-out gradients are kept where the
budget allows (:meth:`~.common.Attributor.keeps`), and the training set then streams once;
otherwise they stream in blocks too, and the training set streams once per block of a streamed
side (its inner products with every training row are all a block needs).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from ..progress import progress_bar

from ..gradients import block_slices
from .common import Attributor
from .cost import datainf_cost, side_rows_per_pass
from .specs import MethodSpec


@dataclass(frozen=True)
class DatainfConfig:
    """DataInf's settings: the per-layer damping lambda_l = mean(g_l^2) / c."""
    c_grid: tuple = (10.0, 1.0, 0.1, 0.01)  # the divisors c of lambda_l = mean(g_l^2) / c
    c_index: int = 0                  # which c: 0 -> c = 10 (reference lambda_const_param)
    n_samples: Optional[int] = None   # training instances k averaged over (None: all n)
    seed: int = 0                     # seed of the subsample
    chunk: Optional[int] = None       # training gradients per chunk (None: the memory budget's)


def datainf_indices(n: int, cfg: DatainfConfig, keep=None) -> np.ndarray:
    """The training instances k of the average: all, or ``n_samples`` of them drawn without
    replacement with ``seed`` -- the rows ``keep`` (the left-out instances, where known) always
    among them, the rest drawn from the others -- sorted."""
    if cfg.n_samples is None or cfg.n_samples >= n:
        return np.arange(n)
    keep = np.unique(np.asarray([] if keep is None else keep, dtype=np.int64))
    if len(keep) >= cfg.n_samples:
        return keep
    others = np.setdiff1d(np.arange(n), keep)
    rng = np.random.default_rng(cfg.seed)
    drawn = rng.choice(others, size=cfg.n_samples - len(keep), replace=False)
    return np.sort(np.concatenate([keep, drawn]))


def _sample(att: Attributor, cfg: DatainfConfig) -> torch.Tensor:
    """:func:`datainf_indices` of the attributor's training rows, its left-out rows kept."""
    keep = None if att.loo_rows is None else att.loo_rows.cpu().numpy()
    idx = datainf_indices(len(att.problem.X), cfg, keep)
    return torch.as_tensor(idx, device=att.problem.X.device)


def _check(cfg: DatainfConfig) -> float:
    if not -len(cfg.c_grid) <= cfg.c_index < len(cfg.c_grid):
        raise ValueError(f"DataInf c_index {cfg.c_index} is outside c_grid {cfg.c_grid}")
    c = float(cfg.c_grid[cfg.c_index])
    if not c > 0:
        raise ValueError(f"DataInf needs c > 0, got c = {c!r}")
    if cfg.n_samples is not None and cfg.n_samples < 1:
        raise ValueError(f"DataInf n_samples must be >= 1 or None, got {cfg.n_samples!r}")
    if cfg.chunk is not None and cfg.chunk < 1:
        raise ValueError(f"DataInf chunk must be >= 1 or None, got {cfg.chunk!r}")
    return c


def _side_blocks(att: Attributor):
    """The groups of (side, rows, gradients) whose inner products with the training set one
    pass over it forms: both sides at once when both are kept, else blocks of either side, as
    many rows together as half the memory budget holds (the other half is the training chunk's),
    so that the training set streams as few times as the budget allows."""
    if att.keeps("test") and att.keeps("left"):
        yield [("test", slice(None), att.test_grads), ("left", slice(None), att.train_grads)]
        return
    cap = side_rows_per_pass(att.problem.memory, att.problem.n_params, att.problem.dtype)
    group, held = [], 0
    for side in ("test", "left"):
        for rows, G in att.grad_blocks(side):
            if group and held + len(G) > cap:
                yield group
                group, held = [], 0
            group.append((side, rows, G))
            held += len(G)
    if group:
        yield group


def datainf(att: Attributor, cfg: DatainfConfig = DatainfConfig()) -> np.ndarray:
    """DataInf scores (18); see the module docstring for the equation."""
    c = _check(cfg)
    problem = att.problem
    n = len(problem.X)
    if n == 0:
        raise ValueError("DataInf: the training set is empty")
    idx = _sample(att, cfg)
    m = len(idx)
    sl = block_slices(problem.params, problem.names)
    layers = list(problem.names)
    size = {"test": len(att.X_test), "left": len(att.X_loo)}
    f64 = dict(dtype=torch.float64, device=problem.X.device)
    sq = {l: torch.empty(m, **f64) for l in layers}                 # ||g_k||^2
    ip = {side: {l: torch.empty(size[side], m, **f64) for l in layers}   # <t_jl, g_k>, <v_il, g_k>
          for side in size}
    chunk = cfg.chunk or problem.grad_rows()
    for p, group in enumerate(_side_blocks(att)):
        it = range(0, m, chunk)
        if problem.progress and m > chunk:
            it = progress_bar(it, desc=f"DataInf: training gradients (pass {p + 1})",
                              total=(m + chunk - 1) // chunk, leave=False)
        for s in it:
            k = idx[s:s + chunk]
            g = problem.loss_grads(problem.X[k], problem.Y[k], desc=None)
            for l in layers:
                gl = g[:, sl[l]]
                if p == 0:
                    sq[l][s:s + len(k)] = (gl ** 2).sum(1)
                for side, rows, G in group:
                    ip[side][l][rows, s:s + len(k)] = G[:, sl[l]] @ gl.T
    lams = {l: float(sq[l].sum()) / (m * (sl[l].stop - sl[l].start)) / c for l in layers}
    # a layer whose gradients are zero up to round-off (e.g. attention key biases, which softmax
    # ignores) has lambda_l ~ eps^2 of the others: dividing by it would amplify round-off alone
    floor = torch.finfo(problem.dtype).eps ** 2 * max(lams.values())
    skipped = [l for l in layers if not lams[l] > floor]
    if skipped:
        warnings.warn(f"DataInf: layers whose training gradients are zero (to round-off) left "
                      f"out: {skipped}")
    if len(skipped) == len(layers):
        raise ValueError("DataInf: every layer has all-zero training gradients")
    scores = torch.zeros(size["test"], size["left"], **f64)
    for ts, te in att.grad_blocks("test"):
        for ls, tr in att.grad_blocks("left"):
            for l in layers:
                if l in skipped:
                    continue
                s2, lam = sq[l], lams[l]
                a, b = ip["test"][l][ts], ip["left"][l][ls]          # (T, m), (n', m)
                first = (te[:, sl[l]] @ tr[:, sl[l]].T).to(torch.float64)
                correction = (a / (lam + s2)) @ b.T / m
                scores[ts, ls] += (first - correction) / lam
    return scores.cpu().numpy()


def datainf_lambdas(att: Attributor, cfg: DatainfConfig = DatainfConfig()) -> dict:
    """lambda_l per layer (for reports): mean squared element of the layer's training gradients
    over the instances of :func:`datainf_indices`, divided by c."""
    c = _check(cfg)
    problem = att.problem
    idx = _sample(att, cfg)
    sl = block_slices(problem.params, problem.names)
    tot = {l: 0.0 for l in problem.names}
    chunk = cfg.chunk or problem.grad_rows()
    for s in range(0, len(idx), chunk):
        k = idx[s:s + chunk]
        g = problem.loss_grads(problem.X[k], problem.Y[k], desc=None)
        for l in problem.names:
            tot[l] += float((g[:, sl[l]].to(torch.float64) ** 2).sum())
    return {l: tot[l] / (len(idx) * (sl[l].stop - sl[l].start)) / c for l in problem.names}


SPECS = (MethodSpec("datainf", datainf, DatainfConfig, "kwon2024datainf eq. (5)", figure2=3,
                    cost=lambda shape, cfg: datainf_cost("datainf", shape, cfg)),)
