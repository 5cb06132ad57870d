"""One chunk of runs: how many runs a chunk holds (:func:`runs_per_chunk`, from the memory its
activations take and the cores), and training them together (:func:`train_chunk`: every step of
every epoch for the runs of one seed, an engine's stacked parameters and optimizer state, the
test losses at each evaluation point) in cache-sized blocks of runs on parallel threads."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from ..models import input_trimmer
from .config import GoldConfig
from .optim import StackedOptimizer, clip_per_run_
from .schedule import Schedule, stream_gather, batch_plan

MLP_RUN_BLOCK_CPU = 8       # runs per cache-sized block of the mlp engine on a CPU
PLAN_STEPS = 64             # steps whose batch indices are built at once


# ----------------------------------------------------------------------------- chunk sizing
def _activation_elems(model: nn.Module, x1: torch.Tensor) -> int:
    """Elements of all leaf-module outputs for one example (a memory estimate)."""
    total = [0]

    def hook(_m, _i, out):
        if torch.is_tensor(out):
            total[0] += out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(input_trimmer(model)(x1))
    finally:
        for h in hs:
            h.remove()
    return max(total[0], 1)


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def runs_per_chunk(cfg: GoldConfig, model, X, n_runs: int, slots: int) -> int:
    if cfg.max_runs_per_chunk is not None:
        return min(cfg.max_runs_per_chunk, n_runs)
    p = next(model.parameters())
    item = p.element_size()
    n_par = sum(q.numel() for q in model.parameters() if q.requires_grad)
    states = 0 if cfg.optimizer == "sgd" else 2
    act = _activation_elems(model, X[:1])
    per_run = item * (n_par * (4 + states) + 4 * slots * act)
    return int(max(1, min(n_runs, (cfg.memory_budget_mb * 2 ** 20) // per_run)))


# ----------------------------------------------------------------------------- one chunk
class _GroupRunner:
    """Runs a function over the blocks of runs: inline, or (mlp engine on a CPU) on a pool of
    ``workers`` threads, each with one intra-op thread and a contiguous share of the blocks.
    The blocks are independent, so the results do not depend on the number of workers; unlike
    OpenMP-parallel ops, no barrier is crossed per op (robust on a loaded machine)."""

    def __init__(self, n_groups: int, workers: int):
        self.pool = None
        self.n = n_groups
        if workers > 1 and n_groups > 1:
            from concurrent.futures import ThreadPoolExecutor
            workers = min(workers, n_groups)
            self.pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                           initargs=(1,))
            bounds = np.linspace(0, n_groups, workers + 1).round().astype(int)
            self.shares = [range(bounds[k], bounds[k + 1]) for k in range(workers)]

    @staticmethod
    def _each(fn, share):
        with torch.no_grad():
            for gi in share:
                fn(gi)

    def __call__(self, fn):
        if self.pool is None:
            for gi in range(self.n):
                fn(gi)
            return
        for f in [self.pool.submit(self._each, fn, share) for share in self.shares]:
            f.result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


@torch.no_grad()
def train_chunk(engine, cfg: GoldConfig, sched: Schedule, perms, inv, left: torch.Tensor,
                X, Y, Xt, Yt, stream, block: int, workers: int = 1, bar=None):
    """Train the runs ``left`` of one seed ((R,) indices or (R, G) groups, -1 = full run: see
    :func:`batch_plan`) from the engine's start parameters; returns (test losses (R, T, J),
    parameter distances (R, T)) as float64 CPU tensors."""
    dev = X.device
    R = len(left)
    P = engine.stack(R)
    dtype = P[0].dtype
    start = [p.to(dev) for p in engine.start]
    groups = [slice(a, min(R, a + block)) for a in range(0, R, block)]
    Pg = [[p[sl] for p in P] for sl in groups]
    opt = StackedOptimizer(cfg, P, groups)
    T, J = len(sched.eval_steps), len(Xt)
    losses = torch.empty(R, T, J, dtype=torch.float64, device=dev)
    dist = torch.empty(R, T, dtype=torch.float64, device=dev)
    extra = sched.slots > sched.batch_size     # slots of the mechanism's extra loss terms
    run = _GroupRunner(len(groups), workers if stream is None else 1)

    def evaluate(t, gi):
        sl, Pl = groups[gi], Pg[gi]
        losses[sl, t] = engine.test_losses(Pl, Xt, Yt).double()
        sq = sum(((p - p0).double() ** 2).reshape(p.shape[0], -1).sum(1)
                 for p, p0 in zip(Pl, start))
        dist[sl, t] = sq.sqrt()

    def train(c1, c0, idx, idx_d, w_d, ep, active, gi):
        sl = groups[gi]
        for k in range(c1 - c0):
            ii = idx_d[k, sl]
            if stream is None:
                x = X[ii]
            else:
                x = stream_gather(stream, ep[k, sl], ii)
                if extra:          # the extra loss terms' instances, un-augmented
                    x[:, sched.batch_size:] = X[ii[:, sched.batch_size:]]
            g = engine.grads(Pg[gi], x, Y[ii], w_d[k, sl])
            if cfg.grad_clip is not None:
                clip_per_run_(g, cfg.grad_clip)
            opt.update(gi, Pg[gi], g, active[k, sl.start:sl.stop])

    try:
        run(lambda gi: evaluate(0, gi))
        for t in range(1, T):
            for c0 in range(int(sched.eval_steps[t - 1]), int(sched.eval_steps[t]), PLAN_STEPS):
                c1 = min(c0 + PLAN_STEPS, int(sched.eval_steps[t]))
                idx, w, ep, active = batch_plan(sched, perms, inv, left, c0, c1)
                active = active.numpy()
                if stream is not None:
                    stream.release_before(int(ep.min()))
                idx_d, w_d = idx.to(dev), w.to(dev, dtype)
                run(lambda gi: train(c1, c0, idx, idx_d, w_d, ep, active, gi))
                if bar is not None:
                    bar.update(R * (c1 - c0) / sched.total)
            run(lambda gi: evaluate(t, gi))
    finally:
        run.close()
    return losses.cpu(), dist.cpu()
