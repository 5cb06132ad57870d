"""The gold standard's noise ceiling on synthetic gold with known signal and seed noise."""
import numpy as np
import pytest

from fimoda import metrics
from fimoda.gold import GoldConfig, GoldResult, further_train, gold_scores
from fimoda.yardsticks import gold_noise_ceiling, noise_ceiling, seeds_needed


def synthetic_gold(K, n_loo, J, sigmas, seed=0, offset=0.0):
    """loss_loo[s, i, t, j] = loss_full[s, t, j] + a[i, t, j] + sigma_t eps[s, i, t, j]
    (+ ``offset`` x a per-(seed, t, j) shift common to every i, which eq. 13 removes and eq. 17
    keeps). a has |a[:, t, j]| = 1; t = 0 is theta^f (a = 0, no noise). Returns the arrays, a
    and the expected ceiling 1 / sqrt(1 + n' sigma_t^2 / K) (eq. 17) per t."""
    rng = np.random.default_rng(seed)
    T = len(sigmas)
    a = rng.normal(size=(n_loo, T, J))
    a /= np.linalg.norm(a, axis=0, keepdims=True)
    a[:, 0] = 0.0
    sig = np.asarray(sigmas, dtype=float)[None, None, :, None]
    full = rng.normal(size=(K, T, J))
    common = offset * rng.normal(size=(K, 1, T, J))
    loo = full[:, None] + a[None] + sig * rng.normal(size=(K, n_loo, T, J)) + common
    loo[:, :, 0] = full[:, None, 0]
    expected = 1 / np.sqrt(1 + n_loo * np.asarray(sigmas, float) ** 2 / K)
    return full, loo, a, expected


def ceiling_sd(K, n_loo, sigma, ceiling):
    """Standard deviation of the estimate (first order) for |a| = 1 and isotropic noise: the
    pair mean of g_s.g_s' has variance 2 n' sigma^4 / (K (K-1)) + 4 sigma^2 / K, and the ceiling
    moves by half its relative error."""
    sd_signal = np.sqrt(2 * n_loo * sigma ** 4 / (K * (K - 1)) + 4 * sigma ** 2 / K)
    return 0.5 * ceiling * sd_signal


def test_ceiling_recovers_the_known_cosine():
    K, n_loo, J = 8, 1500, 12
    sigmas = [0.0, 0.01, 0.04, 0.15]              # expected ceilings .99, .88, .44
    full, loo, a, expected = synthetic_gold(K, n_loo, J, sigmas)
    nc = noise_ceiling(full, loo, adjust="full")
    assert np.isnan(nc.ceiling[0]).all()          # t = 0: the gold is zero, no cosine
    for t in (1, 2, 3):
        sd = ceiling_sd(K, n_loo, sigmas[t], expected[t])
        np.testing.assert_allclose(nc.ceiling[t], expected[t], atol=4 * sd)
        assert nc.mean()[0][t] == pytest.approx(expected[t], abs=4 * sd / np.sqrt(J))
    # the realised cosine of the exact answer to this K-seed gold
    g = gold_scores(full, loo, adjust="full")
    realised = metrics.cosine(g, a[:, 2, :].T)[2]
    np.testing.assert_allclose(nc.ceiling[2], realised, atol=4 * ceiling_sd(K, n_loo, 0.04,
                                                                            expected[2]))
    # one seed's signal-to-noise |a|^2 / (n' sigma^2), and the ceiling of other seed counts
    snr = 1 / (n_loo * np.square(sigmas[1:]))
    rel = 2 * np.array([ceiling_sd(K, n_loo, sg, 1.0) for sg in sigmas[1:]])
    np.testing.assert_allclose(nc.snr[1:] / snr[:, None], 1.0, atol=4 * rel.max())
    np.testing.assert_allclose(nc.for_seeds(K), nc.ceiling[:], atol=1e-12)
    k100 = 1 / np.sqrt(1 + n_loo * sigmas[2] ** 2 / 100)
    np.testing.assert_allclose(nc.for_seeds(100)[2], k100, atol=0.02)
    need = nc.seeds_for(0.9)[2]                     # 0.81 / 0.19 * n' sigma^2 = 10.2
    np.testing.assert_allclose(need, 0.81 / 0.19 * n_loo * sigmas[2] ** 2, rtol=4 * rel[1])


def test_ceiling_agrees_with_split_half_spearman_brown():
    """The classical estimator by hand: the cosine of two halves' golds, r, corrected to K
    seeds by Spearman-Brown, 2r / (1 + r), is the squared ceiling up to sampling noise."""
    K, n_loo, J = 10, 2000, 6
    full, loo, _, _ = synthetic_gold(K, n_loo, J, [0.0, 0.05], seed=1)
    nc = noise_ceiling(full, loo, adjust="full")
    half_a = (loo[:5] - full[:5, None]).mean(0)[:, 1]
    half_b = (loo[5:] - full[5:, None]).mean(0)[:, 1]
    r = (half_a * half_b).sum(0) / np.linalg.norm(half_a, axis=0) / np.linalg.norm(half_b, axis=0)
    np.testing.assert_allclose(nc.ceiling[1], np.sqrt(2 * r / (1 + r)), atol=0.02)


def test_eq13_removes_noise_common_to_the_left_out_set():
    """A seed shift shared by every left-out run (the full run's own noise, in eq. 17) lowers
    the eq. 17 ceiling and leaves eq. 13's: the mean-adjusted signal a - mean(a) against noise
    of n' - 1 dimensions."""
    K, n_loo, J = 8, 1500, 8
    full, loo, a, _ = synthetic_gold(K, n_loo, J, [0.0, 0.03], seed=2, offset=0.2)
    ac = a[:, 1] - a[:, 1].mean(0)
    sq = (ac ** 2).sum(0)
    expected13 = np.sqrt(sq / (sq + (n_loo - 1) * 0.03 ** 2 / K))
    nc13 = noise_ceiling(full, loo, adjust="mean")
    nc17 = noise_ceiling(full, loo, adjust="full")
    np.testing.assert_allclose(nc13.ceiling[1], expected13, atol=0.03)
    # eq. 17 keeps the shift: noise of rank one, so its estimate scatters (module docstring:
    # the estimator assumes noise spread over many directions); on average far lower
    assert nc17.ceiling[1].mean() < nc13.ceiling[1].mean() - 0.3


def test_a_methods_fraction_of_the_ceiling():
    """The exact answer scores about its ceiling (fraction ~ 1); an unrelated method ~ 0; a
    method halfway to the exact answer (cos 0.6 to it) ~ 0.6."""
    K, n_loo, J = 8, 1500, 10
    full, loo, a, _ = synthetic_gold(K, n_loo, J, [0.0, 0.08], seed=3)
    result = GoldResult(full, loo, np.zeros((K, 2)), np.zeros((K, n_loo, 2)), np.arange(2),
                        "epoch", np.arange(1, K + 1), np.arange(n_loo), np.arange(J), {})
    nc = gold_noise_ceiling(result, adjust="full")
    assert list(nc.eval_points) == [0, 1] and nc.n_seeds == K
    g = gold_scores(full, loo, adjust="full")
    exact = a[:, 1].T                                                   # (J, n')
    rng = np.random.default_rng(4)
    other = rng.normal(size=exact.shape)
    other -= (other * exact).sum(1, keepdims=True) * exact              # orthogonal to a
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    mixed = 0.6 * exact + 0.8 * other                                   # cos 0.6 to a
    assert nc.fraction(metrics.cosine(g, exact))[1] == pytest.approx(1.0, abs=0.04)
    assert nc.fraction(metrics.cosine(g, other))[1] == pytest.approx(0.0, abs=0.05)
    assert nc.fraction(metrics.cosine(g, mixed))[1] == pytest.approx(0.6, abs=0.05)
    assert np.isnan(nc.fraction(metrics.cosine(g, exact))[0])


def test_bad_input():
    full, loo, _, _ = synthetic_gold(3, 10, 2, [0.0, 0.1])
    with pytest.raises(ValueError, match="at least 2"):
        noise_ceiling(full[:1], loo[:1])
    with pytest.raises(ValueError, match="2 left-out runs"):
        noise_ceiling(full, loo[:, :1])
    with pytest.raises(ValueError, match="must be \\(S, n', T, J\\)"):
        noise_ceiling(full, loo[0])
    nc = noise_ceiling(full, loo)
    with pytest.raises(ValueError, match="cosines must be"):
        nc.fraction(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        nc.seeds_for(1.0)


def test_on_the_engines_gold():
    """A real further training: at t = 0 every run is theta^f (the eq. 13 mean leaves only
    rounding residues, identical in every seed): no ceiling there; elsewhere one in [0, 1]."""
    from small_models import regression_problem
    model, X, y, Xt, yt = regression_problem(n=30)
    cfg = GoldConfig(epochs=2, batch_size=8, seeds=3, lr=0.05, mechanism="remove",
                     progress=False)
    res = further_train(model, "regression", X, y, Xt, yt, [0, 3, 7, 11, 19, 25], cfg)
    for adjust in ("mean", "full"):
        nc = gold_noise_ceiling(res, adjust)
        assert np.isnan(nc.ceiling[0]).all() and np.isnan(nc.snr[0]).all()
        assert np.all((nc.ceiling[1:] >= 0) & (nc.ceiling[1:] <= 1))


def test_seeds_needed_against_hand_computed_cases():
    """k = K t^2 (1 - c^2) / ((1 - t^2) c^2). By hand: c = 0.6 with K = 10 seeds, target 0.9:
    10 x 0.81 x 0.64 / (0.19 x 0.36) = 5.184 / 0.0684 = 75.789...; c = 0.5 with K = 2, target
    0.8: 2 x 0.64 x 0.75 / (0.36 x 0.25) = 0.96 / 0.09 = 10.667."""
    assert seeds_needed(0.6, 10, 0.9) == pytest.approx(5.184 / 0.0684, rel=1e-12)
    assert seeds_needed(0.5, 2, 0.8) == pytest.approx(0.96 / 0.09, rel=1e-12)
    # a ceiling already at the target needs the seeds it has; arrays broadcast
    np.testing.assert_allclose(seeds_needed(np.array([0.9, 0.6]), np.array([4, 10]), 0.9),
                               [4.0, 5.184 / 0.0684], rtol=1e-12)
    out = seeds_needed(np.array([1.0, 0.0, np.nan]), 3, 0.9)
    assert out[0] == 0 and out[1] == np.inf and np.isnan(out[2])
    for bad, match in (((0.5, 2, 1.0), "in \\(0, 1\\)"), ((0.5, 0, 0.9), ">= 1"),
                       ((1.2, 2, 0.9), "lies in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=match):
            seeds_needed(*bad)


def test_seeds_needed_from_a_ceiling_reaches_the_target_on_synthetic_gold():
    """From the 8-seed ceiling of synthetic gold, seeds_needed predicts the seeds for 0.9;
    the known ceiling of that many seeds, 1 / sqrt(1 + n' sigma^2 / k), is then 0.9."""
    K, n_loo, J, sigma = 8, 1500, 12, 0.04
    full, loo, _, expected = synthetic_gold(K, n_loo, J, [0.0, sigma], seed=5)
    nc = noise_ceiling(full, loo, adjust="full")
    k = seeds_needed(nc.mean()[0][1], K, 0.9)
    assert 1 / np.sqrt(1 + n_loo * sigma ** 2 / k) == pytest.approx(0.9, abs=0.01)
    table = nc.table(targets=(0.9,))
    assert list(table.index) == [0, 1] and table.loc[1, "seeds for 0.9"] == np.ceil(k)
    assert table.loc[1, "ceiling"] == pytest.approx(expected[1], abs=0.01)
    assert np.isnan(table.loc[0, "ceiling"])
    later = nc.select(slice(1, None))
    assert list(later.eval_points) == [1] and later.ceiling.shape == (1, J)
    np.testing.assert_array_equal(later.ceiling[0], nc.ceiling[1])


def test_evaluation_ceiling_is_the_ceiling_at_the_evaluated_points():
    """Notebook 04's ceiling: the stored gold arrays' ceiling with t = 0 (theta^f) dropped as
    evaluation_gold drops it, for the equation asked; none for one seed or one left-out run."""
    from fimoda.paper import experiment as ex
    K, n_loo, J = 4, 300, 5
    full, loo, _, _ = synthetic_gold(K, n_loo, J, [0.0, 0.02, 0.05], seed=6, offset=0.1)
    gold = {"loss_full": full, "loss_loo": loo, "eval_points": np.array([0, 3, 6])}
    for adjust in ("mean", "full"):
        nc = ex.evaluation_ceiling(gold, adjust)
        ref = noise_ceiling(full, loo, adjust)
        assert list(nc.eval_points) == list(ex.evaluation_gold(gold, adjust)[1]) == [3, 6]
        np.testing.assert_array_equal(nc.ceiling, ref.ceiling[1:])
    assert ex.evaluation_ceiling({**gold, "loss_full": full[:1], "loss_loo": loo[:1]}) is None
    assert ex.evaluation_ceiling({**gold, "loss_loo": loo[:, :1]}) is None


def test_peak_for_seeds_is_the_known_ceiling_of_k_seeds_at_the_best_point():
    """The seeds figure's band: for k seeds, the ceiling of a k-seed gold where it is highest;
    on synthetic gold the least noisy point t = 1, 1 / sqrt(1 + n' sigma_1^2 / k); at k = K the
    estimate itself."""
    K, n_loo, J = 8, 1500, 12
    sigmas = [0.0, 0.01, 0.04, 0.15]
    full, loo, _, _ = synthetic_gold(K, n_loo, J, sigmas)
    nc = noise_ceiling(full, loo, adjust="full")
    peak = nc.peak_for_seeds([1, 2, 8])
    assert list(peak.eval_points) == [1, 2, 8] and peak.ceiling.shape == (3, J)
    known = [1 / np.sqrt(1 + n_loo * sigmas[1] ** 2 / k) for k in (1, 2, 8)]
    np.testing.assert_allclose(peak.mean()[0], known, atol=0.02)
    np.testing.assert_allclose(peak.ceiling[2], nc.ceiling[1], atol=1e-12)


def test_mean_is_over_the_test_points_that_have_a_ceiling():
    """A test point whose runs never moved (float32 SST-2 at lr 1e-6) has no ceiling: the mean
    and SE are over the others, by hand; NaN where no test point has one."""
    from fimoda.yardsticks import NoiseCeiling
    c = np.array([[np.nan, np.nan], [0.5, np.nan], [0.2, 0.4]])
    mean, se = NoiseCeiling(c, c, 2, np.arange(3)).mean()
    np.testing.assert_allclose(mean, [np.nan, 0.5, 0.3], atol=1e-15)
    np.testing.assert_allclose(se, [np.nan, 0.0, 0.1], atol=1e-15)   # |0.2 - 0.4| / 2
