"""The vectorised gold standard, :func:`further_train`: the runs of every seed trained in chunks
by an engine, with a resumable work directory.

Runs are processed in chunks (the full run once per seed, in the first chunk); with a work
directory each (seed, chunk) is saved atomically as it finishes, so a killed run resumes where it
stopped and ends with the same arrays, bit for bit.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..io import load_json, load_npz, save_json, save_npz, sha256_arrays
from ..models import input_trimmer
from ..tensors import as_inputs, as_targets
from .config import GoldConfig, GoldResult
from .engines import _make_engine
from .optim import _StackedOptimizer, _clip_per_run_
from .schedule import (Schedule, _AugmentStream, _stream_gather, batch_plan, epoch_permutations,
                       make_schedule)

log = logging.getLogger(__name__)

MLP_RUN_BLOCK_CPU = 8       # runs per cache-sized block of the mlp engine on a CPU
PLAN_STEPS = 64             # steps whose batch indices are built at once
FORMAT = 1                  # version of the work-directory layout


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


def _cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _chunk_runs(cfg: GoldConfig, model, X, n_runs: int, slots: int) -> int:
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
def _train_chunk(engine, cfg: GoldConfig, sched: Schedule, perms, inv, left: torch.Tensor,
                 X, Y, Xt, Yt, stream, block: int, workers: int = 1, bar=None):
    """Train the runs ``left`` (-1 = full run) of one seed from the engine's start parameters;
    returns (test losses (R, T, J), parameter distances (R, T)) as float64 CPU tensors."""
    dev = X.device
    R = len(left)
    P = engine.stack(R)
    dtype = P[0].dtype
    start = [p.to(dev) for p in engine.start]
    groups = [slice(a, min(R, a + block)) for a in range(0, R, block)]
    Pg = [[p[sl] for p in P] for sl in groups]
    opt = _StackedOptimizer(cfg, P, groups)
    T, J = len(sched.eval_steps), len(Xt)
    losses = torch.empty(R, T, J, dtype=torch.float64, device=dev)
    dist = torch.empty(R, T, dtype=torch.float64, device=dev)
    subtract = sched.mechanism == "subtract"
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
                x = _stream_gather(stream, ep[k, sl], ii)
                if subtract:
                    x[:, -1] = X[ii[:, -1]]
            g = engine.grads(Pg[gi], x, Y[ii], w_d[k, sl])
            if cfg.grad_clip is not None:
                _clip_per_run_(g, cfg.grad_clip)
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


# ----------------------------------------------------------------------------- inputs
def _prepare(model, task, X_train, y_train, X_test, y_test, loo_indices, cfg: GoldConfig):
    if task not in ("regression", "classification"):
        raise ValueError(f"unknown task {task!r}; choose 'regression' or 'classification'")
    if not isinstance(cfg, GoldConfig):
        raise ValueError(f"cfg must be a GoldConfig, got {type(cfg).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    dev = torch.device(cfg.device)
    model = copy.deepcopy(model).to(dev).eval()
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    X, Y = as_inputs(X_train, dtype, dev), as_targets(y_train, task, dtype, dev)
    Xt, Yt = as_inputs(X_test, dtype, dev), as_targets(y_test, task, dtype, dev)
    if len(X) != len(Y) or len(X) < 2:
        raise ValueError(f"X_train and y_train need equal lengths >= 2, got {len(X)}, {len(Y)}")
    if len(Xt) != len(Yt) or len(Xt) < 1:
        raise ValueError(f"X_test and y_test need equal lengths >= 1, got {len(Xt)}, {len(Yt)}")
    loo = np.asarray(loo_indices.cpu() if torch.is_tensor(loo_indices) else loo_indices)
    if loo.ndim != 1 or len(loo) == 0 or not np.issubdtype(loo.dtype, np.integer):
        raise ValueError(f"loo_indices must be a non-empty 1-D integer array, got {loo!r}")
    if len(np.unique(loo)) != len(loo) or loo.min() < 0 or loo.max() >= len(X):
        raise ValueError(f"loo_indices must be distinct indices in [0, {len(X)})")
    return model, X, Y, Xt, Yt, loo.astype(np.int64)


def _test_indices(test_indices, J: int) -> np.ndarray:
    if test_indices is None:
        return np.arange(J)
    t = np.asarray(test_indices.cpu() if torch.is_tensor(test_indices) else test_indices)
    if t.shape != (J,):
        raise ValueError(f"test_indices must have one entry per test instance ({J}), "
                         f"got shape {t.shape}")
    return t


# ----------------------------------------------------------------------------- work directory
def _fingerprint(model, task, X, Y, Xt, Yt, loo, cfg, engine, chunk, block, augment,
                 loss=None) -> dict:
    custom = {} if loss is None else {"loss": getattr(loss, "__qualname__", repr(loss))}
    return {**custom, "format": FORMAT, "config": cfg.numeric(), "engine": engine.name,
            "chunk_runs": chunk, "run_block": block, "device": torch.device(cfg.device).type,
            "task": task, "model": type(model).__name__,
            "theta": sha256_arrays(*[v for _, v in sorted(model.state_dict().items())]),
            "train": sha256_arrays(X, Y), "test": sha256_arrays(Xt, Yt), "loo": loo.tolist(),
            "augment": None if augment is None else getattr(augment, "__qualname__", repr(augment))}


def _open_workdir(workdir, fp: dict) -> Path:
    wd = Path(workdir)
    meta = wd / "config.json"
    h = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    if meta.exists():
        old = load_json(meta)
        if old.get("hash") != h:
            def flat(d, pre=""):
                out = {}
                for k, v in d.items():
                    out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {pre + k: v})
                return out
            ofp, nfp = flat(old.get("fingerprint", {})), flat(json.loads(json.dumps(fp)))
            diff = sorted(k for k in set(ofp) | set(nfp) if ofp.get(k) != nfp.get(k))
            raise ValueError(f"work directory {wd} holds further-training results of a different "
                             f"configuration (differs in: {', '.join(diff) or 'hash'}); use "
                             "another workdir or delete this one")
    else:
        wd.mkdir(parents=True, exist_ok=True)
        save_json(meta, {"hash": h, "fingerprint": fp})
    return wd


# ----------------------------------------------------------------------------- main entry
def further_train(model: nn.Module, task: str, X_train, y_train, X_test, y_test, loo_indices,
                  cfg: GoldConfig, workdir=None, augment: Optional[Callable] = None,
                  test_indices=None, callback: Optional[Callable] = None,
                  loss: Optional[Callable] = None) -> GoldResult:
    """LOO further training from theta^f (eqs. 2, 3): for every seed, the full run and one run
    per left-out index, all from ``model``'s parameters with the seed's batch order; test losses
    and ||theta_t - theta^f|| at every evaluation point. Vectorised over runs
    (:mod:`fimoda.gold.engines`).

    ``augment(x_batch, generator)``: optional augmentation of training batches (images), see
    :class:`_AugmentStream`. ``workdir``: resumable storage of finished (seed, chunk) results.
    ``callback(seed, chunk)``: called after each chunk is stored. ``test_indices`` is recorded
    in the result only (default 0..J-1). ``loss(outputs, targets) -> (B,)``: a twice
    differentiable per-example loss in place of the task's (squared error / cross-entropy).
    """
    t_start = time.perf_counter()
    model, X, Y, Xt, Yt, loo = _prepare(model, task, X_train, y_train, X_test, y_test,
                                        loo_indices, cfg)
    n, J, n_loo = len(X), len(Xt), len(loo)
    test_idx = _test_indices(test_indices, J)
    sched = make_schedule(n, cfg)
    engine = _make_engine(model, task, cfg, X, Y, loss)
    runs = np.concatenate([[-1], loo])
    chunk = _chunk_runs(cfg, model, X, len(runs), sched.slots)
    if cfg.run_block is not None:
        block = cfg.run_block
    elif engine.name == "mlp" and X.device.type == "cpu":
        block = MLP_RUN_BLOCK_CPU
    else:
        block = chunk
    # CPU mlp engine: blocks on worker threads (one intra-op thread each), one per core
    workers = 1
    if engine.name == "mlp" and X.device.type == "cpu":
        workers = cfg.workers or _cores()
    seeds = cfg.seed_list
    wd = None
    if workdir is not None:
        wd = _open_workdir(workdir, _fingerprint(model, task, X, Y, Xt, Yt, loo, cfg, engine,
                                                 chunk, block, augment, loss))
    T = len(sched.eval_steps)
    loss_full = np.empty((len(seeds), T, J))
    loss_loo = np.empty((len(seeds), n_loo, T, J))
    dist_full = np.empty((len(seeds), T))
    dist_loo = np.empty((len(seeds), n_loo, T))
    n_chunks = math.ceil(len(runs) / chunk)
    threads = torch.get_num_threads()   # worker threads set their own; restored at the end
    bar = tqdm(total=len(seeds) * len(runs), unit="run", disable=not cfg.progress,
               desc=f"further training ({cfg.optimizer}, {cfg.mechanism})",
               bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}, "
                          "{rate_fmt}{postfix}]")
    computed_runs, computed_s = 0, 0.0
    try:
        for si, seed in enumerate(seeds):
            perms = inv = stream = None
            for c in range(n_chunks):
                a, b = c * chunk, min(len(runs), (c + 1) * chunk)
                path = None if wd is None else wd / f"seed{seed}_chunk{c:04d}.npz"
                if path is not None and path.exists():
                    z = load_npz(path)
                    if not (np.array_equal(z["left"], runs[a:b])
                            and z["loss"].shape == (b - a, T, J)):
                        raise ValueError(f"{path} does not match this configuration; delete "
                                         "the work directory")
                    L, D = z["loss"], z["dist"]
                    bar.update(b - a)
                else:
                    if perms is None:
                        perms = epoch_permutations(n, seed, sched.n_epochs, cfg.shuffle)
                        inv = torch.argsort(perms, dim=1)
                    if augment is not None:   # every chunk replays the seed's views
                        stream = _AugmentStream(augment, X, cfg.batch_size, seed,
                                                lambda e, p=perms: p[e])
                    t0 = time.perf_counter()
                    done0 = bar.n
                    Lt, Dt = _train_chunk(engine, cfg, sched, perms, inv,
                                          torch.as_tensor(runs[a:b]), X, Y, Xt, Yt, stream,
                                          block, workers, bar)
                    bar.update(done0 + (b - a) - bar.n)
                    L, D = Lt.numpy(), Dt.numpy()
                    dt = time.perf_counter() - t0
                    computed_runs, computed_s = computed_runs + (b - a), computed_s + dt
                    rate = (b - a) / dt
                    bar.set_postfix_str(f"last chunk {rate:.2f} runs/s")
                    log.info("seed %d chunk %d/%d: %d runs x %d steps in %.2f s (%.2f runs/s, "
                             "%.0f model-steps/s, engine %s)", seed, c + 1, n_chunks, b - a,
                             sched.total, dt, rate, rate * sched.total, engine.name)
                    if path is not None:
                        save_npz(path, loss=L, dist=D, left=runs[a:b])
                    stream = None
                for r in range(a, b):
                    if runs[r] < 0:
                        loss_full[si], dist_full[si] = L[r - a], D[r - a]
                    else:
                        loss_loo[si, r - 1], dist_loo[si, r - 1] = L[r - a], D[r - a]
                if callback is not None:
                    callback(seed, c)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    total_s = time.perf_counter() - t_start
    if computed_runs:
        log.info("further training done: %d runs computed in %.1f s (%.2f runs/s)",
                 computed_runs, computed_s, computed_runs / computed_s)
    config = dataclasses.asdict(cfg)
    config.update(engine=engine.name, chunk_runs=chunk, run_block=block)
    return GoldResult(loss_full, loss_loo, dist_full, dist_loo, sched.eval_points,
                      "epoch" if sched.by_epoch else "step", np.asarray(seeds), loo, test_idx,
                      config, total_s)
