"""The command line (fimoda.paper.cli) on the smoke profile: --help of every command, bad arguments
as one message with exit status 2, a sharded gold standard merged equal to the unsharded one bit
for bit (and on Dask workers), methods for the user's own model, evaluate and figures."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fimoda.paper.cli import main
from fimoda.io import load_npz

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--profile", "smoke", "--dataset", "concrete", "--runs-per-chunk", "3"]
GOLD = "smoke/concrete/gold_sgd_remove.npz"
WORK = "smoke/concrete/work_gold_sgd_remove"
COMMANDS = ("run", "gold", "merge", "attribute", "evaluate", "figures")


def env(**extra):
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    return e


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """main() sets these from its options: restored after every test."""
    for var in ("FIMODA_RESULTS_DIR", "FIMODA_FIGURES_DIR", "TQDM_DISABLE", "FIMODA_PROGRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """``python -m fimoda gold`` as a batch job would run it (stderr not a terminal): trains the
    final model, then the gold standard in 6 pieces; plain log lines, no progress bars."""
    root = tmp_path_factory.mktemp("unsharded")
    p = subprocess.run([sys.executable, "-m", "fimoda", "gold", *SMOKE, "--results-dir",
                        str(root)], capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "gold standard (sgd, remove): loss_loo (2, 8, 4, 6)" in p.stdout
    assert "INFO fimoda.gold.runner: seed 2 chunk 3/3: 3 runs" in p.stderr
    assert "\r" not in p.stderr and "%|" not in p.stderr        # no progress bar
    return root


def arrays_equal(a, b):
    za, zb = load_npz(a), load_npz(b)
    assert sorted(za) == sorted(zb)
    for k in za:
        assert np.array_equal(za[k], zb[k]), k


def seeded(root: Path, unsharded: Path):
    """A results root holding the unsharded run's final model (the same theta^f: its files and
    the result store's record of them)."""
    d = root / "smoke" / "concrete"
    d.mkdir(parents=True)
    for f in ("final_model.pt", "final_model.json", "final_model.pt.record.json"):
        (d / f).write_bytes((unsharded / "smoke" / "concrete" / f).read_bytes())
    return root


# ----------------------------------------------------------------------------- help, arguments
def test_help_of_every_command(capsys):
    p = subprocess.run([sys.executable, "-m", "fimoda", "--help"], capture_output=True,
                       text=True, env=env(), timeout=120)
    assert p.returncode == 0 and "usage: fimoda" in p.stdout
    assert all(c in p.stdout for c in COMMANDS) and "--model mypkg.mymodule:load" in p.stdout
    for c in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([c, "--help"])
        assert e.value.code == 0
        assert f"usage: fimoda {c}" in capsys.readouterr().out


def test_console_script_is_declared():
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fimoda": "fimoda.paper.cli:main"}
    import fimoda.paper.cli
    assert callable(fimoda.paper.cli.main)


BAD = [
    ([], "the following arguments are required: COMMAND"),
    (["gold", "--profile", "smoke"], "the following arguments are required: --dataset"),
    (["gold", "--dataset", "nope"], "argument --dataset: invalid choice: 'nope'"),
    (["gold", "--dataset", "concrete", "--profile", "huge"], "argument --profile: invalid"),
    (["gold", "--dataset", "concrete", "--shard", "3/2"], "k/N needs 1 <= k <= N, got '3/2'"),
    (["gold", "--dataset", "concrete", "--shard", "two"], "expected k/N (e.g. 3/10)"),
    (["gold", "--dataset", "concrete", "--workers", "0"], "expected a positive integer"),
    (["gold", "--dataset", "concrete", "--workers", "2", "--scheduler", "tcp://h:8786"],
     "not allowed with argument"),
    (["gold", "--dataset", "concrete", "--shard", "1/2", "--workers", "2"],
     "not allowed with argument"),
    (["gold", "--dataset", "concrete", "--seeds", "0"], "expected a positive integer, got '0'"),
    (["gold", "--dataset", "concrete", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["gold", "--dataset", "concrete", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["merge", "--dataset", "concrete", "--mechanism", "drop"], "invalid choice: 'drop'"),
    (["attribute", "--dataset", "concrete", "--methods", "grad_dot,bogus"],
     "unknown method(s) 'bogus'"),
    (["attribute"], "give --dataset (with --profile) or --model"),
    (["attribute", "--model", "nocolon", "--out", "s.npz"], "expected module:function"),
    (["attribute", "--model", "m:f"], "needs --out FILE.npz"),
    (["attribute", "--model", "m:f", "--dataset", "concrete", "--out", "s.npz"],
     "--dataset or --model, not both"),
    (["evaluate", "--dataset", "concrete", "--adjust", "median"], "invalid choice: 'median'"),
    (["figures", "--datasets", "concrete,nope"], "unknown dataset(s) 'nope'"),
    (["run", "--datasets", "nope"], "run --datasets: unknown dataset(s) 'nope'"),
    (["run", "--profile", "huge"], "argument --profile: invalid choice"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) or "none" for a, _ in BAD])
def test_bad_arguments_are_one_error_with_status_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []                       # nothing written


# ----------------------------------------------------------------------------- gold
def test_shards_merged_equal_the_unsharded_gold(unsharded, tmp_path, capsys):
    root = seeded(tmp_path / "r", unsharded)
    opts = [*SMOKE, "--results-dir", str(root), "--no-progress"]
    # merge before any shard: an error naming the work directory, nothing created
    assert main(["merge", *opts]) == 1
    assert "no pieces to merge" in capsys.readouterr().err
    assert not (root / WORK).exists()

    assert main(["gold", *opts, "--shard", "1/2"]) == 0
    assert "shard 1/2 done; 3 piece(s) of other shards" in capsys.readouterr().out
    written = sorted(p.name for p in (root / WORK).glob("seed*.npz"))
    assert written == ["seed1_chunk0000.npz", "seed1_chunk0002.npz", "seed2_chunk0001.npz"]
    assert main(["merge", *opts]) == 1                          # shard 2 not done: names them
    err = capsys.readouterr().err
    assert ("3 of the gold standard's (seed, chunk) pieces are missing" in err
            and "seed1_chunk0001.npz, seed2_chunk0000.npz, seed2_chunk0002.npz" in err)
    assert not (root / GOLD).exists()

    assert main(["gold", *opts, "--shard", "2/2"]) == 0
    assert len(list((root / WORK).glob("seed*.npz"))) == 6
    for f in (root / GOLD, (root / GOLD).with_suffix(".json")):
        f.unlink(missing_ok=True)     # the last shard wrote it; merge must assemble it alone
    stamps = {p: p.stat().st_mtime_ns for p in (root / WORK).glob("seed*.npz")}
    assert main(["merge", *opts]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps       # nothing recomputed
    arrays_equal(unsharded / GOLD, root / GOLD)

    # merge with options the shards were not given: a clear error, not a silent recompute
    assert main(["merge", *opts, "--seeds", "3"]) == 1
    assert "seed3_chunk0000.npz" in capsys.readouterr().err


def test_gold_on_dask_workers_equals_serial(unsharded, tmp_path):
    pytest.importorskip("distributed")
    root = seeded(tmp_path / "r", unsharded)
    assert main(["gold", *SMOKE, "--results-dir", str(root), "--workers", "2",
                 "--no-progress"]) == 0
    arrays_equal(unsharded / GOLD, root / GOLD)
    assert len(list((root / WORK).glob("seed*.npz"))) == 6


# ----------------------------------------------------------------------------- methods
def test_attribute_evaluate_figures(unsharded, tmp_path, capsys, monkeypatch):
    root = tmp_path / "r"
    root.mkdir()
    d = root / "smoke" / "concrete"
    d.mkdir(parents=True)
    for f in (unsharded / "smoke" / "concrete").iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    assert main(["evaluate", "--profile", "smoke", "--dataset", "concrete", "--results-dir",
                 str(root)]) == 1
    err = capsys.readouterr().err
    assert "no method scores" in err and "run 'fimoda attribute --profile smoke" in err
    assert main(["attribute", "--profile", "smoke", "--dataset", "concrete", "--methods",
                 "grad_dot,grad_cos", "--results-dir", str(root), "--no-progress"]) == 0
    assert "grad_dot" in capsys.readouterr().out
    assert load_npz(d / "scores_grad_dot.npz")["scores"].shape == (6, 8)
    assert main(["evaluate", "--profile", "smoke", "--dataset", "concrete", "--results-dir",
                 str(root)]) == 0
    out = capsys.readouterr().out
    assert "Grad-Dot" in out and (d / "evaluation_sgd_remove_eq13.csv").exists()
    figs = tmp_path / "figs"
    assert main(["figures", "--profile", "smoke", "--results-dir", str(root),
                 "--figures-dir", str(figs)]) == 0
    assert (figs / "smoke" / "figure2.png").exists() and (figs / "smoke" / "INDEX.md").exists()
    assert (root / "smoke" / "summary.md").exists()


OWN = """
import torch
from fimoda.models import MLP

def load():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = X.sum(1) + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return {"model": MLP(3, 1, hidden=8).double(), "X_train": X, "y_train": y,
            "X_test": X[:5] + 0.5, "y_test": y[:5], "task": "regression", "left_out": [1, 7, 30]}

def broken():
    return {"model": None}

def huber(outputs, targets):        # a library loss, per example
    return torch.nn.functional.huber_loss(outputs.reshape(-1), targets, reduction="none",
                                          delta=0.5)

def load_huber():
    return {**load(), "loss": huber}
"""


def test_attribute_own_model(tmp_path, capsys):
    from fimoda import api
    (tmp_path / "own_model_cli.py").write_text(textwrap.dedent(OWN))
    out = tmp_path / "scores.npz"
    assert main(["attribute", "--model", "own_model_cli:load", "--methods", "grad_dot,cg",
                 "--out", str(out), "--no-progress"]) == 0
    z = load_npz(out)
    import own_model_cli
    spec = own_model_cli.load()
    for m in ("grad_dot", "cg"):
        ref = api.attribute(spec["model"], spec["X_train"], spec["y_train"], [1, 7, 30],
                            spec["X_test"], spec["y_test"], task="regression", method=m)
        assert z[f"scores_{m}"].shape == (5, 3) and np.array_equal(z[f"scores_{m}"], ref), m
    assert list(z["left_out"]) == [1, 7, 30]
    capsys.readouterr()
    bad = tmp_path / "bad.npz"
    assert main(["attribute", "--model", "own_model_cli:broken", "--out", str(bad)]) == 1
    assert "lacks model, X_train, y_train, X_test, y_test, task" in capsys.readouterr().err
    assert main(["attribute", "--model", "no_such_module_xyz:load", "--out", str(bad)]) == 1
    assert "cannot import 'no_such_module_xyz'" in capsys.readouterr().err
    assert not bad.exists()


def test_attribute_own_model_passes_its_loss_through(tmp_path, capsys):
    """load() returning loss=huber: the command's scores are the API's with that loss (not the
    squared-error ones), and a method that cannot use a custom loss is reported refused."""
    from fimoda import api
    (tmp_path / "own_model_huber.py").write_text(textwrap.dedent(OWN))
    out = tmp_path / "scores.npz"
    assert main(["attribute", "--model", "own_model_huber:load_huber", "--methods",
                 "grad_dot,ekfac", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "loss: huber" in printed and "ekfac: refused" in printed
    import own_model_huber as mod
    spec = mod.load_huber()
    args = (spec["model"], spec["X_train"], spec["y_train"], [1, 7, 30], spec["X_test"],
            spec["y_test"])
    with_loss = api.attribute(*args, task="regression", method="grad_dot", loss=mod.huber)
    without = api.attribute(*args, task="regression", method="grad_dot")
    z = load_npz(out)
    assert np.array_equal(z["scores_grad_dot"], with_loss) and "scores_ekfac" not in z
    assert not np.allclose(with_loss, without)          # the loss matters for these data
