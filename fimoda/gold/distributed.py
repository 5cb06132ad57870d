"""The gold standard's (seed, chunk) pieces as tasks of a ``dask.distributed`` cluster.

The gold standard is embarrassingly parallel over (seed, chunk of left-out runs): every piece
starts from theta^f with its seed's batch order and needs nothing from any other piece. Each task
runs :func:`fimoda.gold.runner.write_piece`, which trains one piece and writes it atomically into
the work directory that the serial path uses; the client then assembles the result from that
directory exactly as a serial run resumes from it. So a cluster run, a serial run and a run
interrupted and resumed with another number of workers give the same arrays, bit for bit: tasks
run with the submitting process's torch intra-op thread count (:func:`dask_executor`'s
``threads``), and the mlp engine's block threads change no number. A worker that dies takes its task with it; the scheduler runs the task again on
another worker (up to ``distributed.scheduler.allowed-failures`` times), and an exception inside
a task is retried ``retries`` times.

Clusters (:func:`cluster_client`):

- several workers on this machine: ``cluster_client(workers=4)`` -- a ``LocalCluster`` of 4
  single-threaded worker processes;
- an existing cluster: ``cluster_client(scheduler="tcp://host:8786")``, e.g. one started by
  ``dask scheduler`` / ``dask worker`` or by ``dask_jobqueue.SLURMCluster`` (README);
- one worker per GPU: ``cluster_client(workers="cuda")`` -- ``dask_cuda.LocalCUDACluster``
  (``pip install dask-cuda``; imported only when asked for).

The work directory must be reachable under the same path by every worker (one machine, or a
shared file system on a cluster).

    from fimoda.gold import distributed
    with distributed.cluster_client(workers=2) as client, distributed.on_dask(client):
        res = further_train(model, task, X, y, Xt, yt, loo, cfg, workdir="work")
        # or ex.run_gold(...): the notebooks' code path, unchanged
"""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Callable, Optional, Union

import torch
from ..progress import progress_bar

from .runner import GoldJob, executing, write_piece

log = logging.getLogger(__name__)
PRE_SPAWN = "distributed.nanny.pre-spawn-environ"     # a worker's environment, set by its nanny


def require_dask():
    try:
        import distributed  # noqa: F401
    except ImportError as e:      # a dependency of fimoda, but a stripped install may lack it
        raise ImportError("the distributed gold standard needs dask.distributed: "
                          "pip install 'dask[distributed]'") from e


@contextlib.contextmanager
def cluster_client(workers: Union[int, str, None] = None, scheduler: Optional[str] = None,
                   threads_per_worker: int = 1, **cluster_options):
    """A ``dask.distributed.Client`` for the block, closed (with its cluster) at the end:
    to the scheduler at address ``scheduler`` (an existing cluster), or on a new cluster on this
    machine: ``workers`` worker processes (a ``LocalCluster``, ``threads_per_worker`` threads
    each) or ``workers="cuda"`` (``dask_cuda.LocalCUDACluster``: one worker per visible GPU).
    ``cluster_options`` go to the cluster's constructor."""
    if (workers is None) == (scheduler is None):
        raise ValueError("give either workers (a count, or 'cuda') or scheduler (an address), "
                         "not both or neither")
    if workers is not None and workers != "cuda" and not (
            isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        raise ValueError(f"workers must be a positive int or 'cuda', got {workers!r}")
    if not (isinstance(threads_per_worker, int) and threads_per_worker >= 1):
        raise ValueError(f"threads_per_worker must be a positive int, got {threads_per_worker!r}")
    require_dask()
    from distributed import Client
    if scheduler is not None:
        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    import dask
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_ in their workers' environment, which turns off
    # glibc's dynamic mmap threshold: every large tensor is then mapped and faulted in afresh
    # (a piece measured 1.7x slower than in this process); the workers here go without it
    with dask.config.set({f"{PRE_SPAWN}.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = _local_cluster(workers, threads_per_worker, cluster_options)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def _local_cluster(workers, threads_per_worker: int, cluster_options: dict):
    from distributed import LocalCluster
    if workers == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as e:
            raise ImportError("workers='cuda' needs dask-cuda (pip install dask-cuda)") from e
        return LocalCUDACluster(threads_per_worker=threads_per_worker, **cluster_options)
    cluster_options.setdefault("dashboard_address", ":0")    # a free port: clusters side by side
    return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                        processes=True, **cluster_options)


def dask_executor(client, retries: int = 2, threads: Optional[int] = None,
                  block_threads: int = 1, progress: bool = True) -> Callable:
    """An executor (:func:`fimoda.gold.runner.executing`) that runs each missing piece as a
    task of ``client``: the job is sent to the workers once, each task writes its piece into
    the job's work directory. ``threads``: torch intra-op threads of each task (None: this
    process's count when the pieces are submitted). The intra-op count changes the last bits
    of some sums, so the default makes a cluster run equal a serial run of this process bit
    for bit; ``threads=1`` fills a machine's cores with single-threaded tasks and equals a
    serial run on one intra-op thread. ``block_threads``: the CPU mlp engine's block threads
    per task (they change no number). ``retries``: reruns of a task that raised (a dead
    worker's task is rerun by the scheduler regardless). ``progress``: a bar over the pieces
    (else a log line per piece)."""
    require_dask()
    for name, v, low in (("retries", retries, 0), ("threads", threads, 1),
                         ("block_threads", block_threads, 1)):
        if not (v is None and name == "threads") and not (
                isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

    def run(job: GoldJob, pieces):
        from distributed import as_completed
        tag = uuid.uuid4().hex[:8]
        t0 = time.perf_counter()
        job_f = client.scatter(job, broadcast=True, hash=False)
        n_threads = threads if threads is not None else torch.get_num_threads()
        futures = {client.submit(write_piece, job_f, s, c, block_threads=block_threads,
                                 threads=n_threads, key=f"fimoda-gold-{tag}-seed{s}-chunk{c}",
                                 retries=retries, pure=False): (s, c) for s, c in pieces}
        bar = progress_bar(total=len(pieces), unit="piece", disable=not progress,
                           desc=f"gold pieces on {len(client.scheduler_info()['workers'])} "
                                "dask workers")
        try:
            for done, f in enumerate(as_completed(futures), 1):
                f.result()                   # a task's exception (after its retries) is raised
                bar.update(1)
                if not progress:
                    s, c = futures[f]
                    log.info("gold piece seed %d chunk %d written (%d/%d, %.1f s)", s, c, done,
                             len(pieces), time.perf_counter() - t0)
        except BaseException:
            client.cancel(list(futures))     # finished pieces stay in the work directory
            raise
        finally:
            bar.close()
            client.cancel(job_f)
    run.threads = threads          # the pieces' intra-op thread count (None: the submitter's)
    return run


@contextlib.contextmanager
def on_dask(client, **options):
    """Within the block, every :func:`fimoda.gold.further_train` (also through
    ``experiment.run_gold``) runs its missing pieces as tasks of ``client``
    (:func:`dask_executor` with ``options``)."""
    with executing(dask_executor(client, **options)) as ex:
        yield ex
