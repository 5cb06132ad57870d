"""Progress bars for every loop of fimoda, shown to suit where the output goes.

:func:`progress_bar` takes tqdm's arguments and picks one of four modes (the environment
variable ``FIMODA_PROGRESS`` forces one; default ``auto``):

- ``terminal`` (stderr is a terminal): a live tqdm bar.
- ``notebook`` (inside a Jupyter kernel, interactive or run by papermill): ONE display per cell,
  updated in place at most every ``FIMODA_PROGRESS_INTERVAL`` seconds (default 1). Its last line
  shows the bars running now (nested ones joined by ``|``); a finished bar with ``leave=True``
  keeps its summary line above it, one with ``leave=False`` leaves its summary on the last line
  until the next bar replaces it. nbclient replaces a stored output when it is updated, so an
  executed notebook keeps one output per cell, never one per redraw. Each finished bar that
  kept its line or ran a second or more is also appended, with the kernel's label
  (``FIMODA_KERNEL_LABEL``), to the file ``FIMODA_KERNEL_LOG`` names: the pipeline sets both,
  so the line lands in its ``kernels.log``; without it (a kernel the pipeline did not start)
  the cell's display is all.
- ``log`` (stderr is a file or pipe: a batch log): a plain line to stderr at most every
  ``FIMODA_PROGRESS_INTERVAL`` seconds (default 60) while a bar runs, and a summary line when a
  bar with ``leave=True`` (or one that logged a line) finishes.
- ``off``: nothing (the command line's ``--no-progress``).
"""
from __future__ import annotations

import os
import sys
import threading
import time

__all__ = ["progress_bar", "note", "mode", "in_kernel", "MODES"]

MODES = ("auto", "terminal", "notebook", "log", "off")
_LOCK = threading.RLock()
_CELL: dict = {}        # notebook mode: the display of the cell running now
_HOOKED: set = set()    # the shells whose cells end with _finish
_UNWRITABLE: set = set()  # kernel-log paths already reported unwritable


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (IPython with a kernel attached)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def mode() -> str:
    """The mode a bar created now gets: ``FIMODA_PROGRESS`` unless it is ``auto`` (or unset),
    else ``notebook`` in a Jupyter kernel, ``terminal`` when stderr is a terminal, ``log``
    otherwise."""
    m = os.environ.get("FIMODA_PROGRESS", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"FIMODA_PROGRESS={m!r}: choose from {', '.join(MODES)}")
    if m != "auto":
        return m
    if in_kernel():
        return "notebook"
    stream = sys.stderr
    return "terminal" if stream is not None and stream.isatty() else "log"


def progress_bar(iterable=None, *, desc: str = "", total=None, unit: str = "it",
                 leave: bool = True, disable: bool = False, **tqdm_kwargs):
    """A progress bar over ``iterable`` (or updated by hand with ``update(n)``), with tqdm's
    meaning of ``desc``, ``total``, ``unit``, ``leave`` and ``disable``; further keyword
    arguments (e.g. ``bar_format``) reach tqdm in terminal mode only. Supports iteration,
    ``update``, ``set_postfix``, ``set_postfix_str``, ``close``, ``n`` and ``with``."""
    m = "off" if disable else mode()
    if m == "terminal":
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, **tqdm_kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _Bar(iterable, desc, total, unit, leave, m)


def note(text: str) -> None:
    """One line shown where the bars show: in a notebook kept above the cell's bars (and
    appended to ``FIMODA_KERNEL_LOG`` when set), else a line on stderr (terminal, log); nothing
    when progress is off."""
    m = mode()
    if m == "off":
        return
    if m != "notebook":
        print(text, file=sys.stderr, flush=True)
        return
    with _LOCK:
        _cell()["kept"].append(text)
        _render(force=True)
    _kernel_log(text)


def _interval(default: float) -> float:
    """Seconds between a bar's shown updates: ``FIMODA_PROGRESS_INTERVAL``, else ``default``."""
    raw = os.environ.get("FIMODA_PROGRESS_INTERVAL", "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"FIMODA_PROGRESS_INTERVAL={raw!r}: a number of seconds >= 0")
    return value


def _num(x) -> str:
    """A count as an integer when it is one, else with one decimal."""
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def clock(seconds: float) -> str:
    """Wall time as m:ss (or h:mm:ss)."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class _Bar:
    """A bar in notebook, log or off mode (see the module's docstring)."""

    def __init__(self, iterable, desc, total, unit, leave, m):
        self.iterable, self.desc, self.total, self.unit = iterable, desc or "", total, unit
        self.leave, self.mode, self.n, self.postfix = leave, m, 0, ""
        self.start = self.last = time.monotonic()
        self.logged, self.closed = False, False
        self.interval = _interval(60.0 if m == "log" else 1.0)
        if m == "notebook":
            with _LOCK:
                _cell()["active"].append(self)

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return int(self.total) if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if self.mode == "off" or now - self.last < self.interval:
            return
        self.last = now
        if self.mode == "log":
            self.logged = True
            print(self.line(now), file=sys.stderr, flush=True)
        else:
            _render(self.interval)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s="", refresh=True):
        self.postfix = str(s)

    def line(self, now=None) -> str:
        """The bar as one line of text: count, share, elapsed and remaining time, postfix."""
        elapsed = (now or time.monotonic()) - self.start
        count = _num(self.n) + (f"/{_num(self.total)}" if self.total else "")
        text = f"{self.desc}: {count} {self.unit}" if self.desc else f"{count} {self.unit}"
        if self.total and not self.closed:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f" in {clock(elapsed)}"
        if self.total and not self.closed and 0 < self.n < self.total:
            text += f", about {clock(elapsed * (self.total - self.n) / self.n)} left"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.mode == "log" and (self.leave or self.logged):
            print(self.line(), file=sys.stderr, flush=True)
        elif self.mode == "notebook":
            with _LOCK:
                cell = _cell()
                if self in cell["active"]:
                    cell["active"].remove(self)
                summary = self.line()
                if self.leave:
                    cell["kept"].append(summary)
                    cell["last"] = ""
                    _render(force=True)
                elif cell["handle"] is not None:     # the cell shows a display: say it ended
                    cell["last"] = summary
                    _render(self.interval)
            if self.leave or time.monotonic() - self.start >= 1.0:
                _kernel_log(summary)


def _cell() -> dict:
    """Notebook mode: the state of the cell running now (a fresh one for each cell). The first
    call in a kernel registers :func:`_finish` to run after every cell."""
    from IPython import get_ipython
    shell = get_ipython()
    key = getattr(shell, "execution_count", None)
    if shell is not None and id(shell) not in _HOOKED:
        shell.events.register("post_run_cell", _finish)
        _HOOKED.add(id(shell))
    if "key" not in _CELL or _CELL["key"] != key:
        _CELL.clear()
        _CELL.update(key=key, handle=None, kept=[], last="", active=[], shown=0.0, dirty=False)
    return _CELL


def _finish(result=None) -> None:
    """After a cell: show what a rate-limited update left unshown (the cell's final lines)."""
    with _LOCK:
        if _CELL.get("dirty") and _CELL.get("handle") is not None:
            _render(force=True)


def _render(interval: float = 0.0, force: bool = False) -> None:
    """Show the cell's lines: kept summaries, then the running bars or the last summary.
    Unless ``force``, at most once every ``interval`` seconds (else marked to show later)."""
    from IPython import display as ipd
    with _LOCK:
        cell = _cell()
        now = time.monotonic()
        if not force and now - cell["shown"] < interval:
            cell["dirty"] = True
            return
        live = " | ".join(b.line(now) for b in cell["active"]) or cell["last"]
        data = {"text/plain": "\n".join(cell["kept"] + ([live] if live else []))}
        if cell["handle"] is None:
            cell["handle"] = ipd.display(data, raw=True, display_id=True)
        else:
            ipd.update_display(data, raw=True, display_id=cell["handle"].display_id)
        cell["shown"], cell["dirty"] = now, False


def _kernel_log(summary: str) -> None:
    """Append a finished bar's summary, stamped and labelled, to the file ``FIMODA_KERNEL_LOG``
    names (the pipeline's kernels.log), never to the cell; nothing when it is unset. The log is
    opened by name because the kernel's stderr is no sure way there: ipykernel replaces
    ``sys.stderr`` with a stream whose ``fileno()`` is a copy of the launch stderr only while it
    captures the process's descriptors (then descriptor 2 is a pipe into the cell's output), and
    raises when it does not: under pytest (it checks ``PYTEST_CURRENT_TEST``) or with
    ``capture_fd_output`` off."""
    path = os.environ.get("FIMODA_KERNEL_LOG", "")
    if not path:
        return
    label = os.environ.get("FIMODA_KERNEL_LABEL", "kernel")
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {label}: {summary}\n".encode()
    try:                         # one O_APPEND write: kernels running at once never interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        if path not in _UNWRITABLE:              # a log that cannot be written stops no work
            _UNWRITABLE.add(path)
            import warnings
            warnings.warn(f"FIMODA_KERNEL_LOG={path!r} cannot be written ({e.strerror}); "
                          "finished bars are not logged", RuntimeWarning, stacklevel=3)
        return
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
