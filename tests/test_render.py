"""The HTML copy of a run: a page per executed notebook with its figures, and the index in reading
order with failures marked and each notebook's figure files; looked at in a headless browser."""
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pytest

from fimoda.paper import pipeline, render, report

# a figure drawn in pure red (matplotlib's tab:red is (214, 39, 40)), so the browser test can
# count its pixels; nothing else on a notebook page is that colour
FIGURE = ("import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
          "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(4, 3))\n"
          "ax.plot([0, 1], [0, 1], color='#ff0000', lw=12)\nplt.show()")


def notebook(path, heading, code):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "smoke"\ndataset = None\ndatasets = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {heading}\n\nText."), params,
                nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A pipeline run over three small notebooks (not fimoda's): a walkthrough with a figure,
    then per dataset one that draws (and raises on the second dataset) and one that prints. The
    run fails; its HTML is written all the same."""
    tmp = tmp_path_factory.mktemp("site")
    src = tmp / "notebooks"
    src.mkdir()
    notebook(src / "00_walkthrough.ipynb", "00 — Walkthrough", FIGURE)
    notebook(src / "01_final_models.ipynb", "01 — Final models",
             FIGURE + "\nif dataset == 'energy':\n    raise ValueError('energy model broke')")
    notebook(src / "02_gold_further_training.ipynb", "02 — Gold", "print('ok')")
    figures = tmp / "figures" / "smoke"
    figures.mkdir(parents=True)
    for name in ("concrete_final_training.png", "concrete_sorted_gold_sgd_remove.png",
                 "concrete_sorted_gold_adam_remove.png", "concrete_table2_sgd_remove.csv"):
        (figures / name).write_bytes(b"x")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("FIMODA_RESULTS_DIR", "results"), ("FIMODA_FIGURES_DIR", "figures"),
                         ("FIMODA_EXECUTED_DIR", "executed")):
            mp.setenv(var, str(tmp / sub))
        mp.setattr(pipeline, "NB", src)
        mp.setattr(pipeline, "STEPS", [("00_walkthrough.ipynb", False, None),
                                       ("01_final_models.ipynb", True, None),
                                       ("02_gold_further_training.ipynb", True, None)])
        mp.setattr(pipeline, "VARIANTS", [("02", ("concrete",), ("smoke",),
                                           {"optimizer": "adam"}, "adam")])
        import io
        from contextlib import redirect_stdout
        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit, match="energy model broke"):
            pipeline.run("smoke", ["concrete", "energy"])
    return tmp, out.getvalue().strip().splitlines()


def test_a_failed_run_still_writes_every_page_and_the_index_marks_the_failure(site):
    tmp, lines = site
    executed = tmp / "executed" / "smoke"
    index = executed / "index.html"
    assert lines[-1].startswith("HTML of 5 executed notebooks (") and lines[-1].endswith(
        f"to read without a kernel: {index}"), lines
    pages = sorted(p.name for p in (executed / "html").glob("*.html"))
    assert pages == ["00_walkthrough.html", "01_final_models_concrete.html",
                     "01_final_models_energy.html", "02_gold_further_training_concrete.html",
                     "02_gold_further_training_concrete_adam.html"]
    text = index.read_text()
    # reading order: the notebooks in STEPS order, each dataset (and variant) under it
    headings = re.findall(r"<h2>(.*?)</h2>", text)
    assert headings == ["00 — Walkthrough", "01 — Final models", "02 — Gold"]
    labels = re.findall(r"<li><b>(.*?)</b>", text)
    assert labels == ["00_walkthrough", "concrete", "energy", "concrete", "concrete (adam)",
                      "energy"]
    models, gold = text.split("<h2>01 — Final models</h2>")[1].split("<h2>02 — Gold</h2>")
    concrete_01, energy_01 = models.split("<b>energy</b>")
    # the failed notebook: its page (which shows the error) and the mark; what came after it in
    # its dataset's chain did not run
    assert 'class="failed">failed<' in energy_01 and ">read</a>" in energy_01
    assert text.count('class="failed"') == 1
    assert gold.split("<b>energy</b>")[1].count('class="not-run">not run<') == 1
    assert text.count("not run<") == 1
    # every link resolves, relative to the index
    for href in re.findall(r'href="([^"]+)"', text):
        assert (executed / href).resolve().exists() or href.endswith("summary.md"), href
    # a figure goes under the step that writes it: its notebook, dataset and variant
    assert "concrete_final_training.png" in concrete_01
    sgd, adam = gold.split("<b>concrete (adam)</b>")
    assert "Fig. 10 (one test point): <a" in sgd and "concrete_sorted_gold_sgd_remove.png" in sgd
    assert "concrete_sorted_gold_adam_remove.png" in adam.split("<b>energy</b>")[0]
    assert "adam_remove" not in sgd and "table2" not in text        # notebook 06 is not a step


def test_pages_embed_their_figures_and_load_nothing_from_the_network(site):
    tmp, _ = site
    for page in (tmp / "executed" / "smoke" / "html").glob("*.html"):
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"?https?:|src=\"https?:", text), \
            page.name
    walkthrough = (tmp / "executed" / "smoke" / "html" / "00_walkthrough.html").read_text()
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', walkthrough)) == 1


def test_a_page_is_rendered_again_only_when_its_notebook_changed(tmp_path):
    nb = tmp_path / "a.ipynb"
    notebook(nb, "A", "1")
    pages = render.Pages(tmp_path / "html")
    page = pages.render(nb)
    first = page.stat().st_mtime_ns
    assert pages.render(nb).stat().st_mtime_ns == first
    notebook(nb, "A changed", "1")
    assert "A changed" in pages.render(nb).read_text()


def test_status_of_executed_copies(tmp_path):
    assert render.notebook_status(tmp_path / "missing.ipynb")["status"] == "not run"
    (tmp_path / "cut.ipynb").write_text('{"cells": [')
    st = render.notebook_status(tmp_path / "cut.ipynb")
    assert st["status"] == "unreadable" and "JSONDecodeError" in st["reason"]
    notebook(tmp_path / "ok.ipynb", "Title *here*", "1")
    assert render.notebook_status(tmp_path / "ok.ipynb") == {
        "status": "done", "seconds": None, "title": "Title *here*", "reason": None}


def test_every_kind_of_file_names_the_notebook_that_writes_it():
    """The notebook each kind of figure file is listed under is the one whose source builds that
    file name (read from the notebooks, independently of the registry), and only that one."""
    from fimoda.paper import figures
    grid = "ex.summary_figure("           # notebook 05 saves the grid and its table through it
    fragments = {k: (f'figure_path(FIG, "{k}"', f'figure_name("{k}"')
                 for k in figures.KINDS if k not in ("figure2", "max_cosine")}
    fragments.update({"figure2": (grid,), "max_cosine": (grid,)})
    assert sorted(report.NOTEBOOK_OF_KIND) == sorted(figures.KINDS) == sorted(fragments)
    assert len(fragments) == 27
    sources = {p.name: p.read_text() for p in pipeline.NB.glob("*.ipynb")}
    for kind, frags in fragments.items():
        writers = sorted(name for name, s in sources.items()
                         if any(f.replace('"', '\\"') in s for f in frags))
        assert len(writers) == 1 and writers[0].startswith(report.NOTEBOOK_OF_KIND[kind]), \
            (kind, writers)


# ------------------------------------------------------------------ in a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: Path, png: Path, profile: Path, size=(1000, 1400)) -> np.ndarray:
    """The page at ``url`` as headless Chromium draws it, with every host name unresolvable (so
    a page that needs the network shows it), as an RGB array."""
    from PIL import Image
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
                    f"--screenshot={png}", f"--window-size={size[0]},{size[1]}",
                    url.as_uri()], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def red(img) -> int:
    """Pixels of the test figure's pure red line."""
    return int(((img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")
def test_headless_chromium_shows_the_figures_and_the_index(site, tmp_path):
    tmp, _ = site
    executed = tmp / "executed" / "smoke"
    shots = Path(tmp_path)
    page = screenshot(executed / "html" / "01_final_models_concrete.html", shots / "page.png",
                      shots / "chromium")
    # the same notebook with its image outputs taken out, rendered the same way
    nb = nbformat.read(executed / "01_final_models_concrete.ipynb", as_version=4)
    for cell in nb.cells:
        cell["outputs"] = [o for o in cell.get("outputs", [])
                           if "image/png" not in o.get("data", {})]
    nbformat.write(nb, shots / "no_images.ipynb")
    bare = screenshot(render.Pages(shots / "html").render(shots / "no_images.ipynb"),
                      shots / "bare.png", shots / "chromium")
    assert red(page) > 2000 and red(bare) == 0, (red(page), red(bare))
    index = screenshot(executed / "index.html", shots / "index.png", shots / "chromium")
    dark = (index.sum(axis=2) < 200).sum()          # text drawn
    assert dark > 2000, dark
