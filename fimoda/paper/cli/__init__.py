"""fimoda's command line: ``fimoda COMMAND --help`` for each command (or ``python -m fimoda``).

The commands call the notebooks' own functions (:mod:`fimoda.paper.experiment`), so their results
are the notebooks' files in ``results/<profile>/<dataset>/``, reused by either:

  run        the whole pipeline (the notebooks, in order; ``run_all.sh``'s options)
  gold       one dataset's gold standard (notebook 02): serially, on a Dask cluster
             (--workers N, --scheduler ADDRESS) or one shard of a job array (--shard k/N)
  merge      the gold file from the pieces that every shard has written
  attribute  methods' scores for a dataset (notebook 03) or for your own model (--model)
  evaluate   the methods against the gold standard (notebook 04's table)
  figures    the summary figures and tables across datasets (notebook 05)

Progress bars on a terminal; plain log lines when stderr is not one (a batch job). Bad
arguments (a CUDA device that is not there included) exit with status 2 and one message before
any work; any failure at run time -- a fimoda error, a full disk, a read-only results folder, a
bad data file -- with status 1 and one line on stderr that names the file holding the full
traceback (``--debug``: the traceback itself); Ctrl-C with status 130 and one line.

Your own model (``fimoda attribute --model mypkg.mymodule:load``): ``load()`` takes no argument
and returns a mapping (or an object with these attributes): ``model`` (the trained
``torch.nn.Module``, theta^f), ``X_train``, ``y_train``, ``X_test``, ``y_test`` (arrays or
tensors), ``task`` (``"regression"`` or ``"classification"``) and optionally ``left_out`` (the
training rows to attribute; default all) and ``loss`` (the model's per-example training loss
when it is not the task's: every method uses it, and those that cannot are reported refused). The scores go to ``--out`` (an .npz with
``scores_<method>[test, left_out]`` per method and ``left_out``).

The package: :mod:`.parser` (the arguments), :mod:`.commands` (what each command does), and here
:func:`main`, which parses, checks, sets up the output and runs one command.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .commands import CommandError
from .parser import parse_datasets, build_parser

__all__ = ["main", "build_parser", "CommandError"]


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
            parse_datasets(a.datasets)
        except argparse.ArgumentTypeError as e:
            ap.error(f"run --datasets: {e}")
    if getattr(a, "dtype", None) is not None:
        from ...models import DTYPES
        if a.dtype not in DTYPES:
            ap.error(f"--dtype: unknown dtype {a.dtype!r}; choose from {', '.join(DTYPES)}")
    device = getattr(a, "device", None)
    if device is not None:
        why = _device_problem(device)
        if why:
            ap.error(f"--device {device}: {why}")


def _device_problem(device: str):
    """Why ``device`` cannot run here (None when it can): checked before any data is loaded."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return "not a device (cpu, cuda, cuda:1, ...)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return ("this torch has no usable CUDA device (torch.cuda.is_available() is False); "
                    "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"there are only {torch.cuda.device_count()} CUDA device(s)"
    elif dev.type != "cpu":
        return f"device type {dev.type!r} is not supported; use cpu or cuda"
    return None


def _output(a, program: bool):
    """Progress bars on a terminal; plain INFO log lines (the gold standard logs every piece)
    otherwise (``program``: run as a program, whose environment may be set)."""
    if getattr(a, "progress", None) is None:
        a.progress = sys.stderr.isatty()
    if not a.progress:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,     # others: warnings
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("fimoda").setLevel(logging.INFO)
        if program:     # the methods' inner bars (fimoda.progress), and other libraries' tqdm
            os.environ.setdefault("FIMODA_PROGRESS", "off")
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
    try:
        a.func(a)
    except KeyboardInterrupt:
        print(f"fimoda {a.command}: interrupted; finished pieces and results are kept, rerun "
              "the same command to resume", file=sys.stderr, flush=True)
        return 130
    except Exception as e:          # every failure: one line, the traceback to a file
        if getattr(a, "debug", False):
            raise
        print(f"fimoda {a.command}: error: {_one_line(e)} (traceback: {_save_traceback()})",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _one_line(e: BaseException) -> str:
    """The error as one line: its message (an OS error with its file and reason), prefixed by
    its type where the type says something the message does not."""
    import errno
    if isinstance(e, OSError) and e.errno is not None:
        where = f" {e.filename}" if e.filename else ""
        hint = {errno.ENOSPC: "free some space, then rerun to resume",
                errno.EROFS: "the folder is read-only; give a writable --results-dir",
                errno.EACCES: "no permission; give a writable --results-dir",
                errno.EFBIG: "a file-size limit (ulimit -f) was hit"}.get(e.errno, "")
        msg = f"cannot write{where}: {e.strerror}" if e.errno in (errno.ENOSPC, errno.EROFS,
                                                                   errno.EACCES, errno.EFBIG) \
            else f"{e.strerror}{':' + where if where else ''}"
        return msg + (f" ({hint})" if hint else "")
    text = " ".join(str(e).split()) or repr(e)
    known = isinstance(e, (CommandError, ValueError, FileNotFoundError, ImportError)) or \
        type(e).__module__.startswith("fimoda")
    return text if known else f"{type(e).__name__}: {text}"


def _save_traceback() -> str:
    """The current exception's traceback, written to a log file in the temporary folder (which
    stays writable when the results folder is not); returns its path."""
    import tempfile
    import time
    import traceback
    path = os.path.join(tempfile.gettempdir(),
                        f"fimoda-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    try:
        with open(path, "w") as fh:
            traceback.print_exc(file=fh)
    except OSError:
        return "not written: the temporary folder is not writable either; rerun with --debug"
    return path


if __name__ == "__main__":
    sys.exit(main())
