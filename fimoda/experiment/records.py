"""What a cached result depends on: the experiment config without the parts a result does not
depend on, in one canonical JSON form that is stored with the result and compared before reuse."""
from __future__ import annotations

from ..config import ExperimentConfig


def _without(cfg: ExperimentConfig, *parts) -> dict:
    """The config as a dict without the parts that a result does not depend on (a method's
    scores do not depend on the gold standard's settings, and vice versa)."""
    d = cfg.to_dict()
    for p in parts:
        d.pop(p)
    return d


def _canon(obj) -> str:
    import json
    return json.dumps(obj, sort_keys=True, default=str)
