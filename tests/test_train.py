"""Final-model training: bit-for-bit determinism, learning, the saved record, reuse only on a
matching config and data, atomic files, and one tiny run of each model family."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fimoda.training import final_model as T
from fimoda.training import loop as TL
from fimoda.paper.config import get_config
from fimoda.data import Dataset
from fimoda.losses import per_example_loss
from fimoda.models import ResNet9, TextClassifier, n_params




# The tests below exercise the training machinery on toy data and a few epochs, with the rule
# that theta^f must beat its trivial predictor off (margin=None); tests/test_baselines.py tests
# the rule itself.


def FakeDataset(name, task, n_classes, X_train, y_train, X_test, y_test, **kw):
    """A synthetic fimoda.data.Dataset (no files behind it)."""
    fields = dict(ids_train=np.arange(len(X_train)), ids_test=np.arange(len(X_test)),
                  feature_names=[], raw_train=None, raw_test=None, stand_in_for=None, files={})
    return Dataset(name, task, n_classes, X_train, y_train, X_test, y_test, **{**fields, **kw})


def regression_ds(n=300, d=6, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n + 60, d)
    y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.randn(n + 60)
    return FakeDataset("concrete", "regression", 1, X[:n], y[:n], X[n:], y[n:],
                       ids_train=np.arange(n), files={"fake.csv": "ab" * 32})


def classification_ds(n=300, d=5, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n + 60, d)
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 > 0.5).astype(np.int64)
    return FakeDataset("adult", "classification", 2, X[:n], y[:n], X[n:], y[n:],
                       stand_in_for="folktables")


def reg_cfg(**train):
    cfg = get_config("concrete", "smoke")
    return replace(cfg, train=replace(cfg.train, **{"epochs": 5, "lr": 0.05, **train}))


def test_tabular_bit_identical_reruns():
    ds = regression_ds()
    a, ra = T.train_final_model(reg_cfg(), ds, progress=False, margin=None)
    b, rb = T.train_final_model(reg_cfg(), ds, progress=False, margin=None)
    c, _ = T.train_final_model(reg_cfg(seed=1), ds, progress=False, margin=None)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra["model_sha256"] == rb["model_sha256"]
    assert ra["curves"]["train_loss"] == rb["curves"]["train_loss"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the seed matters
    # The MLPs train on one thread whatever the caller set; the caller's setting comes back.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        d, rd = T.train_final_model(reg_cfg(), ds, progress=False, margin=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert rd["num_threads"] == 1 and rd["model_sha256"] == ra["model_sha256"]
    assert all(v.dtype == torch.float64 for v in sa.values())


def test_batch_order_is_the_seeded_randperm():
    """One epoch equals a hand-written SGD loop over torch.randperm(n, Generator(seed))."""
    ds = regression_ds(n=200)
    cfg = reg_cfg(epochs=1, lr=0.1)
    model, _ = T.train_final_model(cfg, ds, progress=False, margin=None)
    ref = T._build(cfg, ds, "cpu")
    X = torch.as_tensor(ds.X_train)
    y = torch.as_tensor(ds.y_train)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(cfg.train.seed))
    loss_fn = per_example_loss("regression")
    for k in range(0, len(X), cfg.train.batch_size):
        idx = perm[k:k + cfg.train.batch_size]
        ref.zero_grad()
        loss_fn(ref(X[idx]), y[idx]).mean().backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= cfg.train.lr * p.grad
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-13), name


def test_loss_decreases_and_metrics():
    ds = regression_ds()
    untrained = T._build(reg_cfg(), ds, "cpu")
    before = TL.evaluate(untrained, ds.X_train, ds.y_train, "regression")
    model, rec = T.train_final_model(reg_cfg(epochs=30), ds, progress=False, margin=None)
    curve = rec["curves"]["train_loss"]
    assert len(curve) == 30 and len(rec["curves"]["test_loss"]) == 30
    assert rec["curves"]["eval_epoch"] == list(range(1, 31))
    assert len(rec["curves"]["minibatch_loss"]) == 30
    assert curve[-1] < 0.5 * curve[0] and rec["metrics"]["train"]["loss"] < 0.5 * before["loss"]
    assert rec["metrics"]["train"]["loss"] == pytest.approx(curve[-1], rel=1e-12)
    assert 0.5 < rec["metrics"]["train"]["r2"] <= 1
    assert rec["metrics"]["train"]["rmse"] == pytest.approx(np.sqrt(curve[-1]), rel=1e-12)

    cds = classification_ds()
    cfg = get_config("adult", "smoke")
    cfg = replace(cfg, train=replace(cfg.train, epochs=20, lr=0.1))
    model, rec = T.train_final_model(cfg, cds, progress=False, margin=None)
    curve = rec["curves"]["train_loss"]
    assert curve[-1] < curve[0] < 0.8
    assert rec["metrics"]["train"]["accuracy"] > 0.8


def test_evaluate_matches_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    res = TL.evaluate(model, X.numpy(), y.numpy(), "classification", batch_size=3)
    out = model(X).detach()
    assert res["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, y)), 1e-12)
    assert res["accuracy"] == pytest.approx(float((out.argmax(1) == y).double().mean()))
    reg = torch.nn.Linear(3, 1).double()
    yr = torch.randn(10, dtype=torch.float64)
    res = TL.evaluate(reg, X, yr, "regression")
    pred = reg(X).reshape(-1).detach()
    sse = float(((pred - yr) ** 2).sum())
    assert res["rmse"] == pytest.approx(np.sqrt(sse / 10), 1e-12)
    assert res["r2"] == pytest.approx(1 - sse / float(((yr - yr.mean()) ** 2).sum()), 1e-12)
    with pytest.raises(ValueError, match="equal lengths"):
        TL.evaluate(reg, X, yr[:5], "regression")


def test_record_json(tmp_path):
    ds = classification_ds()
    cfg = get_config("adult", "smoke")
    model, rec = T.train_final_model(cfg, ds, out_dir=tmp_path, progress=False, margin=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [T.RECORD_FILE, T.MODEL_FILE,
                                                          T.MODEL_FILE + ".record.json"]
    saved = json.loads((tmp_path / T.RECORD_FILE).read_text())
    full = json.loads(json.dumps(cfg.to_dict()))
    assert saved["config"] == {k: full[k] for k in ("dataset", "task", "model", "dtype",
                                                    "encoder", "width", "trainable_layers",
                                                    "train", "stand_in_for")}
    assert saved["data_files"] == ds.files and len(saved["data_arrays_sha256"]) == 64
    assert saved["n_params"] == n_params(model) == (5 * 128 + 128) + (128 * 128 + 128) + 258
    assert saved["stand_in_for"] == "folktables"
    assert set(saved["metrics"]) == {"train", "test"}
    for part in ("train", "test"):
        assert 0 <= saved["metrics"][part]["accuracy"] <= 1 and saved["metrics"][part]["loss"] > 0
    assert len(saved["curves"]["train_loss"]) == cfg.train.epochs == saved["epochs"]
    assert saved["curves"]["train_loss"][-1] == pytest.approx(saved["metrics"]["train"]["loss"])
    assert saved["torch_version"] == torch.__version__ and saved["wall_time_s"] > 0
    assert saved["procedure"]["momentum"] == 0.0 and saved["train_rows"] is None
    assert saved["n_train_used"] == len(ds.X_train)
    sd = torch.load(tmp_path / T.MODEL_FILE, weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_curve_epochs_are_spaced_for_long_runs(monkeypatch):
    monkeypatch.setattr(TL, "CURVE_POINTS", 4)
    _, rec = T.train_final_model(reg_cfg(epochs=10), regression_ds(n=100), progress=False,
                                 margin=None)
    assert rec["curves"]["eval_epoch"] == [3, 6, 9, 10]
    assert len(rec["curves"]["train_loss"]) == 4 and len(rec["curves"]["minibatch_loss"]) == 10


def test_reuse_and_retrain(tmp_path, monkeypatch, capsys):
    ds = regression_ds()
    cfg = reg_cfg()
    first, rec1 = T.train_final_model(cfg, ds, out_dir=tmp_path, progress=False, margin=None)
    fit = T.fit_model

    def must_not_train(*a, **k):
        raise AssertionError("retrained although a matching model was saved")
    monkeypatch.setattr(T, "fit_model", must_not_train)
    again, rec2 = T.train_final_model(cfg, ds, out_dir=tmp_path, progress=False, margin=None)
    assert not again.training and rec2 == json.loads(json.dumps(rec1))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))
    loaded = T.load_final_model(cfg, ds, tmp_path, margin=None)
    assert torch.equal(loaded.out.weight, first.out.weight) and not loaded.training
    assert T.load_record(tmp_path) == rec2

    # Settings downstream of theta^f (further training, methods) do not invalidate it.
    downstream = replace(cfg, further=replace(cfg.further, seeds=7),
                         methods=replace(cfg.methods, memory_gb=1.0))
    assert torch.equal(T.load_final_model(downstream, ds, tmp_path, margin=None).out.weight,
                       first.out.weight)

    # A different config, different data, or force=True retrains; a mismatch never loads.
    other = reg_cfg(lr=0.02)
    with pytest.raises(ValueError, match="differs in: config.train.lr"):
        T.load_final_model(other, ds, tmp_path, margin=None)
    with pytest.raises(AssertionError, match="retrained"):
        T.train_final_model(other, ds, out_dir=tmp_path, progress=False, margin=None)
    with pytest.raises(AssertionError, match="retrained"):
        T.train_final_model(cfg, regression_ds(seed=1), out_dir=tmp_path, progress=False,
                            margin=None)
    with pytest.raises(AssertionError, match="retrained"):
        T.train_final_model(cfg, ds, out_dir=tmp_path, progress=False, margin=None, force=True)
    monkeypatch.setattr(T, "fit_model", fit)
    m3, rec3 = T.train_final_model(other, ds, out_dir=tmp_path, progress=False, margin=None)
    assert rec3["config"]["train"]["lr"] == 0.02
    assert "cannot be reused" in capsys.readouterr().out
    assert not torch.equal(m3.out.weight, first.out.weight)
    assert torch.equal(T.load_final_model(other, ds, tmp_path, margin=None).out.weight,
                       m3.out.weight)
    assert T.load_record(tmp_path)["model_sha256"] == rec3["model_sha256"]
    with pytest.raises(FileNotFoundError):
        T.load_final_model(cfg, ds, tmp_path / "nothing", margin=None)


def test_no_partial_files_when_training_fails(tmp_path):
    ds = regression_ds()
    with pytest.raises(FloatingPointError, match="diverged"):
        T.train_final_model(reg_cfg(lr=1e6), ds, out_dir=tmp_path / "a", progress=False,
                            margin=None)
    assert not (tmp_path / "a").exists() or list((tmp_path / "a").iterdir()) == []
    # A failure after an earlier success leaves the earlier files whole and consistent.
    T.train_final_model(reg_cfg(), ds, out_dir=tmp_path / "b", progress=False, margin=None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    with pytest.raises(FloatingPointError):
        T.train_final_model(reg_cfg(lr=1e6), ds, out_dir=tmp_path / "b", progress=False,
                            margin=None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    # A weights file that is not the one its record describes is refused.
    (tmp_path / "b" / T.MODEL_FILE).write_bytes(b"junk")
    with pytest.raises(ValueError, match="sha256"):
        T.load_final_model(reg_cfg(), ds, tmp_path / "b", margin=None)
    # Bad input: one clear error, nothing written.
    bad = regression_ds()
    bad.X_train[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        T.train_final_model(reg_cfg(), bad, out_dir=tmp_path / "c", progress=False, margin=None)
    with pytest.raises(ValueError, match="task"):
        T.train_final_model(get_config("fico", "smoke"), ds, out_dir=tmp_path / "c",
                            progress=False)
    assert not (tmp_path / "c").exists()


def test_train_rows_subset_and_validation():
    ds = classification_ds(n=200)
    cfg = get_config("adult", "smoke")
    rows, val = T.train_rows(cfg, ds)
    assert np.array_equal(rows, np.arange(200)) and len(val) == 0
    sub = replace(cfg, train=replace(cfg.train, n_train_subset=50, select_epoch_by_val=True))
    rows, val = T.train_rows(sub, ds)
    assert len(val) == 40 and len(rows) == 50 and not set(rows) & set(val)
    assert np.all(np.diff(rows) > 0)
    rows2, val2 = T.train_rows(sub, ds)
    assert np.array_equal(rows, rows2) and np.array_equal(val, val2)
    restricted = T.training_dataset(sub, ds)
    assert np.array_equal(restricted.X_train, ds.X_train[rows])
    assert np.array_equal(restricted.y_train, ds.y_train[rows])
    assert restricted.X_test is ds.X_test
    # The image datasets' extra["val_indices"] are test positions: never training rows.
    given = dataclasses.replace(ds, extra={"val_indices": np.arange(10),
                                           "sentences_train": [f"s{i}" for i in range(200)]})
    assert np.array_equal(T.train_rows(sub, given)[1], val)
    assert T.training_dataset(sub, given).extra["sentences_train"] == [f"s{i}" for i in rows]
    assert np.array_equal(T.training_dataset(sub, given).extra["val_indices"], np.arange(10))
    with pytest.raises(ValueError, match="n_train_subset"):
        T.train_rows(replace(cfg, train=replace(cfg.train, n_train_subset=0)), ds)
    big = replace(cfg, train=replace(cfg.train, n_train_subset=10_000, select_epoch_by_val=False))
    assert len(T.train_rows(big, ds)[0]) == len(ds.X_train)      # a cap, not a requirement


def test_resnet9_tiny_run(tmp_path, capsys):
    rng = np.random.RandomState(0)
    X = rng.randn(12, 3, 32, 32).astype(np.float32)
    y = rng.randint(0, 10, 12).astype(np.int64)
    ds = FakeDataset("cifar10", "classification", 10, X[:8], y[:8], X[8:], y[8:],
                     extra={"pad_value": np.array([-1.9, -2.0, -1.8])})
    cfg = get_config("cifar10", "smoke")
    cfg = replace(cfg, train=replace(cfg.train, epochs=1, batch_size=4, n_train_subset=6))
    init = T._build(cfg, ds, "cpu")
    model, rec = T.train_final_model(cfg, ds, out_dir=tmp_path, progress=False, margin=None,
                                     max_eval_rows=3)
    assert "training on 6 of 8" in capsys.readouterr().out
    assert rec["metrics"]["train"]["n"] == 3 and rec["metrics"]["test"]["n"] == 3
    assert isinstance(model, ResNet9) and not model.training
    assert not any(m.training for m in model.modules())
    bn0 = model.net[0][1]
    assert int(bn0.num_batches_tracked) == 2  # BatchNorm ran in train mode on both batches
    assert not torch.equal(bn0.running_mean, init.net[0][1].running_mean)
    assert not torch.equal(model.fc.weight, init.fc.weight)
    assert rec["n_train_used"] == 6 and len(rec["train_rows"]) == 6
    assert rec["procedure"]["momentum"] == 0.9 and rec["n_params"] == n_params(model)
    assert 0 <= rec["metrics"]["test"]["accuracy"] <= 1
    # The triangular schedule: warm-up to the peak then linear decay.
    opt, factor = TL._optimizer(cfg, model, 10)
    assert [factor(s) for s in range(10)] == pytest.approx(
        [0.25, 0.75, 0.9375, 0.8125, 0.6875, 0.5625, 0.4375, 0.3125, 0.1875, 0.0625])
    assert [g["momentum"] for g in opt.param_groups] == [0.9] and opt.defaults["nesterov"]
    assert opt.defaults["lr"] == 0.4 and opt.defaults["weight_decay"] == 1e-3


def test_text_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer
    from fimoda.models import resolve_encoder
    cfg = get_config("sst2", "smoke")
    tok = AutoTokenizer.from_pretrained(resolve_encoder(cfg.encoder))
    rng = np.random.RandomState(0)
    words = ["good", "bad", "film", "great", "boring", "actor", "plot", "fun", "dull", "the"]
    sents = [" ".join(rng.choice(words, rng.randint(2, 8))) for _ in range(20)]
    enc = tok(sents, padding="max_length", max_length=24, truncation=True, return_tensors="np")
    X = np.stack([enc["input_ids"], enc["attention_mask"]], 1).astype(np.int64)
    y = np.array([("good" in s or "great" in s) * 1 for s in sents], dtype=np.int64)
    ds = FakeDataset("sst2", "classification", 2, X[:16], y[:16], X[16:], y[16:])
    cfg = replace(cfg, train=replace(cfg.train, epochs=2, batch_size=8, n_train_subset=None,
                                     select_epoch_by_val=True))
    model, rec = T.train_final_model(cfg, ds, out_dir=tmp_path, progress=False, margin=None)
    assert isinstance(model, TextClassifier) and not model.training
    assert len(rec["val_rows"]) == 3 and rec["n_train_used"] == 13
    assert len(rec["curves"]["val_accuracy"]) == 2
    accs = rec["curves"]["val_accuracy"]
    assert rec["best_epoch"] == int(np.argmax(accs)) + 1
    assert rec["metrics"]["val"]["accuracy"] == pytest.approx(max(accs))
    # Evaluating with trimmed padding equals the untrimmed forward pass.
    with torch.no_grad():
        full = model(torch.as_tensor(X[16:]))
    loss = float(per_example_loss("classification")(full, torch.as_tensor(y[16:])).mean())
    assert rec["metrics"]["test"]["loss"] == pytest.approx(loss, rel=1e-5)
