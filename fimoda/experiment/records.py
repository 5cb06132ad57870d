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


class StaleResult(ValueError):
    """A stored result was produced by another configuration than the one asking for it."""


def check_record(path, stored, expected: dict, rerun: str) -> None:
    """:class:`StaleResult` naming ``path``, the keys on which its stored record (a dict, or the
    canonical JSON of one; None when it has none) disagrees with ``expected``, and the notebook
    ``rerun`` that recomputes it; nothing when they agree."""
    import json
    from ..io import differences
    if isinstance(stored, str):
        stored = json.loads(stored)
    if not isinstance(stored, dict):
        raise StaleResult(f"{path} holds no record of the configuration that produced it: "
                          f"rerun {rerun} to recompute it")
    diff = differences(stored, json.loads(_canon(expected)), only_new_keys=True)
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise StaleResult(f"{path} was computed with another configuration than this one "
                          f"(differs in: {shown}); rerun {rerun} with these settings first")
