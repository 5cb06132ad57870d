"""A copy of the executed notebooks to read without a kernel: one HTML page per executed notebook
(its figures embedded) and an ``index.html`` listing them in the pipeline's reading order, per
dataset, with each notebook's figure files and the paper's figure numbers
(:func:`fimoda.paper.report.figure_index`, the rows of ``figures/<profile>/INDEX.md``).

Pages live in ``notebooks/executed/<profile>/html/``, the index beside the executed copies. They
load nothing from the network (no MathJax, require.js or mermaid from a CDN: LaTeX in markdown
stays as typed; the notebooks write their symbols in Unicode). A notebook that failed is marked in
the index and its page shows the error, as its executed copy does; one that could not be
rendered (a copy left unreadable by a killed run) is marked with the reason.
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import quote

from ..io import atomic_write
from ..progress import clock
from .report import figure_index, paper_order

__all__ = ["Pages", "exporter", "notebook_status", "write_site"]

# nbconvert's JupyterLab template without the blocks that load scripts from CDNs
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def exporter():
    """nbconvert's HTML exporter with the ``lab`` template, images embedded, nothing fetched
    from the network. Build it once and reuse it: building costs more than a page."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    log = logging.getLogger("fimoda.paper.render")  # not nbconvert's notice of images without
    log.setLevel(logging.ERROR)                     # alt text on every figure, on the console
    return HTMLExporter(template_name="lab", template_file="fimoda_offline.html.j2",
                        extra_loaders=[DictLoader({"fimoda_offline.html.j2": _OFFLINE_TEMPLATE})],
                        embed_images=True, log=log)


def notebook_status(path) -> dict:
    """What an executed copy says of its run: ``status`` ("done", "failed": papermill's
    exception flag or an error output; "not run": no copy; "unreadable": not notebook JSON),
    ``seconds`` (papermill's wall time, None where unknown), ``title`` (its first heading, or
    None) and ``reason`` (for "unreadable")."""
    path = Path(path)
    if not path.exists():
        return {"status": "not run", "seconds": None, "title": None, "reason": None}
    try:
        nb = json.loads(path.read_text())
        cells = nb["cells"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"status": "unreadable", "seconds": None, "title": None,
                "reason": f"{type(e).__name__}: {e}"}
    meta = nb.get("metadata", {}).get("papermill", {})
    error = any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", []))
    return {"status": "failed" if meta.get("exception") or error else "done",
            "seconds": meta.get("duration"), "title": title(cells), "reason": None}


def title(cells) -> str | None:
    """The text of the first markdown heading among ``cells``."""
    for c in cells:
        if c.get("cell_type") == "markdown":
            src = "".join(c.get("source", ""))
            m = re.search(r"^#+\s+(.+)$", src, flags=re.M)
            if m:
                return m.group(1).strip()
    return None


class Pages:
    """Renders executed copies into HTML pages in ``directory`` (``<stem>.html``), one at a time
    (threads may share it), with one nbconvert exporter built at the first page: building it
    costs more than a page. The pipeline renders each notebook as soon as it has run, so that
    the end of a run only writes the index."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self._exporter = None
        self._lock = threading.Lock()

    def page(self, notebook) -> Path:
        """Where ``notebook``'s page goes."""
        return self.directory / (Path(notebook).stem + ".html")

    def render(self, notebook) -> Path:
        """``notebook`` (an executed .ipynb) as its HTML page, written atomically; skipped when
        the page is newer than the notebook already. Returns the page's path."""
        notebook, page = Path(notebook), self.page(notebook)
        with self._lock:
            if page.exists() and page.stat().st_mtime >= notebook.stat().st_mtime:
                return page
            self._exporter = self._exporter or exporter()
            body, _ = self._exporter.from_filename(str(notebook))
            return atomic_write(page, lambda fh: fh.write(body.encode()))


def _link(target: Path, start: Path, text: str) -> str:
    return f'<a href="{quote(os.path.relpath(target, start))}">{html.escape(text)}</a>'


def _variant(params: dict) -> str:
    """A step's label after its notebook: its dataset and the parameters that make it a variant
    of the dataset's default run."""
    if "dataset" not in params:
        return ""
    extra = [str(params[k]) for k in ("optimizer", "mechanism") if k in params]
    return params["dataset"] + (f" ({', '.join(extra)})" if extra else "")


def _figures_of(step, steps, rows) -> list[dict]:
    """The rows of the figure index written by ``step`` (one of ``steps``): the same notebook
    and dataset, and the step's variant parameters (optimizer, mechanism) equal to the file's
    settings; a file that several steps could have written goes to the one with the most
    matching parameters."""
    def fits(s, r):
        nb, params, _ = s
        return (nb.startswith(r["notebook"]) and params.get("dataset") == r["dataset"]
                and all(params[k] == r[k] for k in ("optimizer", "mechanism") if k in params))
    nb, params, path = step
    mine = []
    for r in rows:
        if fits(step, r):
            rivals = [s for s in steps if fits(s, r)]
            best = max(rivals, key=lambda s: sum(k in s[1] for k in ("optimizer", "mechanism")))
            if best[2] == path:
                mine.append(r)
    return sorted(mine, key=paper_order)


def _step_line(step, steps, rows, out: Path, figures: Path, pages: Pages) -> tuple[str, dict]:
    """One step's line of the index: its label, page and executed copy, wall time, status when
    not done, and the figure files it wrote with their paper numbers; and its status."""
    nb, params, path = step
    st = notebook_status(path)
    parts = [f"<b>{html.escape(_variant(params) or nb.removesuffix('.ipynb'))}</b>"]
    if st["status"] in ("done", "failed"):
        try:
            parts.append(_link(pages.render(path), out, "read"))
        except Exception as e:              # the index still lists it, with the reason
            st = {**st, "status": "unreadable", "reason": f"{type(e).__name__}: {e}"}
        parts.append(_link(Path(path), out, ".ipynb"))
    if st["seconds"] is not None:
        parts.append(clock(st["seconds"]))
    if st["status"] != "done":
        mark = st["status"] + (f": {st['reason']}" if st["reason"] else "")
        parts.append(f'<span class="{st["status"].replace(" ", "-")}">{html.escape(mark)}</span>')
    figs = [(f"{r['paper']}: " if r["paper"] else "") + _link(figures / r["name"], out, r["name"])
            for r in _figures_of(step, steps, rows)]
    line = " · ".join(parts)
    if figs:
        line += '<ul class="figs"><li>' + "</li><li>".join(figs) + "</li></ul>"
    return line, st


def write_site(steps, profile: str, figures, source_dir, summary=None, pages: Pages | None = None):
    """Render every executed copy of ``steps`` (the pipeline's (notebook, parameters, executed
    path) triples, in reading order) that exists, and write ``index.html`` beside them listing
    every step (done, failed, not run) with its page, wall time and figure files. ``figures``:
    the profile's figures folder; ``source_dir``: the notebooks (titles of steps not run);
    ``summary``: ``summary.md``, linked when it exists; ``pages``: the :class:`Pages` that
    rendered some of them already (default: new ones in ``<executed>/html/``). Returns (index
    path, number of pages, seconds)."""
    t0 = time.perf_counter()
    out, figures = Path(steps[0][2]).parent, Path(figures)
    pages = pages or Pages(out / "html")
    rows = figure_index(profile, figures) if figures.exists() else []
    items: dict[str, list[str]] = {}
    titles: dict[str, str] = {}
    rendered = 0
    for step in steps:
        line, st = _step_line(step, steps, rows, out, figures, pages)
        items.setdefault(step[0], []).append(line)
        rendered += st["status"] in ("done", "failed")
        if step[0] not in titles:
            titles[step[0]] = (st["title"] or notebook_status(Path(source_dir) / step[0])["title"]
                               or step[0])
    index_md = figures / "INDEX.md"
    body = [f"<h1>fimoda: the <code>{html.escape(profile)}</code> profile's notebooks</h1>",
            "<p>Read them in this order. Each page is a notebook as the pipeline executed it, "
            "figures included; it needs no kernel and nothing from the network. Figure numbers "
            "are the paper's (" + (_link(index_md, out, "INDEX.md") if index_md.exists() else
                                   "INDEX.md, written by the summary notebook") + ")"
            + (", the numbers behind them in " + _link(Path(summary), out, "summary.md")
               if summary is not None and Path(summary).exists() else "") + ".</p>", "<ol>"]
    for nb, lines in items.items():
        body.append(f"<li><h2>{html.escape(titles[nb])}</h2><ul><li>" + "</li><li>".join(lines)
                    + "</li></ul></li>")
    body.append("</ol>")
    index = out / "index.html"
    text = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fimoda {html.escape(profile)} notebooks</title><style>{_CSS}</style>"
            "</head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    atomic_write(index, lambda fh: fh.write(text.encode()))
    return index, rendered, time.perf_counter() - t0


_CSS = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;"
        "line-height:1.45;color:#222} h2{font-size:1.1em;margin:1em 0 .2em} ul{margin:.2em 0}"
        " .figs{font-size:.9em;color:#444} .failed,.unreadable{color:#b00;font-weight:bold}"
        " .not-run{color:#888}")
