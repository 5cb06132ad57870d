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


def test_vector_cosine_of_two_score_vectors():
    assert metrics.vector_cosine([1.0, 0.0], [3.0, 3.0]) == pytest.approx(2 ** -0.5)
    assert metrics.vector_cosine([1.0, 2.0, 2.0], [-2.0, -4.0, -4.0]) == pytest.approx(-1.0)
    assert metrics.vector_cosine([0.0, 0.0], [1.0, 2.0]) == 0.0         # as cosine(): 0, not NaN
    with pytest.raises(ValueError, match="one length"):
        metrics.vector_cosine([1.0, 2.0], [1.0, 2.0, 3.0])


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


# ----------------------------------------------------------------------------- LDS
LDS_SCORES = np.array([[1.0, 2.0, 3.0, 4.0],
                       [4.0, 0.0, -1.0, 2.0]])              # (test j, scored instance i)
LDS_SUBSETS = np.array([[0, 1], [2, 3], [0, 3], [1, 2]])     # trained WITH these columns
LDS_LOSSES = np.array([[0.9, 0.2], [0.1, 0.4], [0.5, 0.8], [0.3, 0.6]])   # (subset m, test j)


def test_lds_hand_computed():
    """By hand. Summed scores per subset: j=0 (3, 7, 5, 5), ranks (1, 4, 2.5, 2.5); negated
    losses -(0.9, 0.1, 0.5, 0.3), ranks (1, 4, 2, 3). Centred: (-1.5, 1.5, 0, 0) and
    (-1.5, 1.5, -0.5, 0.5): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10). j=1: sums (4, 1, 6, -1), ranks
    (3, 2, 4, 1); negated losses -(0.2, 0.4, 0.8, 0.6), ranks (4, 3, 1, 2): centred products
    0.75 - 0.25 - 2.25 + 0.75 = -1 over sqrt(5 * 5): -1/5."""
    res = metrics.lds(LDS_SCORES, LDS_SUBSETS, LDS_LOSSES)
    expected = np.array([3 / np.sqrt(10), -0.2])
    np.testing.assert_allclose(res.per_test, expected, rtol=1e-14)
    assert res.mean == pytest.approx(expected.mean(), rel=1e-14)
    assert res.se == pytest.approx(abs(expected[0] - expected[1]) / 2, rel=1e-14)
    assert res.n_test == 2
    mask = np.zeros((4, 4), dtype=bool)
    np.put_along_axis(mask, LDS_SUBSETS, True, axis=1)
    assert np.array_equal(metrics.lds(LDS_SCORES, mask, LDS_LOSSES).per_test, res.per_test)
    utility = metrics.lds(LDS_SCORES, LDS_SUBSETS, -LDS_LOSSES, target="utility")
    assert np.array_equal(utility.per_test, res.per_test)


def test_lds_equals_scipy_spearman_and_is_one_for_an_exact_datamodel():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(5, 30))
    subsets = np.stack([rng.choice(30, 15, replace=False) for _ in range(40)])
    summed = np.stack([s[:, sub].sum(1) for sub in subsets])                 # (M, J)
    noisy_loss = 2.0 - summed + rng.normal(size=summed.shape)
    res = metrics.lds(s, subsets, noisy_loss)
    for j in range(5):
        assert res.per_test[j] == pytest.approx(
            spearmanr(summed[:, j], -noisy_loss[:, j]).statistic, rel=1e-12)
    exact = metrics.lds(s, subsets, 2.0 - 0.5 * summed)                     # linear datamodel
    np.testing.assert_allclose(exact.per_test, 1.0, rtol=1e-14)
    assert metrics.lds(-s, subsets, 2.0 - 0.5 * summed).mean == pytest.approx(-1.0)


def test_lds_undefined_points_and_bad_input():
    losses = LDS_LOSSES.copy()
    losses[:, 1] = 0.5                                      # constant outputs at test point 1
    res = metrics.lds(LDS_SCORES, LDS_SUBSETS, losses)
    assert np.isnan(res.per_test[1]) and res.n_test == 1
    assert res.mean == pytest.approx(3 / np.sqrt(10)) and res.se == 0
    with pytest.raises(ValueError, match="outputs must be"):
        metrics.lds(LDS_SCORES, LDS_SUBSETS, LDS_LOSSES.T)
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        metrics.lds(LDS_SCORES, LDS_SUBSETS + 1, LDS_LOSSES)
    with pytest.raises(ValueError, match="repeats"):
        metrics.lds(LDS_SCORES, np.array([[0, 0], [1, 2], [2, 3], [0, 1]]), LDS_LOSSES)
    with pytest.raises(ValueError, match="at least 3"):
        metrics.lds(LDS_SCORES, LDS_SUBSETS[:2], LDS_LOSSES[:2])
    with pytest.raises(ValueError, match="target"):
        metrics.lds(LDS_SCORES, LDS_SUBSETS, LDS_LOSSES, target="margin")
    with pytest.raises(ValueError, match="undefined at every test point"):
        metrics.lds(LDS_SCORES, LDS_SUBSETS, np.ones((4, 2)))
