"""fimoda.progress: one updating display per cell in a kernel, a few plain lines in a batch log,
a live tqdm bar on a terminal, nothing when off."""
import os
import re
import sys
import types

import IPython
import IPython.display
import pytest
from tqdm import tqdm

from fimoda import progress
from fimoda.progress import progress_bar


class FakeKernel:
    """A stand-in for a Jupyter kernel: IPython's get_ipython(), display and update_display,
    recording what a notebook would store."""

    def __init__(self, monkeypatch):
        self.shell = types.SimpleNamespace(execution_count=1, kernel=object(),
                                           events=types.SimpleNamespace(register=self.register))
        self.hooks, self.calls, self.outputs = [], [], {}
        monkeypatch.setattr(IPython, "get_ipython", lambda: self.shell)
        monkeypatch.setattr(IPython.display, "display", self.display)
        monkeypatch.setattr(IPython.display, "update_display", self.update_display)
        monkeypatch.setattr(progress, "_CELL", {})
        monkeypatch.setattr(progress, "_HOOKED", set())

    def register(self, event, fn):
        assert event == "post_run_cell"
        self.hooks.append(fn)

    def display(self, data, raw=False, display_id=None):
        assert raw and display_id is True
        did = f"d{len(self.outputs)}"
        self.calls.append(("display", did, data["text/plain"]))
        self.outputs[did] = data["text/plain"]
        return types.SimpleNamespace(display_id=did)

    def update_display(self, data, raw=False, display_id=None):
        assert raw and display_id in self.outputs
        self.calls.append(("update", display_id, data["text/plain"]))
        self.outputs[display_id] = data["text/plain"]       # nbclient replaces it in place

    def end_cell(self):
        for fn in self.hooks:
            fn(None)
        self.shell.execution_count += 1


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv("FIMODA_PROGRESS", "auto")
    monkeypatch.setenv("FIMODA_PROGRESS_INTERVAL", "0")      # render every update
    monkeypatch.setitem(sys.modules, "IPython", IPython)
    return FakeKernel(monkeypatch)


def test_a_kernel_gets_one_display_per_cell_updated_in_place(kernel):
    assert progress.mode() == "notebook"
    for epoch in progress_bar(range(50), desc="train concrete"):
        for _ in progress_bar(range(3), desc=f"epoch {epoch + 1}", leave=False):
            pass
    kernel.end_cell()
    displays = [c for c in kernel.calls if c[0] == "display"]
    updates = [c for c in kernel.calls if c[0] == "update"]
    assert len(displays) == 1 and len(updates) > 50         # one output, many in-place updates
    assert {c[1] for c in updates} == {displays[0][1]}
    assert any(" | epoch " in c[2] for c in updates)          # nested bars share the line
    final = kernel.outputs[displays[0][1]]
    assert re.fullmatch(r"train concrete: 50/50 it in 0:0\d", final)   # the outer bar's summary
    # the next cell gets its own display; the first cell's stays as it was
    bar = progress_bar(total=4, desc="gold", unit="run")
    bar.update(2.5)
    bar.set_postfix_str("last chunk 1.00 runs/s")
    bar.close()
    kernel.end_cell()
    assert len(kernel.outputs) == 2 and kernel.outputs[displays[0][1]] == final
    assert list(kernel.outputs.values())[1] == "gold: 2.5/4 run in 0:00 [last chunk 1.00 runs/s]"


def test_updates_are_rate_limited_and_the_cell_end_shows_the_last_state(kernel, monkeypatch):
    monkeypatch.setenv("FIMODA_PROGRESS_INTERVAL", "3600")
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    outer = progress_bar(total=10, desc="outer", leave=False)
    for _ in range(10):
        clock[0] += 1.0
        outer.update(1)
    assert kernel.calls == []                    # nothing yet: under the interval, no display
    clock[0] += 4000.0
    outer.update(0)                              # past the interval: the cell's display
    inner = progress_bar(range(2), desc="inner", leave=False)
    for _ in inner:
        pass                                     # shown once: its updates are rate limited
    outer.close()
    assert [c[0] for c in kernel.calls] == ["display"]
    kernel.end_cell()                            # the hook shows what the limit held back
    assert [c[0] for c in kernel.calls] == ["display", "update"]
    assert kernel.calls[-1][2].startswith("outer: 10/10 it in 1:06:")


def test_quick_bars_that_leave_nothing_make_no_output(kernel, monkeypatch):
    monkeypatch.setenv("FIMODA_PROGRESS_INTERVAL", "3600")
    for _ in progress_bar(range(5), desc="LiSSA", leave=False):
        pass
    kernel.end_cell()
    assert kernel.calls == []


def test_finished_bars_reach_the_kernel_log_with_the_notebook_label(kernel, monkeypatch,
                                                                    tmp_path, capfd):
    log = tmp_path / "kernels.log"
    log.write_text("kernel line before\n")
    monkeypatch.setenv("FIMODA_KERNEL_LOG", str(log))
    monkeypatch.setenv("FIMODA_KERNEL_LABEL", "01_final_models [concrete]")
    for _ in progress_bar(range(3), desc="train concrete", unit="epoch"):
        pass
    for _ in progress_bar(range(3), desc="quick inner", leave=False):
        pass
    lines = log.read_text().splitlines()
    assert len(lines) == 2, lines                # appended; the inner bar was quick, left nothing
    assert lines[0] == "kernel line before"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 01_final_models \[concrete\]: "
                        r"train concrete: 3/3 epoch in 0:00", lines[1]), lines[1]
    assert capfd.readouterr() == ("", "")        # nothing on the process's stdout or stderr
    # without FIMODA_KERNEL_LOG (a kernel the pipeline did not start): the cell's display only
    monkeypatch.delenv("FIMODA_KERNEL_LOG")
    for _ in progress_bar(range(3), desc="unlogged", unit="epoch"):
        pass
    assert len(log.read_text().splitlines()) == 2 and capfd.readouterr() == ("", "")
    assert "unlogged: 3/3 epoch in 0:00" in list(kernel.outputs.values())[-1]


def test_an_unwritable_kernel_log_is_one_warning_and_the_work_goes_on(kernel, monkeypatch,
                                                                      tmp_path):
    bad = tmp_path / "no such folder" / "kernels.log"
    monkeypatch.setenv("FIMODA_KERNEL_LOG", str(bad))
    monkeypatch.setattr(progress, "_UNWRITABLE", set())
    with pytest.warns(RuntimeWarning, match="no such folder.*cannot be written") as caught:
        for _ in range(3):
            assert list(progress_bar(range(2), desc="train")) == [0, 1]
    assert len(caught) == 1 and not bad.parent.exists()


def test_a_pipeline_kernel_appends_its_bars_to_the_log_and_not_to_the_notebook(tmp_path):
    """For real: a notebook run by papermill in the pipeline's kernel manager (a kernel process
    started as the pipeline starts it, here under pytest, where ipykernel does not capture the
    process's descriptors) with one bar of a second or more: its summary line is in the log, with
    the label, and the notebook stores only the bar's display and what the cell printed."""
    import nbformat
    import papermill as pm
    from fimoda.paper.pipeline import ipc_kernel_manager
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(
        "import time\n"
        "from fimoda.progress import progress_bar\n"
        "for _ in progress_bar(range(3), desc='slow bar', unit='step'):\n"
        "    time.sleep(0.4)\n"
        "print('cell done')")]
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    log = tmp_path / "executed" / "kernels.log"
    log.parent.mkdir()
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    pm.execute_notebook(str(tmp_path / "tiny.ipynb"), str(tmp_path / "executed" / "tiny.ipynb"),
                        kernel_name="python3", progress_bar=False, log_output=False,
                        cwd=str(tmp_path),
                        kernel_manager_class=ipc_kernel_manager(str(sockets), log, None,
                                                                "tiny [concrete]"))
    text = log.read_text()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d tiny \[concrete\]: slow bar: 3/3 step "
                     r"in 0:01$", text, re.M), text
    outputs = nbformat.read(tmp_path / "executed" / "tiny.ipynb", 4).cells[-1].outputs
    assert [o["output_type"] for o in outputs] == ["display_data", "stream"], outputs
    assert outputs[0]["data"]["text/plain"] == "slow bar: 3/3 step in 0:01"
    assert outputs[1]["name"] == "stdout" and outputs[1]["text"] == "cell done\n"
    assert "tiny [concrete]" not in nbformat.writes(nbformat.read(
        tmp_path / "executed" / "tiny.ipynb", 4))


def test_a_batch_log_gets_a_summary_line_per_kept_bar(monkeypatch, capsys):
    monkeypatch.setenv("FIMODA_PROGRESS", "log")
    monkeypatch.delenv("FIMODA_PROGRESS_INTERVAL", raising=False)
    for _ in progress_bar(range(1000), desc="train energy", unit="epoch"):
        for _ in progress_bar(range(3), desc="inner", leave=False):
            pass
    err = capsys.readouterr().err
    assert err == "train energy: 1000/1000 epoch in 0:00\n"
    monkeypatch.setenv("FIMODA_PROGRESS_INTERVAL", "0")     # every update a line
    bar = progress_bar(total=2, desc="gold", unit="piece", leave=False)
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("gold: 1/2 piece (50%) in 0:00") and len(err) == 2
    assert "\r" not in "".join(err)


def test_terminal_gets_tqdm_and_off_or_disable_gets_nothing(monkeypatch, capsys):
    monkeypatch.setenv("FIMODA_PROGRESS", "terminal")
    bar = progress_bar(range(3), desc="x", bar_format="{n}")
    assert isinstance(bar, tqdm)
    bar.close()
    capsys.readouterr()
    for env, disable in (("off", False), ("log", True)):
        monkeypatch.setenv("FIMODA_PROGRESS", env)
        assert list(progress_bar(range(3), desc="y", disable=disable)) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")


def test_an_unknown_mode_or_interval_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("FIMODA_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="FIMODA_PROGRESS='fancy'"):
        progress_bar(range(3))
    monkeypatch.setenv("FIMODA_PROGRESS", "log")
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("FIMODA_PROGRESS_INTERVAL", bad)
        with pytest.raises(ValueError, match="FIMODA_PROGRESS_INTERVAL"):
            progress_bar(range(3))


def test_every_loop_of_the_package_uses_the_helper():
    root = os.path.dirname(progress.__file__)
    users = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py") and f != "progress.py":
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                assert "from tqdm" not in text and "import tqdm" not in text, f
                users += [f] if "progress_bar(" in text else []
    assert len(users) >= 15
