"""The notebooks opened by hand: each run top to bottom with its own defaults (no parameters
injected), in the pipeline's reading order, on a fresh clone (no results, figures or executed
copies yet) -- what a student does in JupyterLab with "Run All"."""
import json

import pytest

from conftest import require_file
from fimoda.paper import pipeline


def reading_order() -> list[str]:
    """Every notebook of the pipeline once, in the order it runs them (:data:`pipeline.STEPS`)."""
    return list(dict.fromkeys(nb for nb, _, _ in pipeline.STEPS))


def parameters_source(path) -> str:
    nb = json.loads(path.read_text())
    return "".join(next(c["source"] for c in nb["cells"]
                        if "parameters" in c.get("metadata", {}).get("tags", [])))


def test_every_notebook_defaults_to_the_smoke_profile():
    """A notebook opened by hand runs on the profile that takes seconds; the pipeline passes its
    own profile, so this default never reaches a pipeline run."""
    for name in reading_order():
        ns: dict = {}
        exec(parameters_source(pipeline.NB / name), ns)      # the cell only assigns constants
        if "profile" in ns:
            assert ns["profile"] == "smoke", name
        assert ns.get("device", "cpu") == "cpu", name


@pytest.mark.slow      # every notebook once more, as the smoke pipeline test already runs them
def test_notebooks_run_by_hand_in_reading_order_on_a_fresh_clone(tmp_path, monkeypatch):
    import nbclient
    import nbformat
    require_file("concrete/Concrete_Data.xls")
    for var in ("FIMODA_RESULTS_DIR", "FIMODA_FIGURES_DIR", "FIMODA_EXECUTED_DIR",
                "FIMODA_CACHE_DIR"):                 # a fresh clone: not even the data cache
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    # one intra-op thread per kernel, as conftest gives every test: on a shared 2-core machine
    # more only add OpenMP spinning (this test checks that they run, not their last bits)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    ran = []
    for name in reading_order():
        nb = nbformat.read(pipeline.NB / name, as_version=4)
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                                         resources={"metadata": {"path": str(pipeline.NB)}})
        try:
            client.execute()          # as JupyterLab's Run All, in notebooks/ as working dir
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f"{name} fails when run by hand with its defaults: {e.ename}: {e.evalue}")
        ran.append(name)
    assert ran == reading_order() and len(ran) >= 8
    results = tmp_path / "fimoda_results_dir" / "smoke" / "concrete"
    for f in ("final_model.pt", "gold_sgd_remove.npz", "scores_grad_dot.npz",
              "evaluation_sgd_remove_eq13.csv"):
        assert (results / f).exists(), f
    assert (tmp_path / "fimoda_figures_dir" / "smoke" / "INDEX.md").exists()


def test_a_misspelled_parameter_is_an_error_in_the_first_cell(tmp_path):
    """papermill only warns about a parameter the notebook does not define; the notebook stops
    in the cell after its parameters, naming it and the parameters it has."""
    import papermill as pm
    out = tmp_path / "out.ipynb"
    with pytest.raises(pm.PapermillExecutionError, match=r"unknown parameter\(s\) sedes: this "
                       r"notebook's parameters are .*seeds"):
        pm.execute_notebook(str(pipeline.NB / "04_evaluation.ipynb"), str(out),
                            parameters={"sedes": 3, "profile": "smoke"}, progress_bar=False,
                            cwd=str(pipeline.NB), log_output=False)
    cells = json.loads(out.read_text())["cells"]
    first_error = next(i for i, c in enumerate(cells)
                       if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    assert "check_parameters" in "".join(cells[first_error]["source"])


def test_every_notebook_checks_its_parameters_first():
    for nb in sorted(pipeline.NB.glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        k = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
        assert "".join(cells[k]["source"]).rstrip().splitlines()[-1].startswith(
            "PARAMETERS = set(dir())"), nb.name
        first = next(c for c in cells[k + 1:] if c["cell_type"] == "code")
        assert "check_parameters(PARAMETERS, globals())" in "".join(first["source"][:2]), nb.name
