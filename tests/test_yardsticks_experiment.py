"""Notebook 08's pieces on synthetic further-training losses with known answers: group leave-out
against the sum of single leave-outs (fimoda.yardsticks.additivity, loops and hand-computed
values as references), its settings, and the tables built from stored runs."""
import dataclasses

import numpy as np
import pytest

from fimoda.settings import YardstickConfig
from fimoda.paper.config import yardstick_config, yardstick_reductions, get_config
from fimoda.data.specs import Overrides
from fimoda.paper.experiment import yardsticks as yx
from fimoda.yardsticks import (additive_estimate, additivity_error, group_score, membership,
                               paired_cosine)

POS = np.array([[0, 2, -1], [1, 3, 4], [4, -1, -1]])


def test_membership_and_sums_against_loops():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3, 4))
    M = membership(POS, 5)
    assert M.tolist() == [[1, 0, 1, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 1]]
    want = np.stack([sum(a[i] for i in row if i >= 0) for row in POS])
    np.testing.assert_allclose(additive_estimate(a, POS), want, rtol=0, atol=1e-15)
    s = rng.normal(size=(4, 5))
    want = np.array([[sum(s[j, i] for i in row if i >= 0) for row in POS] for j in range(4)])
    np.testing.assert_allclose(group_score(s, POS), want, rtol=0, atol=1e-15)
    for bad, match in [(np.array([[0, 0]]), "repeats"), (np.array([[-1, -1]]), "empty"),
                       (np.array([[0, 5]]), r"\[0, 5\)"), (np.array([0, 1]), "2-D")]:
        with pytest.raises(ValueError, match=match):
            membership(bad, 5)


def test_additivity_error_by_hand():
    """g = 2 x (sum): relative error 1/2... of |g| and cosine 1; g orthogonal to the sum:
    1 - cos = 1; g = 0 (theta^f itself): undefined."""
    s = np.array([[[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]]])                  # (1 group, 3 t, 2 test)
    g = np.array([[[6.0, 8.0], [0.0, 2.0], [0.0, 0.0]]])
    e = additivity_error(g, s)
    assert e["rel_l2"][0, 0] == pytest.approx(0.5) and e["one_minus_cos"][0, 0] == pytest.approx(0)
    assert e["rel_l2"][0, 1] == pytest.approx(np.sqrt(5) / 2)
    assert e["one_minus_cos"][0, 1] == pytest.approx(1.0)
    assert np.isnan(e["rel_l2"][0, 2]) and np.isnan(e["one_minus_cos"][0, 2])
    with pytest.raises(ValueError, match="both be"):
        additivity_error(g, s[:, :2])


def test_paired_cosine_against_a_loop():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 3, 4)), rng.normal(size=(6, 3, 4))
    want = np.array([[a[:, t, j] @ b[:, t, j] / np.linalg.norm(a[:, t, j])
                      / np.linalg.norm(b[:, t, j]) for j in range(4)] for t in range(3)])
    np.testing.assert_allclose(paired_cosine(a, b), want, rtol=0, atol=1e-14)


def test_settings_validate_and_reductions_name_each_change():
    assert YardstickConfig(group_sizes=(5, 1)).group_sizes == (1, 5)
    for bad, match in [(dict(group_sizes=(1, 1)), "distinct"), (dict(groups_per_size=1), ">= 2"),
                       (dict(lds_subsets=2), ">= 3"), (dict(lds_alpha=1.0), r"\(0, 1\)"),
                       (dict(retrain_epochs=0), ">= 1"), (dict(group_seeds=True), ">= 1"),
                       (dict(lora_ranks=(8, 8)), "lora_ranks must be distinct"),
                       (dict(lora_ranks=()), "lora_ranks"), (dict(lora_seeds=0), ">= 1")]:
        with pytest.raises(ValueError, match=match):
            YardstickConfig(**bad)
    with pytest.raises(ValueError, match="yardsticks overrides"):
        Overrides(yardsticks=dict(groups=3)).check("spec")
    assert yardstick_reductions(yardstick_config("concrete", "paper"), "paper") == []
    cpu = yardstick_config("concrete", "cpu")
    assert "lds_subsets: 50 -> 16" in yardstick_reductions(cpu, "cpu")
    # SST-2's LoRA gold over one of the gold's two seeds in the cpu profile, all in paper
    assert yardstick_config("sst2", "cpu").lora_seeds == 1
    assert yardstick_config("sst2", "paper").lora_seeds is None
    cfg = get_config("concrete", "cpu")
    y = yx.settings(cfg)
    assert y.group_seeds == 2 and yx.settings(cfg, n_gold_seeds=1).group_seeds == 1
    red = yx.reductions(cfg, y, n_loo=100)
    assert "retrain_epochs: the final model's 1000 -> 200" in red
    assert "group runs: the first 2 of the gold standard's 4 seeds" in red
    assert any("dropped" in r for r in yx.reductions(cfg, y, n_loo=20))   # 20 and 50 of 20


def test_draw_groups_caps_sizes_and_repeats_with_the_seed():
    y = YardstickConfig(group_sizes=(1, 2, 5, 8), groups_per_size=4, draw_seed=3)
    g = yx.draw_groups(8, y)
    assert sorted(g) == [1, 2, 5]                     # a group of all 8 would leave none of L in
    assert g[1].shape == (4, 1) and len(set(g[1][:, 0])) == 4
    assert all(len(set(r)) == k and list(r) == sorted(r) for k, p in g.items() for r in p)
    assert all(np.array_equal(g[k], yx.draw_groups(8, y)[k]) for k in g)
    assert yx.draw_groups(3, dataclasses.replace(y, groups_per_size=5))[1].shape == (3, 1)


def _synthetic(additive=True, seed=0):
    """Notebook 02's gold (3 seeds) and group runs (its first 2 seeds) over |L| = 6 left-out
    instances, 4 evaluation points (t = 0: theta^f), 5 test points: run i of seed s has test
    loss full_s + t delta_i (plus, unless ``additive``, a pairwise interaction)."""
    rng = np.random.default_rng(seed)
    T, J, n = 4, 5, 6
    t = np.arange(T)[:, None]
    full = np.repeat(rng.normal(size=(3, 1, J)), T, axis=1)
    delta = rng.normal(size=(n, 1, J))
    loo = full[:, None] + t[None, None] * delta[None]
    gold = {"loss_full": full, "loss_loo": loo, "seeds": np.array([1, 2, 3]),
            "eval_points": np.arange(T), "loo_indices": np.arange(10, 16)}
    pos = yx.draw_groups(n, YardstickConfig(group_sizes=(1, 2, 3), groups_per_size=3))
    positions, sizes = yx._padded(pos)
    runs = []
    for row in positions:
        m = row[row >= 0]
        extra = 0.0 if additive or len(m) < 2 else 0.3 * t * delta[m[0]] * len(m)
        runs.append(full[:2] + t * delta[m].sum(0) + extra)
    groups = {"loss_full": full[:2], "loss_loo": np.stack(runs, axis=1), "seeds": np.array([1, 2]),
              "eval_points": np.arange(T), "positions": positions, "sizes": sizes}
    return gold, groups, delta


def test_additive_runs_have_zero_additivity_error_and_the_size_one_check_holds():
    gold, groups, _ = _synthetic()
    chk = yx.size_one_check(gold, groups)
    assert chk == {"runs": 3, "seeds": 2, "loss": 0.0, "full run": 0.0, "score (relative)": 0.0}
    t, add = yx.additivity_table(gold, groups)
    assert list(t) == [1, 2, 3] and sorted(add) == [1, 2, 3]
    for k, v in add.items():
        assert np.abs(v["rel_l2"][0]).max() < 1e-12 and np.abs(v["one_minus_cos"][0]).max() < 1e-12
    gold_wrong = dict(gold, seeds=np.array([2, 1, 3]))
    with pytest.raises(ValueError, match="first seeds"):
        yx.size_one_check(gold_wrong, groups)


def test_an_interaction_shows_as_additivity_error_growing_with_the_size():
    gold, groups, _ = _synthetic(additive=False)
    t, add = yx.additivity_table(gold, groups)
    assert np.abs(add[1]["rel_l2"][0]).max() < 1e-12
    assert add[2]["rel_l2"][0][-1] > 0.05 and add[3]["rel_l2"][0][-1] > add[2]["rel_l2"][0][-1] / 2


def test_group_cosines_against_a_loop():
    """Per size and test point, the cosine over that size's groups between the group gold
    centred over those groups (eq. 13's form) and each summed score -- a method's, and the
    leave-one-out gold's (eq. 13, the group runs' seeds) -- at the last evaluation point, mean
    and SE over test points: against loops over groups, seeds and test points."""
    gold, groups, delta = _synthetic(additive=False, seed=4)
    rng = np.random.default_rng(5)
    s = rng.normal(size=(5, 6))
    mean, se = yx.group_cosine_table(gold, groups, {"grad_dot": s})
    assert list(mean.columns) == [1, 2, 3] and set(mean.index) == {yx.GOLD, "Grad-Dot"}
    a13 = np.mean([gold["loss_loo"][q, :, -1] - gold["loss_loo"][q, :, -1].mean(0)
                   for q in range(2)], axis=0)                              # (|L|, J)
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    for k in (1, 2, 3):
        rows = np.flatnonzero(groups["sizes"] == k)
        members = [groups["positions"][r][:k] for r in rows]
        runs = groups["loss_loo"][:, rows, -1]                              # (S, g, J)
        g = (runs - runs.mean(1, keepdims=True)).mean(0)                    # (g, J)
        for name, pred in (("Grad-Dot", lambda j: [s[j, m].sum() for m in members]),
                           (yx.GOLD, lambda j: [a13[m, j].sum() for m in members])):
            per = [cos(g[:, j], np.array(pred(j))) for j in range(5)]
            assert mean.loc[name, k] == pytest.approx(np.mean(per), abs=1e-12)
            assert se.loc[name, k] == pytest.approx(np.std(per, ddof=1) / np.sqrt(5), abs=1e-12)
