"""The further-training gold standard: vectorised engine == one-model-at-a-time reference, batch
orders == DataLoader(RandomSampler(generator)), resumability, score arithmetic (eqs. 13, 17)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from fimoda.paper.config import get_config
from fimoda.gold import (GoldConfig, further_train, gold_scores, load_gold_result, make_schedule,
                         reference_further_train, retrain_loo, run_batches, save_gold,
                         seed_group_scores)
from fimoda.gold.optim import StackedOptimizer
from fimoda.io import load_json, load_npz
from fimoda.models import MLP
from small_models import (TOL, ConvBN, assert_close_and_nontrivial, conv_bn_gold_config,
                          conv_bn_problem, flip_augment, killed_after_first_piece,
                          regression_problem, retraining_problem)
from tolerances import gamma

ALGOS = [dict(optimizer="sgd", lr=0.05),
         dict(optimizer="sgd", lr=0.05, weight_decay=0.01),
         dict(optimizer="adam", lr=3e-3),
         dict(optimizer="adamw", lr=3e-3, weight_decay=0.01, grad_clip=1.0)]


@pytest.mark.parametrize("engine", ["mlp", "func"])
@pytest.mark.parametrize("mechanism", ["remove", "subtract"])
@pytest.mark.parametrize("algo", ALGOS, ids=lambda a: "-".join(f"{v}" for v in a.values()))
def test_vectorised_equals_reference(engine, mechanism, algo):
    model, X, y, Xt, yt = regression_problem(n=37)
    cfg = GoldConfig(epochs=3, batch_size=8, mechanism=mechanism, seeds=2, engine=engine,
                     max_runs_per_chunk=3, progress=False, **algo)
    loo = [0, 3, 17, 36]
    a = further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    b = reference_further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    assert a.config["engine"] == engine
    assert_close_and_nontrivial(a, b)
    assert list(a.eval_points) == [0, 1, 2, 3] and a.eval_unit == "epoch"


@pytest.mark.parametrize("eval_every,max_steps", [(None, None), (4, None), (3, 13)])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_n_mod_batch_is_one(eval_every, max_steps, optimizer):
    """n = 5B + 1: with ``remove`` a LOO run has 5 batches per epoch, the full run 6."""
    model, X, y, Xt, yt = regression_problem(n=41)
    cfg = GoldConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, epochs=3,
                     batch_size=8, mechanism="remove", seeds=[3, 7], eval_every=eval_every,
                     max_steps=max_steps, max_runs_per_chunk=2, progress=False)
    sched = make_schedule(41, cfg)
    assert (sched.k_full, sched.k_loo) == (6, 5)
    loo = [0, 20, 40]
    a = further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    b = reference_further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    assert_close_and_nontrivial(a, b)
    if eval_every is None:
        assert len(run_batches(41, cfg, 3, leave_out=20)) == 15
        assert len(run_batches(41, cfg, 3)) == 18
    else:
        total = max_steps or 18
        assert list(a.eval_points) == sorted(set(range(0, total + 1, eval_every)) | {total})


@pytest.mark.parametrize("n,B", [(41, 8), (40, 8), (10, 3), (5, 16)])
def test_batch_order_is_dataloader_random_sampler(n, B):
    epochs, seed = 4, 11
    cfg = GoldConfig(epochs=epochs, batch_size=B, mechanism="remove", seeds=1)
    g = torch.Generator()
    g.manual_seed(seed)
    dl = DataLoader(TensorDataset(torch.arange(n)), batch_size=B,
                    sampler=RandomSampler(range(n), generator=g))
    want = [b[0] for _ in range(epochs) for b in dl]
    got = run_batches(n, cfg, seed)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))

    class DropOne(RandomSampler):   # the paper's LOO sampler: the same order without i
        def __init__(self, data, i, generator):
            super().__init__(data, generator=generator)
            self.i = i

        def __iter__(self):
            return (j for j in super().__iter__() if j != self.i)

    for i in (0, n // 2, n - 1):
        g.manual_seed(seed)
        dl = DataLoader(TensorDataset(torch.arange(n)), batch_size=B,
                        sampler=DropOne(range(n), i, g))
        want = [b[0] for _ in range(epochs) for b in dl]
        got = run_batches(n, cfg, seed, leave_out=i)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    sub = run_batches(n, dataclasses.replace(cfg, mechanism="subtract"), seed, leave_out=1)
    full = run_batches(n, cfg, seed)
    assert all(torch.equal(a, b) for a, b in zip(sub, full))


def test_stacked_optimizers_bitwise_equal_torch_optim():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,)]
    R = 3
    for kind, wd in [("sgd", 0.0), ("sgd", 0.1), ("adam", 0.0), ("adam", 0.1), ("adamw", 0.1)]:
        cfg = GoldConfig(optimizer=kind, lr=0.01, weight_decay=wd)
        stacked = [torch.randn(R, *s, generator=g, dtype=torch.float64) for s in shapes]
        singles = [[p[r].clone().requires_grad_() for p in stacked] for r in range(R)]
        opts = [torch.optim.SGD(ps, lr=0.01, weight_decay=wd) if kind == "sgd" else
                (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)(
                    ps, lr=0.01, weight_decay=wd) for ps in singles]
        opt = StackedOptimizer(cfg, stacked, [slice(0, R)])
        for step in range(5):
            grads = [torch.randn(R, *s, generator=g, dtype=torch.float64) for s in shapes]
            active = np.array([True, step != 2, True])      # run 1 idles once
            opt.update(0, stacked, grads, active)
            for r in range(R):
                if active[r]:
                    for p, gr in zip(singles[r], grads):
                        p.grad = gr[r].clone()
                    opts[r].step()
        for r in range(R):
            for p, q in zip(stacked, singles[r]):
                assert torch.equal(p[r], q.detach()), (kind, wd, r)


@pytest.mark.parametrize("engine", ["auto", "func"])
@pytest.mark.parametrize("mechanism", ["remove", "subtract"])
def test_batchnorm_model_generic_path_with_augmentation(mechanism, engine):
    net, X, y, Xt, yt = conv_bn_problem()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    net.train()                                  # further training must use eval mode
    cfg = conv_bn_gold_config(mechanism, engine)
    a = further_train(net, "classification", X, y, Xt, yt, [0, 5, 16], cfg, augment=flip_augment)
    b = reference_further_train(net, "classification", X, y, Xt, yt, [0, 5, 16], cfg,
                                augment=flip_augment)
    # auto: the per-run loop for a convolutional model on a CPU
    assert a.config["engine"] == ("loop" if engine == "auto" else "func")
    assert net.training                                      # the caller's model is untouched
    assert_close_and_nontrivial(a, b)
    c = further_train(net, "classification", X, y, Xt, yt, [0, 5, 16], cfg)
    assert np.abs(a.loss_loo - c.loss_loo).max() > 1e-6       # the augmentation is used
    with torch.no_grad():                                      # eval mode at t = 0
        ref0 = nn.functional.cross_entropy(net.eval()(Xt), yt, reduction="none").numpy()
    np.testing.assert_allclose(a.loss_full[0, 0], ref0, rtol=0, atol=1e-14)


class Branchy(nn.Module):
    """Data-dependent control flow (vmap cannot batch it) and an unused parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 1)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if bool((self.b.weight.sum() > 0).item()):   # on the parameters: vmap cannot batch it
            h = h * 1.5
        return self.b(h)


def test_loop_engine_for_models_vmap_cannot_batch():
    torch.manual_seed(0)
    net = Branchy().double()
    _, X, y, Xt, yt = regression_problem(n=21, d=4)
    cfg = GoldConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, epochs=2, batch_size=6,
                     mechanism="remove", seeds=2, progress=False)
    a = further_train(net, "regression", X, y, Xt, yt, [0, 7, 20], cfg)
    b = reference_further_train(net, "regression", X, y, Xt, yt, [0, 7, 20], cfg)
    assert a.config["engine"] == "loop"
    assert_close_and_nontrivial(a, b)
    with pytest.raises(ValueError, match="vmap"):
        further_train(net, "regression", X, y, Xt, yt, [0], dataclasses.replace(cfg,
                                                                                engine="func"))
    model, X, y, Xt, yt = regression_problem(n=21)
    c = further_train(model, "regression", X, y, Xt, yt, [0, 7], dataclasses.replace(cfg,
                                                                                     engine="loop"))
    d = reference_further_train(model, "regression", X, y, Xt, yt, [0, 7], cfg)
    assert c.config["engine"] == "loop"
    assert_close_and_nontrivial(c, d)


def test_classification_mlp_engine():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    Xt = torch.randn(5, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (5,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    cfg = GoldConfig(optimizer="adam", lr=1e-2, epochs=3, batch_size=7, mechanism="subtract",
                     seeds=2, progress=False)
    a = further_train(model, "classification", X, y, Xt, yt, [1, 2, 29], cfg)
    b = reference_further_train(model, "classification", X, y, Xt, yt, [1, 2, 29], cfg)
    assert a.config["engine"] == "mlp"
    assert_close_and_nontrivial(a, b)


def test_chunking_does_not_change_results():
    model, X, y, Xt, yt = regression_problem(n=30)
    base = dict(optimizer="adam", lr=3e-3, epochs=2, batch_size=8, seeds=2, progress=False)
    a = further_train(model, "regression", X, y, Xt, yt, [1, 4, 9, 20, 29],
                      GoldConfig(max_runs_per_chunk=2, run_block=1, **base))
    b = further_train(model, "regression", X, y, Xt, yt, [1, 4, 9, 20, 29],
                      GoldConfig(max_runs_per_chunk=6, **base))
    np.testing.assert_allclose(a.loss_loo, b.loss_loo, rtol=0, atol=1e-13)
    np.testing.assert_allclose(a.loss_full, b.loss_full, rtol=0, atol=1e-13)


def test_worker_threads_do_not_change_results():
    """The CPU mlp engine runs blocks of runs on GoldConfig.workers threads (default: one per
    core), whatever torch's intra-op setting; the count changes no number."""
    import dataclasses
    model, X, y, Xt, yt = regression_problem(n=30)
    cfg = GoldConfig(optimizer="adam", lr=3e-3, epochs=2, batch_size=8, seeds=1, run_block=2,
                     progress=False, workers=1)
    one = further_train(model, "regression", X, y, Xt, yt, [1, 4, 9, 20, 29], cfg)
    before = torch.get_num_threads()
    for w in (2, 3, None):
        other = further_train(model, "regression", X, y, Xt, yt, [1, 4, 9, 20, 29],
                              dataclasses.replace(cfg, workers=w))
        assert torch.get_num_threads() == before                      # restored
        assert np.array_equal(one.loss_loo, other.loss_loo), w
        assert np.array_equal(one.param_dist, other.param_dist), w
    assert cfg.numeric() == dataclasses.replace(cfg, workers=3).numeric()   # not in cache keys
    with pytest.raises(ValueError, match="workers must be None or a positive int"):
        GoldConfig(workers=0)


def test_resume_is_bit_for_bit(tmp_path):
    model, X, y, Xt, yt = regression_problem(n=30)
    cfg = GoldConfig(optimizer="adam", lr=3e-3, epochs=2, batch_size=8, seeds=2,
                     max_runs_per_chunk=2, progress=False)
    loo = [1, 4, 9, 20, 29]                     # 6 runs per seed -> 3 chunks per seed
    whole = further_train(model, "regression", X, y, Xt, yt, loo, cfg, workdir=tmp_path / "a")
    files = killed_after_first_piece(model, X, y, Xt, yt, loo, cfg, tmp_path / "b")
    assert files == ["seed1_chunk0000.npz"]
    mtime = (tmp_path / "b" / files[0]).stat().st_mtime_ns
    seen = []
    resumed = further_train(model, "regression", X, y, Xt, yt, loo, cfg, workdir=tmp_path / "b",
                            callback=lambda s, c: seen.append((s, c)))
    assert (tmp_path / "b" / files[0]).stat().st_mtime_ns == mtime   # loaded, not recomputed
    assert seen == [(s, c) for s in (1, 2) for c in range(3)]
    for name in ("loss_full", "loss_loo", "param_dist", "param_dist_loo"):
        assert np.array_equal(getattr(whole, name), getattr(resumed, name)), name
    # more seeds reuse the finished ones
    more = further_train(model, "regression", X, y, Xt, yt, loo,
                         dataclasses.replace(cfg, seeds=3), workdir=tmp_path / "b")
    assert np.array_equal(more.loss_loo[:2], whole.loss_loo)


def test_workdir_config_mismatch_is_an_error(tmp_path):
    model, X, y, Xt, yt = regression_problem(n=20)
    cfg = GoldConfig(epochs=1, batch_size=8, seeds=1, progress=False)
    further_train(model, "regression", X, y, Xt, yt, [0, 1], cfg, workdir=tmp_path)
    with pytest.raises(ValueError, match="different configuration.*lr"):
        further_train(model, "regression", X, y, Xt, yt, [0, 1],
                      dataclasses.replace(cfg, lr=0.1), workdir=tmp_path)
    with pytest.raises(ValueError, match="different configuration.*train"):
        further_train(model, "regression", X, y + 1, Xt, yt, [0, 1], cfg, workdir=tmp_path)
    with pytest.raises(ValueError, match="different configuration.*loo"):
        further_train(model, "regression", X, y, Xt, yt, [0, 2], cfg, workdir=tmp_path)


def test_gold_scores_eq13_eq17_by_hand():
    # S=2 seeds, n'=3 left out, T=1, J=2
    loss_full = np.array([[[1.0, 2.0]], [[3.0, 4.0]]])
    loss_loo = np.array([[[[1.5, 2.0]], [[0.5, 2.5]], [[1.0, 4.0]]],
                         [[[3.0, 5.0]], [[4.0, 4.0]], [[2.0, 3.0]]]])
    a17 = gold_scores(loss_full, loss_loo, adjust="full")
    # (1/S) sum_s (loo - full): i=0: ((0.5, 0) + (0, 1))/2 ; i=1: ((-0.5, .5) + (1, 0))/2 ;
    # i=2: ((0, 2) + (-1, -1))/2
    want17 = np.array([[[0.25, 0.5]], [[0.25, 0.25]], [[-0.5, 0.5]]])
    np.testing.assert_allclose(a17, want17, rtol=0, atol=1e-15)    # dyadic: every step exact
    a13 = gold_scores(None, loss_loo, adjust="mean")
    # a13 is a combination sum c x of the losses with sum |c x| <= 2 max|x|, each term rounded at
    # most n' + S + 1 times (Higham Lemma 3.1); the mean of want17 adds n' + 1 roundings
    S, m = loss_loo.shape[:2]
    x_max = np.abs(loss_loo).max()
    err13 = gamma(m + S + 1) * 2 * x_max
    np.testing.assert_allclose(a13, want17 - want17.mean(axis=0), rtol=0,
                               atol=err13 + gamma(m + 1) * 2 * np.abs(want17).max())
    # exactly 0: the n' errors of a13, and the sum's own n' - 1 roundings
    np.testing.assert_allclose(a13.sum(axis=0), 0,
                               atol=m * err13 + gamma(m - 1) * np.abs(a13).sum(axis=0).max())
    np.testing.assert_allclose(gold_scores(loss_full, loss_loo, "full", seeds=[1]),
                               loss_loo[1] - loss_full[1][None], atol=0)
    with pytest.raises(ValueError, match="adjust"):
        gold_scores(loss_full, loss_loo, adjust="median")


def test_seed_groups():
    rng = np.random.default_rng(0)
    lf, ll = rng.normal(size=(7, 3, 2)), rng.normal(size=(7, 4, 3, 2))
    g = seed_group_scores(lf, ll, 3, adjust="full")
    assert g.shape == (2, 4, 3, 2)                                   # 7 // 3 groups
    np.testing.assert_allclose(g[1], gold_scores(lf, ll, "full", seeds=[3, 4, 5]), atol=0)
    # one group of all 7 seeds: the same reductions over the same array (bit-identical)
    np.testing.assert_allclose(seed_group_scores(lf, ll, 7)[0], gold_scores(lf, ll), atol=1e-15)
    with pytest.raises(ValueError):
        seed_group_scores(lf, ll, 8)


def test_retrain_loo_matches_reference():
    cfg, init, X, y, Xt, yt = retraining_problem(n=33, epochs=3, hidden=16)
    res = retrain_loo(init, cfg, X, y, Xt, yt, [2, 32], seeds=2, progress=False)
    gcfg = GoldConfig.from_training(cfg.train, seeds=2, progress=False)
    assert gcfg.seed_list == [0, 1] and gcfg.mechanism == "remove" and gcfg.shuffle == "randperm"
    assert res.config["lr"] == 0.05 and res.config["epochs"] == 3
    ref = reference_further_train(init, "regression", X, y, Xt, yt, [2, 32], gcfg)
    assert_close_and_nontrivial(res, ref)
    # the full run is plain minibatch SGD from theta^0 with one randperm per epoch
    g = torch.Generator().manual_seed(0)
    m = MLP(4, 1, hidden=16).double()
    m.load_state_dict(init.state_dict())
    for _ in range(3):
        perm = torch.randperm(33, generator=g)
        for idx in perm.split(8):
            loss = ((m(X[idx]).squeeze(1) - y[idx]) ** 2).mean()
            grads = torch.autograd.grad(loss, list(m.parameters()))
            with torch.no_grad():
                for p, gr in zip(m.parameters(), grads):
                    p.sub_(gr, alpha=0.05)
    with torch.no_grad():
        want = ((m(Xt).squeeze(1) - yt) ** 2).numpy()
    np.testing.assert_allclose(res.loss_full[0, -1], want, rtol=0, atol=TOL)


def test_retrain_full_run_is_the_final_model(tmp_path):
    """With the final model's seed, the full re-training run is fimoda.training's theta^f."""
    from conftest import data_dir, require_file
    require_file("concrete/Concrete_Data.xls")
    from fimoda.data import load_dataset
    from fimoda.models import build_model
    from fimoda.training import train_final_model
    cfg = get_config("concrete", "smoke")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=4))
    ds = load_dataset("concrete", data_dir=data_dir())
    # 4 epochs need not beat the trivial predictor: the check is off (margin=None)
    model, _ = train_final_model(cfg, ds, out_dir=tmp_path, progress=False, margin=None)
    X, y, Xt, yt = (torch.as_tensor(np.asarray(a)) for a in (ds.X_train, ds.y_train, ds.X_test,
                                                             ds.y_test))
    init = build_model(cfg, n_features=X.shape[1])
    res = retrain_loo(init, cfg, X, y, Xt, yt, [0, 9], seeds=1, progress=False)
    with torch.no_grad():
        want = ((model(Xt).reshape(-1) - yt) ** 2).numpy()
    np.testing.assert_allclose(res.loss_full[0, -1], want, rtol=0, atol=TOL)


def test_save_and_load_gold(tmp_path):
    model, X, y, Xt, yt = regression_problem(n=20)
    cfg = GoldConfig(optimizer="adam", lr=1e-3, epochs=2, batch_size=8, seeds=2,
                     mechanism="remove", progress=False)
    res = further_train(model, "regression", X, y, Xt, yt, [0, 3], cfg, test_indices=[5, 6, 7, 8,
                                                                                       9, 10])
    p = save_gold(tmp_path, res, cfg)
    assert p.name == "gold_adam_remove.npz" and p.with_suffix(".json").exists()
    z = load_npz(p)
    for k in ("loss_full", "loss_loo", "loo_indices", "test_indices", "eval_points",
              "param_dist"):
        assert k in z
    assert list(z["test_indices"]) == [5, 6, 7, 8, 9, 10]
    assert load_json(p.with_suffix(".json"))["optimizer"] == "adam"
    back = load_gold_result(p)
    assert np.array_equal(back.loss_loo, res.loss_loo) and back.eval_unit == "epoch"
    q = save_gold(tmp_path / "x.npz", res, {"record": {"a": 1}})
    assert load_json(q.with_suffix(".json"))["record"] == {"a": 1}


def test_config_from_experiment_and_validation():
    cfg = get_config("concrete", "paper")
    sgd = GoldConfig.from_experiment(cfg.further)
    adam = GoldConfig.from_experiment(cfg, optimizer="adam", seeds=[4, 5])
    assert (sgd.optimizer, sgd.lr, sgd.epochs, sgd.seed_list[-1]) == ("sgd", 3e-2, 500, 100)
    assert (adam.optimizer, adam.lr, adam.seed_list) == ("adam", 1e-4, [4, 5])
    sst = GoldConfig.from_experiment(get_config("sst2", "paper").further)
    assert (sst.optimizer, sst.grad_clip, sst.eval_every) == ("adamw", 1.0, 5)
    for bad in [dict(optimizer="rmsprop"), dict(mechanism="drop"), dict(lr=0), dict(seeds=0),
                dict(seeds=[1, 1]), dict(max_steps=5), dict(batch_size=0), dict(grad_clip=-1)]:
        with pytest.raises(ValueError):
            GoldConfig(**bad)
    model, X, y, Xt, yt = regression_problem(n=20)
    ok = GoldConfig(epochs=1, batch_size=8, seeds=1, progress=False)
    for loo in ([], [0, 0], [20], [-1]):
        with pytest.raises(ValueError, match="loo_indices"):
            further_train(model, "regression", X, y, Xt, yt, loo, ok)
    with pytest.raises(ValueError, match="engine='mlp'"):
        further_train(ConvBN().double(), "classification", torch.zeros(4, 2, 3, 3).double(),
                      torch.zeros(4).long(), torch.zeros(1, 2, 3, 3).double(),
                      torch.zeros(1).long(), [0], dataclasses.replace(ok, engine="mlp"))


def test_schedule_eval_points():
    s = make_schedule(100, GoldConfig(epochs=4, batch_size=32))
    assert list(s.eval_points) == [0, 1, 2, 3, 4] and list(s.eval_steps) == [0, 4, 8, 12, 16]
    s = make_schedule(100, GoldConfig(epochs=1, max_steps=10, eval_every=4, batch_size=32))
    assert list(s.eval_points) == [0, 4, 8, 10] and s.total == 10 and not s.by_epoch
    assert math.ceil(10 / 4) == s.n_epochs
