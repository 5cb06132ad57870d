"""The notebooks, executed end to end by papermill on the smoke profile (as run_all.sh does)."""
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time

import pytest

from conftest import require_file
from fimoda.paper import experiment as ex, pipeline
from fimoda.paper.config import get_config, yardsticks_left_out


OUTPUT_DIRS = (("FIMODA_RESULTS_DIR", "results"), ("FIMODA_FIGURES_DIR", "figures"),
               ("FIMODA_EXECUTED_DIR", "executed"))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    for var, sub in OUTPUT_DIRS:
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


@contextlib.contextmanager
def captured_output():
    """What the block writes to stdout and to stderr, from Python and from the file descriptors
    (as pytest's ``capfd`` sees it, for a module-scoped fixture, which cannot take ``capfd``):
    a dict filled with ``out`` and ``err`` when the block ends."""
    got: dict = {}
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            with open(1, "w", buffering=1, closefd=False) as o, \
                    open(2, "w", buffering=1, closefd=False) as e, \
                    contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
                yield got
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            for name, f in (("out", out), ("err", err)):
                f.seek(0)
                got[name] = f.read().decode(errors="replace")


@pytest.fixture(scope="module")
def concrete_run(tmp_path_factory):
    """The smoke pipeline for Concrete, every notebook, run once for the tests that read it:
    (its folder, what it printed on stdout, on stderr)."""
    require_file("concrete/Concrete_Data.xls")
    tmp = tmp_path_factory.mktemp("concrete_run")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in OUTPUT_DIRS:
            mp.setenv(var, str(tmp / sub))
        with captured_output() as cap:
            pipeline.run("smoke", ["concrete"])
    return tmp, cap["out"], cap["err"]


@pytest.fixture
def in_concrete_run(concrete_run, monkeypatch):
    """``concrete_run``'s folder, with the output folders pointing into it for this test."""
    tmp = concrete_run[0]
    for var, sub in OUTPUT_DIRS:
        monkeypatch.setenv(var, str(tmp / sub))
    return tmp


def printed(nb_path) -> str:
    """Everything an executed notebook printed or displayed as text."""
    cells = json.loads(nb_path.read_text())["cells"]
    return "".join("".join(o.get("data", {}).get("text/plain", "")) + "".join(o.get("text", ""))
                   for c in cells for o in c.get("outputs", []))


def check_hand_written(executed, ds):
    """Notebooks 02 and 03 ran their hand-written checks (a check that fails stops the notebook
    with an error, which the callers assert against): the LOO run against the engine's run in
    float64, and the pipeline's own gold beside it; Grad-Dot
    and the damped influence function against fimoda.attribute."""
    nb02 = printed(executed / f"02_gold_further_training_{ds}.ipynb")
    assert "hand-written vs engine, float64: full run" in nb02, nb02
    assert "the pipeline's gold difference (" in nb02, nb02
    nb03 = printed(executed / f"03_attribution_methods_{ds}.ipynb")
    assert "Grad-Dot by hand vs fimoda.attribute: largest difference" in nb03, nb03
    assert "damped Gauss-Newton IF by hand vs fimoda.attribute: largest difference" in nb03, nb03


def test_plan_runs_every_notebook_for_every_dataset_in_order():
    steps = pipeline.plan("smoke", ["concrete", "fashion_mnist", "sst2"])
    names = [(nb, p.get("dataset")) for nb, p, _ in steps]
    assert names[:2] == [("00_walkthrough.ipynb", None), ("00_data.ipynb", None)]
    for ds in ("concrete", "fashion_mnist", "sst2"):     # images and text: the same notebooks
        for nb in ("01_final_models", "02_gold_further_training", "03_attribution_methods",
                   "04_evaluation", "06_qualitative", "07_beyond_the_paper"):
            assert (nb + ".ipynb", ds) in names
    # the yardsticks for the tabular datasets of fimoda.paper.config.YARDSTICK_DATASETS, and
    # their LoRA section for the text one (LORA_DATASETS); not for the images
    assert [d for nb, d in names if nb == "08_yardsticks.ipynb"] == ["concrete", "sst2"]
    paper = pipeline.plan("paper", ["concrete", "energy", "fico", "adult", "sst2"])
    assert [p["dataset"] for nb, p, _ in paper if nb == "08_yardsticks.ipynb"] == \
        ["concrete", "energy", "fico", "sst2"]              # the issue's three small models
    assert yardsticks_left_out("cpu", ["concrete", "energy", "sst2"]) == ["energy"]
    assert yardsticks_left_out("paper", ["concrete", "energy", "sst2"]) == []
    assert ("05_summary_figures.ipynb", None) in names
    order = [nb for nb, _ in names[1:]]         # after the walkthrough, in numbered order
    assert order == sorted(order)


def test_chains_split_the_plan_into_independent_dataset_chains():
    steps = pipeline.plan("smoke", ["concrete", "sst2"])
    head, per_ds, tail = pipeline.chains(steps)
    assert [nb for nb, _, _ in head] == ["00_walkthrough.ipynb", "00_data.ipynb"]
    assert [nb for nb, _, _ in tail] == ["05_summary_figures.ipynb"]
    assert [c[0][1]["dataset"] for c in per_ds] == ["concrete", "sst2"]
    for chain in per_ds:                     # each dataset's notebooks, in order, nothing else
        assert len({p["dataset"] for _, p, _ in chain}) == 1
    # Concrete's gold standard three times in the smoke profile: its default (SGD, remove),
    # subtract, and Adam (App. E.1), which notebooks 04 and 07 (part 2 only) use a second time
    assert [nb[:2] for nb, _, _ in per_ds[0]] == ["01", "02", "02", "02", "03", "04", "04", "06",
                                                  "07", "07", "08"]
    assert per_ds[0][9][1]["optimizer"] == "adam" and per_ds[0][9][1]["infinitesimal"] is False
    assert per_ds[0][2][1]["mechanism"] == "subtract" and "optimizer" not in per_ds[0][2][1]
    assert per_ds[0][3][1]["optimizer"] == "adam" and per_ds[0][6][1]["optimizer"] == "adam"
    assert "optimizer" not in per_ds[0][5][1]
    assert [nb[:2] for nb, _, _ in per_ds[1]] == ["01", "02", "03", "04", "06", "07", "08"]
    assert sum(map(len, per_ds)) + len(head) + len(tail) == len(steps)
    only_02 = [s for s in steps if s[0].startswith("02")]
    assert pipeline.chains(only_02)[0] == [] and pipeline.chains(only_02)[2] == []


def test_waits_for_lets_variants_run_beside_their_default_run():
    steps = pipeline.plan("smoke", ["concrete", "sst2"])
    waits = pipeline.waits_for(steps)
    name = {k: (nb[:2], p.get("dataset"), p.get("optimizer") or p.get("mechanism"))
            for k, (nb, p, _) in enumerate(steps)}
    at = {v: k for k, v in name.items()}
    assert waits[at[("00", None, None)]] == set()             # the head waits for nothing
    c01, c02 = at[("01", "concrete", None)], at[("02", "concrete", None)]
    c02s, c02a = at[("02", "concrete", "subtract")], at[("02", "concrete", "adam")]
    for k in (c02, c02s, c02a):                       # the three gold standards side by side
        assert waits[k] == {c01}
    assert waits[at[("03", "concrete", None)]] == {c02, c02s, c02a}
    c03 = at[("03", "concrete", None)]
    assert waits[at[("04", "concrete", None)]] == waits[at[("04", "concrete", "adam")]] == {c03}
    assert waits[at[("06", "concrete", None)]] == {at[("04", "concrete", None)],
                                                   at[("04", "concrete", "adam")]}
    # SST-2's chain never waits for Concrete's, and has no variants
    sst = [k for k, v in name.items() if v[1] == "sst2"]
    assert [waits[k] for k in sst] == [set()] + [{k} for k in sst[:-1]]
    assert waits[at[("05", None, None)]] == set(range(at[("05", None, None)]))


def test_run_graph_keeps_the_order_of_waits_and_uses_every_worker():
    # 0 -> {1, 2} -> 3, and 4 alone: 1 and 2 must overlap, 3 must start after both end
    waits = [set(), {0}, {0}, {1, 2}, set()]
    events, lock = [], threading.Lock()
    inside = threading.Barrier(2, timeout=10)         # 1 and 2 must be running at the same time

    def work(k):
        with lock:
            events.append(("start", k))
        if k in (1, 2):
            inside.wait()
        time.sleep(0.01)
        with lock:
            events.append(("end", k))

    pipeline.run_graph(waits, work, jobs=2, key=lambda k, waiting: -k if k == 4 else k)
    assert events[0] == ("start", 4) or events[1] == ("start", 4)   # the smallest key first
    pos = {e: i for i, e in enumerate(events)}
    for k, w in enumerate(waits):
        for j in w:
            assert pos[("end", j)] < pos[("start", k)], (j, k, events)
    assert len(events) == 10


def test_spread_key_starts_the_dataset_with_the_most_notebooks_left_first():
    steps = pipeline.plan("smoke", ["concrete", "sst2"])
    head, per_ds, _ = pipeline.chains(steps)
    graph = head + [s for chain in per_ds for s in chain]
    key = pipeline.spread_key(graph)
    of = {ds: [k for k, s in enumerate(graph) if s[1].get("dataset") == ds]
          for ds in ("concrete", "sst2")}
    assert (len(of["concrete"]), len(of["sst2"])) == (11, 7)
    everything = set(range(len(graph)))
    assert min(everything, key=lambda k: key(k, everything)) == 0     # the head first
    assert key(of["concrete"][0], everything) < key(of["sst2"][0], everything)   # 11 left vs 7
    # Concrete down to its last three notebooks: SST-2's seven left go first
    late = set(of["concrete"][-3:]) | set(of["sst2"])
    assert key(of["sst2"][0], late) < key(of["concrete"][-3], late)
    # equal counts left: the longer dataset (COST_ORDER: Concrete before SST-2)
    even = set(of["concrete"][-7:]) | set(of["sst2"])
    assert key(of["concrete"][-7], even) < key(of["sst2"][0], even)


def test_run_graph_stops_at_the_first_failure_and_raises_it():
    started = []

    def work(k):
        started.append(k)
        if k == 0:
            raise SystemExit("notebook 0 failed")

    with pytest.raises(SystemExit, match="notebook 0 failed"):
        pipeline.run_graph([set(), {0}, {1}], work, jobs=2)
    assert started == [0]                             # nothing that waits on it starts
    with pytest.raises(ValueError, match="wait for each other"):
        pipeline.run_graph([{1}, {0}], lambda k: None, jobs=2)


def test_jobs_must_be_positive():
    with pytest.raises(SystemExit, match="--jobs must be at least 1"):
        pipeline.run("smoke", ["concrete"], jobs=0)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown dataset"):
        pipeline.run("smoke", ["mnist"])


def test_only_matching_no_notebook_is_an_error():
    with pytest.raises(SystemExit, match="matches no notebook"):
        pipeline.run("smoke", ["concrete"], only=["99"])


def test_smoke_pipeline_runs_every_notebook(concrete_run, in_concrete_run):
    isolated, out, err = concrete_run
    # one line per notebook with its wall time, the total, then the HTML copy; nothing from the
    # kernels
    lines = out.strip().splitlines()
    assert len(lines) == 1 + 14 + 2, out
    assert all(re.search(r"^\[ ?\d+/14\] \S+.* \d+:\d\d$", ln) for ln in lines[1:-2]), out
    assert lines[-2].startswith("all 14 notebooks done in ")
    index = isolated / "executed" / "smoke" / "index.html"
    assert lines[-1].startswith("HTML of 14 executed notebooks (")
    assert lines[-1].endswith(f"to read without a kernel: {index}")
    assert len(list((index.parent / "html").glob("*.html"))) == 14
    assert "without encryption" not in err and "TCP" not in err, err
    executed = sorted((isolated / "executed" / "smoke").glob("*.ipynb"))
    assert len(executed) == 14          # notebook 07 twice: SGD, and Adam (part 2 only)
    for nb in executed:
        cells = json.loads(nb.read_text())["cells"]
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, nb.name
    check_hand_written(isolated / "executed" / "smoke", "concrete")
    check_clean_outputs(executed)
    # the kernels' log keeps each finished training bar's summary, labelled with its notebook
    log = (isolated / "executed" / "smoke" / "kernels.log").read_text()
    assert re.search(r"01_final_models \[concrete\]: train concrete: \d+/\d+ epoch in ", log), log
    res = isolated / "results" / "smoke" / "concrete"
    for name in ("final_model.pt", "final_model.json", "gold_sgd_remove.npz",
                 "gold_sgd_subtract.npz", "gold_adam_remove.npz", "scores_dense_damping0.npz",
                 "scores_grad_dot.npz", "scores_cg.npz", "evaluation_sgd_remove_eq13.csv",
                 "evaluation_sgd_remove_eq17.csv", "evaluation_adam_remove_eq13.csv",
                 "retrain_remove.npz", "beyond_summary_sgd.csv", "beyond_summary_adam.csv",
                 "beyond_trajectory_sgd.npz", "beyond_trajectory_adam.npz",
                 "yardsticks_groups_sgd_remove.npz", "yardsticks_lds_sgd_remove.npz",
                 "yardsticks_retrain.npz", "yardsticks_summary_sgd.csv"):
        assert (res / name).exists(), name
    figs = {p.name for p in (isolated / "figures" / "smoke").glob("*.png")}
    assert {"concrete_cosine_sgd_remove_eq13.png", "figure2.png", "concrete_mechanisms_sgd_eq13.png",
            "concrete_damping_sweep_dense_sgd_remove_eq13.png", "concrete_cosine_sgd_remove_eq17.png",
            "concrete_seeds_sgd_remove_eq17.png", "concrete_cosine_adam_remove_eq13.png",
            "concrete_seeds_adam_remove_eq13.png", "figure2_adam.png", "figure2_eq17.png",
            "concrete_additivity_sgd_remove.png", "concrete_group_cosine_sgd_remove.png"} <= figs, figs
    check_figures_shown(isolated)
    check_report(isolated, "concrete", retrain=True, adam=True)
    check_reproduction(isolated, "concrete")


def check_figures_shown(isolated, unsaved_ok=("07_beyond_the_paper",)):
    """Every PNG the notebooks wrote under figures/smoke/ is an image output of an executed
    notebook, named in the output's metadata; each notebook shows each figure it saved exactly
    once (so the named image outputs count the saved figures; a file two notebooks write, e.g.
    the full-data runs' parameter distance of notebook 02 with either mechanism, is shown by
    both). An image without a file name (a figure drawn and not saved) is allowed only in the
    notebooks of ``unsaved_ok`` (notebook 07 builds its figure up family by family)."""
    pngs = {p.name for p in (isolated / "figures" / "smoke").glob("*.png")}
    shown = set()
    for nb in (isolated / "executed" / "smoke").glob("*.ipynb"):
        names = [o.get("metadata", {}).get("image/png", {}).get("filename")
                 for c in json.loads(nb.read_text())["cells"] for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {})]
        if nb.name.startswith(unsaved_ok):
            names = [n for n in names if n is not None]
        assert len(names) == len(set(names)) and None not in names, (nb.name, names)
        shown |= set(names)
    assert pngs and shown == pngs, (sorted(pngs - shown), sorted(shown - pngs))


def check_reproduction(isolated, ds):
    """The theta^f spread reuses the pipeline's own theta^f (its cosines are notebook 04's) and
    trains another from init seed 1; the reproduction folder holds what its README lists."""
    import pandas as pd
    from fimoda.paper import reproduction as rep
    spread = rep.theta_spread(ds, "smoke", init_seeds=(0, 1), seeds=2)
    assert sorted(spread["init seed"].unique()) == [0, 1]
    table = pd.read_csv(isolated / "results" / "smoke" / ds / "evaluation_sgd_remove_eq13.csv",
                        index_col=0)
    gd = spread.set_index(["init seed", "method"])["cos max"]
    assert gd[(0, "grad_dot")] == pytest.approx(table.loc["Grad-Dot", "max cosine"], abs=1e-12)
    assert gd[(1, "grad_dot")] != pytest.approx(gd[(0, "grad_dot")], abs=1e-6)   # another theta^f
    out = isolated / "reproduction"
    readme = rep.write_folder("smoke", [ds], out=out, spread=spread).read_text()
    statuses = re.findall(r"^\| " + ds + r" \| [^|]+ \| (reproduced|not reproduced|n/a) \|",
                          readme, flags=re.M)
    assert len(statuses) == 8 and "Near-zero cosine to LOO re-training" in readme, readme
    listed = re.findall(r"\| `([^`]+\.png)` \|", readme)
    assert "figure2.png" in listed and all((out / f).exists() for f in listed), listed
    assert (out / "summary.md").exists() and (out / "theta_spread.csv").exists()
    assert (out / f"{ds}_evaluation_sgd_remove_eq13.csv").exists()


def check_report(isolated, ds, retrain=False, adam=False):
    """INDEX.md lists only files that exist, with the paper's numbers; summary.md has a finite
    row per method and the paper column only where PAPER_VALUES has the setting."""
    import numpy as np
    from fimoda.paper import report
    figdir = isolated / "figures" / "smoke"
    index = (figdir / "INDEX.md").read_text()
    listed = re.findall(r"`([^`]+\.(?:png|pdf|csv))`", index)
    assert any(f.endswith(".pdf") for f in listed) and any(f.endswith(".csv") for f in listed)
    assert listed and all((figdir / f).exists() for f in listed), listed
    for num in ("Fig. 2", "Fig. 6 (panel)", "Figs. 3, 7", "Fig. 10", "Table 2", "Fig. 5",
                "Fig. 5 (panel)", "Fig. 9"):
        assert f"| {num} |" in index, num
    if adam:
        for num in ("Fig. 4", "Fig. 4 (panel)", "Fig. 8"):
            assert f"| {num} |" in index, num
    if retrain:
        assert "| Fig. 11 |" in index
    opt, mech = ex.gold_settings(get_config(ds, "smoke"))
    for f in (figdir / "figure2.png", figdir / "figure2_eq17.png",
              figdir / f"{ds}_fig10_sorted_scores_{opt}_{mech}.png"):
        assert f.with_suffix(".pdf").exists(), f
    text = (isolated / "results" / "smoke" / "summary.md").read_text()
    assert "## each dataset's gold standard, eq. 13" in text and "| Grad-Dot |" in text
    assert "## each dataset's gold standard, eq. 17" in text
    assert ("## Adam gold standard (App. E.1), eq. 13" in text) == adam
    rows = report.summary_rows("smoke", [ds])
    nums = rows[["cos first", "cos max", "cos last", "sp first", "sp max", "sp last"]].to_numpy()
    assert len(rows) >= 8 and np.isfinite(nums).all()
    assert rows[["paper first", "paper last"]].isna().all().all()       # no paper value here
    import pytest
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(report.PAPER_VALUES, ds, {("sgd", 13, "cosine"): {"grad_dot": (0.9, 0.5)},
                                             ("sgd", 13, "spearman"): {"cg": (0.3, 0.4)}})
        rows = report.summary_rows("smoke", [ds]).set_index("method")
    assert tuple(rows.loc["Grad-Dot", ["paper first", "paper last"]]) == (0.9, 0.5)
    assert rows.drop("Grad-Dot")["paper first"].isna().all()
    assert tuple(rows.loc["CG", ["paper sp first", "paper sp last"]]) == (0.3, 0.4)
    assert rows.drop("CG")["paper sp first"].isna().all()


def check_clean_outputs(executed):
    """No cell of an executed notebook stores more than 3 stream outputs (a progress bar is one
    display updated in place, not one output per redraw), and none shows an empty or bare
    Python value ({}, [], None) or a path object's repr."""
    for nb in executed:
        for k, cell in enumerate(json.loads(nb.read_text())["cells"]):
            outputs = cell.get("outputs", [])
            streams = [o for o in outputs if o["output_type"] == "stream"]
            assert len(streams) <= 3, (nb.name, k, [o["text"] for o in streams][:5])
            for o in outputs:
                text = o["text"] if "text" in o else o.get("data", {}).get("text/plain")
                if text is None:                 # an image or HTML only
                    continue
                text = "".join(text).strip()
                assert text not in ("{}", "[]", "None", "()", ""), (nb.name, k, o)
                assert not text.startswith(("PosixPath(", "WindowsPath(")), (nb.name, k, text)


def test_mislabel_detection_runs_on_a_classification_dataset(isolated):
    require_file("heloc/heloc_dataset_v1.csv")
    pipeline.run("smoke", ["fico"], only=["01", "02", "06"])
    nb = json.loads((isolated / "executed" / "smoke" / "06_qualitative_fico.ipynb").read_text())
    text = "".join("".join(o.get("data", {}).get("text/plain", "")) for c in nb["cells"]
                   for o in c.get("outputs", []))
    assert "further training (gold)" in text and "Grad-Dot" in text and "AUC mean" in text
    auc = (isolated / "figures" / "smoke" / "fico_mislabel_auc_sgd_remove.csv").read_text()
    assert auc.splitlines()[0] == ",AUC mean,se,trials" and len(auc.splitlines()) == 3


@pytest.mark.slow   # 7 min of the default suite's 18 on a 2-core machine; the cpu profile runs both
def test_smoke_pipeline_for_images_and_text(isolated, capfd):
    """ResNet-9 on Fashion-MNIST and the encoder on SST-2 through every notebook, the two
    datasets' chains at once (two jobs), and Figure 2 with their panels (e) and (f)."""
    require_file("fashion-mnist/train-images-idx3-ubyte.gz")
    require_file("sst2/train.tsv")
    pipeline.run("smoke", ["fashion_mnist", "sst2"], jobs=2)
    lines = capfd.readouterr().out.strip().splitlines()
    assert "2 at a time" in lines[0]
    counters = [int(re.match(r"^\[ ?(\d+)/16\] ", ln).group(1)) for ln in lines[1:-2]]
    assert counters == list(range(1, 17)), lines
    assert lines[-3].split()[1] == "05_summary_figures"     # after both chains
    executed = sorted((isolated / "executed" / "smoke").glob("*.ipynb"))
    assert len(executed) == 2 + 2 * 6 + 1 + 1          # notebook 08's LoRA section on SST-2
    for nb in executed:
        cells = json.loads(nb.read_text())["cells"]
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, nb.name
    check_clean_outputs(executed)
    for ds, gold in (("fashion_mnist", "gold_sgd_subtract.npz"), ("sst2", "gold_adamw_subtract.npz")):
        res = isolated / "results" / "smoke" / ds
        for name in ("final_model.pt", "final_model.json", gold,
                     "scores_grad_dot.npz", "scores_grad_cos.npz", "scores_lissa.npz",
                     "scores_lissa_h.npz", "scores_trak.npz", "scores_ekfac.npz",
                     "scores_datainf.npz", "scores_arnoldi.npz"):
            assert (res / name).exists(), (ds, name)
        assert not (res / "scores_cg.npz").exists()          # skipped, with the reason printed
    assert (isolated / "results" / "smoke" / "sst2" / "trunk_features.npz").exists()
    figs = {p.name for p in (isolated / "figures" / "smoke").glob("*.png")}
    assert {"fashion_mnist_cosine_sgd_subtract_eq13.png", "sst2_cosine_adamw_subtract_eq13.png",
            "figure2.png", "sst2_fig10_sorted_scores_adamw_subtract.png",
            "sst2_lora_gold_adamw_subtract.png"} <= figs, figs
    check_figures_shown(isolated)
    text = printed(isolated / "executed" / "smoke" / "03_attribution_methods_sst2.ipynb")
    assert "skipped: CG needs full-batch Hessian products" in text
    # notebook 08 on SST-2: sections 1-3 say why they skip it, LoRA runs; its numbers in the summary
    text = printed(isolated / "executed" / "smoke" / "08_yardsticks_sst2.ipynb")
    assert "sections 1-3 run on the tabular MLPs" in text and "like-for-like" in text
    summary = (isolated / "results" / "smoke" / "summary.md").read_text()
    assert "| sst2 | LoRA gold vs full gold (eq. 13) | rank 8 |" in summary, summary
    for ds in ("fashion_mnist", "sst2"):
        check_hand_written(isolated / "executed" / "smoke", ds)


def test_notebooks_are_valid_and_have_a_parameters_cell():
    """Every notebook validates against its nbformat schema (cell ids included: a missing one is
    a warning at every papermill run) and has exactly one cell tagged ``parameters``."""
    import warnings
    import nbformat
    for path in sorted(pipeline.NB.glob("*.ipynb")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            nb = nbformat.read(path, as_version=4)
            nbformat.validate(nb)
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, path.name


def test_summary_gives_the_noise_ceiling_and_each_methods_fraction_of_it(in_concrete_run):
    """summary.md of the Concrete smoke run has the noise ceiling of each gold standard and each
    method's cosine as a fraction of it; the ceiling recomputed by hand from the stored gold
    arrays: with two seeds the estimator is ceiling^2 = 4 g1.g2 / |g1 + g2|^2 (the split-half
    agreement, Spearman-Brown corrected to two seeds), g_s seed s's eq. 13 scores."""
    import numpy as np
    from fimoda.paper import report
    res = in_concrete_run / "results" / "smoke"
    text = (res / "summary.md").read_text()
    assert text.count("Noise ceiling of each gold standard:") >= 2       # eq. 13 and eq. 17
    assert "| first / ceil |" in text and "| ceil at max | max / ceil |" in text
    assert "| seeds for 0.9 (first) | seeds for 0.9 (last) |" in text
    gold = np.load(res / "concrete" / "gold_sgd_remove.npz")
    full, loo = gold["loss_full"], gold["loss_loo"]           # (S, T, J), (S, n', T, J)
    assert full.shape[0] == 2
    g = loo - full[:, None]                                    # each seed's eq. 17 scores
    g = g - g.mean(1, keepdims=True)                           # eq. 13: minus the mean over L
    g = g[:, :, 1:]                                            # t = 0 (theta^f: all zero) dropped
    ratio = 4 * (g[0] * g[1]).sum(0) / ((g[0] + g[1]) ** 2).sum(0)       # (T - 1, J)
    mean = np.sqrt(np.clip(ratio, 0, 1)).mean(1)
    points = list(gold["eval_points"][1:])
    rows = report.summary_rows("smoke", ["concrete"]).set_index("method")
    assert len(rows) >= 8
    for m, r in rows.iterrows():
        k = points.index(r["cos max at"])
        assert r["ceil at max"] == pytest.approx(mean[k], abs=1e-9), m
        assert r["max / ceil"] == pytest.approx(r["cos max"] / mean[k], abs=1e-9), m
        assert r["first / ceil"] == pytest.approx(r["cos first"] / mean[0], abs=1e-9), m
    (row,) = report.ceiling_rows(ex.with_results("smoke", ["concrete"])).to_dict("records")
    assert row["seeds"] == 2 and row["eq"] == 13
    assert row["ceiling first"] == pytest.approx(mean[0], abs=1e-9)
    assert row["ceiling last"] == pytest.approx(mean[-1], abs=1e-9)
    assert row["lowest"] == pytest.approx(mean.min(), abs=1e-9)
    need = [2 * 0.81 * (1 - c * c) / (0.19 * c * c) for c in (mean[0], mean[-1])]   # by hand
    assert [row["seeds for 0.9 (first)"], row["seeds for 0.9 (last)"]] == list(np.ceil(need))


def test_notebook_07_runs_on_the_smoke_profile(in_concrete_run):
    """Notebook 07 (which reads notebook 02's gold standards and computes its own scores) in the
    smoke pipeline's run: its infinitesimal and trajectory studies, SGD and Adam."""
    import numpy as np
    from fimoda.paper import report
    isolated = in_concrete_run
    nb = isolated / "executed" / "smoke" / "07_beyond_the_paper_concrete.ipynb"
    cells = json.loads(nb.read_text())["cells"]
    assert not [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    figs = {p.name for p in (isolated / "figures" / "smoke").glob("*.png")}
    assert {"concrete_infinitesimal_sgd.png", "concrete_trajectory_sgd_remove_eq13.png"} <= figs
    rows = report.beyond_rows("smoke", ["concrete"])
    inf = rows[rows["what"] == "infinitesimal vs finite (float64)"]
    assert len(inf) == 1 and float(inf["first"].iloc[0]) > 0.95    # small perturbation: ~ 1
    traj = rows[(rows["part"] == "trajectory") & (rows["optimizer"] == "sgd")]
    assert {"trajectory (GN)", "trajectory (true H)", "Grad-Dot", "CG"} <= set(traj["what"])
    assert np.isfinite(traj[["first", "min", "last"]].to_numpy(dtype=float)).all()
    # the Adam run (pipeline VARIANTS): part 2 only, with Adam's preconditioner beside
    adam = rows[rows["optimizer"] == "adam"]
    assert set(adam["part"]) == {"trajectory"}
    assert {"trajectory (GN)", "trajectory, Adam D (GN)", "trajectory, Adam D (true H)",
            "Grad-Dot"} <= set(adam["what"])
    assert np.isfinite(adam[["first", "min", "last"]].to_numpy(dtype=float)).all()
    assert (isolated / "figures" / "smoke" / "concrete_trajectory_adam_remove_eq13.png").exists()
    index = report.figure_index("smoke")
    assert any("concrete_trajectory_sgd_remove_eq13.png" in r["file"] for r in index)


def test_notebook_02_stops_when_the_hand_written_run_disagrees_with_the_engine(concrete_run,
                                                                               isolated,
                                                                               monkeypatch):
    """Notebook 02's hand-written leave-one-out run is checked against the engine's run of the
    same seed and instance (in float64): a copy of the notebook whose hand-written loop steps
    with a learning rate 1e-6 too large (its losses move far above float64 round-off, far below
    their size) stops with the check's message."""
    # a copy of the pipeline's results: theta^f and the gold computed in the kernel's environment
    shutil.copytree(concrete_run[0] / "results", isolated / "results")
    notebooks = isolated / "notebooks"
    notebooks.mkdir()
    nb = json.loads((pipeline.NB / "02_gold_further_training.ipynb").read_text())
    line = '    opt = Optimizer(params, lr=gc["lr"], weight_decay=gc["weight_decay"])\n'
    cells = [c for c in nb["cells"] if line in c["source"]]
    assert len(cells) == 1                       # the hand-written loop's optimizer, once
    src = cells[0]["source"]
    src[src.index(line)] = line.replace('lr=gc["lr"]', 'lr=gc["lr"] * (1 + 1e-6)')
    (notebooks / "02_gold_further_training.ipynb").write_text(json.dumps(nb))
    monkeypatch.setattr(pipeline, "NB", notebooks)
    with pytest.raises(SystemExit, match="the hand-written run differs from the engine's"):
        pipeline.run("smoke", ["concrete"], only=["02"])


def test_notebook_08_runs_on_the_smoke_profile(in_concrete_run):
    """Notebook 08 in the smoke pipeline's run: its |S| = 1 check printed (the group runs of one
    instance reproduce notebook 02's leave-one-out runs), its two figures shown, the LDS table
    with every method and the gold, and its rows in summary.md."""
    import numpy as np
    import pandas as pd
    isolated = in_concrete_run
    nb = isolated / "executed" / "smoke" / "08_yardsticks_concrete.ipynb"
    text = printed(nb)
    assert re.search(r"\|S\| = 1 check: \d+ group runs of one instance", text), text
    assert re.search(r"reproduced (bit for bit|to rounding)", text), text
    shown = [o.get("metadata", {}).get("image/png", {}).get("filename")
             for c in json.loads(nb.read_text())["cells"] for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert shown == ["concrete_additivity_sgd_remove.png", "concrete_group_cosine_sgd_remove.png"]
    lds = pd.read_csv(isolated / "figures" / "smoke" / "concrete_lds_sgd_remove.csv", index_col=0)
    assert {"further training (gold)", "Grad-Dot", "CG"} <= set(lds.index)
    cols = ["further-training LDS", "further-training se", "re-training LDS", "re-training se"]
    assert list(lds.columns) == cols
    assert np.isfinite(lds.loc["further training (gold)", cols].to_numpy(float)).all()
    summary = (isolated / "results" / "smoke" / "summary.md").read_text()
    assert "## Yardsticks of the field (notebook 08)" in summary
    assert "| concrete | further-training LDS | Grad-Dot |" in summary
    assert "| concrete | noise ceiling (eq. 13) | last point |" in summary
