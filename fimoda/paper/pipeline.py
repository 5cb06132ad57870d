"""Run the notebooks in order with papermill: ``python -m fimoda.paper.pipeline --profile cpu``.

Executed notebooks go to ``notebooks/executed/<profile>/``; results to
``results/<profile>/<dataset>/``; figures to ``figures/<profile>/``. Every step is resumable
(results already computed with the same config are loaded, not recomputed), so a rerun after an
interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..data.specs import PROFILES, cost_order, dataset_names, default_datasets, tabular_names
from ..progress import clock
from .config import LORA_DATASETS, YARDSTICK_DATASETS, yardsticks_left_out
from .schedule import head_length, run_graph, spread_key, waits_for

ROOT = Path(__file__).resolve().parent.parent.parent
NB = ROOT / "notebooks"

# (notebook, per-dataset?, which datasets it applies to: None (all), or a function of the profile)
STEPS = [
    # the unifying view on a two-parameter toy model: needs no data, only the profile
    ("00_walkthrough.ipynb", False, None),
    ("00_data.ipynb", False, None),
    ("01_final_models.ipynb", True, None),
    ("02_gold_further_training.ipynb", True, None),
    ("03_attribution_methods.ipynb", True, None),
    ("04_evaluation.ipynb", True, None),
    ("05_summary_figures.ipynb", False, None),
    ("06_qualitative.ipynb", True, None),
    # beyond the paper: the infinitesimal gold standard and trajectory-matched
    # influence; tabular datasets run it, images and text print why they skip it
    ("07_beyond_the_paper.ipynb", True, None),
    # the field's yardsticks: group leave-out, LDS two ways, the gold's noise ceiling on the
    # profile's tabular datasets (fimoda.paper.config.YARDSTICK_DATASETS); LoRA further training
    # on SST-2
    ("08_yardsticks.ipynb", True, lambda profile: YARDSTICK_DATASETS[profile] + LORA_DATASETS),
]

# notebooks that read no dataset (so get no ``datasets`` parameter)
DATA_FREE = ("00_walkthrough.ipynb",)


# LOO re-training from scratch (Fig. 11) is for the regression datasets; it costs a full training
# per left-out instance, so the cpu profile leaves it out (run notebook 02 with retrain=True).
RETRAIN_DATASETS = ("concrete", "energy")
RETRAIN_PROFILES = ("smoke", "paper")
# The Adam runs: notebooks 02 and 04 with optimizer="adam", and notebook 07's part 2
_ADAM = (("02", {"optimizer": "adam"}), ("04", {"optimizer": "adam"}),
         ("07", {"optimizer": "adam", "infinitesimal": False}))
CPU_ADAM_DATASETS = ("concrete", "fico")
# A dataset's notebook run again with other parameters, right after its default run:
# (notebook prefix, datasets (a tuple, or a function returning one), profiles, parameters,
#  suffix of the executed copy)
VARIANTS = [
    # Concrete's gold standard also under the other leave-out mechanism, for notebook 04's
    # side-by-side comparison of the two (one more gold run, so not in the cpu profile)
    ("02", ("concrete",), ("smoke", "paper"), {"mechanism": "subtract"}, "subtract"),
    # the Adam gold standard of App. E.1 (Figs. 4 and 8), evaluated, and notebook 07's
    # trajectory-matched influence against it (Adam's lr, and Adam's preconditioner; part 2
    # only: the infinitesimal study is the SGD run's): for every tabular dataset, but in the cpu
    # profile for Concrete and FICO only, a regression and a classifier (as notebook 08), to stay
    # within its budget on 2 cores
    *((nb, tabular_names, ("smoke", "paper"), extra, "adam") for nb, extra in _ADAM),
    *((nb, CPU_ADAM_DATASETS, ("cpu",), extra, "adam") for nb, extra in _ADAM),
]


def plan(profile: str, datasets: list[str], seeds: int | None = None, variants: bool = True):
    """The (notebook, parameters, output path) triples to execute, in order. ``seeds``: the
    number of further-training seeds of every per-dataset notebook (None: the profile's);
    ``variants``: also the :data:`VARIANTS` runs."""
    base = Path(os.environ.get("FIMODA_EXECUTED_DIR", ROOT / "notebooks" / "executed"))
    out = base / profile
    steps = []
    for nb, per_ds, only in STEPS:
        if not per_ds:
            params = {"profile": profile}
            if nb not in DATA_FREE:
                params["datasets"] = list(datasets)
            if seeds is not None and nb.startswith("05"):      # it reads every dataset's gold
                params["seeds"] = seeds
            steps.append((nb, params, out / nb))
            continue
        only = only(profile) if callable(only) else only
        for ds in datasets:
            if only is not None and ds not in only:
                continue
            params = {"profile": profile, "dataset": ds}
            if seeds is not None:
                params["seeds"] = seeds
            first = dict(params)
            if nb.startswith("02") and ds in RETRAIN_DATASETS and profile in RETRAIN_PROFILES:
                first["retrain"] = True     # LOO re-training from scratch (paper Fig. 11)
            steps.append((nb, first, out / nb.replace(".ipynb", f"_{ds}.ipynb")))
            for prefix, names, profiles, extra, suffix in VARIANTS if variants else ():
                names = names() if callable(names) else names
                if nb.startswith(prefix) and ds in names and profile in profiles:
                    steps.append((nb, {**params, **extra},
                                  out / nb.replace(".ipynb", f"_{ds}_{suffix}.ipynb")))
    return steps


def ipc_kernel_manager(socket_dir: str, log_path: Path, threads: int | None = None,
                       label: str = "kernel"):
    """A kernel manager whose kernel talks over Unix sockets in ``socket_dir`` instead of TCP on
    localhost (the kernel and papermill share this machine, and ipykernel warns at every start of
    a TCP kernel without transport encryption; the socket path must be absolute: the kernel runs
    in notebooks/, papermill elsewhere), and whose own stderr -- kernel-level log lines such as
    the interrupt at shutdown, never a cell's output or error, which the executed notebook holds
    -- is appended to ``log_path`` instead of the console. ``threads``: the kernel's intra-op
    thread count (its OMP/MKL environment), None to inherit. Each finished progress bar's
    summary (:mod:`fimoda.progress`) is appended to the same log by name
    (``FIMODA_KERNEL_LOG``), labelled ``label`` (``FIMODA_KERNEL_LABEL``): the notebook."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            # a fresh prefix per kernel: kernels started at once must not pick the same sockets
            kwargs.setdefault("ip", tempfile.mkdtemp(dir=socket_dir) + "/kernel")
            super().__init__(**kwargs)

        async def start_kernel(self, **kw):
            kw["env"] = {**os.environ, **kw.get("env", {}), "FIMODA_KERNEL_LABEL": label,
                         "FIMODA_KERNEL_LOG": str(Path(log_path).resolve()),
                         # Hugging Face's own bars (loading weights) would be stored redraws
                         "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
            if threads is not None:
                kw["env"].update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            with open(log_path, "ab") as log:        # the child keeps its own descriptor
                kw.setdefault("stderr", log)
                return await super().start_kernel(**kw)

    return IPCKernelManager


def chains(steps):
    """``steps`` split into (head, per-dataset chains, tail): the notebooks before the first
    per-dataset one, each dataset's notebooks in order (independent of every other dataset's),
    and the other all-dataset notebooks (the summary, which reads every dataset's results), run
    after every chain."""
    first = head_length(steps)
    by_ds: dict[str, list] = {}
    tail = []
    for s in steps[first:]:
        if "dataset" in s[1]:
            by_ds.setdefault(s[1]["dataset"], []).append(s)
        else:
            tail.append(s)
    return steps[:first], list(by_ds.values()), tail


def __getattr__(name: str):
    """``COST_ORDER``: which dataset's notebooks go first when several are ready at once, a view
    of the dataset specs' ``cost_rank`` (:func:`fimoda.data.specs.cost_order`): the longest
    chain first (by the cpu profile's measured notebook times), so that the chains end close
    together and no core idles long at the end (the longest-processing-time-first rule)."""
    if name == "COST_ORDER":
        return cost_order()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(profile: str, datasets: list[str], device: str = "cpu", kernel: str = "python3",
        only: list[str] | None = None, jobs: int = 1, seeds: int | None = None,
        variants: bool = True) -> None:
    """Execute the notebooks of ``profile`` for ``datasets``. With ``jobs`` > 1 that many
    notebooks run at once, each as soon as the notebooks it reads have run (:func:`waits_for`:
    the datasets' chains side by side, a notebook's variants beside its default run), the
    longest dataset's first (``COST_ORDER``), each kernel with ``cpu_count // jobs`` intra-op
    threads: small models use one thread better than two (the gold engine runs its own blocks
    in parallel, and the methods' many small ops wait on each other). The count is fixed by
    ``jobs``, not by which notebooks happen to run together or how many datasets are asked
    for: a model trained with another thread count sums in another order, and reruns must give
    identical numbers."""
    import papermill as pm
    for ds in datasets:
        if ds not in dataset_names():
            raise SystemExit(f"unknown dataset {ds!r}; choose from {', '.join(dataset_names())}")
    if jobs < 1:
        raise SystemExit(f"--jobs must be at least 1 (got {jobs})")
    if seeds is not None and seeds < 1:
        raise SystemExit(f"--seeds must be at least 1 (got {seeds})")
    steps = plan(profile, datasets, seeds, variants)
    if only:
        steps = [s for s in steps if any(s[0].startswith(o) for o in only)]
        if not steps:
            raise SystemExit(f"--only {','.join(only)} matches no notebook of this run; "
                             f"notebooks: {', '.join(sorted({nb for nb, _, _ in plan(profile, datasets)}))}")
    head, per_ds, tail = chains(steps)
    jobs = min(jobs, max(1, len(steps) - len(tail)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    print(f"fimoda pipeline: profile={profile} datasets={','.join(datasets)} device={device}"
          + (f" seeds={seeds}" if seeds is not None else "")
          + f" ({len(steps)} notebooks" + (f", {jobs} at a time" if jobs > 1 else "") + ")",
          flush=True)
    left = yardsticks_left_out(profile, datasets)
    if left:
        print(f"notebook 08 (the yardsticks) not run for {', '.join(left)} in the {profile} "
              f"profile (its time budget; the README's notebook table says how to run it by hand)",
              flush=True)
    t_all = time.perf_counter()
    socket_dir = tempfile.mkdtemp(prefix="fimoda-kernel-")
    log = steps[0][2].parent / "kernels.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    done = [0]
    lock = threading.Lock()
    from .render import Pages
    pages = Pages(steps[0][2].parent / "html")

    def execute(nb, params, path, threads=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {**params, "device": device}
        label = nb.removesuffix(".ipynb")
        if "dataset" in params:         # and a variant's parameters (VARIANTS)
            label += " [" + ", ".join([params["dataset"]] + [
                str(params[k]) for k in ("optimizer", "mechanism") if k in params]) + "]"
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(NB / nb), str(path), parameters=params, kernel_name=kernel,
                                cwd=str(NB), progress_bar=False, log_output=False,
                                kernel_manager_class=ipc_kernel_manager(socket_dir, log, threads,
                                                                         label))
        except pm.PapermillExecutionError as e:
            raise SystemExit(f"notebook {label} failed ({e.ename}: {e.evalue}); "
                             f"see the executed copy at {path}") from None
        except RuntimeError as e:                   # e.g. the kernel died
            raise SystemExit(f"notebook {label} failed ({e}); kernel log: {log}") from None
        with lock:
            done[0] += 1
            print(f"[{done[0]:>2}/{len(steps)}] {label:<52} {clock(time.perf_counter() - t0):>8}",
                  flush=True)
        try:           # its HTML page now, while other notebooks run, so the end of the run is quick
            pages.render(path)
        except Exception:                       # render_html tries again and says why in the index
            pass

    try:
        if jobs == 1:
            for s in head:
                execute(*s)
            for chain in per_ds:
                for s in chain:
                    execute(*s)
        else:
            # the head and every chain as one graph (waits_for)
            graph = head + [s for chain in per_ds for s in chain]
            run_graph(waits_for(graph), lambda k: execute(*graph[k], threads=threads), jobs,
                      key=spread_key(graph))
        for s in tail:
            execute(*s)
    except SystemExit:                  # a notebook failed: the pages of the others, and its own
        render_html(profile, plan(profile, datasets, seeds, variants), pages)
        raise
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    from ..io import figures_dir, results_dir
    print(f"all {len(steps)} notebooks done in {clock(time.perf_counter() - t_all)}; executed "
          f"copies in {steps[0][2].parent}, figures in {figures_dir(profile)}, results in "
          f"{results_dir(profile, '').parent}", flush=True)
    render_html(profile, plan(profile, datasets, seeds, variants), pages)


def render_html(profile: str, steps, pages=None) -> Path:
    """HTML pages of the executed copies of ``steps`` (every notebook of the run, also those
    ``--only`` left out) and the index listing them (:func:`fimoda.paper.render.write_site`);
    prints one line ending with the index's path. ``pages``: the :class:`fimoda.paper.render.Pages`
    that rendered some already. Returns that path."""
    from ..io import figures_dir, results_dir
    from .render import write_site
    index, n, seconds = write_site(steps, profile, figures_dir(profile), NB,
                                   results_dir(profile, "") / "summary.md", pages)
    print(f"HTML of {n} executed notebooks ({clock(seconds)}), to read without a kernel: "
          f"{index}", flush=True)
    return index


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (else exit status 2 with one message)."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1 or str(v) != text.strip():
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The pipeline's options (also ``fimoda run``'s)."""
    ap.add_argument("--profile", default="cpu", choices=PROFILES)
    ap.add_argument("--datasets", default=None,
                    help="comma-separated; default: the profile's datasets")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=None, help="comma-separated notebook prefixes, e.g. 00,01")
    ap.add_argument("--jobs", type=_at_least_one, default=None,
                    help="datasets run at once (default: the number of cores, at most 2)")
    ap.add_argument("--seeds", type=_at_least_one, default=None,
                    help="further-training seeds of the gold standard (default: the profile's; "
                         "printed in every banner as a reduction)")
    return ap


def run_args(a: argparse.Namespace) -> None:
    """:func:`run` with options parsed by :func:`add_arguments`."""
    datasets = a.datasets.split(",") if a.datasets else list(default_datasets(a.profile))
    datasets = [d.strip() for d in datasets if d.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # notebooks run in notebooks/: relative directories given by the caller must not move
    for var in ("FIMODA_DATA_DIR", "FIMODA_CACHE_DIR", "FIMODA_RESULTS_DIR",
                "FIMODA_FIGURES_DIR", "FIMODA_EXECUTED_DIR"):
        if os.environ.get(var):
            os.environ[var] = os.path.abspath(os.environ[var])
    # other libraries' tqdm bars inside executed notebooks: a redraw every 10 s at most rather
    # than one stored output each (fimoda's own bars are one display per cell: fimoda.progress)
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    # tqdm.auto's notice that the kernel has no ipywidgets (the bars fall back to text), printed
    # into every executed notebook whose imports load it: not about fimoda's results
    os.environ.setdefault("PYTHONWARNINGS", "ignore:IProgress not found")
    jobs = a.jobs
    if jobs is None:                 # a CPU's cores: two datasets at once; one GPU: one at a time
        jobs = min(2, os.cpu_count() or 1) if a.device == "cpu" else 1
    run(a.profile, datasets, a.device, only=a.only.split(",") if a.only else None, jobs=jobs,
        seeds=a.seeds)


def main(argv=None):
    run_args(add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
             .parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
