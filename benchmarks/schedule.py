"""The pipeline's notebook schedulers compared on one run's measured notebook times.

A run's log (the lines ``[ k/N] <notebook> [<dataset>, ...]  m:ss`` that ``run_all.sh`` prints)
gives each notebook's wall time as it ran. This replays the profile's plan on two workers as a
discrete-event simulation, with each notebook taking its measured time, under

- ``chains``: each worker takes a whole dataset chain, longest first (``COST_ORDER``);
- ``dataset first``: the graph of :func:`fimoda.paper.pipeline.waits_for`, starting among the
  ready notebooks the longest dataset's first;
- ``spread``: the same graph with :func:`fimoda.paper.pipeline.spread_key` (the pipeline's);

and prints the simulated wall time of each, beside the sum of the notebook times over the
workers (the bound no schedule beats). A notebook's time depends on what ran beside it, so the
numbers are estimates of each order's idle time, not new measurements.

    .venv/bin/python benchmarks/schedule.py run.log [--profile cpu] [--jobs 2]
"""
from __future__ import annotations

import argparse
import heapq
import re

from fimoda.data.specs import cost_order, default_datasets
from fimoda.paper import pipeline

LINE = re.compile(r"^\[\s*\d+/\d+\] (.+?)\s+(\d+):(\d\d)$")


def durations(log: str) -> dict:
    """{notebook label: seconds} from a run's log."""
    out = {}
    for line in open(log):
        m = LINE.match(line.rstrip())
        if m:
            out[m.group(1).strip()] = int(m.group(2)) * 60 + int(m.group(3))
    return out


def label(nb: str, params: dict) -> str:
    """The label the pipeline prints for a notebook (its name, dataset and variant)."""
    lab = nb.removesuffix(".ipynb")
    if "dataset" in params:
        lab += " [" + ", ".join([params["dataset"]] + [
            str(params[k]) for k in ("optimizer", "mechanism") if k in params]) + "]"
    return lab


def simulate_graph(graph, seconds, jobs, key) -> float:
    """Wall time of :func:`fimoda.paper.pipeline.run_graph`'s rule on ``graph`` when each step
    takes ``seconds[k]``."""
    left = {k: set(w) for k, w in enumerate(pipeline.waits_for(graph))}
    t, free, running = 0.0, jobs, []
    while left or running:
        while free:
            ready = [k for k, w in left.items() if not w]
            if not ready:
                break
            k = min(ready, key=lambda j: key(j, left.keys()))
            del left[k]
            free -= 1
            heapq.heappush(running, (t + seconds[k], k))
        t, done = heapq.heappop(running)
        free += 1
        for w in left.values():
            w.discard(done)
    return t


def simulate_chains(head, per_ds, seconds_of, jobs) -> float:
    """Wall time of the head one at a time, then whole chains on ``jobs`` workers, longest
    dataset first."""
    rank = {d: k for k, d in enumerate(cost_order())}
    workers = [sum(map(seconds_of, head))] * jobs
    for chain in sorted(per_ds, key=lambda c: rank.get(c[0][1]["dataset"], -1)):
        i = workers.index(min(workers))
        workers[i] += sum(map(seconds_of, chain))
    return max(workers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    measured = durations(a.log)
    steps = pipeline.plan(a.profile, list(default_datasets(a.profile)))
    missing = [label(nb, p) for nb, p, _ in steps if label(nb, p) not in measured]
    if missing:
        print(f"not in the log (taken as 0 s): {', '.join(missing)}")
    seconds_of = lambda s: measured.get(label(s[0], s[1]), 0)
    head, per_ds, tail = pipeline.chains(steps)
    graph = head + [s for chain in per_ds for s in chain]
    seconds = [seconds_of(s) for s in graph]
    rank = {d: k for k, d in enumerate(cost_order())}
    dataset_first = lambda k, waiting: (rank.get(graph[k][1].get("dataset"), -1), k)
    end = sum(map(seconds_of, tail))          # the summary, alone after everything
    work = sum(seconds_of(s) for s in steps)
    print(f"{len(steps)} notebooks, {work / 60:.1f} notebook-minutes; {a.jobs} workers: at "
          f"best {(work - end) / a.jobs / 60 + end / 60:.1f} min")
    for name, t in (("chains", simulate_chains(head, per_ds, seconds_of, a.jobs)),
                    ("dataset first", simulate_graph(graph, seconds, a.jobs, dataset_first)),
                    ("spread (the pipeline's)",
                     simulate_graph(graph, seconds, a.jobs, pipeline.spread_key(graph)))):
        print(f"  {name:<24} {(t + end) / 60:5.1f} min")


if __name__ == "__main__":
    main()
