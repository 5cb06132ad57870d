"""The paper's Figure 10 (sorted, test-averaged scores) and Figure 2's panel grid (summary)."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from fimoda.paper import experiment as ex
from fimoda.paper import plots
from fimoda.paper.config import get_config
from fimoda.gold import GoldResult, save_gold
from fimoda import store
from fimoda.paper.experiment.gold_runs import gold_reader_inputs
from fimoda.paper.experiment.methods import scores_reader_inputs
from fimoda.paper.experiment.records import config_without
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
                 gold=None, extra=()):
    """Gold (as run_gold writes it, through save_gold) and Grad-Dot/Grad-Cos score files (and
    random scores of the methods in ``extra``); with ``perfect`` Grad-Dot equals the eq. (13)
    gold scores at the last eval point (cosine 1). The gold's (optimizer, mechanism): ``gold``,
    else the dataset's with ``defaults``, else (sgd, subtract)."""
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
    for m, s in (("grad_dot", dot), ("grad_cos", rng.normal(size=(J, n))),
                 *((m, rng.normal(size=(J, n))) for m in extra)):
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
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "Grad-Dot", "Grad-Cos", "noise ceiling of the gold (2 seeds)"]
    assert list(table.columns) == ["concrete", "fico", "fashion_mnist (stand-in for cifar10)",
                                   "sst2"]
    # each panel's ceiling band is its own gold standard's, at the panel's evaluation points
    for ax, ds in zip(axes, ("concrete", "fico", "fashion_mnist", "sst2")):
        gold = ex.load_gold(get_config(ds, "smoke"), "sgd", "subtract")
        nc = ex.evaluation_ceiling(gold)
        (line,), (band,) = ceiling_artists(ax)
        np.testing.assert_array_equal(line.get_xdata(), ex.evaluation_gold(gold)[1])
        np.testing.assert_allclose(line.get_ydata(), nc.mean()[0], rtol=0, atol=1e-12)
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


# ----------------------------------------------------------------------------- one look
def drawn_looks(ax) -> dict:
    """{legend label: (colour, line style, marker)} of the labelled curves of ``ax``, read back
    from its Line2D objects (matplotlib's names: '-', '--', '-.', ':' and marker codes)."""
    from matplotlib.colors import to_hex
    lines = [(ln.get_label(), ln) for ln in ax.get_lines()]
    lines += [(c.get_label(), c.lines[0]) for c in ax.containers]     # errorbar: the data line
    return {lab: (to_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker())
            for lab, ln in lines if not lab.startswith("_")}


# The thirteen methods as the paper's table names them, with hand-written legend labels
PAPER_LABELS = {"grad_dot": "Grad-Dot", "grad_cos": "Grad-Cos", "cg": "CG", "lissa": "LiSSA",
                "lissa_h": "LiSSA-H", "trak": "TRAK (M=1)", "ekfac": "EK-FAC",
                "datainf": "DataInf", "arnoldi": "Arnoldi", "prop1": "Prop. 1", "cor2": "Cor. 2",
                "eq16": "Eq. (16)", "dense": "Dense IF"}


def test_every_method_has_its_own_colour_and_line_style_marker_pair():
    from matplotlib.colors import to_hex
    assert set(plots.METHOD_KEYS) == set(PAPER_LABELS)
    assert {m: plots.method_style(m)["label"] for m in PAPER_LABELS} == PAPER_LABELS
    everything = plots.STYLE_KEYS          # gold, 13 methods, notebook 07's trajectory curves
    assert len(everything) >= 14 + 12
    pairs = [(plots.method_style(m)["linestyle"], plots.method_style(m)["marker"])
             for m in everything]
    assert len(set(pairs)) == len(pairs), pairs          # greyscale print separates them
    colours = [to_hex(plots.method_style(m)["color"]) for m in plots.METHOD_KEYS]
    assert len(set(colours)) == 13
    labels = [plots.method_style(m)["label"] for m in everything]
    assert len(set(labels)) == len(labels)
    with pytest.raises(ValueError, match="no look for 'grad_dott'"):
        plots.method_style("grad_dott")


def test_damping_variants_keep_the_marker_and_darken_with_smaller_damping():
    from matplotlib.colors import to_rgb
    base = plots.method_style("dense")
    looks = [plots.method_style(plots.damping_label("dense", g)) for g in (0.1, 1.0, 10.0, 100.0)]
    assert [lk["label"] for lk in looks] == [f"Dense IF, λ = λ_G × {g}" for g in
                                             ("0.1", "1", "10", "100")]
    assert all((lk["marker"], lk["linestyle"]) == (base["marker"], base["linestyle"])
               for lk in looks)
    grey = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in (to_rgb(lk["color"]) for lk in looks)]
    assert all(b - a > 0.05 for a, b in zip(grey, grey[1:])), grey    # apart in greyscale too
    # notebook 04 builds the same keys by hand
    assert plots.damping_label("cg", 10.0) == f"{plots.label('cg')}, λ = λ_G × {10.0:g}"


def curve_results(methods, T=6, seed=0):
    rng = np.random.default_rng(seed)
    return {m: (rng.uniform(-1, 1, T), np.full(T, 0.05)) for m in methods}


def test_single_panel_figures_draw_a_method_alike_whichever_others_they_draw():
    full = plots.cosine_figure(np.arange(6), curve_results(plots.METHOD_KEYS), "all")
    # a dataset that skips methods, given in another order
    few = ["datainf", "trak", "grad_dot", "lissa"]
    part = plots.cosine_figure(np.arange(6), curve_results(few), "some")
    seeds = plots.seeds_figure([1, 2, 4], {m: (np.ones(3), np.zeros(3)) for m in few}, "seeds")
    looks_full = drawn_looks(full.axes[0])
    assert len(looks_full) == 13
    for fig in (part, seeds):
        looks = drawn_looks(fig.axes[0])
        assert set(looks) == {PAPER_LABELS[m] for m in few}
        assert all(looks[k] == looks_full[k] for k in looks), fig
        # the legend: the fixed order (Grad-Dot, DataInf, TRAK, LiSSA), each handle in its look
        leg = fig.axes[0].get_legend()
        assert [t.get_text() for t in leg.get_texts()] == ["Grad-Dot", "DataInf", "TRAK (M=1)",
                                                           "LiSSA"]
    from matplotlib.colors import to_hex
    leg = part.axes[0].get_legend()
    assert [(to_hex(h.get_color()), h.get_linestyle(), h.get_marker())
            for h in leg.legend_handles] == [looks_full[t.get_text()] for t in leg.get_texts()]


def test_grid_with_a_panel_that_skips_methods_keeps_every_look_and_one_legend(results):
    """As SST-2 skips CG and LiSSA-H: its panel draws DataInf and TRAK in their own colours,
    not in the ones the panels beside it give to the methods it skips."""
    every = ["cg", "lissa", "lissa_h", "trak", "datainf"]
    fake_results("smoke", "concrete", seed=0, extra=every)
    fake_results("smoke", "sst2", seed=1, extra=["lissa", "trak", "datainf"])
    fig, _ = ex.summary("smoke", ["sst2", "concrete"], optimizer="sgd", mechanism="subtract",
                        methods=["grad_dot", "grad_cos"] + every)
    concrete, sst2 = (drawn_looks(ax) for ax in fig.axes)
    assert len(concrete) == 7 and set(sst2) == set(concrete) - {"CG", "LiSSA-H"}
    assert all(sst2[k] == concrete[k] for k in sst2)
    assert all(concrete[PAPER_LABELS[m]][:2] == (plots.method_style(m)["color"],
                                                 plots.method_style(m)["linestyle"])
               for m in ["grad_dot", "grad_cos"] + every)
    (leg,) = fig.legends
    assert [t.get_text() for t in leg.get_texts()] == [
        "Grad-Dot", "Grad-Cos", "DataInf", "TRAK (M=1)", "CG", "LiSSA", "LiSSA-H",
        "noise ceiling of the gold (2 seeds)"]
    from matplotlib.colors import to_hex
    assert [(to_hex(h.get_color()), h.get_linestyle(), h.get_marker())
            for h in leg.legend_handles[:-1]] == [concrete[t.get_text()]
                                                  for t in leg.get_texts()[:-1]]


# ----------------------------------------------------------------------------- noise ceiling
def ceiling_artists(ax):
    """([lines], [bands]) of the noise ceiling drawn on ``ax``, found by their gid."""
    mine = lambda a: str(a.get_gid()).startswith(plots.CEILING_GID + ":")
    return [ln for ln in ax.get_lines() if mine(ln)], [c for c in ax.collections if mine(c)]


def band_limits(band, x):
    """(lower, upper) y of a fill_between band at each of ``x``, read from its path."""
    v = band.get_paths()[0].vertices
    ys = [v[np.isclose(v[:, 0], xi), 1] for xi in x]
    return np.array([y.min() for y in ys]), np.array([y.max() for y in ys])


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_ceiling_band_draws_the_estimators_numbers_beneath_the_curves():
    """The band is the ceiling's mean +- SE over test points, read back from the axes, at the
    curves' evaluation points; on synthetic gold with known noise those are the known ceilings;
    it lies beneath the curves and is the legend's last entry; without a ceiling, nothing."""
    from test_noise_ceiling import synthetic_gold
    from fimoda.yardsticks import noise_ceiling
    K, n_loo, J = 8, 1500, 12
    full, loo, _, expected = synthetic_gold(K, n_loo, J, [0.0, 0.01, 0.04, 0.15])
    t = np.array([2, 4, 6])
    nc = noise_ceiling(full, loo, "full", eval_points=np.array([0, 2, 4, 6])).select(slice(1, None))
    fig = plots.cosine_figure(t, curve_results(["grad_dot", "cg"], T=3), "t", ceiling=nc)
    ax = fig.axes[0]
    (line,), (band,) = ceiling_artists(ax)
    mean, se = nc.mean()
    np.testing.assert_array_equal(line.get_xdata(), t)
    np.testing.assert_allclose(line.get_ydata(), mean, rtol=0, atol=1e-12)
    lo, hi = band_limits(band, t)
    np.testing.assert_allclose(lo, mean - se, atol=1e-12)
    np.testing.assert_allclose(hi, mean + se, atol=1e-12)
    np.testing.assert_allclose(line.get_ydata(), expected[1:], atol=0.05)    # .88, .44 known
    curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert band.get_zorder() < line.get_zorder() < min(ln.get_zorder() for ln in curves)
    assert legend_texts(ax) == ["Grad-Dot", "CG", "noise ceiling of the gold (8 seeds)"]
    one_seed = plots.cosine_figure(t, curve_results(["grad_dot"], T=3), "t", ceiling=None)
    assert ceiling_artists(one_seed.axes[0]) == ([], [])
    assert legend_texts(one_seed.axes[0]) == ["Grad-Dot"]
    with pytest.raises(ValueError, match="evaluation points"):
        plots.cosine_figure(np.arange(5), curve_results(["grad_dot"], T=5), "t", ceiling=nc)
    # the mechanisms figure: each panel its own gold standard's ceiling; notebook 07's figure
    other = noise_ceiling(full[:4], loo[:4], "full").select(slice(1, None))
    res = curve_results(["grad_dot"], T=3)
    fig = plots.mechanisms_figure(t, {"remove": res, "subtract": res}, "m",
                                  ceilings={"remove": nc, "subtract": other})
    for ax, c in zip(fig.axes, (nc, other)):
        np.testing.assert_allclose(ceiling_artists(ax)[0][0].get_ydata(), c.mean()[0])
    assert legend_texts(fig.axes[-1])[-1] == "noise ceiling of the gold (4, 8 seeds)"
    # the seeds figure: the ceiling of a k-seed gold at its best point, at each k
    ks = [1, 2, 4, 8]
    ax = plots.seeds_figure(ks, {"grad_dot": (np.ones(4), np.zeros(4))}, "s", ceiling=nc).axes[0]
    (line,), _ = ceiling_artists(ax)
    np.testing.assert_array_equal(line.get_xdata(), ks)
    np.testing.assert_allclose(line.get_ydata(), nc.peak_for_seeds(ks).mean()[0], atol=1e-12)
    assert legend_texts(ax)[-1] == "noise ceiling of a k-seed gold (from 8 seeds)"
    from fimoda.paper import beyond
    study = {"eval_points": t, "curves": curve_results(["grad_dot", "trajectory"], T=3),
             "ceiling": nc}
    ax = beyond.trajectory_figure(study, "t").axes[0]
    np.testing.assert_allclose(ceiling_artists(ax)[0][0].get_ydata(), mean)
    assert legend_texts(ax)[-1] == "noise ceiling of the gold (8 seeds)"


def test_trajectory_figure_draws_notebook_07_curves_from_the_one_map():
    from fimoda.paper import beyond
    keys = ["grad_dot", "cg", "trajectory", "trajectory_h", "schedule", "trajectory_prop1"]
    study = {"eval_points": np.arange(1, 7), "curves": curve_results(keys)}
    fig = beyond.trajectory_figure(study, "t")
    looks = drawn_looks(fig.axes[0])
    for m in keys:
        st = plots.method_style(m)
        assert looks[st["label"]] == (st["color"], st["linestyle"], st["marker"]), m
    assert looks["trajectory (GN)"][1:] == ("-", "H") and looks["trajectory (true H)"][1:] == \
        ("--", "H")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "Grad-Dot", "CG", "trajectory (GN)", "trajectory (true H)", "CG, λ(t)=1/(ηt) (GN)",
        "trajectory + Prop. 1 term (true H)"]


def test_importing_plots_leaves_the_backend_alone():
    import os
    import subprocess
    import sys
    code = ("import matplotlib; before = matplotlib.get_backend(); import fimoda.paper.plots, "
            "fimoda.paper.experiment, fimoda.paper.beyond; import matplotlib.pyplot as plt; "
            "plt.figure(); print(before, matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "svg"}).stdout.split()
    assert out == ["svg", "svg"]


def test_figures_do_not_change_global_settings_and_savefig_closes(tmp_path):
    import matplotlib
    before = dict(matplotlib.rcParams)
    fig = plots.cosine_figure(np.arange(6), curve_results(["grad_dot"]), "t")
    assert fig.axes[0].get_title() == "t"
    assert dict(matplotlib.rcParams) == before
    assert plt.fignum_exists(fig.number)
    plots.savefig(fig, tmp_path / "x.png", pdf=False)
    assert not plt.fignum_exists(fig.number)       # no figure leak in long batch runs
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_savefig_in_a_kernel_shows_each_saved_figure_exactly_once(tmp_path):
    """A tiny notebook run by nbclient in an IPython kernel with the inline backend: every saved
    figure is one image output of its cell, carrying its file name; no second copy at the end
    of the cell, nothing from a cell that saves nothing."""
    import nbclient
    import nbformat
    cells = [f"import matplotlib, numpy as np\nfrom pathlib import Path\n"
             f"from fimoda.paper import plots\n"
             f"out = Path({str(tmp_path)!r})\nprint(matplotlib.get_backend())",
             "fig = plots.cosine_figure(np.arange(5), {'grad_dot': (np.ones(5), np.zeros(5))}, 't')\n"
             "plots.savefig(fig, out / 'a.png')",
             "import matplotlib.pyplot as plt\nfor name in ('b', 'c'):\n"
             "    fig, ax = plt.subplots()\n    ax.plot([0, 1])\n"
             "    plots.savefig(fig, out / f'{name}.png', pdf=False)",
             "print('nothing drawn')"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    assert "inline" in nb.cells[0].outputs[0]["text"]
    shown = [[(o["output_type"], o["metadata"]["image/png"]["filename"]) for o in c.outputs
              if "image/png" in o.get("data", {})] for c in nb.cells]
    assert shown == [[], [("display_data", "a.png")],
                     [("display_data", "b.png"), ("display_data", "c.png")], []]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a.png", "b.png", "c.png"]
    import base64
    assert base64.b64decode(nb.cells[1].outputs[0]["data"]["image/png"]) == \
        (tmp_path / "a.png").read_bytes()             # what is shown is the file saved


def test_show_in_a_kernel_is_one_image_of_a_figure_not_saved(tmp_path):
    """plots.show (notebook 07 builds its figure up curve family by curve family): one image
    output per call, nothing written; outside a kernel the figure is returned untouched."""
    import nbclient
    import nbformat
    cells = ["import numpy as np\nfrom fimoda.paper import plots\n"
             "fig = plots.show(plots.cosine_figure(np.arange(5), "
             "{'grad_dot': (np.ones(5), np.zeros(5))}, 't'))",
             "import os\nprint(sorted(os.listdir('.')))"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for o in nb.cells[0].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and not list(tmp_path.iterdir())
    fig = plots.cosine_figure(np.arange(5), {"grad_dot": (np.ones(5), np.zeros(5))}, "t")
    assert plots.show(fig) is fig and plt.fignum_exists(fig.number)     # not a kernel here
    plt.close(fig)


def test_examples_figure_rings_the_golds_extremes_and_titles_each_panel_with_its_cosine():
    # five left-out instances; gold ~1e-4 as in practice. Grad-Dot ranks like the gold, CG
    # reverses it: cosines 47 / sqrt(30 * 74.25) = 0.9958 and its negative (g = [1,-2,3,0,-4]e-4,
    # v = [2,-3,5,0.5,-6])
    g = np.array([1.0, -2.0, 3.0, 0.0, -4.0]) * 1e-4
    v = np.array([2.0, -3.0, 5.0, 0.5, -6.0])
    cos = (2 + 6 + 15 - 0 + 24) / (np.sqrt(30) * np.sqrt(4 + 9 + 25 + 0.25 + 36))
    fig = plots.examples_figure(g, {"grad_dot": v, "cg": -v}, k=1)
    ax_gd, ax_cg = fig.axes
    assert ax_gd.get_title() == f"Grad-Dot: cosine {cos:.2f}"
    assert ax_cg.get_title() == f"CG: cosine {-cos:.2f}"
    assert ax_gd.get_xlabel() == "gold score (eq. 13) (×1e-4)"      # ticks read 3, not 0.0003
    assert ax_gd.get_ylabel() == "Grad-Dot score"                   # in [0.01, 1000): as is

    def rings(ax, colour):
        from matplotlib.colors import to_rgba
        return [tuple(c.get_offsets()[0]) for c in ax.collections
                if len(c.get_edgecolor()) and np.allclose(c.get_edgecolor()[0], to_rgba(colour))
                and not len(c.get_facecolor())]

    assert rings(ax_gd, "#2ca02c") == [(3.0, 5.0)]                  # the gold's most helpful
    assert rings(ax_gd, "#d62728") == [(-4.0, -6.0)]                # and most harmful
    assert rings(ax_cg, "#2ca02c") == [(3.0, -5.0)]                 # the same instances in CG's
    labels = [t.get_text() for t in ax_cg.get_legend().get_texts()]
    assert labels == ["the method's 1 most helpful\nand 1 most harmful", "gold's 1 most helpful",
                      "gold's 1 most harmful"]
    plt.close(fig)
