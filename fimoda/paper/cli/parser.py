"""The ``fimoda`` command's arguments: the types that check them and the parser of every
command (:func:`build_parser`)."""
from __future__ import annotations

import argparse
import importlib

from .. import pipeline
from ..config import DATASET_NAMES
from ...data.specs import PROFILES

from .commands import (cmd_attribute, cmd_evaluate, cmd_figures, cmd_gold, cmd_merge, cmd_run)

# ----------------------------------------------------------------------------- argument types
def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected k/N (e.g. 3/10), got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"k/N needs 1 <= k <= N, got {text!r}")
    return k, n


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _workers(text: str):
    return "cuda" if text == "cuda" else _positive(text)


def _names(kind: str, choices):
    """An argparse type: a comma-separated list of names among ``choices``."""
    def parse(text: str) -> list[str]:
        names = [m.strip() for m in text.split(",") if m.strip()]
        bad = [m for m in names if m not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {kind}(s) {', '.join(bad) or text!r}; "
                                             f"choose from {', '.join(choices)}")
        return names
    return parse


def _methods(text: str) -> list[str]:
    from ...influence import METHODS
    return _names("method", list(METHODS))(text)


parse_datasets = _names("dataset", DATASET_NAMES)


def _entry_point(text: str) -> str:
    mod, _, fn = text.partition(":")
    if not mod or not fn or not all(p.isidentifier() for p in mod.split(".") + fn.split(".")):
        raise argparse.ArgumentTypeError(f"expected module:function (e.g. mypkg.models:load), "
                                         f"got {text!r}")
    return text


# ----------------------------------------------------------------------------- the parser
def _options(*specs, exclusive: bool = False):
    """An option group: a function adding the options ``specs`` ((flag, argparse keywords)
    pairs; ``exclusive``: at most one of them) to a parser."""
    def add(p):
        g = p.add_mutually_exclusive_group() if exclusive else p
        for flag, kw in specs:
            g.add_argument(flag, **kw)
    return add


def _gold_choices():
    from ...gold import MECHANISMS, OPTIMIZERS
    return OPTIMIZERS, MECHANISMS


PROFILE = ("--profile", dict(default="cpu", choices=PROFILES, help="default: cpu"))
RESULTS_DIR = ("--results-dir", dict(default=None, help="root of results/<profile>/<dataset>/ "
                                     "(default: $FIMODA_RESULTS_DIR or results/)"))
EXPERIMENT = [
    ("--device", dict(default="cpu", help="cpu | cuda | cuda:1 ... (default: cpu)")),
    ("--dtype", dict(default=None, help="default: the dataset's (float64 for tabular)")),
    ("--seeds", dict(type=_positive, default=None, metavar="S", help="further-training seeds "
                     "(default: the profile's; printed as a reduction)")),
    ("--data-dir", dict(default=None, help="default: $FIMODA_DATA_DIR or data/raw")),
    RESULTS_DIR,
]


def _experiment_options(dataset_required: bool = True):
    return _options(PROFILE, ("--dataset", dict(required=dataset_required,
                                                 choices=DATASET_NAMES)), *EXPERIMENT)


def _gold_options(p):
    optimizers, mechanisms = _gold_choices()
    _options(
        ("--optimizer", dict(default=None, choices=optimizers, help="default: the dataset's "
                             "(SGD; AdamW for SST-2); adam: App. E.1")),
        ("--mechanism", dict(default=None, choices=mechanisms, help="default: the dataset's "
                             "(remove: tabular; subtract: images, text)")),
        ("--runs-per-chunk", dict(type=_positive, default=None, metavar="N", help="runs per "
                                  "(seed, chunk) piece (default: sized by memory); more, smaller"
                                  " pieces spread better over a cluster; give the same value to "
                                  "every shard and to merge")))(p)


_progress_options = _options(
    ("--progress", dict(dest="progress", action="store_true", default=None,
                        help="progress bars (default: when stderr is a terminal)")),
    ("--no-progress", dict(dest="progress", action="store_false",
                           help="plain log lines instead of progress bars")), exclusive=True)
_dask_or_shard = _options(
    ("--shard", dict(type=_shard, default=None, metavar="k/N", help="compute only shard k of N "
                     "of the pieces (e.g. $SLURM_ARRAY_TASK_ID/N)")),
    ("--workers", dict(type=_workers, default=None, metavar="N|cuda", help="a Dask LocalCluster"
                       " of N single-threaded worker processes, or 'cuda': "
                       "dask_cuda.LocalCUDACluster, one worker per GPU")),
    ("--scheduler", dict(default=None, metavar="ADDRESS", help="the Dask scheduler of an "
                         "existing cluster, e.g. tcp://10.0.0.1:8786")), exclusive=True)
METHODS_OPTION = ("--methods", dict(type=_methods, default=None, help="comma-separated "
                                    "(default: every method but the dense reference)"))
_attribute_options = _options(
    METHODS_OPTION,
    ("--damping-index", dict(type=int, default=None,
                             help="index into the damping grid (default: the config's)")),
    ("--model", dict(type=_entry_point, default=None, metavar="MODULE:FUNCTION",
                     help="your own model and data instead of --dataset")),
    ("--out", dict(default=None, help="the .npz for --model's scores")))
_evaluate_options = _options(
    ("--adjust", dict(default="mean", choices=("mean", "full"),
                      help="mean: eq. (13) (default); full: eq. (17)")), METHODS_OPTION)
_figures_options = _options(
    PROFILE,
    ("--datasets", dict(type=parse_datasets, default=None,
                        help="comma-separated (default: the profile's)")),
    RESULTS_DIR,
    ("--figures-dir", dict(default=None, help="default: $FIMODA_FIGURES_DIR or figures/")))


def _command(sub, func, *groups):
    """Subcommand ``cmd_<name>`` with the option groups ``groups`` (functions adding options to
    a parser); its docstring's first line is the summary, the whole its description."""
    doc = " ".join(func.__doc__.split())
    p = sub.add_parser(func.__name__.removeprefix("cmd_"), help=doc.split(". ")[0].rstrip("."),
                       description=doc)
    for add in groups:
        add(p)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    doc = importlib.import_module(__package__).__doc__      # the command line's own help text
    ap = argparse.ArgumentParser(prog="fimoda", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc.split("\n\n", 1)[1].split("\n\nThe package:")[0])
    ap.add_argument("--debug", action="store_true",
                    help="on a failure, print the full traceback instead of one line")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _command(sub, cmd_run, pipeline.add_arguments)
    _command(sub, cmd_gold, _experiment_options(), _gold_options, _dask_or_shard,
             _progress_options)
    _command(sub, cmd_merge, _experiment_options(), _gold_options, _progress_options)
    _command(sub, cmd_attribute, _experiment_options(dataset_required=False),
             _attribute_options, _progress_options)
    _command(sub, cmd_evaluate, _experiment_options(), _gold_options, _evaluate_options)
    _command(sub, cmd_figures, _figures_options, _gold_options)
    return ap


