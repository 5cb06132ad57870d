"""Reliability probes of issue 12, as a skeptical user would run them: corrupt, foreign and
old-format work-directory pieces; unreadable or stale result files; non-finite data and results;
bad input caught before any work; result-file permissions; runs killed with SIGKILL and resumed;
two processes on one result. The table in tests/README.md maps each probe to its test here."""
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fimoda
from fimoda.paper import experiment as ex
from fimoda.paper.config import get_config
from fimoda.gold import GoldConfig, further_train
from fimoda.gradients import Problem
from fimoda.influence import Attributor
from fimoda.io import UnreadableFile, load_npz, save_json, save_npz
from fimoda.locks import ResultLocked, result_lock
from fimoda.models import MLP

ROOT = Path(__file__).resolve().parent.parent


def data(n=24, d=3, n_test=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(X @ torch.ones(d, dtype=torch.float64)) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64)
    Xt = torch.randn(n_test, d, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    return MLP(d, 1, hidden=6).double(), X, y, Xt, torch.sin(Xt.sum(1))


CFG = GoldConfig(epochs=2, batch_size=8, seeds=2, lr=0.05, max_runs_per_chunk=2, progress=False)
LOO = [1, 5, 9]                                  # 4 runs per seed -> 2 chunks per seed


def gold(workdir, cfg=CFG, **kw):
    model, X, y, Xt, yt = data()
    return further_train(model, "regression", X, y, Xt, yt, LOO, cfg, workdir=workdir, **kw)


def same(a, b):
    for k in ("loss_full", "loss_loo", "param_dist", "param_dist_loo"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return gold(tmp_path_factory.mktemp("ref") / "w")


# ----------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("damage", ["truncated", "other seed", "other chunk", "tampered",
                                    "other configuration", "not npz"])
def test_bad_piece_is_reported_and_recomputed(damage, reference, tmp_path, caplog):
    wd = tmp_path / "w"
    gold(wd)
    victim = wd / "seed2_chunk0000.npz"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "other seed":
        victim.write_bytes((wd / "seed1_chunk0000.npz").read_bytes())
    elif damage == "other chunk":
        victim.write_bytes((wd / "seed2_chunk0001.npz").read_bytes())
    elif damage == "tampered":
        z = load_npz(victim)
        z["loss"][0, 1, 0] += 1e-3
        save_npz(victim, **z)
    elif damage == "other configuration":
        gold(tmp_path / "o", dataclasses.replace(CFG, lr=0.01))
        victim.write_bytes((tmp_path / "o" / victim.name).read_bytes())
    else:
        victim.write_bytes(b"not an npz at all")
    with caplog.at_level(logging.WARNING, logger="fimoda.gold.workdir"):
        again = gold(wd)
    assert victim.name in caplog.text and "recomputing" in caplog.text
    same(again, reference)
    assert load_npz(victim)["loss"].shape == (2, 3, 4)          # rewritten, valid


def test_old_format_work_directory_is_a_clear_message(tmp_path):
    wd = tmp_path / "w"
    gold(wd)
    meta = json.loads((wd / "config.json").read_text())
    meta["fingerprint"]["format"] = 1
    save_json(wd / "config.json", meta)
    with pytest.raises(ValueError, match=r"work-directory format 1 .* reads format 2.*delete"):
        gold(wd)


# ----------------------------------------------------------------------------- result files
def tiny_experiment(tmp_path, dtype="float64"):
    """A smoke-profile concrete config over a tiny random data set, and its model."""
    cfg = get_config("concrete", "smoke", dtype=dtype)
    cfg = dataclasses.replace(cfg, further=dataclasses.replace(cfg.further, seeds=1, epochs=1))
    g = np.random.default_rng(0)
    ds = SimpleNamespace(X_train=g.normal(size=(30, 8)), y_train=g.normal(size=30),
                         X_test=g.normal(size=(5, 8)), y_test=g.normal(size=5), extra={})
    torch.manual_seed(0)
    return cfg, ds, MLP(8, 1, hidden=4).double()


def test_final_gold_file_unreadable_is_named_then_recomputed(tmp_path, capsys):
    cfg, ds, model = tiny_experiment(tmp_path)
    loo, test = np.array([0, 3, 7]), np.arange(5)
    z = ex.run_gold(model, ds, cfg, loo, test, directory=tmp_path)
    path = tmp_path / "gold_sgd_remove.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ex.StaleResult, match=str(path) + ".*truncated"):
        ex.load_gold(cfg, directory=tmp_path)
    again = ex.run_gold(model, ds, cfg, loo, test, directory=tmp_path)
    assert "gold_sgd_remove.npz is not the one its record describes" in capsys.readouterr().out
    assert np.array_equal(again["loss_loo"], z["loss_loo"])


def test_loaders_check_what_produced_the_results(tmp_path):
    """Notebooks 04-06 with -p dtype float32 over float64 results: a clear error naming the
    difference and the notebook to rerun, not a float32 banner over float64 numbers."""
    cfg, ds, model = tiny_experiment(tmp_path)
    loo, test = np.array([0, 3, 7]), np.arange(5)
    ex.run_gold(model, ds, cfg, loo, test, directory=tmp_path)
    X = torch.as_tensor(ds.X_train)
    y = torch.as_tensor(ds.y_train)
    att = Attributor(Problem(model, X, y, "regression", progress=False), X[loo], y[loo],
                     torch.as_tensor(ds.X_test), torch.as_tensor(ds.y_test))
    ex.run_method("grad_dot", att, cfg, loo, test, directory=tmp_path)
    assert set(ex.load_scores(cfg, ["grad_dot"], directory=tmp_path)) == {"grad_dot"}
    ex.load_gold(cfg, directory=tmp_path)
    f32 = get_config("concrete", "smoke", dtype="float32")
    f32 = dataclasses.replace(f32, further=cfg.further)
    with pytest.raises(ValueError, match=r"experiment\.dtype.*02_gold_further_training"):
        ex.load_gold(f32, directory=tmp_path)
    with pytest.raises(ValueError, match=r"experiment\.dtype.*03_attribution_methods"):
        ex.load_scores(f32, ["grad_dot"], directory=tmp_path)
    (tmp_path / "gold_sgd_remove.json").unlink()
    with pytest.raises(ValueError, match="its file gold_sgd_remove.json is missing"):
        ex.load_gold(cfg, directory=tmp_path)
    (tmp_path / "gold_sgd_remove.npz.record.json").unlink()
    with pytest.raises(ValueError, match="no record of what it was computed from"):
        ex.load_gold(cfg, directory=tmp_path)


def test_truncated_scores_file_is_named(tmp_path):
    cfg, ds, model = tiny_experiment(tmp_path)
    loo, test = np.array([0, 3, 7]), np.arange(5)
    X, y = torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train)
    att = Attributor(Problem(model, X, y, "regression", progress=False), X[loo], y[loo],
                     torch.as_tensor(ds.X_test), torch.as_tensor(ds.y_test))
    ex.run_method("grad_dot", att, cfg, loo, test, directory=tmp_path)
    path = tmp_path / "scores_grad_dot.npz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ex.StaleResult, match="scores_grad_dot.npz.*truncated"):
        ex.load_scores(cfg, ["grad_dot"], directory=tmp_path)
    save_npz(tmp_path / "scores_cg.npz", scores=np.zeros((3, 4)))      # no record at all
    with pytest.raises(ex.StaleResult, match="scores_cg.npz.*no record"):
        ex.load_scores(cfg, ["cg"], directory=tmp_path)


def test_result_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_npz(tmp_path / "a.npz", x=np.zeros(2))
        save_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("where", ["X_train", "y_train", "X_test", "y_test"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_data_is_refused_before_any_work(where, value, tmp_path):
    model, X, y, Xt, yt = data()
    arrays = {"X_train": X.clone(), "y_train": y.clone(), "X_test": Xt.clone(),
              "y_test": yt.clone()}
    arrays[where][2] = value
    X, y, Xt, yt = arrays.values()
    match = f"{where} contains NaN or inf"
    with pytest.raises(ValueError, match=match):
        fimoda.attribute(model, X, y, [0, 1], Xt, yt, task="regression")
    with pytest.raises(ValueError, match=match):
        fimoda.gold_standard(model, X, y, [0, 1], Xt, yt, task="regression", epochs=1, seeds=1)
    with pytest.raises(ValueError, match=match):
        further_train(model, "regression", X, y, Xt, yt, [0, 1], CFG, workdir=tmp_path / "w")
    assert not list((tmp_path / "w").glob("seed*")) if (tmp_path / "w").exists() else True
    if where.endswith("train"):
        with pytest.raises(ValueError, match=match):
            Problem(model, X, y, "regression", progress=False)


def test_final_model_refuses_non_finite_data(tmp_path):
    cfg, ds, _ = tiny_experiment(tmp_path)
    ds.y_train[4] = np.nan
    ds.task, ds.n_classes = "regression", None
    from fimoda.training import train_final_model
    with pytest.raises(ValueError, match="y_train contains NaN or inf"):
        train_final_model(cfg, ds, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "final_model.pt").exists()


def test_diverging_gold_standard_is_an_error_and_saves_nothing(tmp_path):
    with pytest.raises(FloatingPointError, match=r"diverged: seed 1, chunk 1/2.*lr 1000000"):
        gold(tmp_path / "w", dataclasses.replace(CFG, lr=1e6))
    assert not list((tmp_path / "w").glob("seed*.npz"))


def test_run_method_never_saves_non_finite_scores(tmp_path, monkeypatch):
    cfg, ds, model = tiny_experiment(tmp_path)
    import fimoda.influence as inf
    monkeypatch.setattr(inf, "compute_scores", lambda *a, **k: np.full((5, 3), np.nan))
    X, y = torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train)
    att = Attributor(Problem(model, X, y, "regression", progress=False), X[[0, 3, 7]],
                     y[[0, 3, 7]], torch.as_tensor(ds.X_test), torch.as_tensor(ds.y_test))
    with pytest.raises(ex.MethodFailed, match="grad_dot: 15 of its 15 scores are NaN or inf"):
        ex.run_method("grad_dot", att, cfg, [0, 3, 7], np.arange(5), directory=tmp_path)
    assert not (tmp_path / "scores_grad_dot.npz").exists()


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_one_clear_error_before_any_work(tmp_path):
    model, X, y, Xt, yt = data()

    def att(**kw):
        a = dict(X_train=X, y_train=y, left_out=[0, 1], X_test=Xt, y_test=yt, task="regression")
        a.update(kw)
        return fimoda.attribute(model, a["X_train"], a["y_train"], a["left_out"], a["X_test"],
                                a["y_test"], task=a["task"], **{k: v for k, v in kw.items()
                                                                 if k == "method"})
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\) or \(N, 1\)"):
        att(y_train=torch.stack([y, y], 1))
    with pytest.raises(ValueError, match=r"X_test rows have shape \(4,\) but X_train rows \(3,\)"):
        att(X_test=torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown method 'influence'"):
        att(method="influence")
    with pytest.raises(ValueError, match="task must be one of"):
        att(task="regresion")
    with pytest.raises(ValueError, match="task must be one of"):
        Problem(model, X, y, "regresion", progress=False)
    with pytest.raises(ValueError, match=r"y_train must have shape \(N,\) for regression"):
        further_train(model, "regression", X, y[:, None], Xt, yt, [0], CFG, workdir=tmp_path / "w")
    with pytest.raises(ValueError, match="X_test rows have shape"):
        further_train(model, "regression", X, y, Xt[:, :2], yt, [0], CFG, workdir=tmp_path / "w")
    assert not (tmp_path / "w").exists()                         # nothing written
    problem = Problem(model, X, y, "regression", progress=False)
    with pytest.raises(ValueError, match="X_test rows have shape"):
        Attributor(problem, X[:2], y[:2], Xt[:, :2], yt)
    for bad, match in ((dict(lr=0), "lr must be a positive"), (dict(lr=-1), "lr must be"),
                       (dict(epochs=0), "epochs must be an integer >= 1"),
                       (dict(seeds=0), "seeds must be >= 1"),
                       (dict(optimizer="rmsprop"), "unknown optimizer"),
                       (dict(mechanism="drop"), "unknown mechanism")):
        with pytest.raises(ValueError, match=match):
            GoldConfig(**bad)
    with pytest.raises((ValueError, KeyError), match="unknown dataset|dataset"):
        get_config("cifar100", "smoke")
    with pytest.raises((ValueError, KeyError), match="profile"):
        get_config("concrete", "huge")


def test_final_model_of_another_dataset_or_configuration_is_refused(tmp_path):
    from fimoda.training import load_final_model, train_final_model
    cfg = get_config("concrete", "smoke")
    ds = ex.load_data(cfg)
    train_final_model(cfg, ds, out_dir=tmp_path, progress=False)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.1))
    with pytest.raises(ValueError, match=r"final_model.pt cannot be used here: .*differs in: "
                                         r"config.train.lr"):
        load_final_model(other, ds, tmp_path)
    energy = get_config("energy", "smoke")
    with pytest.raises(ValueError, match=r"cannot be used here: .*differs in: .*config.dataset"):
        load_final_model(energy, ex.load_data(energy), tmp_path)


def test_damping_below_minus_lambda_min_and_lissa_divergence_are_named():
    from fimoda.influence.errors import LissaDivergedError, MethodBreakdown
    model, X, y, Xt, yt = data()
    att = fimoda.attributor(model, X, y, [0, 1, 2], Xt, yt, task="regression")
    H = att.problem.dense_hessian() / att.n_train
    lam_min = float(torch.linalg.eigvalsh(H).min())
    assert lam_min < 0                               # theta^f is not a minimum: H/n indefinite
    for method in ("dense", "cg"):                   # Assumption 1 needs lambda > -lambda_min
        with pytest.raises(MethodBreakdown, match="positive definite"):
            fimoda.attribute(model, X, y, [0, 1, 2], Xt, yt, task="regression", method=method,
                             att=att, hessian="true", damping=-lam_min / 2)
    with pytest.raises(LissaDivergedError, match=r"scale=0\.001.*next to try: scale=0\.002"):
        fimoda.attribute(model, X, y, [0, 1, 2], Xt, yt, task="regression", method="lissa",
                         att=att, scale=1e-3, scale_grid=(), depth=200)


# ----------------------------------------------------------------------------- SIGKILL
def child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_when(proc, ready, timeout=60.0):
    """SIGKILL ``proc`` as soon as ``ready()`` holds; whether it had already finished."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode != -signal.SIGKILL


def test_gold_killed_after_its_first_piece_resumes_bit_identical(tmp_path):
    cfg = dataclasses.replace(CFG, max_runs_per_chunk=1, epochs=30)
    wd = tmp_path / "w"
    proc = child(f"""
        import dataclasses, torch
        torch.set_num_threads(1)
        from test_reliability import CFG, gold
        gold({str(wd)!r}, dataclasses.replace(CFG, max_runs_per_chunk=1, epochs=30))
        """)
    kill_when(proc, lambda: any(wd.glob("seed*.npz")))
    written = sorted(wd.glob("seed*.npz"))
    assert 1 <= len(written) < 8                                 # killed midway
    same(gold(wd, cfg), gold(tmp_path / "fresh", cfg))


def test_method_killed_midway_leaves_nothing_and_reruns_bit_identical(tmp_path):
    code = f"""
        import numpy as np, torch
        torch.set_num_threads(1)
        from test_reliability import method_run
        method_run({str(tmp_path / 'k')!r})
        """
    proc = child(code)
    lock = tmp_path / "k" / ".scores_lissa.npz.lock"
    finished = kill_when(proc, lambda: lock.exists() and lock.read_text().strip() != "")
    assert finished or not (tmp_path / "k" / "scores_lissa.npz").exists()
    with warnings.catch_warnings():    # this tiny model's LiSSA steps up its scale once, as designed
        warnings.filterwarnings("ignore", "LiSSA diverged at scale", UserWarning)
        assert np.array_equal(method_run(tmp_path / "k"), method_run(tmp_path / "fresh"))


def method_run(directory):
    cfg, ds, model = tiny_experiment(directory)
    X, y = torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train)
    loo, test = np.array([0, 3, 7]), np.arange(5)
    att = Attributor(Problem(model, X, y, "regression", progress=False), X[loo], y[loo],
                     torch.as_tensor(ds.X_test), torch.as_tensor(ds.y_test))
    return ex.run_method("lissa", att, cfg, loo, test, directory=directory, depth=4000,
                         batch_size=None)


def test_final_model_killed_midway_retrains_bit_identical(tmp_path):
    from fimoda.training import train_final_model
    proc = child(f"""
        from test_reliability import final_model_run
        final_model_run({str(tmp_path / 'k')!r})
        """)
    lock = tmp_path / "k" / ".final_model.pt.lock"
    kill_when(proc, lambda: lock.exists() and lock.read_text().strip() != "")
    killed, fresh = final_model_run(tmp_path / "k"), final_model_run(tmp_path / "fresh")
    assert killed["model_sha256"] == fresh["model_sha256"]


def final_model_run(directory):
    from fimoda.training import train_final_model
    cfg = get_config("concrete", "smoke")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=60))
    return train_final_model(cfg, ex.load_data(cfg), out_dir=directory, progress=False)[1]


# ----------------------------------------------------------------------------- locking
def test_a_second_process_waits_or_stops_with_a_clear_message(tmp_path):
    result = tmp_path / "scores_cg.npz"
    proc = child(f"""
        import time
        from fimoda.locks import result_lock
        with result_lock({str(result)!r}, "the test's holder"):
            print("held", flush=True)
            time.sleep(1.5)
        """)
    assert proc.stdout.readline().strip() == b"held"
    with pytest.raises(ResultLocked, match=rf"scores_cg.npz is being computed by another process "
                                           rf"\(pid {proc.pid} .*the test's holder\)"):
        with result_lock(result, wait=False):
            pass
    t0 = time.monotonic()
    with result_lock(result):                        # waits for the holder to finish
        with result_lock(result):                    # re-entrant within the process
            pass
    assert time.monotonic() - t0 > 0.3
    proc.wait()


def test_a_lock_left_by_a_killed_process_is_not_stale(tmp_path):
    result = tmp_path / "gold_sgd_remove.npz"
    proc = child(f"""
        import time
        from fimoda.locks import result_lock
        with result_lock({str(result)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)
    assert proc.stdout.readline().strip() == b"held"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with result_lock(result, wait=False):                # taken at once
        pass


def test_padded_sequences_may_differ_in_length_but_not_in_width():
    from fimoda.tensors import check_data
    X, Xt = torch.zeros(4, 46, 8), torch.zeros(3, 55, 8)     # (rows, padded tokens, features)
    y, yt = torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    check_data("classification", X, y, Xt, yt, padded=True)
    with pytest.raises(ValueError, match="X_test rows have shape"):
        check_data("classification", X, y, Xt, yt)
    with pytest.raises(ValueError, match="X_test rows have shape"):
        check_data("classification", X, y, torch.zeros(3, 55, 9), yt, padded=True)
