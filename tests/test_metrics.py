import numpy as np
import pytest
from scipy.stats import spearmanr

from fimoda import metrics


def test_cosine_and_spearman_against_direct_formulas():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=(12, 3, 4))          # (i, t, j)
    s = rng.normal(size=(4, 12))                # (j, i)
    cos = metrics.cosine(gold, s)
    sp = metrics.spearman(gold, s)
    for t in range(3):
        for j in range(4):
            a, b = gold[:, t, j], s[j]
            assert cos[t, j] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            assert sp[t, j] == pytest.approx(spearmanr(a, b).statistic)


def test_cosine_ignores_scale_and_flags_sign():
    rng = np.random.default_rng(1)
    gold = rng.normal(size=(10, 2, 3))
    s = 7.5 * gold[:, 0, :].T
    assert np.allclose(metrics.cosine(gold, s)[0], 1.0)
    assert np.allclose(metrics.cosine(gold, -s)[0], -1.0)


def test_shape_and_nan_errors():
    with pytest.raises(ValueError, match="test, left-out"):
        metrics.cosine(np.zeros((5, 2, 3)), np.zeros((5, 3)))
    s = np.ones((3, 5))
    s[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.cosine(np.ones((5, 2, 3)), s)


def test_mean_se_and_curve():
    vals = np.array([[1.0, 2.0, 3.0, 4.0]])
    m, se = metrics.mean_se(vals, axis=1)
    assert m[0] == 2.5 and se[0] == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    rng = np.random.default_rng(2)
    gold = rng.normal(size=(8, 5, 6))
    mean, se = metrics.curve(gold, rng.normal(size=(6, 8)))
    assert mean.shape == (5,) and se.shape == (5,) and np.all(se > 0)


def test_seeds_study_takes_max_over_eval_points():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(4, 9))
    groups = rng.normal(size=(3, 9, 5, 4))
    groups[:, :, 2, :] = s.T[None]            # perfect agreement at t = 2
    best, se, t = metrics.peak_over_eval_points(groups, s)
    assert t == 2 and best == pytest.approx(1.0) and se == pytest.approx(0.0)


def test_roc_auc():
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert metrics.roc_auc([0.5, 0.5], [0, 1]) == 0.5
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(4)
    sc, lab = rng.normal(size=50), rng.integers(0, 2, 50)
    assert metrics.roc_auc(sc, lab) == pytest.approx(roc_auc_score(lab, sc))
    with pytest.raises(ValueError):
        metrics.roc_auc([1, 2], [1, 1])


def test_method_agreement_is_symmetric_with_unit_diagonal():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 7))
    names, M = metrics.method_agreement({"a": a, "b": 2 * a, "c": -a})
    assert names == ["a", "b", "c"]
    assert np.allclose(M, M.T) and np.allclose(np.diag(M), 1)
    assert M[0, 1] == pytest.approx(1) and M[0, 2] == pytest.approx(-1)
