"""The paper's Figure 10 (sorted, test-averaged scores) and Figure 2's panel grid (summary)."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from fimoda import experiment as ex
from fimoda import plots
from fimoda.config import get_config
from fimoda.gold import GoldResult, save_gold
from fimoda import store
from fimoda.experiment.gold_runs import gold_reader_inputs
from fimoda.experiment.methods import scores_reader_inputs
from fimoda.experiment.records import config_without
from fimoda.io import results_dir, save_npz

# Two test instances (rows) x three left-out instances. Each row sorted on its own:
#   [-1, 2, 3] / 3 = [-1/3, 2/3, 1]      [-2, 0, 4] / 4 = [-1/2, 0, 1]
# mean = [-5/12, 1/3, 1]; se of two values = |x1 - x2| / 2 = [1/12, 1/3, 0].
# (Sorting each column, or the whole array, or normalising after averaging gives other numbers.)
TINY = np.array([[3.0, -1.0, 2.0],
                 [0.0, 4.0, -2.0]])
TINY_MEAN = np.array([-5 / 12, 1 / 3, 1.0])
TINY_SE = np.array([1 / 12, 1 / 3, 0.0])


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_sorted_average_matches_hand_computed_example():
    mean, se = plots.sorted_average(TINY)
    np.testing.assert_allclose(mean, TINY_MEAN, rtol=0, atol=1e-12)
    np.testing.assert_allclose(se, TINY_SE, rtol=0, atol=1e-12)


def test_sorted_average_other_normalisations_and_zero_rows():
    mean, se = plots.sorted_average(TINY, normalize="none")
    np.testing.assert_allclose(mean, [-1.5, 1.0, 3.5], atol=1e-12)      # [-1,2,3], [-2,0,4]
    np.testing.assert_allclose(se, [0.5, 1.0, 0.5], atol=1e-12)         # |x1 - x2| / 2
    mean, _ = plots.sorted_average(TINY, normalize="l2")
    n1, n2 = np.sqrt(14.0), np.sqrt(20.0)
    np.testing.assert_allclose(mean, [(-1 / n1 - 2 / n2) / 2, (2 / n1) / 2, (3 / n1 + 4 / n2) / 2],
                               atol=1e-12)
    mean, se = plots.sorted_average(np.array([[0.0, 0.0], [1.0, -1.0]]))
    np.testing.assert_allclose(mean, [-0.5, 0.5])        # the zero row stays zero, no NaN
    mean, se = plots.sorted_average(TINY[:1])             # one test instance: se 0
    np.testing.assert_allclose(mean, [-1 / 3, 2 / 3, 1.0])
    np.testing.assert_array_equal(se, 0.0)
    with pytest.raises(ValueError, match="normalize"):
        plots.sorted_average(TINY, normalize="max")
    with pytest.raises(ValueError, match="NaN"):
        plots.sorted_average(np.array([[1.0, np.nan]]))


def test_sorted_scores_curves_take_gold_per_eval_point_and_transpose():
    # gold a[i, t, j]: left-out 3 x eval points 2 x test 2; at t = 1 it is TINY transposed,
    # at t = 0 all ones (sorted and normalised: ones).
    gold = np.ones((3, 2, 2))
    gold[:, 1, :] = TINY.T
    cur = plots.sorted_scores_curves(gold, {"grad_dot": TINY, "grad_cos": -TINY}, [0, 1])
    assert list(cur) == [0, 1] and list(cur[1]) == ["gold", "grad_dot", "grad_cos"]
    np.testing.assert_allclose(cur[1]["gold"][0], TINY_MEAN, atol=1e-12)
    np.testing.assert_allclose(cur[0]["gold"][0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(cur[0]["grad_dot"][0], TINY_MEAN, atol=1e-12)
    # -TINY sorted: [-3,-2,1]/3 and [-4,0,2]/4 -> mean [-1, -1/3, 5/12]
    np.testing.assert_allclose(cur[1]["grad_cos"][0], [-1.0, -1 / 3, 5 / 12], atol=1e-12)
    with pytest.raises(ValueError, match="test, left-out"):
        plots.sorted_scores_curves(gold, {"grad_dot": TINY.T}, [0])
    assert plots.fig10_eval_indices(1) == [0] and plots.fig10_eval_indices(5) == [0, 4]


def test_sorted_scores_figure_has_two_panels_and_saves_png_and_pdf(tmp_path):
    rng = np.random.default_rng(0)
    gold = rng.normal(size=(7, 4, 5))
    scores = {"grad_dot": rng.normal(size=(5, 7)), "grad_cos": rng.normal(size=(5, 7))}
    fig = plots.sorted_scores_figure(gold, [1, 2, 3, 4], scores, unit="step")
    axes = fig.axes
    assert len(axes) == 2
    assert [ax.get_title() for ax in axes] == ["after 1 step of further training",
                                               "after 4 steps of further training"]
    # gold, Grad-Dot, Grad-Cos in each panel, drawn over the 7 sorted positions
    assert [len(ax.get_lines()) for ax in axes] == [4, 4]        # + the y = 0 line
    expect = plots.sorted_scores_curves(gold, scores, [3])[3]["gold"][0]
    np.testing.assert_allclose(axes[1].get_lines()[0].get_ydata(), expect)
    path = plots.savefig(fig, tmp_path / "x_fig10_sorted_scores.png", pdf=True)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert path.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_fig10_sorted_scores.pdf",
                                                          "x_fig10_sorted_scores.png"]


# ----------------------------------------------------------------------------- Figure 2 grid
def fake_results(profile, dataset, perfect=False, seed=0, n=5, T=4, J=3, defaults=False,
                 gold=None):
    """Gold (as run_gold writes it, through save_gold) and Grad-Dot/Grad-Cos score files; with
    ``perfect`` Grad-Dot equals the eq. (13) gold scores at the last eval point (cosine 1). The
    gold's (optimizer, mechanism): ``gold``, else the dataset's with ``defaults``, else
    (sgd, subtract)."""
    rng = np.random.default_rng(seed)
    cfg = get_config(dataset, profile)
    d = results_dir(profile, dataset)
    S = 2
    loss_loo = rng.normal(size=(S, n, T, J))
    loss_loo[:, :, 0] = 1.0                       # t = 0: every run is theta^f
    res = GoldResult(loss_full=np.ones((S, T, J)), loss_loo=loss_loo,
                     param_dist=np.zeros((S, T)), param_dist_loo=np.zeros((S, n, T)),
                     eval_points=np.arange(T), eval_unit="epoch", seeds=np.arange(S),
                     loo_indices=np.arange(n), test_indices=np.arange(J),
                     config=dict(zip(("optimizer", "mechanism"),
                                     gold or (ex.gold_settings(cfg) if defaults
                                              else ("sgd", "subtract")))))
    record = {"gold": res.config, "experiment": config_without(cfg, "methods")}   # as run_gold's
    gp = save_gold(d, res, {"record": record, "loo_indices": np.arange(n), "test_indices": np.arange(J)})
    store.write_record(gp, gold_reader_inputs(cfg, *res.config.values(), d),
                       files=[gp.with_suffix(".json")])
    a, _ = ex.evaluation_gold(ex.load_gold(cfg, *res.config.values()))
    dot = a[:, -1, :].T.copy() if perfect else rng.normal(size=(J, n))
    for m, s in (("grad_dot", dot), ("grad_cos", rng.normal(size=(J, n)))):
        store.write_record(save_npz(d / f"scores_{m}.npz", scores=s, loo_indices=np.arange(n),
                                    test_indices=np.arange(J)), scores_reader_inputs(cfg, m, d))
    return cfg


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("FIMODA_RESULTS_DIR", str(tmp_path / "results"))
    return tmp_path / "results"


def test_summary_panels_follow_paper_order_with_letters_and_units(results):
    for k, ds in enumerate(("sst2", "fashion_mnist", "concrete", "fico")):
        fake_results("smoke", ds, perfect=ds == "fico", seed=k)
    # given out of order, energy has no results
    fig, table = ex.summary("smoke", ["sst2", "energy", "fashion_mnist", "concrete", "fico"],
                            optimizer="sgd", mechanism="subtract",
                            methods=["grad_dot", "grad_cos"])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        f"{t}\n(sgd, subtract)" for t in ("(a) concrete", "(b) fico",
                                          "(c) fashion_mnist (stand-in for cifar10)", "(d) sst2")]
    assert [ax.get_xlabel() for ax in axes] == [
        "further training (epochs)", "further training (epochs)",
        "further training (steps)", "further training (steps)"]
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in axes} == {(2, 2)}
    # one legend for the figure, none in the panels
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Grad-Dot", "Grad-Cos"]
    assert list(table.columns) == ["concrete", "fico", "fashion_mnist (stand-in for cifar10)",
                                   "sst2"]
    # each panel shows its own dataset's results: only fico's Grad-Dot is the gold itself
    assert table.loc["Grad-Dot", "fico"] == pytest.approx(1.0)
    assert table.loc["Grad-Dot"].drop("fico").max() < 0.99


def test_summary_six_datasets_give_six_panels_in_two_rows_of_three(results):
    six = ["sst2", "adult", "cifar10", "energy", "fico", "concrete"]
    for k, ds in enumerate(six):
        fake_results("smoke", ds, seed=k, defaults=True)
    # each dataset's own gold standard: remove for tabular, subtract for images and text
    fig, table = ex.summary("smoke", six, methods=["grad_dot", "grad_cos"])
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes] == [
        "(a) concrete\n(sgd, remove)", "(b) energy\n(sgd, remove)", "(c) fico\n(sgd, remove)",
        "(d) adult (stand-in for folktables)\n(sgd, remove)", "(e) cifar10\n(sgd, subtract)",
        "(f) sst2\n(adamw, subtract)"]
    assert [ax.get_subplotspec().get_geometry() for ax in axes] == [
        (2, 3, k, k) for k in range(6)]
    assert ["steps" in ax.get_xlabel() for ax in axes] == [False] * 4 + [True] * 2
    assert table.shape == (2, 6)


def test_adam_figure_is_figure4_over_the_datasets_with_an_adam_gold(results, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("FIMODA_FIGURES_DIR", str(tmp_path / "figures"))
    fake_results("smoke", "energy", defaults=True)           # SGD only
    assert ex.adam_figure("smoke", ["energy"]) == (
        None, "no Adam gold standard in this run (notebook 02 with optimizer='adam')")
    fake_results("smoke", "concrete", perfect=True, gold=("adam", "remove"))
    path, table = ex.adam_figure("smoke", ["energy", "concrete"])
    assert path == tmp_path / "figures" / "smoke" / "figure2_adam.png" and path.exists()
    assert (path.parent / "max_cosine_adam.csv").exists()
    assert list(table.columns) == ["concrete"]               # energy has no Adam panel
    assert table.loc["Grad-Dot", "concrete"] == pytest.approx(1.0)
    # a gold standard chosen for every panel: Figure 2 is drawn with it, no Adam grid beside it
    assert ex.adam_figure("smoke", ["concrete"], "adam") == (
        None, "no separate Adam grid: Figure 2 above already uses the gold standard chosen for "
              "every panel (adam)")


def test_fig2_order_and_grid_shape():
    assert plots.fig2_order(["sst2", "adult", "concrete", "folktables", "sst2"]) == [
        "concrete", "folktables", "adult", "sst2"]
    assert [plots.grid_shape(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [
        (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 3), (3, 3)]
