"""The pipeline's notebooks as a graph: which notebook waits for which (:func:`waits_for`), the
order ready notebooks start in (:func:`spread_key`), and the threads that run them
(:func:`run_graph`)."""
from __future__ import annotations

import threading

from ..data.specs import cost_order

__all__ = ["head_length", "waits_for", "spread_key", "run_graph"]


def waits_for(steps) -> list[set[int]]:
    """For each of ``steps`` (:func:`plan`'s order) the indices of the steps it must wait for.

    - the head (the walkthrough, the data tour) waits for nothing: it reads only the data;
    - a dataset's notebook waits for its dataset's previous notebook, *and every variant of it*
      (:data:`VARIANTS`: the same notebook with other parameters); a variant waits for what its
      default run waits for, so the two run side by side (02 beside 02 [adam], 04 beside
      04 [adam], ...): neither reads the other's results, each writes files named by its own
      optimizer / mechanism, and a quantity both need is computed once under its result lock;
    - the tail (the summary) waits for every step before it."""
    head = head_length(steps)
    waits: list[set[int]] = []
    stage: dict[str, tuple[str, set[int], set[int]]] = {}   # dataset -> (notebook, its waits, its runs)
    for k, (nb, params, _) in enumerate(steps):
        ds = params.get("dataset")
        if ds is None:
            waits.append(set() if k < head else set(range(k)))
            continue
        prev_nb, prev_waits, prev_runs = stage.get(ds, (None, set(), set()))
        if nb == prev_nb:                               # a variant of the step before it
            waits.append(set(prev_waits))
            prev_runs.add(k)
        else:
            waits.append(set(prev_runs))
            stage[ds] = (nb, waits[-1], {k})
    return waits


def spread_key(graph):
    """The order in which :func:`run_graph` starts the ready notebooks of ``graph`` (a
    ``key(k, waiting)`` of step k and the steps not yet started): the head first, then the
    notebook of the dataset with the most notebooks not yet started, ties to the longer dataset
    (``COST_ORDER``), then plan order. A dataset with much left must not be left to run alone
    at the end; taking one dataset's notebooks first while it has any ready does just that to
    the datasets it keeps waiting (``benchmarks/schedule.py`` compares the two on a run's
    measured notebook times)."""
    rank = {d: k for k, d in enumerate(cost_order())}

    def key(k, waiting):
        ds = graph[k][1].get("dataset")
        rest = sum(1 for j in waiting if graph[j][1].get("dataset") == ds)
        return (ds is not None, -rest, rank.get(ds, -1), k)
    return key


def run_graph(waits: list[set[int]], work, jobs: int, key=lambda k, waiting: k) -> None:
    """Run ``work(k)`` for every step k on ``jobs`` threads, each step once every step in
    ``waits[k]`` has finished; of the steps ready, the one with the smallest
    ``key(k, waiting)`` first (``waiting``: the steps not yet started, k among them).
    The first exception stops new steps from starting; it is raised once the running ones end."""
    lock = threading.Condition()
    left = {k: set(w) for k, w in enumerate(waits)}
    running: set[int] = set()
    failed: list[BaseException] = []

    def worker():
        while True:
            with lock:
                while True:
                    ready = [k for k, w in left.items() if not w]
                    if failed or not left or ready:
                        break
                    if not running:                 # nothing can free a step: a cycle
                        failed.append(ValueError(f"steps {sorted(left)} wait for each other"))
                        lock.notify_all()
                        return
                    lock.wait()
                if failed or not left:
                    return
                k = min(ready, key=lambda j: key(j, left.keys()))
                del left[k]
                running.add(k)
            try:
                work(k)
            except BaseException as e:               # SystemExit from a failed notebook
                with lock:
                    failed.append(e)
            with lock:
                running.discard(k)
                for w in left.values():
                    w.discard(k)
                lock.notify_all()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failed:
        raise failed[0]


def head_length(steps) -> int:
    """How many of ``steps`` come before the first per-dataset notebook (the head)."""
    return next((k for k, s in enumerate(steps) if "dataset" in s[1]), len(steps))
