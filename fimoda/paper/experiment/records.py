"""What a stored result of the experiment depends on, in the form the result store
(:mod:`fimoda.store`) records and compares: the experiment config without the parts a result does
not depend on, and the final model theta^f the result was computed from."""
from __future__ import annotations

from pathlib import Path

from ...settings import ExperimentConfig
from ...store import StaleResult, source

__all__ = ["StaleResult", "config_without", "final_model_source", "FINAL_MODEL_FILE"]

FINAL_MODEL_FILE = "final_model.pt"


def config_without(cfg: ExperimentConfig, *parts) -> dict:
    """The config as a dict without the parts that a result does not depend on (a method's
    scores do not depend on the gold standard's settings, and vice versa)."""
    d = cfg.to_dict()
    for p in parts:
        d.pop(p)
    return d


def final_model_source(directory) -> dict:
    """``{"final_model": {file, sha256}}`` of the saved theta^f in ``directory``, or ``{}`` when
    there is none there: what a result computed from it records, and what a reader compares, so
    that a replaced theta^f invalidates every result downstream of it."""
    p = Path(directory) / FINAL_MODEL_FILE
    return {"final_model": source(p)} if p.exists() else {}
