"""The vectorised gold standard, :func:`further_train`: the runs of every seed trained in chunks
by an engine, with a resumable work directory.

Runs are processed in chunks (the full run once per seed, in the first chunk); with a work
directory each (seed, chunk) is saved atomically as it finishes, so a killed run resumes where it
stopped and ends with the same arrays, bit for bit. A :class:`GoldJob` is the prepared work;
:func:`write_piece` computes one (seed, chunk) piece of it, the unit that an executor (a shard of
a job array, :mod:`fimoda.gold.distributed`'s Dask tasks) runs elsewhere. How a chunk is sized
and trained: :mod:`fimoda.gold.chunks`; how its pieces are stored and checked:
:mod:`fimoda.gold.workdir`.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from ..progress import progress_bar

from ..losses import check_task
from ..tensors import as_inputs, as_targets, check_data
from ..store import environment
from .chunks import MLP_RUN_BLOCK_CPU, runs_per_chunk, cpu_cores, train_chunk
from .config import GoldConfig, GoldResult
from .engines import make_engine
from .groups import FULL, as_left_out, is_groups
from .schedule import AugmentStream, epoch_permutations, make_schedule
from .workdir import fingerprint, load_piece, open_workdir, save_piece

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- inputs
def prepare_inputs(model, task, X_train, y_train, X_test, y_test, loo_indices,
                   cfg: GoldConfig, groups: bool = True):
    """The inputs checked and on the device; ``loo_indices`` normalised by
    :func:`fimoda.gold.groups.as_left_out` ((n',) indices, or (m, G) groups when ``groups``)."""
    check_task(task)
    if not isinstance(cfg, GoldConfig):
        raise ValueError(f"cfg must be a GoldConfig, got {type(cfg).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    dev = torch.device(cfg.device)
    model = copy.deepcopy(model).to(dev).eval()
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    X, Y = as_inputs(X_train, dtype, dev), as_targets(y_train, task, dtype, dev)
    Xt, Yt = as_inputs(X_test, dtype, dev), as_targets(y_test, task, dtype, dev)
    check_data(task, X, Y, Xt, Yt, padded=hasattr(model, "trim_inputs"))
    if len(X) != len(Y) or len(X) < 2:
        raise ValueError(f"X_train and y_train need equal lengths >= 2, got {len(X)}, {len(Y)}")
    if len(Xt) != len(Yt) or len(Xt) < 1:
        raise ValueError(f"X_test and y_test need equal lengths >= 1, got {len(Xt)}, {len(Yt)}")
    loo = as_left_out(loo_indices, len(X), "loo_indices")
    if is_groups(loo) and not groups:
        raise ValueError("loo_indices: this computation (the infinitesimal gold) takes one "
                         "left-out instance per run, not groups")
    return model, X, Y, Xt, Yt, loo


def checked_test_indices(test_indices, J: int) -> np.ndarray:
    if test_indices is None:
        return np.arange(J)
    t = np.asarray(test_indices.cpu() if torch.is_tensor(test_indices) else test_indices)
    if t.shape != (J,):
        raise ValueError(f"test_indices must have one entry per test instance ({J}), "
                         f"got shape {t.shape}")
    return t


# ----------------------------------------------------------------------------- the pieces
class MissingPieces(RuntimeError):
    """(seed, chunk) pieces that an executor left out of the work directory (e.g. other shards'
    pieces, or a merge before every shard has finished); ``pieces`` lists them, ``paths`` their
    files."""

    def __init__(self, workdir: Path, pieces: list, paths: list):
        self.workdir, self.pieces, self.paths = workdir, list(pieces), list(paths)
        names = ", ".join(p.name for p in self.paths[:12])
        more = f" and {len(self.paths) - 12} more" if len(self.paths) > 12 else ""
        super().__init__(f"{len(self.pieces)} of the gold standard's (seed, chunk) pieces are "
                         f"missing from {workdir}: {names}{more}")


class GoldJob:
    """The further training of :func:`further_train`, prepared: inputs on the device, schedule,
    engine, the runs and their chunks, and the opened work directory. Any (seed, chunk) piece is
    computed from it alone (:meth:`compute`, :func:`write_piece`), so pieces can run in other
    processes: a job pickles with its tensors on the CPU and without its engine, which is built
    again where it is unpickled."""

    def __init__(self, model: nn.Module, task: str, X_train, y_train, X_test, y_test,
                 loo_indices, cfg: GoldConfig, workdir=None, augment: Optional[Callable] = None,
                 test_indices=None, loss: Optional[Callable] = None,
                 workdir_mismatch: str = "error"):
        self.model, self.X, self.Y, self.Xt, self.Yt, self.loo = prepare_inputs(
            model, task, X_train, y_train, X_test, y_test, loo_indices, cfg)
        self.task, self.cfg, self.augment, self.loss = task, cfg, augment, loss
        self.test_idx = checked_test_indices(test_indices, len(self.Xt))
        group = self.loo.shape[1] if is_groups(self.loo) else 1
        self.sched = make_schedule(len(self.X), cfg, group)
        self._engine = make_engine(self.model, task, cfg, self.X, self.Y, loss)
        # run 0 is the full run: (n' + 1,) indices, or (m + 1, G) groups
        self.runs = np.concatenate([np.full((1,) + self.loo.shape[1:], FULL), self.loo])
        self.chunk = runs_per_chunk(cfg, self.model, self.X, len(self.runs), self.sched.slots)
        cpu_mlp = self._engine.name == "mlp" and self.X.device.type == "cpu"
        if cfg.run_block is not None:
            self.block = cfg.run_block
        else:
            self.block = MLP_RUN_BLOCK_CPU if cpu_mlp else self.chunk
        # CPU mlp engine: blocks on worker threads (one intra-op thread each), one per core
        self.workers = (cfg.workers or cpu_cores()) if cpu_mlp else 1
        self.seeds = cfg.seed_list
        self.T = len(self.sched.eval_steps)
        self.n_chunks = math.ceil(len(self.runs) / self.chunk)
        self.workdir, self.config_hash = None, None
        # the arithmetic environment every piece must be computed in (an executor that runs its
        # tasks with another intra-op thread count sets it: :meth:`expect_threads`)
        self.env = environment(cfg.device)
        if workdir is not None:
            self.workdir, self.config_hash = open_workdir(workdir, fingerprint(
                self.model, task, self.X, self.Y, self.Xt, self.Yt, self.loo, cfg, self._engine,
                self.chunk, self.block, augment, loss), workdir_mismatch)

    def expect_threads(self, threads: Optional[int]) -> None:
        """Pieces are computed with ``threads`` intra-op threads (None: this process's count)."""
        if threads is not None:
            self.env = {**self.env, "threads": int(threads)}

    # pickling: tensors travel on the CPU, the engine is rebuilt on arrival
    _TENSORS = ("X", "Y", "Xt", "Yt")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_engine"] = None
        state["model"] = copy.deepcopy(self.model).cpu()
        for k in self._TENSORS:
            state[k] = state[k].cpu()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        dev = torch.device(self.cfg.device)
        self.model = self.model.to(dev)
        for k in self._TENSORS:
            setattr(self, k, getattr(self, k).to(dev))

    @property
    def engine(self):
        if self._engine is None:
            self._engine = make_engine(self.model, self.task, self.cfg, self.X, self.Y,
                                       self.loss)
        return self._engine

    def pieces(self) -> list[tuple[int, int]]:
        """Every (seed, chunk index), seed by seed."""
        return [(s, c) for s in self.seeds for c in range(self.n_chunks)]

    def bounds(self, c: int) -> tuple[int, int]:
        """The runs [a, b) of chunk c (run 0 is the full run)."""
        return c * self.chunk, min(len(self.runs), (c + 1) * self.chunk)

    def path(self, seed: int, c: int) -> Optional[Path]:
        return None if self.workdir is None else self.workdir / f"seed{seed}_chunk{c:04d}.npz"

    def load(self, seed: int, c: int):
        """(test losses, distances) of a stored piece, or None when it is not stored or fails
        verification (:func:`fimoda.gold.workdir.load_piece`: reported, to be recomputed)."""
        a, b = self.bounds(c)
        return load_piece(self.path(seed, c), self.config_hash, seed, c, self.runs[a:b],
                          (b - a, self.T, len(self.Xt)), self.env)

    def missing(self) -> list[tuple[int, int]]:
        """The pieces not yet validly in the work directory (all of them without one)."""
        return [p for p in self.pieces() if self.load(*p) is None]

    def compute(self, seed: int, c: int, perms=None, bar=None, workers: Optional[int] = None):
        """Train chunk c of ``seed`` and store it (with a work directory, atomically); returns
        (test losses (R, T, J), distances (R, T)). ``perms``: the seed's epoch permutations and
        their inverses when already drawn; ``workers``: block threads (no effect on the
        numbers; default :attr:`workers`)."""
        cfg, n = self.cfg, len(self.X)
        env = environment(cfg.device)       # recorded with the piece
        if perms is None:
            perms = epoch_permutations(n, seed, self.sched.n_epochs, cfg.shuffle)
            perms = (perms, torch.argsort(perms, dim=1))
        p, inv = perms
        stream = None
        if self.augment is not None:   # every chunk replays the seed's views
            stream = AugmentStream(self.augment, self.X, cfg.batch_size, seed,
                                   lambda e, p=p: p[e])
        a, b = self.bounds(c)
        t0 = time.perf_counter()
        done0 = None if bar is None else bar.n
        Lt, Dt = train_chunk(self.engine, cfg, self.sched, p, inv,
                             torch.as_tensor(self.runs[a:b]), self.X, self.Y, self.Xt, self.Yt,
                             stream, self.block, workers or self.workers, bar)
        if bar is not None:
            bar.update(done0 + (b - a) - bar.n)
        L, D = Lt.numpy(), Dt.numpy()
        dt = time.perf_counter() - t0
        log.info("seed %d chunk %d/%d: %d runs x %d steps in %.2f s (%.2f runs/s, "
                 "%.0f model-steps/s, engine %s)", seed, c + 1, self.n_chunks, b - a,
                 self.sched.total, dt, (b - a) / dt, (b - a) / dt * self.sched.total,
                 self.engine.name)
        finite = np.isfinite(L).all(axis=tuple(range(1, L.ndim))) & \
            np.isfinite(D).all(axis=tuple(range(1, D.ndim)))
        if not finite.all() and cfg.diverged == "keep":
            log.warning("seed %d chunk %d/%d: %d of %d runs diverged (lr %g, optimizer %s); kept "
                        "as non-finite", seed, c + 1, self.n_chunks, int((~finite).sum()),
                        b - a, cfg.lr, cfg.optimizer)
        elif not finite.all():
            raise FloatingPointError(
                f"further training diverged: seed {seed}, chunk {c + 1}/{self.n_chunks} has "
                f"non-finite test losses or parameter distances (lr {cfg.lr}, optimizer "
                f"{cfg.optimizer}); lower lr. Nothing was saved for it")
        if self.workdir is not None:
            save_piece(self.path(seed, c), self.config_hash, seed, c, self.runs[a:b], L, D, env)
        return L, D


def write_piece(job: GoldJob, seed: int, c: int, block_threads: Optional[int] = None,
                threads: Optional[int] = None) -> str:
    """Compute piece (``seed``, chunk ``c``) of ``job`` and write it atomically into the job's
    work directory, unless it is there already; returns the file's path. The unit of work of a
    distributed or sharded gold standard. ``block_threads``: of the CPU mlp engine;
    ``threads``: torch intra-op threads while it runs (None: as they are). Neither changes the
    numbers of the mlp engine."""
    path = job.path(seed, c)
    if path is None:
        raise ValueError("write_piece needs a job with a work directory")
    if job.load(seed, c) is None:
        before = torch.get_num_threads()
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            job.compute(seed, c, workers=block_threads)
        finally:
            torch.set_num_threads(before)
    return str(path)


# An executor computes pieces elsewhere: ``executor(job, pieces)`` writes the given pieces into
# the job's work directory (or some of them: a shard); further_train then loads them.
_EXECUTOR: contextvars.ContextVar = contextvars.ContextVar("fimoda_gold_executor", default=None)


@contextlib.contextmanager
def executing(executor: Callable):
    """Within the block, :func:`further_train` (also through ``experiment.run_gold``) hands the
    pieces missing from its work directory to ``executor(job, pieces)`` (e.g.
    :func:`fimoda.gold.distributed.dask_executor`) instead of training them itself, then
    assembles the result from the work directory; :class:`MissingPieces` if the executor
    left some out."""
    token = _EXECUTOR.set(executor)
    try:
        yield executor
    finally:
        _EXECUTOR.reset(token)


def shard_executor(k: int, n: int, progress: bool = True) -> Callable:
    """An executor that computes, in this process, only shard ``k`` of ``n`` (1-based): the
    pieces whose index in :meth:`GoldJob.pieces` is k-1 modulo n (a job array's task k)."""
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
        raise ValueError(f"shard must be k/N with 1 <= k <= N, got {k}/{n}")

    def run(job: GoldJob, pieces):
        mine = set(job.pieces()[k - 1::n])
        todo = [p for p in pieces if p in mine]
        for s, c in progress_bar(todo, desc=f"gold shard {k}/{n}", unit="piece",
                                 disable=not progress):
            write_piece(job, s, c)
        log.info("gold shard %d/%d: %d piece(s) written to %s", k, n, len(todo), job.workdir)
    run.concurrent = True       # the other shards write into the same work directory meanwhile
    return run


def concurrent_executor() -> bool:
    """Whether the executor in force (:func:`executing`) runs alongside other processes on the
    same work directory (a job array's shards), which a lock on the result must then allow."""
    return bool(getattr(_EXECUTOR.get(), "concurrent", False))


def assemble_only(job: GoldJob, pieces) -> None:
    """An executor that computes nothing: the result is assembled from pieces already written
    (``fimoda merge``); any missing piece is a :class:`MissingPieces` error."""


# ----------------------------------------------------------------------------- main entry
def further_train(model: nn.Module, task: str, X_train, y_train, X_test, y_test, loo_indices,
                  cfg: GoldConfig, workdir=None, augment: Optional[Callable] = None,
                  test_indices=None, callback: Optional[Callable] = None,
                  loss: Optional[Callable] = None,
                  executor: Optional[Callable] = None,
                  workdir_mismatch: str = "error") -> GoldResult:
    """LOO further training from theta^f (eqs. 2, 3): for every seed, the full run and one run
    per left-out index, all from ``model``'s parameters with the seed's batch order; test losses
    and ||theta_t - theta^f|| at every evaluation point. Vectorised over runs
    (:mod:`fimoda.gold.engines`).

    ``loo_indices``: the left-out indices (n',), or groups -- ``[[0, 5], [3], ...]`` or a 2-D
    index array (m, k) -- one run per group S without all of S (:mod:`fimoda.gold.groups`; the
    result's ``loss_loo[s, g]`` is group g's run and its ``loo_indices`` the (m, G) padded
    groups). Groups all of one instance give leave-one-out's numbers bit for bit (in a mix with
    larger groups, ``subtract`` pads their subtracted slots with zero weights: equal to
    rounding).

    ``augment(x_batch, generator)``: optional augmentation of training batches (images), see
    :class:`AugmentStream`. ``workdir``: resumable storage of finished (seed, chunk) results.
    ``callback(seed, chunk)``: called after each chunk is stored. ``test_indices`` is recorded
    in the result only (default 0..J-1). ``loss(outputs, targets) -> (B,)``: a twice
    differentiable per-example loss in place of the task's (squared error / cross-entropy).
    ``executor(job, pieces)`` (default: the one set by :func:`executing`, else none): computes
    the missing pieces elsewhere (a Dask cluster, a shard), into ``workdir``; without one,
    every piece is trained here, in order. ``workdir_mismatch``: what to do with a work directory
    of other inputs (another theta^f, data or configuration): "error" (a ValueError saying what
    differs), or "replace" it (what the result store does when it recomputes a gold standard
    whose inputs changed).
    """
    t_start = time.perf_counter()
    job = GoldJob(model, task, X_train, y_train, X_test, y_test, loo_indices, cfg, workdir,
                  augment, test_indices, loss, workdir_mismatch)
    executor = executor if executor is not None else _EXECUTOR.get()
    if executor is not None:
        if job.workdir is None:
            raise ValueError("a gold-standard executor writes its pieces into a work directory: "
                             "give workdir")
        job.expect_threads(getattr(executor, "threads", None))
        todo = job.missing()
        if todo:
            executor(job, todo)
        left = job.missing()
        if left:
            raise MissingPieces(job.workdir, left, [job.path(*p) for p in left])
    seeds, runs, T, J, n_loo = job.seeds, job.runs, job.T, len(job.Xt), len(job.loo)
    loss_full = np.empty((len(seeds), T, J))
    loss_loo = np.empty((len(seeds), n_loo, T, J))
    dist_full = np.empty((len(seeds), T))
    dist_loo = np.empty((len(seeds), n_loo, T))
    threads = torch.get_num_threads()   # worker threads set their own; restored at the end
    bar = progress_bar(total=len(seeds) * len(runs), unit="run", disable=not cfg.progress,
                       desc=f"further training ({cfg.optimizer}, {cfg.mechanism})",
                       bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}, "
                                  "{rate_fmt}{postfix}]")
    computed_runs, computed_s = 0, 0.0
    try:
        for si, seed in enumerate(seeds):
            perms = None
            for c in range(job.n_chunks):
                a, b = job.bounds(c)
                stored = job.load(seed, c)
                if stored is not None:
                    L, D = stored
                    bar.update(b - a)
                else:
                    if perms is None:
                        p = epoch_permutations(len(job.X), seed, job.sched.n_epochs, cfg.shuffle)
                        perms = (p, torch.argsort(p, dim=1))
                    t0 = time.perf_counter()
                    L, D = job.compute(seed, c, perms, bar)
                    dt = time.perf_counter() - t0
                    computed_runs, computed_s = computed_runs + (b - a), computed_s + dt
                    bar.set_postfix_str(f"last chunk {(b - a) / dt:.2f} runs/s")
                for r in range(a, b):
                    if np.all(runs[r] == FULL):
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
    config.update(engine=job.engine.name, chunk_runs=job.chunk, run_block=job.block)
    return GoldResult(loss_full, loss_loo, dist_full, dist_loo, job.sched.eval_points,
                      "epoch" if job.sched.by_epoch else "step", np.asarray(seeds), job.loo,
                      job.test_idx, config, total_s)
