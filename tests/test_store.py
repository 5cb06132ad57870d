"""The result store (fimoda.store): reuse only what was computed from the same inputs, in the same
arithmetic environment, from intact files; a replaced theta^f invalidates everything downstream;
work-directory pieces of another thread count are never mixed into a result."""
import dataclasses
import io
import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fimoda.paper import experiment as ex
from fimoda import store
from fimoda.paper.config import get_config
from fimoda.gold import GoldConfig, further_train
from fimoda.gradients import Problem
from fimoda.influence import Attributor
from fimoda.io import load_json, save_json, save_npz, load_npz
from fimoda.models import MLP


# ----------------------------------------------------------------------------- the store itself
def _computer(path, value):
    calls = []

    def compute():
        calls.append(value)
        save_npz(path, x=np.asarray(value))
        return {"note": "kept, never compared"}
    return compute, calls


def load_x(p):
    return float(load_npz(p)["x"])


def test_same_inputs_reuse_other_inputs_recompute_saying_why(tmp_path, capsys):
    p = tmp_path / "r.npz"
    compute, calls = _computer(p, 1.0)
    assert store.cached(p, {"a": 1, "b": [1, 2]}, compute, load_x) == 1.0
    assert store.cached(p, {"b": (1, 2), "a": 1}, compute, load_x) == 1.0     # same, reordered
    assert calls == [1.0]
    rec = store.read_record(p)
    assert rec["inputs"] == {"a": 1, "b": [1, 2]} and rec["info"] == {"note": "kept, never compared"}
    assert rec["environment"] == store.environment() and set(rec["files"]) == {"r.npz"}
    capsys.readouterr()
    compute2, calls2 = _computer(p, 2.0)
    assert store.cached(p, {"a": 2, "b": [1, 2]}, compute2, load_x) == 2.0
    assert calls2 == [2.0] and "differs in: a" in capsys.readouterr().out


def test_reuse_only_names_what_differs_and_computes_nothing(tmp_path):
    p = tmp_path / "r.npz"
    compute, calls = _computer(p, 1.0)
    store.cached(p, {"theta": "aaa", "lr": 0.1}, compute, load_x)
    with pytest.raises(store.StaleResult, match=r"differs in: theta.*rerun step 2"):
        store.cached(p, {"theta": "bbb", "lr": 0.1}, compute, load_x, reuse="only",
                     rerun="step 2")
    assert calls == [1.0] and store.read_record(p)["inputs"]["theta"] == "aaa"
    assert store.cached(p, {"theta": "aaa", "lr": 0.1}, compute, load_x, reuse="never") == 1.0
    assert calls == [1.0, 1.0]
    with pytest.raises(ValueError, match="reuse must be one of"):
        store.cached(p, {}, compute, load_x, reuse="sometimes")


def test_a_file_changed_behind_its_record_or_without_one_is_recomputed(tmp_path):
    p = tmp_path / "r.npz"
    compute, calls = _computer(p, 1.0)
    store.cached(p, {"a": 1}, compute, load_x)
    save_npz(p, x=np.asarray(5.0))                            # replaced behind the record's back
    with pytest.raises(store.StaleResult, match="sha256 differs"):
        store.check(p, {"a": 1}, "step 1")
    assert store.cached(p, {"a": 1}, compute, load_x) == 1.0 and len(calls) == 2
    store.record_path(p).unlink()
    with pytest.raises(store.StaleResult, match="no record"):
        store.check(p, {"a": 1}, "step 1")
    assert store.cached(p, {"a": 1}, compute, load_x) == 1.0 and len(calls) == 3


def test_a_failed_computation_leaves_no_record_that_stands_for_its_files(tmp_path):
    p = tmp_path / "r.npz"
    compute, _ = _computer(p, 1.0)
    store.cached(p, {"a": 1}, compute, load_x)

    def broken():
        save_npz(p, x=np.asarray(9.0))                        # half the work done, then a fault
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        store.cached(p, {"a": 2}, broken, load_x)
    with pytest.raises(store.StaleResult, match="sha256 differs"):   # a=1's record refuses it
        store.check(p, {"a": 1}, "step 1")
    with pytest.raises(store.StaleResult, match="differs in: a"):    # and a=2 has none
        store.check(p, {"a": 2}, "step 1")


def test_another_thread_count_recomputes_but_readers_accept_it(tmp_path, capsys):
    p = tmp_path / "r.npz"
    compute, calls = _computer(p, 1.0)
    store.cached(p, {"a": 1}, compute, load_x)
    rec = load_json(store.record_path(p))
    rec["environment"]["threads"] += 7                         # as if computed on other threads
    save_json(store.record_path(p), rec)
    store.check(p, {"a": 1}, "step 1")                         # a valid result to read ...
    capsys.readouterr()
    store.cached(p, {"a": 1}, compute, load_x)                 # ... but not this process's bits
    out = capsys.readouterr().out
    assert len(calls) == 2 and f"threads: {rec['environment']['threads']} there" in out


# ----------------------------------------------------------------------------- a replaced theta^f
def _experiment(tmp_path):
    from fimoda.training import train_final_model
    cfg = get_config("concrete", "smoke")
    cfg = dataclasses.replace(cfg, further=dataclasses.replace(cfg.further, seeds=1, epochs=1),
                              train=dataclasses.replace(cfg.train, epochs=2))
    g = np.random.default_rng(0)
    X = g.normal(size=(40, 8))
    ds = SimpleNamespace(name="concrete", task="regression", n_classes=None, files={},
                         X_train=X, y_train=X @ np.ones(8) + 0.1 * g.normal(size=40),
                         X_test=g.normal(size=(5, 8)), y_test=g.normal(size=5), extra={},
                         stand_in_for=None)
    model, _ = train_final_model(cfg, ds, out_dir=tmp_path, progress=False, margin=None)
    return cfg, ds, model


def _attributor(model, ds, loo):
    X, y = torch.as_tensor(ds.X_train), torch.as_tensor(ds.y_train)
    return Attributor(Problem(model, X, y, "regression", progress=False), X[loo], y[loo],
                      torch.as_tensor(ds.X_test), torch.as_tensor(ds.y_test))


def test_a_replaced_final_model_invalidates_gold_and_scores_downstream(tmp_path, capsys):
    """The issue's probe: another theta^f for the same configuration, its record updated to match
    the new file (as a retrain that came out different leaves it). Gold standard and scores are
    recomputed, never reused; the readers refuse the old ones, naming the final model."""
    cfg, ds, model = _experiment(tmp_path)
    loo, test = np.array([0, 3, 7]), np.arange(5)
    gold = ex.run_gold(model, ds, cfg, loo, test, directory=tmp_path)
    scores = ex.run_method("grad_dot", _attributor(model, ds, loo), cfg, loo, test,
                           directory=tmp_path)
    capsys.readouterr()
    other = MLP(8, 1).double()                                 # a different theta^f ...
    buf = io.BytesIO()
    torch.save(other.state_dict(), buf)
    (tmp_path / "final_model.pt").write_bytes(buf.getvalue())
    rec = load_json(tmp_path / "final_model.json")            # ... whose record matches it
    import hashlib
    rec["model_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    save_json(tmp_path / "final_model.json", rec)
    from fimoda.training import model_key
    store.write_record(tmp_path / "final_model.pt", model_key(cfg, ds),      # as a retrain would
                       files=[tmp_path / "final_model.json"])
    with pytest.raises(ex.StaleResult, match=r"gold_sgd_remove.npz.*final_model"):
        ex.load_gold(cfg, directory=tmp_path)
    with pytest.raises(ex.StaleResult, match=r"scores_grad_dot.npz.*final_model"):
        ex.load_scores(cfg, ["grad_dot"], directory=tmp_path)
    from fimoda.training import load_final_model
    model2 = load_final_model(cfg, ds, tmp_path, margin=None)              # the new theta^f, as notebook 02 loads it
    gold2 = ex.run_gold(model2, ds, cfg, loo, test, directory=tmp_path)
    scores2 = ex.run_method("grad_dot", _attributor(model2, ds, loo), cfg, loo, test,
                            directory=tmp_path)
    out = capsys.readouterr().out
    assert out.count("recomputing") == 2 and "final_model" in out
    assert not np.array_equal(gold2["loss_loo"], gold["loss_loo"])
    assert not np.array_equal(scores2, scores)
    ex.load_gold(cfg, directory=tmp_path)                      # the new ones are the valid ones
    assert set(ex.load_scores(cfg, ["grad_dot"], directory=tmp_path)) == {"grad_dot"}
    # nothing else is invalidated: the same theta^f again reuses both
    ex.run_gold(model2, ds, cfg, loo, test, directory=tmp_path)
    assert "recomputing" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- work directory
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for 2 intra-op threads")
def test_a_resume_on_another_thread_count_recomputes_instead_of_mixing(tmp_path, caplog):
    """Interrupted on 1 intra-op thread, resumed on 2: the one-thread pieces are recomputed (one
    warning naming both counts), so the result equals a clean two-thread run bit for bit."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 8, generator=g, dtype=torch.float64)
    Xt = torch.randn(12, 8, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = MLP(8, 1).double()
    cfg = GoldConfig(lr=0.03, epochs=1, batch_size=64, seeds=2, max_runs_per_chunk=4,
                     progress=False)
    loo = list(range(0, 60, 5))
    args = (model, "regression", X, torch.sin(X.sum(1)), Xt, torch.sin(Xt.sum(1)), loo, cfg)
    before = torch.get_num_threads()

    class Stop(Exception):
        pass

    def stop_after_two(seed, chunk):
        if (seed, chunk) == (cfg.seed_list[0], 1):
            raise Stop
    try:
        torch.set_num_threads(1)
        with pytest.raises(Stop):
            further_train(*args, workdir=tmp_path / "w", callback=stop_after_two)
        torch.set_num_threads(2)
        clean = further_train(*args, workdir=tmp_path / "clean")
        with caplog.at_level(logging.WARNING, logger="fimoda.gold.workdir"):
            resumed = further_train(*args, workdir=tmp_path / "w")
    finally:
        torch.set_num_threads(before)
    warned = [r.getMessage() for r in caplog.records if "intra-op" in r.getMessage()]
    assert len(warned) == 1 and "1 intra-op thread(s)" in warned[0] \
        and "2 intra-op thread(s)" in warned[0] and "recomputing" in warned[0]
    for k in ("loss_full", "loss_loo", "param_dist", "param_dist_loo"):
        assert np.array_equal(getattr(resumed, k), getattr(clean, k)), k
    meta = json.loads(str(load_npz(tmp_path / "w" / f"seed{cfg.seed_list[0]}_chunk0000.npz")["meta"]))
    assert meta["env"]["threads"] == 2
