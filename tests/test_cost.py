"""Every second-order method under the memory budget (fimoda.memory), and its cost said before
it is paid (fimoda.influence.cost): scores with a budget small enough to stream the gradients
of one side, or to solve for the other in several blocks, equal the in-memory scores on an MLP
and on a tiny BERT; the cost estimate's parts equal sizes computed by hand, its peak bounds the
measured peak memory of a run within a stated factor; a budget that cannot hold a method is one
error naming the setting to change, before any gradient is computed."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fimoda
from fimoda.gradients import Problem
from fimoda.influence import Attributor, compute_scores
from fimoda.influence.cost import shape_of
from fimoda.influence.errors import MemoryBudgetError
from fimoda.memory import CHUNK_COPIES, SOLVE_COPIES
from fimoda.models import MLP

from test_hf_streaming import text, tiny_bert  # noqa: F401  (the tiny BERT and its batches)

DT = torch.float64
SECOND_ORDER = ("cg", "lissa", "lissa_h", "dense", "arnoldi", "prop1", "cor2", "eq16")
# the Gauss-Newton methods also through Hessian products instead of the materialised Phi
PRODUCTS = {"cg": {"materialize": "never"}, "lissa": {"materialize": "never", "depth": 40}}
OPTIONS = {"arnoldi": {"n_iter": 30, "rank": 10}, "lissa_h": {"depth": 40}}


def attributor(n_test=2, loo=None, solve_cols=None, n=30, seed=0):
    """A classification MLP's attributor (30 training rows; ``loo``: the left-out rows, default
    all; ``n_test`` test rows); with ``solve_cols``, under a budget whose solver blocks hold
    that many right-hand sides (and whose quarter keeps 4 x that many gradient rows)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(3, 3, hidden=5).to(DT)
    P = sum(p.numel() for p in model.parameters())
    memory = None if solve_cols is None else 2 * SOLVE_COPIES * solve_cols * P * 8
    X, Y = torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    Xt = torch.randn(n_test, 3, generator=g, dtype=DT)
    Yt = torch.randint(0, 3, (n_test,), generator=g)
    prob = Problem(model, X, Y, "classification", chunk=7, progress=False, memory=memory,
                   batch_size=11)
    rows = torch.arange(n) if loo is None else torch.as_tensor(loo)
    return Attributor(prob, X[rows], Y[rows], Xt, Yt, loo_rows=rows)


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("method,opts", [(m, OPTIONS.get(m, {})) for m in SECOND_ORDER]
                         + [(m, o) for m, o in PRODUCTS.items()])
def test_streamed_left_side_equals_the_in_memory_scores_on_an_mlp(method, opts):
    """2 test points solved in one block; the 30 left-out gradients streamed in chunks (never
    held whole): the same numbers to round-off."""
    full, tight = attributor(), attributor(solve_cols=2)
    assert tight.problem.solve_cols() == 2
    assert tight.problem.grad_rows() == 2 * SOLVE_COPIES // CHUNK_COPIES
    assert full.keeps("left") and not tight.keeps("left") and tight.keeps("test")
    a, b = compute_scores(method, full, **opts), compute_scores(method, tight, **opts)
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-11 * np.abs(a).max())
    assert "train_grads" not in tight.__dict__


@pytest.mark.parametrize("method", ["dense", "cg", "prop1"])
@pytest.mark.parametrize("n_test,loo", [(6, range(30)), (20, [1, 4, 7, 20, 25])])
def test_solves_in_several_blocks_equal_one_solve(method, n_test, loo):
    """A budget of 2 right-hand sides per solve: 3 blocks of the smaller side (test points, or
    left-out rows), the other side streamed; a dense solve equals the one-block scores to
    round-off, CG (which rounds by its block's Krylov space) to its tolerance."""
    opts = {} if method == "dense" else {"tol": 1e-13}
    full = attributor(n_test=n_test, loo=list(loo))
    tight = attributor(n_test=n_test, loo=list(loo), solve_cols=2)
    other = "left" if n_test <= len(loo) else "test"
    assert tight.problem.solve_cols() == 2 and not tight.keeps(other)
    assert tight.cost(method, **opts).solve_columns == 2
    a, b = compute_scores(method, full, **opts), compute_scores(method, tight, **opts)
    rtol = 1e-10 if method == "dense" else 1e-8
    np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * np.abs(a).max())


@pytest.mark.parametrize("method,opts", [("cg", {}), ("lissa_h", {"depth": 20}),
                                         ("arnoldi", {"n_iter": 20, "rank": 8}),
                                         ("prop1", {"damping": 10.0}), ("cor2", {}),
                                         ("eq16", {"damping": 10.0})])
def test_streamed_scores_equal_the_in_memory_scores_on_a_transformer(text, method, opts):
    """Tiny BERT, 2 left-out sentences solved for, the 11 training sentences twice as 22 test
    points streamed in chunks under a budget of 2 right-hand sides (a quarter keeps 16)."""
    model, train, _, _ = text
    P = sum(p.numel() for p in model.parameters())
    kw = dict(task="classification", method=method, **opts)
    memory = 2 * SOLVE_COPIES * 2 * P * 8
    cost = fimoda.estimate_cost(model, train, None, [0, 5], train + train, None, memory=memory,
                                **kw)
    assert cost.solve_columns == (0 if method == "arnoldi" else 2)
    assert cost.chunk_rows == 2 * SOLVE_COPIES * 2 // 6
    a = fimoda.attribute(model, train, None, [0, 5], train + train, None, **kw)
    b = fimoda.attribute(model, train, None, [0, 5], train + train, None, memory=memory, **kw)
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-10 * np.abs(a).max())


def test_second_order_methods_switch_sdpa_attention_to_eager_and_back(text):
    """Built with the default (sdpa) attention, whose CPU kernel has no double backward: the
    true-Hessian methods run, through fimoda.attribute and through an attributor's
    compute_scores alike, and the model's own setting is restored."""
    from transformers import BertForSequenceClassification
    eager, train, test, left = text
    sdpa = BertForSequenceClassification(eager.config.__class__(
        **{**eager.config.to_dict(), "attn_implementation": "sdpa"})).to(DT).eval()
    sdpa.load_state_dict(eager.state_dict())
    kw = dict(task="classification", method="arnoldi", n_iter=6, rank=3)
    a = fimoda.attribute(sdpa, train, None, left[:2], test, None, **kw)
    assert sdpa.config._attn_implementation == "sdpa"
    b = fimoda.attribute(eager, train, None, left[:2], test, None, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11 * np.abs(b).max())
    att = fimoda.attributor(sdpa, train, None, left[:2], test, None, task="classification")
    assert sdpa.config._attn_implementation == "sdpa"
    c = compute_scores("prop1", att, damping=10.0)
    assert sdpa.config._attn_implementation == "sdpa" and np.isfinite(c).all()


# ----------------------------------------------------------------------------- the estimate
def test_cost_parts_equal_sizes_computed_by_hand():
    """CG on the MLP (P = 68 float64 parameters, row 544 bytes), 6 test points, 30 left out,
    budget of 2 right-hand sides (2 x 16 copies x 2 x 544 = 34,816 bytes): chunks of 10 rows,
    the 6 test gradients kept (a quarter holds 16 rows), the left side streamed once per block
    of 2 test points, CG's products at most (2 max_iter + 1) per column."""
    att = attributor(n_test=6, solve_cols=2)
    row, P = 544, 68
    assert att.problem.n_params == P and SOLVE_COPIES == 16 and CHUNK_COPIES == 3
    c = att.cost("cg", materialize="never", max_iter=50)
    assert (c.chunk_rows, c.solve_columns, c.budget_bytes) == (10, 2, 34816)
    assert c.gradient_rows == 6 + 30 * 3 + 30          # test, left per block, lambda_G's pass
    assert c.products == 101 * 6 and c.products_bound and c.product_rows == 30
    assert c.product_batch == 11
    # 16 copies of a 2-column block, the kept test gradients, a Hessian product's 4 vectors, 3
    # copies of a streamed chunk, a vmapped batch's intermediates (7 rows), the scores twice
    assert c.peak_bytes == (16 * 2 + 6 + 4) * row + 3 * 10 * row + 7 * row + 6 * 30 * 16
    m = att.cost("cg")                                 # Phi (30 x 68) and K materialised
    assert m.products == 0 and m.gradient_rows == c.gradient_rows + 30
    assert m.peak_bytes - c.peak_bytes == (2 * 30 * 68 + 2 * 30 * 30) * 8 - 4 * row
    lissa = att.cost("lissa_h", depth=7)               # below Krylov's depth: the recurrence
    assert lissa.products == 7 * 6 and not lissa.products_bound
    arn = att.cost("arnoldi", n_iter=12, rank=4)
    assert arn.products == 12 and arn.peak_bytes >= 2 * P * 12 * 8
    shape = shape_of(att)
    assert (shape.n, shape.n_left, shape.n_test, shape.P) == (30, 30, 6, P)
    assert "train_grads" not in att.__dict__ and not att.fitted   # no work done


def test_datainf_streams_a_side_the_budget_cannot_keep_and_counts_its_gradients():
    """DataInf under the budget of test_cost_parts_equal_sizes_computed_by_hand: the 6 test
    gradients kept, the 30 left-out ones streamed in 3 blocks of 10; half the budget holds 32
    rows, so the training set (30 rows) streams twice, with the test side and two left-out
    blocks, then with the third; the left-out side once more against the test side:
    6 + 30 + 30 x 2 + 30 gradient rows, counted as they are made."""
    att = attributor(n_test=6, solve_cols=2)
    assert att.keeps("test") and not att.keeps("left")
    c = att.cost("datainf")
    assert c.gradient_rows == 6 + 30 + 30 * 2 + 30 and c.chunk_rows == 10
    made, loss_grads = [], att.problem.loss_grads
    att.problem.loss_grads = lambda X, Y, *a, **k: made.append(len(X)) or loss_grads(X, Y, *a, **k)
    scores = compute_scores("datainf", att)
    assert sum(made) == c.gradient_rows and max(made) <= 10
    np.testing.assert_allclose(scores, compute_scores("datainf", attributor(n_test=6)),
                               rtol=1e-10, atol=1e-12 * np.abs(scores).max())


def test_ekfac_keeps_a_block_of_the_test_side_and_counts_its_captured_rows(monkeypatch):
    """EK-FAC on the MLP (68 factored parameters, 544 bytes a row), 6 test points, 30 left out,
    a budget whose quarter holds 4 test rows: two test blocks, so the left-out rows pass twice;
    2 x 30 rows for the factors, 6 + 2 x 30 for the scores, counted as they pass; no per-example
    gradient row with the damping given; the same scores as with the whole test side kept."""
    from fimoda.influence import ekfac as ekfac_module
    att = attributor(n_test=6)
    att.problem.memory = 4 * 4 * 544
    c = att.cost("ekfac", damping=1.0)
    assert c.gradient_rows == 0 and c.refusal is None
    assert (c.captured_rows, c.capture_batch) == (2 * 30 + 6 + 2 * 30, 30)
    assert "126 rows through layer captures (batches of 30)" in c.line()
    seen, passes = [], ekfac_module._passes

    def counted(problem, layers, batch_size, desc, consume, *args, **kwargs):
        def counting(rows, l, a, ds):
            if l == 0:                                  # each batch once, by its first layer
                seen.append(len(a))
            consume(rows, l, a, ds)
        passes(problem, layers, batch_size, desc, counting, *args, **kwargs)
    monkeypatch.setattr(ekfac_module, "_passes", counted)
    scores = compute_scores("ekfac", att, damping=1.0)
    assert sum(seen) == c.captured_rows and "train_grads" not in att.__dict__
    whole = compute_scores("ekfac", attributor(n_test=6), damping=1.0)
    np.testing.assert_allclose(scores, whole, rtol=1e-12, atol=1e-14 * np.abs(whole).max())
    att.problem.memory = 4 * 544 - 1                  # not even one test row in a quarter
    with pytest.raises(MemoryBudgetError, match="EK-FAC: one test gradient of the factored"):
        compute_scores("ekfac", att, damping=1.0)


MEASURE = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from fimoda.gradients import Problem
    from fimoda.influence import Attributor, compute_scores
    from fimoda.models import MLP

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    out = {{}}
    for method, opts in {runs!r}:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = MLP(40, 1, hidden=300).double()           # P = 102,901: rows of 823 kB
        X = torch.randn(60, 40, generator=g, dtype=torch.float64)
        y = torch.randn(60, generator=g, dtype=torch.float64)
        prob = Problem(model, X, y, "regression", chunk=8, progress=False,
                       memory={memory}, batch_size=60)
        att = Attributor(prob, X[:40], y[:40], X[40:46], y[40:46])
        cost = att.cost(method, **opts)
        open("/proc/self/clear_refs", "w").write("5")      # the peak RSS starts again here
        base = rss("VmRSS:")
        compute_scores(method, att, **opts)
        out[method] = [rss("VmHWM:") - base, cost.peak_bytes]
        del att, prob
    print(json.dumps(out))
""")


CHEAP = [("grad_dot", {}), ("cg", {"materialize": "never"}),
         ("arnoldi", {"n_iter": 20, "rank": 10}), ("datainf", {}), ("ekfac", {})]
COSTLY = [("lissa_h", {"depth": 20}), ("prop1", {"damping": 10.0}), ("eq16", {"damping": 10.0})]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak RSS only")
@pytest.mark.parametrize("runs", [CHEAP, pytest.param(COSTLY, marks=pytest.mark.slow)],
                         ids=["first-order-cg-arnoldi", "lissa_h-prop1-eq16"])
def test_the_estimated_peak_bounds_the_measured_peak_within_a_factor_of_three(runs):
    """Peak resident memory of each method's run (Linux: VmHWM reset before it; every
    allocation of 64 kB or more mmapped, so freed tensors leave the resident set) on an MLP
    whose gradient rows dominate its memory: measured <= estimated <= 3 x measured, both for a
    generous budget and for one that streams (10 rows per chunk, 2 right-hand sides)."""
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    row = 102901 * 8
    for memory in (2 ** 33, 2 * SOLVE_COPIES * 2 * row):
        code = MEASURE.format(tests=tests, runs=runs, memory=memory)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr

        for method, (measured, estimated) in json.loads(res.stdout.splitlines()[-1]).items():
            assert measured <= estimated <= 3 * measured, (memory, method, measured, estimated)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method", ["cg", "lissa", "lissa_h", "prop1", "eq16", "grad_dot"])
def test_a_budget_too_small_is_refused_before_any_work(method, capfd):
    att = attributor(solve_cols=2)
    att.problem.memory = 2 * SOLVE_COPIES * 68 * 8 - 1 if method != "grad_dot" else 100
    att.problem.progress = True
    with pytest.raises(MemoryBudgetError, match=r"raise memory=.*names=") as e:
        compute_scores(method, att)
    assert "\n" not in str(e.value)
    assert "train_grads" not in att.__dict__ and "test_grads" not in att.__dict__
    assert not att.fitted and not att.shared and "lambda_G" not in att.__dict__
    assert capfd.readouterr().err == ""                 # no progress: nothing ran


def test_fixed_state_over_memory_gb_is_refused_naming_its_setting():
    att = attributor()
    with pytest.raises(MemoryBudgetError, match="lower n_iter= or raise memory_gb="):
        compute_scores("arnoldi", att, n_iter=60, memory_gb=1e-5)
    with pytest.raises(MemoryBudgetError, match=r"memory_gb=1e-06.*\(cg, lissa\)"):
        compute_scores("dense", att, materialize="never", memory_gb=1e-6)
    assert "train_grads" not in att.__dict__ and "lambda_G" not in att.__dict__


def test_the_cost_is_one_line_before_the_work_and_returned_by_the_api(capfd, monkeypatch):
    monkeypatch.setenv("FIMODA_PROGRESS", "log")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    torch.manual_seed(0)
    model = MLP(3, 1, hidden=4).to(DT)
    kw = dict(task="regression", method="cg", hvp_batch=7, memory=10 ** 6)
    cost = fimoda.estimate_cost(model, X, y, [0, 4, 8], X[:4], y[:4], **kw)
    assert cost.budget_bytes == 10 ** 6 and cost.product_batch == 7 and cost.refusal is None
    fimoda.attribute(model, X, y, [0, 4, 8], X[:4], y[:4], progress=True, **kw)
    err = capfd.readouterr().err
    assert err.startswith(cost.line() + "\n") and "cg: peak ~" in err
    with pytest.raises(ValueError, match="unknown method"):
        fimoda.estimate_cost(model, X, y, [0], X[:4], y[:4], task="regression", method="nope")
