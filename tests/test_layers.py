"""The direction of imports: fimoda's core (data loading, models, training of theta^f, gradients,
the gold standard, the methods, metrics, the public API) imports nothing from the paper layer
(the profiles and the paper's settings, the experiment's steps, notebook 07's studies, the
pipeline, figures, summary and reports, the command line), which builds on the core.

Every import counts: module level, inside a function, relative (``from . import x``,
``from ..config import y``), absolute, and ``importlib.import_module`` with a literal name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fimoda

PACKAGE = Path(fimoda.__file__).parent
# The paper layer: these modules and every module below them. Every other module of fimoda is
# core, so a new module is core unless it is placed under one of these.
PAPER = ("fimoda.paper", "fimoda.__main__")


def in_paper_layer(module: str) -> bool:
    """Whether dotted ``module`` is in the paper layer (an entry of PAPER or below one)."""
    return any(module == p or module.startswith(p + ".") for p in PAPER)


def module_name(path: Path) -> str:
    """Dotted name of the module in file ``path`` under the package (a package: its own name)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool = False):
    """(line, [dotted modules], source text) of every import statement of ``source`` (the text
    of ``module``; ``is_package``: its ``__init__``) that names fimoda modules: for
    ``from A import b`` both A and A.b, since b may be a submodule."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)]
                                + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                             "__import__")):
            names = [node.args[0].value]
        names = [n for n in names if n == "fimoda" or n.startswith("fimoda.")]
        if names:
            yield node.lineno, names, ast.get_source_segment(source, node)


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """One line per statement of core ``module`` that imports a paper-layer module, in line
    order (none for a paper-layer module, which may import anything):
    'module:line imports paper-layer X: <statement>'."""
    if in_paper_layer(module):
        return []
    out = []
    for line, names, text in sorted(imported(source, module, is_package)):
        paper = [n for n in names if in_paper_layer(n)]
        if paper:
            out.append(f"{module}:{line} imports paper-layer {paper[0]}: {text}")
    return out


def modules():
    """(path, dotted name) of every module of the package."""
    return [(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))]


def test_the_core_imports_nothing_from_the_paper_layer():
    found = []
    for path, name in modules():
        found += violations(path.read_text(), name, path.name == "__init__.py")
    assert not found, "the core must not import the paper layer:\n" + "\n".join(found)


def test_both_layers_have_modules_and_the_map_names_existing_ones():
    names = [n for _, n in modules()]
    core = [n for n in names if not in_paper_layer(n)]
    assert {"fimoda.api", "fimoda.gradients", "fimoda.gold", "fimoda.influence", "fimoda.data",
            "fimoda.training", "fimoda.models", "fimoda.metrics"} <= set(core)
    # an entry that names nothing (a module moved or renamed) would keep no one out
    missing = [p for p in PAPER if p != "fimoda.paper" and not any(
        n == p or n.startswith(p + ".") for n in names)]
    assert not missing, f"the layer map names modules that do not exist: {missing}"
    assert any(in_paper_layer(n) for n in names)


# Synthetic sources name only fimoda.paper, the paper layer's own package, so that they keep
# their meaning when the paper layer's modules move into it.
CORE_SOURCE = '''\
import numpy as np
from . import losses
from .gold import GoldConfig
from ..metrics import lds

def later():
    from ..paper.config import get_config
    return get_config

def also():
    import fimoda.paper.pipeline as p
    from fimoda import paper, metrics
    from .. import paper as pp
    importlib.import_module("fimoda.paper.report")
    from ..paperwork import nothing
'''


def test_the_checker_finds_every_form_of_import_and_names_the_line():
    found = violations(CORE_SOURCE, "fimoda.data.example")
    assert found == [
        "fimoda.data.example:7 imports paper-layer fimoda.paper.config: "
        "from ..paper.config import get_config",
        "fimoda.data.example:11 imports paper-layer fimoda.paper.pipeline: "
        "import fimoda.paper.pipeline as p",
        "fimoda.data.example:12 imports paper-layer fimoda.paper: "
        "from fimoda import paper, metrics",
        "fimoda.data.example:13 imports paper-layer fimoda.paper: from .. import paper as pp",
        "fimoda.data.example:14 imports paper-layer fimoda.paper.report: "
        "importlib.import_module(\"fimoda.paper.report\")",
    ]
    # a package's __init__ resolves ``from .x`` inside itself: "from .paper.cli import main" in
    # fimoda/__init__.py is a violation, in fimoda/gold/__init__.py (fimoda.gold.paper) not
    assert violations("from .paper.cli import main\n", "fimoda", is_package=True) == [
        "fimoda:1 imports paper-layer fimoda.paper.cli: from .paper.cli import main"]
    assert violations("from .paper.cli import main\n", "fimoda.gold", is_package=True) == []
    # the paper layer may import anything, the core anything of the core
    assert violations(CORE_SOURCE, "fimoda.paper.example") == []
    assert violations("from ..gold import runner\nfrom .. import settings\n",
                      "fimoda.training.example") == []


@pytest.mark.parametrize("name, paper", [
    ("fimoda.paper.config", True), ("fimoda.paper.experiment.setup", True),
    ("fimoda.paper.plots", True), ("fimoda.plotsy", False), ("fimoda.settings", False), ("fimoda.paper.cli", True),
    ("fimoda", False), ("fimoda.paper.figures", True), ("fimoda.paperwork", False)])
def test_the_layer_of_a_module(name, paper):
    assert in_paper_layer(name) is paper
