"""fimoda's command line: ``fimoda COMMAND --help`` for each command (or ``python -m fimoda``).

The commands call the notebooks' own functions (:mod:`fimoda.experiment`), so their results are
the notebooks' files in ``results/<profile>/<dataset>/``, reused by either:

  run        the whole pipeline (the notebooks, in order; ``run_all.sh``'s options)
  gold       one dataset's gold standard (notebook 02): serially, on a Dask cluster
             (--workers N, --scheduler ADDRESS) or one shard of a job array (--shard k/N)
  merge      the gold file from the pieces that every shard has written
  attribute  methods' scores for a dataset (notebook 03) or for your own model (--model)
  evaluate   the methods against the gold standard (notebook 04's table)
  figures    the summary figures and tables across datasets (notebook 05)

Progress bars on a terminal; plain log lines when stderr is not one (a batch job). Bad
arguments exit with status 2 and one message; a failure at run time with status 1.

Your own model (``fimoda attribute --model mypkg.mymodule:load``): ``load()`` takes no argument
and returns a mapping (or an object with these attributes): ``model`` (the trained
``torch.nn.Module``, theta^f), ``X_train``, ``y_train``, ``X_test``, ``y_test`` (arrays or
tensors), ``task`` (``"regression"`` or ``"classification"``) and optionally ``left_out`` (the
training rows to attribute; default all). The scores go to ``--out`` (an .npz with
``scores_<method>[test, left_out]`` per method and ``left_out``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from . import pipeline
from .config import DATASETS, PROFILES

log = logging.getLogger("fimoda.cli")


class CommandError(RuntimeError):
    """A failure at run time that the command reports in one line (exit status 1)."""


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
    from .influence import METHODS
    return _names("method", list(METHODS))(text)


_datasets = _names("dataset", DATASETS)


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
    from .gold import MECHANISMS, OPTIMIZERS
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
    return _options(PROFILE, ("--dataset", dict(required=dataset_required, choices=DATASETS)),
                    *EXPERIMENT)


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
    ("--datasets", dict(type=_datasets, default=None,
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
    ap = argparse.ArgumentParser(prog="fimoda", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
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


# ----------------------------------------------------------------------------- shared steps
def _setup(a):
    """The dataset's config (banner printed, as every notebook starts)."""
    from . import experiment as ex
    return ex.setup(a.dataset, a.profile, a.data_dir, a.dtype, a.seeds)[0]


def _final_model(cfg, a, train: bool = True):
    """(theta^f, its training rows): the saved final model, trained first (notebook 01's
    train_final_model) when there is none and ``train``."""
    from . import experiment as ex
    try:
        return ex.final_model(cfg, device=a.device)
    except FileNotFoundError:
        if not train:
            raise
    from .train import train_final_model
    print(f"no final model for {cfg.dataset} ({cfg.profile} profile): training it", flush=True)
    train_final_model(cfg, ex.load_data(cfg), device=a.device, out_dir=ex.out_dir(cfg),
                      progress=a.progress)
    return ex.final_model(cfg, device=a.device)


def _instances(cfg, ds):
    from . import experiment as ex
    return (ex.select_loo_indices(cfg, len(ds.X_train)),
            ex.select_test_indices(cfg, len(ds.X_test)))


def _gold_overrides(a) -> dict:
    over = {"progress": bool(a.progress)}
    if a.runs_per_chunk is not None:
        over["max_runs_per_chunk"] = a.runs_per_chunk
    return over


def _workdir(cfg, a) -> Path:
    from . import experiment as ex
    opt, mech = ex.gold_settings(cfg, a.optimizer, a.mechanism)
    return ex.out_dir(cfg) / f"work_gold_{opt}_{mech}"


def _report_gold(gold, cfg, a):
    from . import experiment as ex
    opt, mech = ex.gold_settings(cfg, a.optimizer, a.mechanism)
    print(f"gold standard ({opt}, {mech}): loss_loo {tuple(gold['loss_loo'].shape)} "
          f"(seeds, left-out, eval points, test) in "
          f"{ex.out_dir(cfg) / f'gold_{opt}_{mech}.npz'}", flush=True)


# ----------------------------------------------------------------------------- commands
def cmd_run(a):
    """The whole pipeline: every notebook, in order (run_all.sh's options). Executed notebooks
    go to notebooks/executed/<profile>/, results to results/<profile>/<dataset>/, figures to
    figures/<profile>/; every step resumes from what is already computed."""
    pipeline.run_args(a)


def cmd_gold(a):
    """One dataset's gold standard for a profile (notebook 02's run_gold). Further training from
    the final model (trained first if there is none), resumable from its work directory;
    --workers/--scheduler run the (seed, chunk) pieces as Dask tasks, --shard k/N computes only
    shard k's pieces (a job array's task) and 'fimoda merge' then writes the gold file."""
    import contextlib
    from . import experiment as ex
    from .gold.runner import MissingPieces, executing, shard_executor
    cfg = _setup(a)
    model, ds = _final_model(cfg, a)
    loo_idx, test_idx = _instances(cfg, ds)
    with contextlib.ExitStack() as stack:
        if a.shard is not None:
            stack.enter_context(executing(shard_executor(*a.shard, progress=a.progress)))
        elif a.workers is not None or a.scheduler is not None:
            from .gold import distributed as dd
            dd.require_dask()             # imports distributed, which sets its loggers' levels
            logging.getLogger("distributed").setLevel(logging.WARNING)   # its INFO chatter
            client = stack.enter_context(dd.cluster_client(workers=a.workers,
                                                           scheduler=a.scheduler))
            print(f"dask: {len(client.scheduler_info()['workers'])} workers, dashboard "
                  f"{client.dashboard_link}", flush=True)
            stack.enter_context(dd.on_dask(client, progress=a.progress))
        try:
            gold = ex.run_gold(model, ds, cfg, loo_idx, test_idx, a.optimizer, a.mechanism,
                               device=a.device, **_gold_overrides(a))
        except MissingPieces as e:
            if a.shard is None:
                raise
            k, n = a.shard
            print(f"shard {k}/{n} done; {len(e.pieces)} piece(s) of other shards are not "
                  f"written yet in {e.workdir}. Once every shard has finished: fimoda merge "
                  "with the same options", flush=True)
            return       # (the shard that finds every piece written writes the gold file)
    _report_gold(gold, cfg, a)


def cmd_merge(a):
    """Assemble the gold file from every shard's pieces. Computes nothing: give the options the
    shards were given; a missing piece is an error that names it."""
    from . import experiment as ex
    from .gold.runner import assemble_only, executing
    cfg = _setup(a)
    opt, mech = ex.gold_settings(cfg, a.optimizer, a.mechanism)
    wd = _workdir(cfg, a)
    if not wd.is_dir() and not (ex.out_dir(cfg) / f"gold_{opt}_{mech}.npz").exists():
        raise CommandError(f"no pieces to merge: {wd} does not exist (run 'fimoda gold --shard "
                           "k/N' for every k first)")
    model, ds = _final_model(cfg, a, train=False)
    loo_idx, test_idx = _instances(cfg, ds)
    with executing(assemble_only):
        gold = ex.run_gold(model, ds, cfg, loo_idx, test_idx, a.optimizer, a.mechanism,
                           device=a.device, **_gold_overrides(a))
    _report_gold(gold, cfg, a)


def _load_entry_point(spec: str):
    mod, _, fn = spec.partition(":")
    sys.path.insert(0, os.getcwd())      # a module next to the caller, as `python -m` finds it
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise CommandError(f"--model {spec}: cannot import {mod!r} ({e})") from None
    finally:
        sys.path.pop(0)
    for part in fn.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"--model {spec}: {mod!r} has no {fn!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CommandError(f"--model {spec}: {fn!r} is not callable")
    got = obj()
    need = ("model", "X_train", "y_train", "X_test", "y_test", "task")
    get = (lambda k: got.get(k)) if isinstance(got, dict) else (lambda k: getattr(got, k, None))
    missing = [k for k in need if get(k) is None]
    if missing:
        raise CommandError(f"--model {spec}: the returned value lacks {', '.join(missing)} "
                           f"(needs {', '.join(need)}, optionally left_out)")
    return {k: get(k) for k in need + ("left_out",)}


def _attribute_own(a):
    import numpy as np
    from . import api
    from .influence import METHODS
    from .influence.errors import MethodBreakdown
    from .io import save_npz
    spec = _load_entry_point(a.model)
    left = spec["left_out"]
    if left is None:
        left = np.arange(len(spec["X_train"]))
    methods = a.methods or [m for m in METHODS if m != "dense"]
    att = api.attributor(spec["model"], spec["X_train"], spec["y_train"], left,
                         spec["X_test"], spec["y_test"], task=spec["task"], progress=a.progress)
    out, failed = {}, {}
    options = {} if a.damping_index is None else {"damping_index": a.damping_index}
    for m in methods:
        try:
            out[f"scores_{m}"] = api.attribute(spec["model"], None, None, left, None, None,
                                               task=spec["task"], method=m, att=att, **options)
            print(f"{m}: scores {out[f'scores_{m}'].shape} (test, left-out)", flush=True)
        except MethodBreakdown as e:
            failed[m] = str(e)
            print(f"{m}: failed ({e})", flush=True)
    if not out:
        raise CommandError(f"every method failed: {failed}")
    path = save_npz(a.out, left_out=np.asarray(left), **out)
    print(f"scores of {len(out)} method(s) in {path}", flush=True)


def cmd_attribute(a):
    """Methods' scores for a dataset or your own model. One or several methods (notebook 03's
    run_methods, written to results/<profile>/<dataset>/scores_<method>.npz), or, with --model
    module:function, for your own trained model (see 'fimoda --help' for what the function
    returns), written to --out."""
    if a.model is not None:
        return _attribute_own(a)
    import dataclasses
    from . import experiment as ex
    from .influence import METHODS
    cfg = _setup(a)
    if a.damping_index is not None:
        cfg = dataclasses.replace(cfg, methods=dataclasses.replace(
            cfg.methods, damping_index=a.damping_index))
    model, ds = _final_model(cfg, a)
    loo_idx, test_idx = _instances(cfg, ds)
    att = ex.make_attributor(model, ds, cfg, loo_idx, test_idx, device=a.device,
                             progress=a.progress)
    methods = a.methods or [m for m in METHODS if m != "dense"]
    _, status = ex.run_methods(methods, att, cfg, loo_idx, test_idx)
    print(status.to_string(), flush=True)
    print(f"scores in {ex.out_dir(cfg)}", flush=True)
    if not (status["status"] == "ok").any():
        raise CommandError("no method produced scores")


def cmd_evaluate(a):
    """The methods against the gold standard (notebook 04). Cosine and Spearman of every
    method's scores against the gold standard, max over eval points per method, saved as
    evaluation_<optimizer>_<mechanism>_eq<13|17>.csv next to the results."""
    from . import experiment as ex
    from .influence import METHODS
    cfg = _setup(a)
    opt, mech = ex.gold_settings(cfg, a.optimizer, a.mechanism)
    gold = ex.load_gold(cfg, opt, mech)
    scores = ex.load_scores(cfg, a.methods or [m for m in METHODS if m != "dense"])
    if not scores:
        raise CommandError(f"no method scores in {ex.out_dir(cfg)}: run 'fimoda attribute "
                           f"--profile {a.profile} --dataset {a.dataset}' first")
    eq = "13" if a.adjust == "mean" else "17"
    *_, table = ex.evaluate(gold, scores, a.adjust)
    path = ex.save_table(table, cfg, f"evaluation_{opt}_{mech}_eq{eq}.csv")
    print(table.round(3).to_string(), flush=True)
    print(path, flush=True)


def cmd_figures(a):
    """Summary figures and tables (notebook 05). Figure 2 (and 4, 5) grids over the datasets
    with results, their max-cosine tables, the figure index and summary.md."""
    from . import experiment as ex, report
    from .config import PROFILE_DATASETS
    datasets = list(a.datasets or PROFILE_DATASETS[a.profile])
    path, _ = ex.summary_figure(a.profile, datasets, a.optimizer, a.mechanism)
    print(path, flush=True)
    adam = ex.gold_datasets(a.profile, datasets, "adam")
    if adam and a.optimizer is None and a.mechanism is None:
        print(ex.summary_figure(a.profile, adam, "adam")[0], flush=True)
    print(ex.summary_figure(a.profile, datasets, a.optimizer, a.mechanism, adjust="full")[0],
          flush=True)
    print(report.write_figure_index(a.profile), flush=True)
    print(report.write_summary(a.profile, datasets, a.optimizer, a.mechanism), flush=True)


# ----------------------------------------------------------------------------- entry point
def _check(ap, a):
    """Argument combinations argparse cannot express: one error (status 2) before any work."""
    if a.command == "attribute":
        if a.model is not None and a.dataset is not None:
            ap.error("attribute: give --dataset or --model, not both")
        if a.model is None and a.dataset is None:
            ap.error("attribute: give --dataset (with --profile) or --model MODULE:FUNCTION")
        if a.model is not None and not a.out:
            ap.error("attribute --model needs --out FILE.npz")
        if a.out and not a.out.endswith(".npz"):
            ap.error(f"attribute --out must name an .npz file, got {a.out!r}")
    if a.command == "run" and a.datasets:
        try:
            _datasets(a.datasets)
        except argparse.ArgumentTypeError as e:
            ap.error(f"run --datasets: {e}")
    if getattr(a, "dtype", None) is not None:
        from .models import DTYPES
        if a.dtype not in DTYPES:
            ap.error(f"--dtype: unknown dtype {a.dtype!r}; choose from {', '.join(DTYPES)}")


def _output(a, program: bool):
    """Progress bars on a terminal; plain INFO log lines (the gold standard logs every piece)
    otherwise (``program``: run as a program, whose environment may be set)."""
    if getattr(a, "progress", None) is None:
        a.progress = sys.stderr.isatty()
    if not a.progress:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,     # others: warnings
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("fimoda").setLevel(logging.INFO)
        if program and "tqdm" not in sys.modules:   # the methods' inner bars: read at import
            os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: the program's arguments); returns the exit
    status (argparse exits with 2 on bad arguments)."""
    program = argv is None
    ap = build_parser()
    a = ap.parse_args(argv)
    _check(ap, a)
    for opt, var in (("results_dir", "FIMODA_RESULTS_DIR"), ("figures_dir", "FIMODA_FIGURES_DIR"),
                     ("data_dir", "FIMODA_DATA_DIR")):
        if getattr(a, opt, None):
            os.environ[var] = os.path.abspath(getattr(a, opt))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _output(a, program)
    from .gold.runner import MissingPieces
    try:
        a.func(a)
    except (CommandError, MissingPieces, ValueError, FileNotFoundError, ImportError) as e:
        print(f"fimoda {a.command}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
