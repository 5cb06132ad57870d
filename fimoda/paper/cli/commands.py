"""What each ``fimoda`` command does (``cmd_<name>``), through the notebooks' own functions, and
the steps they share."""
from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

from .. import pipeline

log = logging.getLogger("fimoda.paper.cli")


class CommandError(RuntimeError):
    """A failure at run time that the command reports in one line (exit status 1)."""


# ----------------------------------------------------------------------------- shared steps
def _setup(a):
    """The dataset's config (banner printed, as every notebook starts)."""
    from .. import experiment as ex
    return ex.setup(a.dataset, a.profile, a.data_dir, a.dtype, a.seeds)[0]


def _final_model(cfg, a, train: bool = True):
    """(theta^f, its training rows): the saved final model, trained first (notebook 01's
    train_final_model) when there is none and ``train``."""
    from .. import experiment as ex
    try:
        return ex.final_model(cfg, device=a.device)
    except FileNotFoundError:
        if not train:
            raise
    from ...training import train_final_model
    print(f"no final model for {cfg.dataset} ({cfg.profile} profile): training it", flush=True)
    train_final_model(cfg, ex.load_data(cfg), device=a.device, out_dir=ex.out_dir(cfg),
                      progress=a.progress)
    return ex.final_model(cfg, device=a.device)


def _instances(cfg, ds):
    from .. import experiment as ex
    return (ex.select_loo_indices(cfg, len(ds.X_train)),
            ex.select_test_indices(cfg, len(ds.X_test)))


def _gold_overrides(a) -> dict:
    over = {"progress": bool(a.progress)}
    if a.runs_per_chunk is not None:
        over["max_runs_per_chunk"] = a.runs_per_chunk
    return over


def _workdir(cfg, a) -> Path:
    from .. import experiment as ex
    opt, mech = ex.gold_settings(cfg, a.optimizer, a.mechanism)
    return ex.out_dir(cfg) / f"work_gold_{opt}_{mech}"


def _report_gold(gold, cfg, a):
    from .. import experiment as ex
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
    from .. import experiment as ex
    from ...gold.runner import MissingPieces, executing, shard_executor
    cfg = _setup(a)
    model, ds = _final_model(cfg, a)
    loo_idx, test_idx = _instances(cfg, ds)
    with contextlib.ExitStack() as stack:
        if a.shard is not None:
            stack.enter_context(executing(shard_executor(*a.shard, progress=a.progress)))
        elif a.workers is not None or a.scheduler is not None:
            from ...gold import distributed as dd
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
    from .. import experiment as ex
    from ...gold.runner import assemble_only, executing
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
                           f"(needs {', '.join(need)}, optionally left_out and loss)")
    return {k: get(k) for k in need + ("left_out", "loss")}


def _attribute_own(a):
    import numpy as np
    from ... import api
    from ...influence import default_methods
    from ...gradients import CustomLossError
    from ...influence.errors import MethodBreakdown
    from ...io import save_npz
    spec = _load_entry_point(a.model)
    left = spec["left_out"]
    if left is None:
        left = np.arange(len(spec["X_train"]))
    methods = a.methods or list(default_methods())
    loss = spec["loss"]                          # the model's own loss, where load() gives one
    att = api.attributor(spec["model"], spec["X_train"], spec["y_train"], left,
                         spec["X_test"], spec["y_test"], task=spec["task"], progress=a.progress,
                         loss=loss)
    if loss is not None:
        print(f"loss: {getattr(loss, '__qualname__', repr(loss))} (load()'s), not the task's",
              flush=True)
    out, failed = {}, {}
    options = {} if a.damping_index is None else {"damping_index": a.damping_index}
    for m in methods:
        try:
            out[f"scores_{m}"] = api.attribute(spec["model"], None, None, left, None, None,
                                               task=spec["task"], method=m, att=att, loss=loss,
                                               **options)
            print(f"{m}: scores {out[f'scores_{m}'].shape} (test, left-out)", flush=True)
        except (MethodBreakdown, CustomLossError) as e:
            failed[m] = str(e)
            print(f"{m}: {'refused' if isinstance(e, CustomLossError) else 'failed'} ({e})",
                  flush=True)
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
    from .. import experiment as ex
    from ...influence import default_methods
    cfg = _setup(a)
    if a.damping_index is not None:
        cfg = dataclasses.replace(cfg, methods=dataclasses.replace(
            cfg.methods, damping_index=a.damping_index))
    model, ds = _final_model(cfg, a)
    loo_idx, test_idx = _instances(cfg, ds)
    att = ex.make_attributor(model, ds, cfg, loo_idx, test_idx, device=a.device,
                             progress=a.progress)
    methods = a.methods or list(default_methods())
    _, status = ex.run_methods(methods, att, cfg, loo_idx, test_idx)
    print(status.to_string(), flush=True)
    print(f"scores in {ex.out_dir(cfg)}", flush=True)
    if not (status["status"] == "ok").any():
        raise CommandError("no method produced scores")


def cmd_evaluate(a):
    """The methods against the gold standard (notebook 04). Cosine and Spearman of every
    method's scores against the gold standard, max over eval points per method, saved as
    evaluation_<optimizer>_<mechanism>_eq<13|17>.csv next to the results."""
    from .. import experiment as ex
    from ...influence import default_methods
    cfg = _setup(a)
    opt, mech = ex.gold_settings(cfg, a.optimizer, a.mechanism)
    gold = ex.load_gold(cfg, opt, mech)
    scores = ex.load_scores(cfg, a.methods or list(default_methods()))
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
    from .. import experiment as ex, report
    from ..config import PROFILE_DATASETS
    datasets = list(a.datasets or PROFILE_DATASETS[a.profile])
    path, _ = ex.summary_figure(a.profile, datasets, a.optimizer, a.mechanism)
    print(path, flush=True)
    path, _ = ex.adam_figure(a.profile, datasets, a.optimizer, a.mechanism)
    if path is not None:                 # Figure 4 only where it was drawn
        print(path, flush=True)
    print(ex.summary_figure(a.profile, datasets, a.optimizer, a.mechanism, adjust="full")[0],
          flush=True)
    print(report.write_figure_index(a.profile), flush=True)
    print(report.write_summary(a.profile, datasets, a.optimizer, a.mechanism), flush=True)


