"""The models behind the LDS: group further training over subsets of L, classic re-training."""

import numpy as np
import pytest

from fimoda.gold import GoldConfig, further_train, gold_scores, retrain_loo
from fimoda.yardsticks import draw_subsets, further_training_lds, retraining_lds
from small_models import regression_problem, retraining_problem


def test_draw_subsets():
    a = draw_subsets(20, 6, alpha=0.3, seed=5)
    assert a.shape == (6, 6) and a.dtype == np.int64
    assert all(len(set(r)) == 6 and list(r) == sorted(r) and r.max() < 20 for r in a)
    assert np.array_equal(a, draw_subsets(20, 6, alpha=0.3, seed=5))
    assert not np.array_equal(a, draw_subsets(20, 6, alpha=0.3, seed=6))
    for bad, match in [(dict(n_subsets=2), ">= 3"), (dict(alpha=1.0), r"\(0, 1\)"),
                       (dict(alpha=0.01), "at least one")]:
        with pytest.raises(ValueError, match=match):
            draw_subsets(20, **{"n_subsets": 6, **bad})


def test_further_training_lds_runs_the_complements_and_the_gold_predicts_them():
    """Model m is the group run without L minus its subset; its output is the group's gold
    mean_s(loss_{-S} - loss_full); and the leave-one-out gold of the same further training,
    summed over each kept subset, ranks the subsets' losses well (far above the 0 +- 0.12 of
    an unrelated score over 12 subsets and 6 test points; removing half of L is not a small
    perturbation, so not 1): the sign conventions of fimoda.metrics.lds end to end."""
    model, X, y, Xt, yt = regression_problem(n=41)
    cfg = GoldConfig(optimizer="sgd", lr=0.05, epochs=3, batch_size=8, seeds=2,
                     mechanism="remove", progress=False)
    L = np.array([0, 2, 5, 8, 13, 17, 21, 26, 30, 33, 36, 40])
    runs = further_training_lds(model, "regression", X, y, Xt, yt, L, cfg, n_subsets=12,
                                alpha=0.5, seed=3)
    assert runs.subsets.shape == (12, 6) and runs.outputs.shape == (12, 4, len(Xt))
    groups = [np.setdiff1d(L, L[k]) for k in runs.subsets]
    direct = further_train(model, "regression", X, y, Xt, yt, groups, cfg)
    assert np.array_equal(runs.gold.loss_loo, direct.loss_loo)
    np.testing.assert_allclose(runs.outputs, (direct.loss_loo - direct.loss_full[:, None]).mean(0),
                               rtol=0, atol=1e-15)
    loo = further_train(model, "regression", X, y, Xt, yt, L, cfg)
    gold = gold_scores(loo.loss_full, loo.loss_loo, adjust="full")[:, -1].T      # (J, |L|)
    score = runs.lds(gold)
    assert score.n_test == len(Xt) and score.mean > 0.6, score
    assert runs.lds(-gold).mean < -0.6
    with pytest.raises(ValueError, match="1-D set L"):
        further_training_lds(model, "regression", X, y, Xt, yt, [[0, 1]], cfg, n_subsets=3)


def test_retraining_lds_is_retrain_loo_without_the_complements():
    cfg, init, X, y, Xt, yt = retraining_problem(n=20, epochs=2, hidden=8)
    runs = retraining_lds(init, cfg, X, y, Xt, yt, n_subsets=4, alpha=0.5, seed=1, seeds=2,
                          progress=False)
    assert runs.subsets.shape == (4, 10)
    groups = [np.setdiff1d(np.arange(20), k) for k in runs.subsets]
    direct = retrain_loo(init, cfg, X, y, Xt, yt, groups, seeds=2, progress=False)
    assert np.array_equal(runs.gold.loss_loo, direct.loss_loo)
    assert runs.gold.loo_indices.shape == (4, 10) and list(runs.eval_points) == [0, 1, 2]


def test_retraining_lds_over_a_pool_leaves_out_only_pool_members():
    """``pool``: each model leaves out the pool minus its kept subset (positions in the pool),
    every instance outside the pool stays in; the runs are retrain_loo's for those groups."""
    cfg, init, X, y, Xt, yt = retraining_problem(n=20, epochs=2, hidden=8)
    pool = np.array([1, 4, 6, 9, 12, 15, 18, 19])
    runs = retraining_lds(init, cfg, X, y, Xt, yt, n_subsets=3, alpha=0.25, seed=2,
                          pool=pool, progress=False)
    assert runs.subsets.shape == (3, 2) and runs.subsets.max() < len(pool)
    groups = [np.setdiff1d(pool, pool[k]) for k in runs.subsets]
    assert [sorted(g) for g in groups] == [sorted(r[r >= 0]) for r in runs.gold.loo_indices]
    direct = retrain_loo(init, cfg, X, y, Xt, yt, groups, seeds=1, progress=False)
    assert np.array_equal(runs.gold.loss_loo, direct.loss_loo)
    with pytest.raises(ValueError, match="pool"):
        retraining_lds(init, cfg, X, y, Xt, yt, n_subsets=3, pool=[[1, 2]], progress=False)
    with pytest.raises(ValueError, match="pool"):
        retraining_lds(init, cfg, X, y, Xt, yt, n_subsets=3, pool=[1, 1, 2, 3], progress=False)


def test_a_diverged_retraining_is_left_out_of_the_lds_not_an_error():
    """The recipe's learning rate can make a re-training on another subset diverge (Concrete's
    lr 0.3): further training stops with a FloatingPointError by default, while the re-training
    LDS keeps such a model as non-finite and leaves it out of the LDS."""
    import dataclasses
    from fimoda.yardsticks import LDSRuns
    cfg, init, X, y, Xt, yt = retraining_problem(n=20, epochs=2, hidden=8)
    huge = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e6))
    with pytest.raises(FloatingPointError, match="diverged"):
        retrain_loo(init, huge, X, y, Xt, yt, [[0, 1]], progress=False)
    runs = retraining_lds(init, huge, X, y, Xt, yt, n_subsets=4, alpha=0.5, seed=1,
                          progress=False)
    assert runs.diverged == 4 and not np.isfinite(runs.outputs[:, -1]).any()
    with pytest.raises(ValueError, match="4 of 4 models diverged"):
        runs.lds(np.ones((len(Xt), 20)))
    with pytest.raises(ValueError, match="diverged must be"):
        GoldConfig(diverged="ignore")
    assert "diverged" not in GoldConfig().numeric()     # stored pieces keep their hash
    # one model of five diverged: the LDS of the other four
    ok = retraining_lds(init, cfg, X, y, Xt, yt, n_subsets=5, alpha=0.5, seed=1,
                        progress=False)
    out = ok.outputs.copy()
    out[2, -1, 0] = np.nan
    one = LDSRuns(ok.subsets, out, ok.eval_points, ok.gold)
    s = np.random.default_rng(0).normal(size=(len(Xt), 20))
    keep = [0, 1, 3, 4]
    assert one.diverged == 1
    expected = LDSRuns(ok.subsets[keep], ok.outputs[keep], ok.eval_points, ok.gold).lds(s)
    got = one.lds(s)
    assert (got.mean, got.se) == (expected.mean, expected.se)
