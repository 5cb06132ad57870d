"""The gold standard's (seed, chunk) pieces as Dask tasks (fimoda.gold.distributed) on a
LocalCluster of 2 single-threaded worker processes: the same arrays as a serial run, bit for bit,
the same piece files in the same work directory, resumable across worker counts, a killed
worker's task run again; bad input is an error before any work."""
import os
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("distributed")

from fimoda.gold import GoldConfig, further_train  # noqa: E402
from fimoda.gold import distributed as dd  # noqa: E402
from fimoda.gold.runner import MissingPieces, executing  # noqa: E402
from fimoda.io import load_npz  # noqa: E402
from small_models import killed_after_first_piece, regression_problem  # noqa: E402

ARRAYS = ("loss_full", "loss_loo", "param_dist", "param_dist_loo")
LOO = [0, 23, 47, 71, 95, 119, 143, 167]          # 9 runs per seed, 3 per chunk: 3 chunks


def config(epochs=6):
    return GoldConfig(optimizer="sgd", lr=0.05, epochs=epochs, batch_size=8, seeds=2,
                      max_runs_per_chunk=3, progress=False)


@pytest.fixture(scope="module")
def client():
    with dd.cluster_client(workers=2) as c:     # LocalCluster, 2 processes x 1 thread
        yield c


@pytest.fixture(scope="module")
def problem():
    return regression_problem(n=200)


@pytest.fixture(scope="module")
def serial(problem):
    model, X, y, Xt, yt = problem
    return further_train(model, "regression", X, y, Xt, yt, LOO, config())


def assert_same(a, b):
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    effect = np.abs(a.loss_loo[:, :, -1] - a.loss_full[:, None, -1]).max()
    assert effect > 1e-6            # the runs differ: equality is not trivially true


def pieces(workdir):
    return sorted(p.name for p in workdir.glob("seed*_chunk*.npz"))


def test_cluster_equals_serial_with_the_serial_pieces(client, problem, serial, tmp_path):
    model, X, y, Xt, yt = problem
    further_train(model, "regression", X, y, Xt, yt, LOO, config(), workdir=tmp_path / "serial")
    with dd.on_dask(client, progress=False):
        res = further_train(model, "regression", X, y, Xt, yt, LOO, config(),
                            workdir=tmp_path / "dask")
    assert_same(serial, res)
    names = pieces(tmp_path / "serial")
    assert names == pieces(tmp_path / "dask") and len(names) == 6
    for n in names:                    # same files, same contents, same config.json
        a, b = load_npz(tmp_path / "serial" / n), load_npz(tmp_path / "dask" / n)
        assert all(np.array_equal(a[k], b[k]) for k in ("loss", "dist", "left")), n
    assert ((tmp_path / "serial" / "config.json").read_bytes()
            == (tmp_path / "dask" / "config.json").read_bytes())
    assert not list((tmp_path / "dask").glob(".*.tmp"))       # atomic writes left no temp file


def test_resumed_with_other_worker_counts(client, problem, serial, tmp_path):
    model, X, y, Xt, yt = problem
    # a serial run (one worker) interrupted after its first piece, resumed on 2 workers
    wd = tmp_path / "a"
    assert killed_after_first_piece(model, X, y, Xt, yt, LOO, config(), wd) == [
        "seed1_chunk0000.npz"]
    first = (wd / "seed1_chunk0000.npz").stat().st_mtime_ns
    with dd.on_dask(client, progress=False):
        res = further_train(model, "regression", X, y, Xt, yt, LOO, config(), workdir=wd)
    assert (wd / "seed1_chunk0000.npz").stat().st_mtime_ns == first     # not recomputed
    assert_same(serial, res)

    # the cluster stopped after 3 of the 6 pieces, resumed serially
    wd = tmp_path / "b"
    run = dd.dask_executor(client, progress=False)
    with pytest.raises(MissingPieces, match=r"3 of .* missing .*seed2_chunk0000\.npz"):
        with executing(lambda job, todo: run(job, todo[:3])):
            further_train(model, "regression", X, y, Xt, yt, LOO, config(), workdir=wd)
    assert len(pieces(wd)) == 3
    done = {n: (wd / n).stat().st_mtime_ns for n in pieces(wd)}
    res = further_train(model, "regression", X, y, Xt, yt, LOO, config(), workdir=wd)
    assert {n: (wd / n).stat().st_mtime_ns for n in done} == done
    assert_same(serial, res)


def test_a_killed_workers_task_is_run_again(client, problem, tmp_path):
    """SIGKILL a worker process while it trains a piece: the nanny restarts it, the scheduler
    reruns the lost task, and the arrays equal a serial run's."""
    model, X, y, Xt, yt = problem
    cfg = config(epochs=40)                    # pieces long enough to be caught mid-flight
    ref = further_train(model, "regression", X, y, Xt, yt, LOO, cfg)
    pids = client.run(os.getpid)
    out, killed = {}, {}

    def target():
        try:
            with dd.on_dask(client, progress=False):
                out["res"] = further_train(model, "regression", X, y, Xt, yt, LOO, cfg,
                                           workdir=tmp_path)
        except BaseException as e:          # reported below
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    deadline = time.time() + 60
    while not killed and time.time() < deadline and t.is_alive():
        busy = {w: keys for w, keys in client.processing().items()
                if any("fimoda-gold" in str(k) for k in keys)}
        if busy and len(pieces(tmp_path)) < 5:
            w = sorted(busy)[0]
            os.kill(pids[w], signal.SIGKILL)
            killed[w] = busy[w]
        time.sleep(0.02)
    t.join(120)
    assert killed, "no worker was caught running a piece"
    assert "error" not in out, out.get("error")
    assert_same(ref, out["res"])
    assert len(pieces(tmp_path)) == 6
    client.wait_for_workers(2, timeout=60)       # the nanny brought the worker back
    assert set(client.run(os.getpid).values()) != set(pids.values())


def test_bad_input_is_an_error_before_any_work(client, problem, tmp_path):
    model, X, y, Xt, yt = problem
    with pytest.raises(ValueError, match="executor writes its pieces into a work directory"):
        with dd.on_dask(client, progress=False):
            further_train(model, "regression", X, y, Xt, yt, LOO, config())
    with pytest.raises(ValueError, match="either workers .* or scheduler"):
        with dd.cluster_client(workers=2, scheduler="tcp://127.0.0.1:1"):
            pass
    with pytest.raises(ValueError, match="either workers .* or scheduler"):
        with dd.cluster_client():
            pass
    with pytest.raises(ValueError, match="workers must be a positive int or 'cuda'"):
        with dd.cluster_client(workers=0):
            pass
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        dd.dask_executor(client, retries=-1)
    with pytest.raises(ValueError, match="block_threads must be an integer >= 1"):
        dd.dask_executor(client, block_threads=0)
    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        dd.dask_executor(client, threads=0)
    wd = tmp_path / "w"
    with pytest.raises(ValueError, match="loo_indices must be distinct indices"):
        with dd.on_dask(client, progress=False):
            further_train(model, "regression", X, y, Xt, yt, LOO + [10_000], config(),
                          workdir=wd)
    assert not wd.exists()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for 2 intra-op threads")
def test_tasks_run_with_the_clients_thread_count(client, tmp_path):
    """Tasks use the submitting process's intra-op thread count: the cluster equals the serial
    run at 2 threads, and with threads=1 the serial run at 1 thread. Where the count changes the
    last bits of the 2x128 MLP's sums (it does with some BLAS builds and processors, not with
    others), the two comparisons also tell the counts apart."""
    import torch
    from fimoda.models import MLP
    g = torch.Generator().manual_seed(0)
    X = torch.randn(927, 8, generator=g, dtype=torch.float64)
    Xt = torch.randn(20, 8, generator=g, dtype=torch.float64)
    y, yt = torch.sin(X.sum(1)), torch.sin(Xt.sum(1))
    torch.manual_seed(0)
    model = MLP(8, 1).double()
    cfg = GoldConfig(lr=0.03, epochs=1, batch_size=128, seeds=1, max_runs_per_chunk=10,
                     progress=False)
    loo = list(range(0, 180, 9))
    torch.set_num_threads(1)
    one = further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    torch.set_num_threads(2)
    two = further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    with dd.on_dask(client, progress=False):
        assert_same(two, further_train(model, "regression", X, y, Xt, yt, loo, cfg,
                                       workdir=tmp_path / "a"))
    with dd.on_dask(client, progress=False, threads=1):
        assert_same(one, further_train(model, "regression", X, y, Xt, yt, loo, cfg,
                                       workdir=tmp_path / "b"))


def test_workers_keep_glibcs_dynamic_mmap_threshold(client):
    """Dask's nannies would set MALLOC_TRIM_THRESHOLD_ (pieces 1.7x slower); cluster_client's
    workers, restarted ones included (the kill test above), run without it."""
    assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
    assert len(client.scheduler_info()["workers"]) == 2


def test_methods_scored_over_test_chunks_on_dask_equal_one_call(client, problem):
    """The methods' scores with the test points in chunks, all but the first on the workers,
    equal one call on the whole test set: bit for bit where a row depends on nothing but its own
    test point (Grad-Dot, EK-FAC, the exact Gauss-Newton solve), to the solver's tolerance for the
    block CG, whose chunks share search directions."""
    import torch
    from fimoda.gradients import Problem
    from fimoda.influence import Attributor, compute_scores
    from fimoda.influence.distributed import scores_on_dask
    model, X, y, Xt, yt = problem
    X, y, Xt, yt = (torch.as_tensor(a) for a in (X, y, Xt, yt))

    def attributor():
        return Attributor(Problem(model, X, y, "regression", progress=False), X[LOO], y[LOO],
                          Xt, yt)
    assert len(Xt) > 5
    for name in ("grad_dot", "ekfac", "dense", "cg"):
        whole = compute_scores(name, attributor())
        chunked = scores_on_dask(client, name, attributor(), chunk=2)
        assert chunked.shape == whole.shape == (len(Xt), len(LOO))
        if name == "cg":
            np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-9 * np.abs(whole).max())
        else:
            np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        scores_on_dask(client, "grad_dot", attributor(), chunk=0)


def test_group_runs_on_dask_equal_serial(client, problem, tmp_path):
    """Group leave-out pieces as Dask tasks: the serial arrays, bit for bit."""
    model, X, y, Xt, yt = problem
    groups = [[0, 23, 47], [71], [95, 119, 143, 167, 180]]
    cfg = config(epochs=2)
    serial = further_train(model, "regression", X, y, Xt, yt, groups, cfg)
    with dd.on_dask(client, progress=False):
        res = further_train(model, "regression", X, y, Xt, yt, groups, cfg, workdir=tmp_path)
    assert_same(serial, res)
    assert res.loo_indices.shape == (3, 5) and len(pieces(tmp_path)) == 4
