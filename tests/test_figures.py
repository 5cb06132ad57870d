"""The registry of figure kinds (fimoda.paper.figures): every kind's name reads back into its kind
and settings; a bad kind or setting is one error before anything is written; and the figure index
lists every file of a figures folder by the registry, refusing a file no kind names."""
import pytest

from fimoda.paper import figures, report
from fimoda.paper.figures import KINDS, figure_name, figure_path, read_figure_name
from fimoda.gold import MECHANISMS, OPTIMIZERS

# A figures folder as the notebooks leave it (PNGs with their PDFs, tables with their store
# records), and the rows of the INDEX.md that fimoda wrote for it before the registry of figure
# kinds existed (b1f8b25, its regular expressions): the index must not change.
FOLDER = [
    "concrete_cosine_adam_remove_eq13.png",
    "concrete_cosine_sgd_remove_eq13.png",
    "concrete_cosine_sgd_remove_eq17.png",
    "concrete_damping_sweep_dense_sgd_remove_eq13.png",
    "concrete_fig10_sorted_scores_sgd_remove.pdf",
    "concrete_fig10_sorted_scores_sgd_remove.png",
    "concrete_final_training.pdf",
    "concrete_final_training.png",
    "concrete_infinitesimal_sgd.png",
    "concrete_mechanisms_sgd_eq13.png",
    "concrete_method_agreement.png",
    "concrete_param_distance_sgd.png",
    "concrete_retrain_cosine.csv",
    "concrete_retrain_cosine.csv.record.json",
    "concrete_seeds_adam_remove_eq13.png",
    "concrete_seeds_sgd_remove_eq17.png",
    "concrete_sorted_gold_sgd_remove.png",
    "concrete_spearman_sgd_remove_eq13.png",
    "concrete_trajectory_sgd_remove_eq13.png",
    "fico_mislabel_auc_sgd_remove.csv",
    "fico_table2_sgd_remove.csv",
    "fico_table2_sgd_remove.csv.record.json",
    "figure2.pdf",
    "figure2.png",
    "figure2_adam.png",
    "figure2_eq17.png",
    "figure2_sgd_subtract_eq17.png",
    "max_cosine.csv",
    "max_cosine_adam.csv",
    "sst2_cosine_adamw_subtract_eq13.png",
    "walkthrough_cosine.png",
    "walkthrough_difference.png",
    "walkthrough_landscape.png",
]
INDEX_ROWS = [
    '| Fig. 2 (panel) | `concrete_cosine_sgd_remove_eq13.png` | cosine against further training, mean +- SE over test points | ds=concrete, opt=sgd, mech=remove, eq. 13 |',
    "| Fig. 2 | `figure2.png` (+ `figure2.pdf`) | cosine (gold vs method) against further training, every dataset, one panel each | each dataset's default gold standard, eq. 13 |",
    "| Fig. 2 | `max_cosine.csv` | each method's maximum mean cosine per dataset (the numbers of the grid) | each dataset's default gold standard, eq. 13 |",
    '| Fig. 2 (panel) | `sst2_cosine_adamw_subtract_eq13.png` | cosine against further training, mean +- SE over test points | ds=sst2, opt=adamw, mech=subtract, eq. 13 |',
    '| Fig. 4 (panel) | `concrete_cosine_adam_remove_eq13.png` | cosine against further training, mean +- SE over test points | ds=concrete, opt=adam, mech=remove, eq. 13 |',
    '| Fig. 4 | `figure2_adam.png` | cosine (gold vs method) against further training, every dataset, one panel each | opt=adam, eq. 13 |',
    "| Fig. 4 | `max_cosine_adam.csv` | each method's maximum mean cosine per dataset (the numbers of the grid) | opt=adam, eq. 13 |",
    '| Fig. 5 (panel) | `concrete_cosine_sgd_remove_eq17.png` | cosine against further training, mean +- SE over test points | ds=concrete, opt=sgd, mech=remove, eq. 17 |',
    "| Fig. 5 | `figure2_eq17.png` | cosine (gold vs method) against further training, every dataset, one panel each | eq. 17, each dataset's default gold standard |",
    '| Fig. 5 | `figure2_sgd_subtract_eq17.png` | cosine (gold vs method) against further training, every dataset, one panel each | opt=sgd, mech=subtract, eq. 17 |',
    '| Fig. 6 (panel) | `concrete_spearman_sgd_remove_eq13.png` | Spearman correlation against further training | ds=concrete, opt=sgd, mech=remove, eq. 13 |',
    '| Fig. 8 | `concrete_seeds_adam_remove_eq13.png` | maximum cosine against the number of seeds averaged in the gold standard | ds=concrete, opt=adam, mech=remove, eq. 13 |',
    '| Fig. 9 | `concrete_seeds_sgd_remove_eq17.png` | maximum cosine against the number of seeds averaged in the gold standard | ds=concrete, opt=sgd, mech=remove, eq. 17 |',
    '| Fig. 10 | `concrete_fig10_sorted_scores_sgd_remove.png` (+ `concrete_fig10_sorted_scores_sgd_remove.pdf`) | gold scores sorted per test point and averaged (with Grad-Dot, Grad-Cos), normalised | ds=concrete, opt=sgd, mech=remove |',
    '| Fig. 10 (one test point) | `concrete_sorted_gold_sgd_remove.png` | sorted gold scores of one test point at several amounts of further training | ds=concrete, opt=sgd, mech=remove |',
    '| Fig. 11 | `concrete_retrain_cosine.csv` | cosine to LOO re-training from scratch | ds=concrete |',
    '| App. E.2.1 | `fico_mislabel_auc_sgd_remove.csv` | mislabelled-example detection AUC, mean +- SE over trials | ds=fico, opt=sgd, mech=remove |',
    '| Table 2 | `fico_table2_sgd_remove.csv` | most helpful / most harmful training instances for the first test points | ds=fico, opt=sgd, mech=remove |',
    '| — | `concrete_damping_sweep_dense_sgd_remove_eq13.png` | cosine of one method at every damping of its grid (beyond the paper, Sec. 7), with Grad-Dot for reference | ds=concrete, m=dense, opt=sgd, mech=remove, eq. 13 |',
    '| — | `concrete_final_training.png` (+ `concrete_final_training.pdf`) | training curves of the final model | ds=concrete |',
    '| — | `concrete_infinitesimal_sgd.png` | the exact infinitesimal gold standard against the finite subtract gold on identical work, and float32 against float64 (beyond the paper, notebook 07) | ds=concrete, opt=sgd |',
    '| — | `concrete_mechanisms_sgd_eq13.png` | Grad-Dot, CG and LiSSA against the gold standard under each leave-out mechanism (remove, subtract), side by side (beyond the paper) | ds=concrete, opt=sgd, eq. 13 |',
    '| — | `concrete_method_agreement.png` | cosine between every pair of methods | ds=concrete |',
    '| — | `concrete_param_distance_sgd.png` | distance of further-trained parameters from theta^f | ds=concrete, opt=sgd |',
    "| — | `concrete_trajectory_sgd_remove_eq13.png` | trajectory-matched influence and the damping schedule 1/(lr t) at every evaluation point, beside the paper's methods (beyond the paper, notebook 07) | ds=concrete, opt=sgd, mech=remove, eq. 13 |",
    "| — | `walkthrough_cosine.png` | notebook 00's toy: cosine to further training against steps (Figure 2 in miniature) |  |",
    "| — | `walkthrough_difference.png` | notebook 00's toy: one test-loss change against further-training steps, exact, first order, second order, linearised |  |",
    '| — | `walkthrough_landscape.png` | the unifying view on a two-parameter toy (notebook 00): further training without a point, and where each approximation puts it |  |',
]


def folder(path, names=FOLDER):
    path.mkdir(parents=True, exist_ok=True)
    for n in names:
        (path / n).write_bytes(b"x")
    return path


def values(kind):
    """Every combination of settings of ``kind`` to try: each optimizer and mechanism (and, for
    an optional one, its absence), both equations, datasets and methods with and without '_'."""
    choices = {"dataset": ["concrete", "fashion_mnist"], "method": ["dense", "lissa_h"],
               "optimizer": list(OPTIMIZERS), "mechanism": list(MECHANISMS), "eq": [13, 17]}
    combos = [{}]
    for s in kind.settings:
        extra = [None] if s in kind.defaults and kind.defaults[s] is None else []
        combos = [{**c, s: v} for c in combos for v in choices[s] + extra]
    return combos


def test_every_kind_reads_back_from_every_name_it_builds():
    assert len(KINDS) == 27
    seen = {}
    for kind in KINDS.values():
        for settings in values(kind):
            name = figure_name(kind.name, **settings)
            full = {s: kind.defaults[s] if settings[s] is None else settings[s]
                    for s in kind.settings}
            assert read_figure_name(name) == (kind, full), (name, settings)
            assert name.endswith((".png", ".csv")) and name not in seen, (name, seen.get(name))
            seen[name] = (kind.name, settings)
    assert {k for k, _ in seen.values()} == set(KINDS)


@pytest.mark.parametrize("kind, settings, name", [
    ("figure2", {}, "figure2.png"),
    ("figure2", {"optimizer": "adam"}, "figure2_adam.png"),
    ("figure2", {"optimizer": "sgd", "mechanism": "remove", "eq": None}, "figure2_sgd_remove.png"),
    ("figure2", {"optimizer": None, "mechanism": None, "eq": 17}, "figure2_eq17.png"),
    ("max_cosine", {"optimizer": "sgd", "mechanism": "subtract", "eq": 17},
     "max_cosine_sgd_subtract_eq17.csv"),
    ("cosine", dict(dataset="concrete", optimizer="sgd", mechanism="remove", eq=13),
     "concrete_cosine_sgd_remove_eq13.png"),
    ("seeds", dict(dataset="concrete", optimizer="adam", mechanism="remove", eq="17"),
     "concrete_seeds_adam_remove_eq17.png"),
    ("damping_sweep", dict(dataset="fashion_mnist", method="lissa_h", optimizer="adamw",
                           mechanism="subtract", eq=17),
     "fashion_mnist_damping_sweep_lissa_h_adamw_subtract_eq17.png"),
    ("sorted_scores", dict(dataset="sst2", optimizer="adamw", mechanism="subtract"),
     "sst2_fig10_sorted_scores_adamw_subtract.png"),
    ("mechanisms", dict(dataset="concrete", optimizer="sgd", eq="13"),
     "concrete_mechanisms_sgd_eq13.png"),
    ("table2", dict(dataset="fico", optimizer="sgd", mechanism="remove"),
     "fico_table2_sgd_remove.csv"),
    ("retrain_cosine", dict(dataset="concrete"), "concrete_retrain_cosine.csv"),
    ("walkthrough_cosine", {}, "walkthrough_cosine.png"),
])
def test_names_are_the_ones_the_notebooks_always_wrote(tmp_path, kind, settings, name):
    assert figure_name(kind, **settings) == name
    assert figure_path(tmp_path, kind, **settings) == tmp_path / name


@pytest.mark.parametrize("kind, settings, message", [
    ("cosines", dict(dataset="concrete"), "unknown figure kind 'cosines'"),
    ("cosine", dict(dataset="concrete", optimizer="sgd", eq=13), "missing: mechanism"),
    ("final_training", dict(dataset="concrete", optimizer="sgd"), "not its settings: optimizer"),
    ("walkthrough_cosine", dict(eq=13), "not its settings: eq"),
    ("cosine", dict(dataset="concrete", optimizer="rmsprop", mechanism="remove", eq=13),
     "optimizer 'rmsprop' is not one of"),
    ("sorted_gold", dict(dataset="concrete", optimizer="sgd", mechanism="drop"),
     "mechanism 'drop' is not one of"),
    ("cosine", dict(dataset="concrete", optimizer="sgd", mechanism="remove", eq=15),
     "eq 15 is not 13 or 17"),
    ("final_training", dict(dataset="my data"), "dataset 'my data' is not words"),
    ("final_training", dict(dataset=None), "dataset None is not words"),
    ("damping_sweep", dict(dataset="a_damping_sweep_b", method="c", optimizer="sgd",
                           mechanism="remove", eq=13), "reads back otherwise"),
])
def test_an_unknown_kind_or_a_bad_setting_is_one_error(kind, settings, message):
    with pytest.raises(ValueError, match=message):
        figure_name(kind, **settings)


@pytest.mark.parametrize("name", ["notes.txt", "concrete_cosine_sgd_remove_eq13.jpg",
                                  "concrete_cosine_rmsprop_remove_eq13.png", "figure2_eq13.png",
                                  "concrete_cosine_sgd_remove.png"])
def test_a_name_of_no_kind_is_refused(name):
    with pytest.raises(ValueError, match=f"'{name}' is the name of no figure kind"):
        read_figure_name(name)


def test_paper_numbers_follow_the_gold_standard():
    assert report.paper_figure("seeds", "adam", "13") == "Fig. 8"
    assert figures.paper_figure("cosine", "sgd", 17) == "Fig. 5 (panel)"
    assert figures.paper_figure("figure2") == "Fig. 2"
    assert figures.paper_figure("spearman", "adam") == ""
    assert figures.paper_figure("table2", "adam", 17) == "Table 2"


def test_the_index_lists_the_folder_as_it_did_before_the_registry(tmp_path):
    d = folder(tmp_path / "figures")
    (d / ".figure2.png.x1y2.tmp").write_bytes(b"")     # a write in progress
    (d / "old").mkdir()                                # a folder is not a figure
    (d / "fico_mislabel_auc_sgd_remove.csv").write_text(",AUC mean,se,trials\ngold,0.75,0.05,2\n")
    lines = report.write_figure_index("smoke", d).read_text().splitlines()
    assert lines[:6] == ["# Figures of the `smoke` profile", "",
                         "Written by `notebooks/05_summary_figures.ipynb`; every file here is "
                         "regenerated by `./run_all.sh` --profile smoke.", "",
                         "| paper | file | shows | settings |", "|---|---|---|---|"]
    assert lines[6:] == INDEX_ROWS
    rows = {r["name"]: r for r in report.figure_index("smoke", d)}   # INDEX.md is passed over
    assert len(rows) == len(INDEX_ROWS)
    r = rows["concrete_seeds_adam_remove_eq13.png"]
    assert (r["kind"], r["notebook"], r["dataset"], r["optimizer"], r["mechanism"]) == \
        ("seeds", "04", "concrete", "adam", "remove")
    assert rows["figure2_eq17.png"]["optimizer"] is None
    auc = report.mislabel_rows("smoke", ["concrete", "fico"], d)
    assert auc.to_dict("records") == [{"dataset": "fico", "detector": "gold", "AUC mean": 0.75,
                                       "file": "fico_mislabel_auc_sgd_remove.csv", "se": 0.05,
                                       "trials": 2}]


@pytest.mark.parametrize("stray", ["my_plot.png", "figure2_eq13.png", "notes.txt",
                                   "walkthrough_landscape_v2.pdf", "orphan.csv.record.json",
                                   "concrete_cosine_sgd_remove.png"])
def test_a_file_no_kind_names_is_an_error_naming_it(tmp_path, stray):
    d = folder(tmp_path / "figures", FOLDER + [stray])
    with pytest.raises(ValueError, match=f"{d / stray}: not a file of any figure kind"):
        report.figure_index("smoke", d)
    with pytest.raises(ValueError, match=stray):
        report.write_figure_index("smoke", d)
    assert not (d / "INDEX.md").exists()
