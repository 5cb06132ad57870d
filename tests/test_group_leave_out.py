"""Group leave-out further training: a run leaves out a set S of training instances."""

import numpy as np
import pytest

import fimoda
from fimoda.gold import (GoldConfig, as_left_out, epoch_permutations, further_train,
                         reference_further_train, run_batches)
from small_models import (assert_close_and_nontrivial, conv_bn_gold_config, conv_bn_problem,
                          flip_augment, killed_after_first_piece, regression_problem)

ARRAYS = ("loss_full", "loss_loo", "param_dist", "param_dist_loo")


@pytest.mark.parametrize("engine", ["mlp", "func"])
@pytest.mark.parametrize("mechanism", ["remove", "subtract"])
@pytest.mark.parametrize("algo", [dict(optimizer="sgd", lr=0.05),
                                  dict(optimizer="adamw", lr=3e-3, weight_decay=0.01,
                                       grad_clip=1.0)], ids=["sgd", "adamw"])
def test_groups_of_one_are_leave_one_out_bit_for_bit(engine, mechanism, algo):
    """n = 5B + 1 (a LOO run has one batch fewer per epoch), step units crossing epochs."""
    model, X, y, Xt, yt = regression_problem(n=41)
    cfg = GoldConfig(epochs=2, batch_size=8, mechanism=mechanism, seeds=2, engine=engine,
                     eval_every=4, max_steps=13, max_runs_per_chunk=3, progress=False, **algo)
    loo = [0, 3, 20, 40]
    a = further_train(model, "regression", X, y, Xt, yt, loo, cfg)
    b = further_train(model, "regression", X, y, Xt, yt, [[i] for i in loo], cfg)
    c = further_train(model, "regression", X, y, Xt, yt, np.array(loo)[:, None], cfg)
    assert b.loo_indices.shape == (4, 1) and a.loo_indices.shape == (4,)
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(getattr(a, name), getattr(c, name)), name


@pytest.mark.parametrize("engine", ["mlp", "func"])
@pytest.mark.parametrize("mechanism", ["remove", "subtract"])
@pytest.mark.parametrize("units", ["epoch", "step"])
def test_group_runs_equal_the_reference_loop(engine, mechanism, units):
    """Groups of mixed sizes (padding in the plan), n = 5B + 2: removing 2 or 3 instances
    takes one batch fewer per epoch; step units make those runs start their epochs earlier."""
    model, X, y, Xt, yt = regression_problem(n=42)
    steps = dict(eval_every=5, max_steps=16) if units == "step" else {}
    cfg = GoldConfig(optimizer="adam", lr=3e-3, epochs=2, batch_size=8, mechanism=mechanism,
                     seeds=[2, 5], engine=engine, max_runs_per_chunk=2, progress=False, **steps)
    groups = [[7, 0, 41], [3], [20, 21], [5, 9, 30]]
    a = further_train(model, "regression", X, y, Xt, yt, groups, cfg)
    b = reference_further_train(model, "regression", X, y, Xt, yt, groups, cfg)
    assert_close_and_nontrivial(a, b)
    assert a.loo_indices.tolist() == [[0, 7, 41], [3, -1, -1], [20, 21, -1], [5, 9, 30]]


@pytest.mark.parametrize("mechanism", ["remove", "subtract"])
def test_groups_with_augmentation_on_a_batchnorm_model(mechanism):
    """The generic engine with augmented views: ``subtract`` uses its G subtracted members
    un-augmented, as the reference loop does."""
    net, X, y, Xt, yt = conv_bn_problem()
    cfg = conv_bn_gold_config(mechanism, "func")
    groups = [[0, 5, 16], [3], [7, 8]]
    a = further_train(net, "classification", X, y, Xt, yt, groups, cfg, augment=flip_augment)
    b = reference_further_train(net, "classification", X, y, Xt, yt, groups, cfg,
                                augment=flip_augment)
    assert_close_and_nontrivial(a, b)


@pytest.mark.parametrize("S,n_batches", [([2, 11, 22], 12),          # 20 left: 4 per epoch
                                         (list(range(1, 23, 2)) + [0, 4], 6)])   # 10 left: 2
def test_group_batches_are_the_order_without_the_group(S, n_batches):
    """Independently of the plan: a ``remove`` run of group S takes, epoch by epoch, the seed's
    permutation with S's members deleted, cut into batches of B (the last one smaller)."""
    n, B, seed = 23, 5, 4
    cfg = GoldConfig(epochs=3, batch_size=B, mechanism="remove", seeds=1, progress=False)
    perms = epoch_permutations(n, seed, 3)
    expected = []
    for perm in perms:
        order = [int(i) for i in perm if int(i) not in S]
        expected += [order[k:k + B] for k in range(0, len(order), B)]
    got = [b.tolist() for b in run_batches(n, cfg, seed, leave_out=S)]
    assert got == expected and len(got) == n_batches
    assert [b.tolist() for b in run_batches(n, cfg, seed, leave_out=[11])] == \
        [b.tolist() for b in run_batches(n, cfg, seed, leave_out=11)]


@pytest.mark.parametrize("bad,match", [
    ([[0, 1], []], "group 1 is empty"),
    ([[0, 1], [4, 2, 4]], r"group 1 repeats an index: \[4, 2, 4\]"),
    ([[0, 30]], r"group 0 has an index outside \[0, 30\)"),
    ([[-2, 3]], r"group 0 has an index outside \[0, 30\)"),
    ([[3], [-1]], "group 1 is empty"),
    ([], "non-empty"),
    ([[0.5, 1.0]], "integer"),
    ([[0, 1], 2], "not a mix"),
    (np.zeros((2, 2, 2), dtype=int), "not a mix"),
    ([list(range(30))], "leaves out all 30"),
    ([3, 3], "distinct"),
])
def test_bad_groups_are_one_clear_error_before_any_work(tmp_path, bad, match):
    model, X, y, Xt, yt = regression_problem(n=30)
    cfg = GoldConfig(epochs=1, batch_size=8, seeds=1, progress=False)
    wd = tmp_path / "w"
    with pytest.raises(ValueError, match=match):
        further_train(model, "regression", X, y, Xt, yt, bad, cfg, workdir=wd)
    assert not wd.exists()
    with pytest.raises(ValueError, match=match):
        as_left_out(bad, 30)


def test_group_workdir_resumes_and_is_not_shared_with_leave_one_out(tmp_path):
    model, X, y, Xt, yt = regression_problem(n=30)
    cfg = GoldConfig(optimizer="adam", lr=3e-3, epochs=2, batch_size=8, seeds=2,
                     max_runs_per_chunk=2, progress=False)
    groups = [[1, 4], [9], [20, 29, 3]]
    whole = further_train(model, "regression", X, y, Xt, yt, groups, cfg)
    wd = tmp_path / "g"
    assert killed_after_first_piece(model, X, y, Xt, yt, groups, cfg, wd) == ["seed1_chunk0000.npz"]
    resumed = further_train(model, "regression", X, y, Xt, yt, groups, cfg, workdir=wd)
    for name in ARRAYS:
        assert np.array_equal(getattr(whole, name), getattr(resumed, name)), name
    with pytest.raises(ValueError, match="different configuration.*groups"):
        further_train(model, "regression", X, y, Xt, yt, [[1, 4], [9], [20, 29]], cfg,
                      workdir=wd)
    single = tmp_path / "s"
    further_train(model, "regression", X, y, Xt, yt, [[1], [9]], cfg, workdir=single)
    with pytest.raises(ValueError, match="different configuration.*(groups|loo)"):
        further_train(model, "regression", X, y, Xt, yt, [1, 9], cfg, workdir=single)


def test_gold_standard_accepts_groups():
    """The front door: a group's gold with ``adjust="full"`` is mean_s(loss_{-S} - loss_full)
    of the engine's group run; the groups of one reproduce the leave-one-out gold."""
    model, X, y, Xt, yt = regression_problem(n=30)
    kw = dict(task="regression", epochs=2, seeds=2, batch_size=8, lr=0.05, adjust="full")
    loo = fimoda.gold_standard(model, X, y, [2, 6, 11], Xt, yt, **kw)
    ones = fimoda.gold_standard(model, X, y, [[2], [6], [11]], Xt, yt, **kw)
    assert np.array_equal(loo, ones)
    grp = fimoda.gold_standard(model, X, y, [[2, 6], [11]], Xt, yt, **kw)
    cfg = GoldConfig(epochs=2, seeds=2, batch_size=8, lr=0.05, mechanism="remove",
                     progress=False)
    res = further_train(model, "regression", X, y, Xt, yt, [[2, 6], [11]], cfg)
    by_hand = (res.loss_loo[:, :, -1] - res.loss_full[:, None, -1]).mean(0).T     # (J, m)
    np.testing.assert_allclose(grp, by_hand, rtol=0, atol=1e-15)
    assert np.array_equal(grp[:, 1], loo[:, 2])
    with pytest.raises(ValueError, match="repeats an index"):
        fimoda.gold_standard(model, X, y, [[2, 2]], Xt, yt, **kw)


def test_the_infinitesimal_gold_refuses_groups_before_any_work():
    from fimoda.gold.infinitesimal import infinitesimal_further_train
    model, X, y, Xt, yt = regression_problem(n=20)
    with pytest.raises(ValueError, match="one left-out instance per run, not groups"):
        infinitesimal_further_train(model, "regression", X, y, Xt, yt, [[0, 1]],
                                    GoldConfig(mechanism="subtract", progress=False))
