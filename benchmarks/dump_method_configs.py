"""Dump every (profile, dataset, method) effective method config, and the experiment-wide method
settings, as JSON: run it on two commits and diff the outputs to show a refactoring of the
method settings left every effective value as it was.

    PYTHONPATH=<checkout> python benchmarks/dump_method_configs.py > configs.json
"""
import dataclasses
import json

from fimoda.paper.config import DATASETS, get_config
from fimoda.data.specs import PROFILES
from fimoda.paper.experiment.methods import method_config
from fimoda.influence import METHODS

SHARED = ("damping_grid", "damping_index", "memory_gb", "grad_chunk", "fit_rows", "skip",
          "damping_sweep")

out = {}
for profile in PROFILES:
    for dataset in DATASETS:
        cfg = get_config(dataset, profile)
        key = f"{profile}/{dataset}"
        out[key] = {"shared": {k: repr(getattr(cfg.methods, k)) for k in SHARED}}
        for name in METHODS:
            mcfg = method_config(name, cfg)
            out[key][name] = {"class": type(mcfg).__name__,
                              **{k: repr(v) for k, v in dataclasses.asdict(mcfg).items()}}
print(json.dumps(out, indent=1, sort_keys=True))
