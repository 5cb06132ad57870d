"""Every failure of the ``fimoda`` command is one line on stderr: exit 1 at run time (the
traceback goes to a file the line names, or to stderr with --debug), exit 2 for bad arguments
before any work, exit 130 for Ctrl-C."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fimoda.paper.cli.parser as parser
from fimoda.paper.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _failing(monkeypatch, exc):
    def boom(a):
        """A command that fails."""
        raise exc
    boom.__name__ = "cmd_evaluate"                          # the command's name comes from it
    monkeypatch.setattr(parser, "cmd_evaluate", boom)       # bound when main builds the parser


ARGS = ["evaluate", "--profile", "smoke", "--dataset", "concrete"]


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.EROFS, "Read-only file system", "/r/results/x.npz"),
     "cannot write /r/results/x.npz: Read-only file system (the folder is read-only"),
    (OSError(errno.ENOSPC, "No space left on device", "/r/x.npz"),
     "cannot write /r/x.npz: No space left on device (free some space, then rerun to resume)"),
    (OSError(errno.EFBIG, "File too large", "/r/x.npz"), "a file-size limit (ulimit -f)"),
    (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero"),
    (ValueError("bad\nvalue"), "bad value"),
])
def test_a_runtime_failure_is_one_line_and_status_1(monkeypatch, capsys, exc, expected):
    _failing(monkeypatch, exc)
    assert main(ARGS) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fimoda evaluate: error: ") and expected in lines[0]
    log = lines[0].rsplit("(traceback: ", 1)[1].rstrip(")")
    assert type(exc).__name__ in Path(log).read_text()          # the full story, kept
    os.unlink(log)


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    _failing(monkeypatch, KeyboardInterrupt())
    assert main(ARGS) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "resume" in err[0]


def test_debug_shows_the_traceback(monkeypatch):
    _failing(monkeypatch, ZeroDivisionError("x"))
    with pytest.raises(ZeroDivisionError):
        main(["--debug"] + ARGS)


@pytest.mark.parametrize("argv, message", [
    (["run", "--jobs", "0"], "--jobs: expected an integer >= 1"),
    (["run", "--seeds", "-3"], "--seeds: expected an integer >= 1"),
    (["gold", "--profile", "smoke", "--dataset", "concrete", "--device", "cuda"],
     "--device cuda: this torch has no usable CUDA device"),
    (["gold", "--profile", "smoke", "--dataset", "concrete", "--device", "tpu"],
     "--device tpu: not a device"),
])
def test_bad_arguments_exit_2_before_any_work(argv, message, capsys, monkeypatch):
    import torch
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    def started(a):
        """A command that must not start."""
        pytest.fail("work started")
    started.__name__ = "cmd_gold"
    monkeypatch.setattr(parser, "cmd_gold", started)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_real_failure_from_the_shell_prints_no_traceback(tmp_path):
    """A data folder that is a file: one line naming the fix, exit 1, nothing on stdout's
    behalf of a traceback."""
    bogus = tmp_path / "data"
    bogus.write_text("not a folder")
    env = {**os.environ, "FIMODA_DATA_DIR": str(bogus), "FIMODA_RESULTS_DIR": str(tmp_path / "r")}
    p = subprocess.run([sys.executable, "-m", "fimoda", "gold", "--profile", "smoke",
                        "--dataset", "concrete", "--no-progress"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert "FIMODA_DATA_DIR is a file" in lines[0]
