"""The lock that keeps two processes from computing the same result file at once.

:func:`result_lock` holds ``.<name>.lock`` next to the result with ``fcntl.flock`` while a gold
standard, a method's scores or a final model is computed and written. The kernel releases a
flock when its holder exits, however it exits (SIGKILL included), so a lock file left behind by a
dead process is never stale: the next process takes it at once. A holder that finishes removes the
file. The file records the holder's
pid, host and purpose for the message a waiting process prints. Re-entrant within a process
(a method that computes a shared quantity under its own lock while the caller holds another).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading
import time
from pathlib import Path

_HELD: dict = {}            # lock path -> (file object, depth): the locks this process holds
_GUARD = threading.Lock()


class ResultLocked(RuntimeError):
    """Another process holds the lock of a result (``wait=False``, or ``timeout`` passed)."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown process"
    except OSError:
        return "unknown process"


@contextlib.contextmanager
def result_lock(result, what: str = "", wait: bool = True, timeout: float | None = None,
                poll: float = 0.2):
    """Hold the lock of ``result`` (a result file's path; the lock is ``.<name>.lock`` beside
    it) for the block. Held by another process: wait for it (printing once who holds it), up to
    ``timeout`` seconds (None: as long as it takes), or with ``wait=False`` raise
    :class:`ResultLocked` at once; either way the caller then finds the other process's
    finished result instead of writing over it."""
    result = Path(result)
    path = result.parent / f".{result.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _GUARD:
        if key in _HELD:
            fh, depth = _HELD[key]
            _HELD[key] = (fh, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _GUARD:
                fh, depth = _HELD[key]
                _HELD[key] = (fh, depth - 1)
        return
    fh = _acquire(path, result, wait, timeout, poll)
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}"
                 + (f", {what}" if what else "") + "\n")
        fh.flush()
        with _GUARD:
            _HELD[key] = (fh, 1)
        try:
            yield path
        finally:
            with _GUARD:
                _HELD.pop(key, None)
            path.unlink(missing_ok=True)        # removed while still held, then released
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


def _acquire(path: Path, result: Path, wait: bool, timeout, poll):
    """The lock file, opened and flock'ed; retried when the file was removed (by its releasing
    holder) between our open and our lock, so that two processes never hold different files."""
    t0, told = time.monotonic(), False
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            msg = f"{result} is being computed by another process ({_holder(path)}); "
            if not wait or (timeout is not None and time.monotonic() - t0 > timeout):
                raise ResultLocked(msg + "wait for it to finish, or stop it, then rerun")
            if not told:
                print(msg + "waiting for it to finish", file=sys.stderr, flush=True)
                told = True
            time.sleep(poll)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()
