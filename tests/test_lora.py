"""LoRA further training (:mod:`fimoda.lora`), against independent references in float64:

- the adapted model starts exactly at theta^f (outputs bit for bit, the encoder and the cpu
  profile's ``TextTop`` alike), only the adapters train, the caller's model is left alone, and bad
  settings are one error before anything is built;
- full-rank LoRA against full fine-tuning on a toy linear layer, by SGD: with s A orthogonal the
  first step is full fine-tuning's exactly, the second differs by exactly
  -eta^3 s^2 (G0 G0^T G1 + G1 G0^T G1) (computed here in closed form), and the function after a
  few steps approaches full fine-tuning's as s^2;
- the gold engine's LoRA runs against a plain-torch loop that trains hand-written adapters on the
  same batch orders (SGD, ``remove``), and against the one-model reference loop (AdamW,
  ``subtract``, clipping, step evaluation);
- attribution on the adapters: Grad-Dot equals a dense autograd reference, and every method runs
  on the adapted model at theta^f (where the A matrices get no gradient).
"""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fimoda
from fimoda.gold import GoldConfig, further_train, reference_further_train
from fimoda.lora import (BERT_TARGETS, LoRALinear, add_lora, adapter_names, merged_weight,
                         n_trainable)
from fimoda.models import TextTop
from small_models import TOL, regression_problem
from test_image_text_models import text_data, tiny_text_model


# ----------------------------------------------------------------------------- the wrapper
def test_adapted_model_starts_exactly_at_theta_f_and_trains_only_adapters():
    clf = tiny_text_model()
    x, _ = text_data(6)
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    wrapped, names = add_lora(clf, rank=3, seed=5)
    with torch.no_grad():
        assert torch.equal(wrapped(x), clf(x))                      # bit for bit
    # 2 layers x 6 linears (query, key, value, attention output, intermediate, output) x (A, B)
    assert len(names) == 24 and names == adapter_names(wrapped)
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] == names
    assert n_trainable(wrapped) == 2 * 3 * (4 * (32 + 32) + (32 + 64) + (64 + 32))
    # the caller's model: same values, still trainable everywhere, no adapters
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in clf.named_parameters())
    assert not any(isinstance(m, LoRALinear) for m in clf.modules())
    # A from the seed (the same seed draws the same A), B zero
    again, _ = add_lora(clf, rank=3, seed=5)
    other, _ = add_lora(clf, rank=3, seed=6)
    a = dict(wrapped.named_parameters())
    for n in names:
        if n.endswith("lora_A.weight"):
            assert torch.equal(a[n], dict(again.named_parameters())[n])
            assert not torch.equal(a[n], dict(other.named_parameters())[n])
            assert a[n].abs().max() <= 1 / np.sqrt(a[n].shape[1])
        else:
            assert torch.count_nonzero(a[n]) == 0
    # the cpu profile's model: the top layer with the head on the trunk's features, whose last
    # layer runs for the [CLS] position only
    clf.eval()
    feats = clf.trunk_features(x, 1)
    top = TextTop(clf, 1).eval()
    top_lora, top_names = add_lora(top, rank=2)
    with torch.no_grad():
        assert torch.equal(top_lora(feats), top(feats))
    assert len(top_names) == 12 and all(n.startswith("layers.0.") for n in top_names)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.0), "rank must be an integer >= 1"),
    (dict(alpha=-1.0), "alpha must be a positive number"),
    (dict(alpha=float("nan")), "alpha must be a positive number"),
    (dict(targets=("qkv",)), "match no trainable nn.Linear"),
    (dict(targets=("attention.self",)), "LoRA adapts nn.Linear layers only"),
])
def test_bad_settings_are_one_error_before_anything_is_built(kwargs, message):
    clf = tiny_text_model()
    state = copy.deepcopy(clf.state_dict())
    with pytest.raises(ValueError, match=message):
        add_lora(clf, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in clf.state_dict().items())
    wrapped, _ = add_lora(clf)
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        add_lora(wrapped, targets=("query",))


# ----------------------------------------------------------------------------- vs full fine-tuning
def toy_linear(seed=0, n=8, d_in=4, d_out=3):
    """A bias-free linear layer W0 (d_out x d_in) and a regression batch (X, Y); loss
    L(W) = sum_rows ||W x - y||^2 / (2 n), whose gradient is G = (W X^T - Y^T) X / n."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    Y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    return W0, X, Y, Q


def grad_w(W, X, Y):
    return (W @ X.T - Y.T) @ X / len(X)


def lora_sgd(W0, X, Y, Q, s, lr, steps):
    """fimoda.lora's full-rank (r = in) adapters on the layer, with s A = Q orthogonal, trained
    by torch.optim.SGD on L; returns the merged weight after each step."""
    lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(W0)
    model, names = add_lora(nn.Sequential(lin), rank=W0.shape[1], alpha=s * W0.shape[1],
                            targets=("0",))
    layer = model[0]
    assert layer.scaling == pytest.approx(s)
    with torch.no_grad():
        layer.lora_A.weight.copy_(Q / s)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (((model(X) - Y) ** 2).sum() / (2 * len(X))).backward()
        opt.step()
        out.append(merged_weight(layer).detach().clone())
    return out


def test_full_rank_lora_is_full_fine_tuning_step_for_step_up_to_eta3_s2():
    """Full rank, s A orthogonal, SGD: step 1 is full fine-tuning's exactly; step 2 differs by
    exactly -eta^3 s^2 (G0 G0^T G1 + G1 G0^T G1) (fimoda.lora's docstring derives it)."""
    W0, X, Y, Q = toy_linear()
    lr, s = 0.3, 1.5
    G0 = grad_w(W0, X, Y)
    W1 = W0 - lr * G0                                   # full fine-tuning, closed form
    G1 = grad_w(W1, X, Y)
    W2 = W1 - lr * G1
    L1, L2 = lora_sgd(W0, X, Y, Q, s, lr, 2)
    tol = 1e-12 * float(W0.abs().max())
    assert float((L1 - W1).abs().max()) <= tol
    predicted = -lr ** 3 * s ** 2 * (G0 @ G0.T @ G1 + G1 @ G0.T @ G1)
    assert float(predicted.abs().max()) > 1e6 * tol                 # a real difference
    assert float((L2 - W2 - predicted).abs().max()) <= tol
    # rank below the input width: the first step is full fine-tuning's projected, not equal
    lin = nn.Sequential(nn.Linear(4, 3, bias=False).double())
    with torch.no_grad():
        lin[0].weight.copy_(W0)
    low, _ = add_lora(lin, rank=2, targets=("0",))
    opt = torch.optim.SGD([p for p in low.parameters() if p.requires_grad], lr=lr)
    (((low(X) - Y) ** 2).sum() / (2 * len(X))).backward()
    opt.step()
    A = low[0].lora_A.weight.detach()
    assert torch.allclose(merged_weight(low[0]).detach(), W0 - lr * G0 @ A.T @ A, rtol=0,
                          atol=tol)
    assert float((merged_weight(low[0]).detach() - W1).abs().max()) > 1e-3


def test_full_rank_lora_function_after_a_few_steps_approaches_full_fine_tuning_as_s_squared():
    W0, X, Y, Q = toy_linear(seed=1)
    lr, steps = 0.2, 5
    W = W0.clone()
    for _ in range(steps):                              # full fine-tuning, plain SGD by hand
        W = W - lr * grad_w(W, X, Y)
    Xt = torch.randn(5, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    gaps = []
    for s in (1.0, 0.1, 0.01, 0.001):
        Wl = lora_sgd(W0, X, Y, Q, s, lr, steps)[-1]
        gaps.append(float((Xt @ Wl.T - Xt @ W.T).abs().max()))
    assert gaps[0] > 0.1                                # far from full fine-tuning at s = 1
    for big, small in zip(gaps[1:], gaps[2:]):          # each tenth of s: a hundredth of the gap
        assert 90 < big / small < 110, gaps
    assert gaps[-1] < 2e-6


# ----------------------------------------------------------------------------- the gold engine
def lora_mlp(rank=2, seed=3):
    """(LoRA-adapted MLP(3, 1) of 5 hidden units, its adapter names, X, y, X_test, y_test):
    every linear adapted, rank 2, alpha 4; B set away from zero (a model after some LoRA
    training) so that both adapters get gradients."""
    model, X, y, Xt, yt = regression_problem(n=13, d=3, n_test=4, hidden=5)
    wrapped, names = add_lora(model, rank=rank, alpha=4.0, targets=("hidden.0", "hidden.1", "out"),
                              seed=seed)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if n.endswith("lora_B.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return wrapped, names, X, y, Xt, yt


def plain_lora_loop(wrapped, X, y, Xt, yt, loo, seeds, lr, epochs, B):
    """The gold standard by hand: every layer h = W0 x + b0 + s B A x with W0, b0 fixed and
    plain tensors A, B trained by SGD, ``remove`` (perm[perm != i]) on epoch orders drawn as
    torch.randperm(n) from a generator seeded with the seed; test losses after every epoch."""
    layers = [wrapped.hidden[0], wrapped.hidden[1], wrapped.out]
    W0 = [(m.base.weight.detach(), m.base.bias.detach(), m.scaling) for m in layers]
    A0 = [m.lora_A.weight.detach().clone() for m in layers]
    B0 = [m.lora_B.weight.detach().clone() for m in layers]

    def forward(AB, x):
        h = x
        for k, (W, b, s) in enumerate(W0):
            A, Bm = AB[2 * k], AB[2 * k + 1]
            h = h @ W.T + b + s * (h @ A.T) @ Bm.T
            if k < len(W0) - 1:
                h = torch.relu(h)
        return h[:, 0]

    out_full = np.empty((len(seeds), epochs + 1, len(Xt)))
    out_loo = np.empty((len(seeds), len(loo), epochs + 1, len(Xt)))
    for si, seed in enumerate(seeds):
        for r, i in enumerate([None] + list(loo)):
            AB = [t.clone().requires_grad_() for pair in zip(A0, B0) for t in pair]
            losses = [((forward(AB, Xt) - yt) ** 2).detach().numpy()]
            g = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                perm = torch.randperm(len(X), generator=g)
                order = perm if i is None else perm[perm != i]
                for batch in order.split(B):
                    loss = ((forward(AB, X[batch]) - y[batch]) ** 2).mean()
                    grads = torch.autograd.grad(loss, AB)
                    with torch.no_grad():
                        for p, q in zip(AB, grads):
                            p -= lr * q
                losses.append(((forward(AB, Xt) - yt) ** 2).detach().numpy())
            (out_full[si] if i is None else out_loo[si, r - 1])[:] = np.stack(losses)
    return out_full, out_loo


def test_engine_lora_runs_equal_a_plain_torch_loop_on_the_same_batch_order():
    wrapped, names, X, y, Xt, yt = lora_mlp()
    loo = [0, 4, 12]
    cfg = GoldConfig(optimizer="sgd", lr=0.05, epochs=3, batch_size=4, mechanism="remove",
                     shuffle="randperm", seeds=(1, 2), progress=False)
    base = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    res = further_train(wrapped, "regression", X, y, Xt, yt, loo, cfg)
    assert res.config["engine"] == "func"
    full, left = plain_lora_loop(wrapped, X, y, Xt, yt, loo, (1, 2), 0.05, 3, 4)
    np.testing.assert_allclose(res.loss_full, full, rtol=0, atol=TOL)
    np.testing.assert_allclose(res.loss_loo, left, rtol=0, atol=TOL)
    assert np.abs(res.loss_loo[:, :, 1:] - res.loss_full[:, None, 1:]).max() > 1e3 * TOL
    assert np.abs(res.loss_full[:, -1] - res.loss_full[:, 0]).max() > 1e-3
    assert all(torch.equal(p, base[n]) for n, p in wrapped.named_parameters())   # a copy trains


def test_engine_lora_runs_equal_the_reference_loop_with_adamw_subtract_and_clipping():
    wrapped, names, X, y, Xt, yt = lora_mlp(rank=1)
    cfg = GoldConfig(optimizer="adamw", lr=0.01, epochs=2, max_steps=5, eval_every=2,
                     batch_size=4, weight_decay=0.1, grad_clip=0.5, mechanism="subtract",
                     seeds=(3,), progress=False, max_runs_per_chunk=2)
    a = further_train(wrapped, "regression", X, y, Xt, yt, [1, 7, 9], cfg)
    b = reference_further_train(wrapped, "regression", X, y, Xt, yt, [1, 7, 9], cfg)
    np.testing.assert_allclose(a.loss_full, b.loss_full, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.loss_loo, b.loss_loo, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.param_dist_loo, b.param_dist_loo, rtol=0, atol=TOL)
    assert np.abs(a.loss_loo[:, :, 1:] - a.loss_full[:, None, 1:]).max() > 1e3 * TOL


def test_a_lora_work_directory_is_not_the_full_models():
    """The work directory's fingerprint names the trained parameters when some are frozen, so
    LoRA pieces and full-parameter pieces never mix; a fully trainable model's is as before."""
    from fimoda.gold.workdir import fingerprint
    model, X, y, Xt, yt = regression_problem(n=9, d=3, n_test=2, hidden=4)
    cfg = GoldConfig(epochs=1, seeds=1, progress=False)
    args = ("regression", X, y, Xt, yt, np.arange(2), cfg, type("E", (), {"name": "func"}),
            1, 1, None)
    assert "trained" not in fingerprint(model, *args)
    frozen = copy.deepcopy(model)
    frozen.out.weight.requires_grad_(False)
    assert fingerprint(frozen, *args)["trained"] == ["hidden.0.weight", "hidden.0.bias",
                                                     "hidden.1.weight", "hidden.1.bias",
                                                     "out.bias"]


# ----------------------------------------------------------------------------- attribution
def test_grad_dot_on_the_adapters_equals_a_dense_reference():
    wrapped, names, X, y, Xt, yt = lora_mlp()
    left = [2, 5, 11]
    scores = fimoda.attribute(wrapped, X, y, left, Xt, yt, task="regression",
                              method="grad_dot", names=names)
    params = [p for n, p in wrapped.named_parameters() if n in names]

    def grad_row(x, t):
        loss = ((wrapped(x[None])[0, 0] - t) ** 2)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    T = torch.stack([grad_row(Xt[j], yt[j]) for j in range(len(Xt))])
    V = torch.stack([grad_row(X[i], y[i]) for i in left])
    ref = (T @ V.T).numpy()
    assert T.shape[1] == n_trainable(wrapped) and np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(scores, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("method", sorted(fimoda.METHODS))
def test_every_method_runs_on_the_adapters_at_theta_f(method):
    """At theta^f (B = 0) the A matrices get no gradient: every method still gives finite
    scores on the adapters (DataInf leaves the zero blocks out, with a warning)."""
    model, X, y, Xt, yt = regression_problem(n=24, d=3, n_test=3, hidden=6)
    wrapped, names = add_lora(model, rank=2, targets=("hidden.0", "hidden.1", "out"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = fimoda.attribute(wrapped, X, y, [0, 3, 8, 20], Xt, yt, task="regression",
                                  method=method, names=names)
    assert scores.shape == (3, 4) and np.all(np.isfinite(scores))
    assert np.abs(scores).max() > 0


# ----------------------------------------------------------------------------- the study
def test_lora_study_compares_with_the_full_gold_and_reuses_its_results(tmp_path):
    """The study on SST-2's smoke settings with a tiny encoder top (the cpu profile's model
    kind): the full gold is run, each rank's LoRA gold stored and then reused, and the cosine is
    the cosine of the two golds' eq. 13 vectors, computed here by hand."""
    from types import SimpleNamespace
    from fimoda.paper.config import get_config
    from fimoda.paper.experiment.lora_study import lora_figure, lora_gold_path, lora_study
    from fimoda.gold import gold_scores
    from fimoda.io import load_npz
    cfg = get_config("sst2", "smoke", dtype="float64")      # the tiny model's dtype
    clf = tiny_text_model()
    x, y = text_data(40, seed=3)
    feats = clf.trunk_features(x, 1)
    top = TextTop(clf, 1).eval()
    ds = SimpleNamespace(X_train=feats[:30].numpy(), y_train=y[:30].numpy(),
                         X_test=feats[30:].numpy(), y_test=y[30:].numpy())
    study = lora_study(cfg, ranks=(1, 4), model=top, ds=ds, directory=tmp_path)
    T = len(study.eval_points)
    assert study.cosine.shape == (2, T, cfg.further.n_test) and T >= 2
    assert np.all(np.isnan(study.cosine[:, 0])) and np.all(np.abs(study.cosine[:, 1:]) <= 1)
    full = load_npz(tmp_path / "gold_adamw_subtract.npz")
    a_full = gold_scores(full["loss_full"], full["loss_loo"], adjust="mean")
    for k, r in enumerate((1, 4)):
        lora = load_npz(lora_gold_path(cfg, r, directory=tmp_path))
        a = gold_scores(lora["loss_full"], lora["loss_loo"], adjust="mean")
        assert np.abs(a[:, -1]).max() > 0 and not np.allclose(a, a_full)
        for t in range(1, T):
            for j in range(a.shape[2]):
                u, v = a_full[:, t, j], a[:, t, j]
                want = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
                assert study.cosine[k, t, j] == pytest.approx(want, abs=1e-12)
    assert study.trainable.tolist() == [r * (4 * 64 + 96 + 96) for r in (1, 4)]
    assert study.full_trainable == sum(p.numel() for p in top.parameters())
    assert list(study.table()["rank"]) == [1, 4]
    stamp = lora_gold_path(cfg, 4, directory=tmp_path).stat().st_mtime_ns
    again = lora_study(cfg, ranks=(4,), model=top, ds=ds, directory=tmp_path)
    assert lora_gold_path(cfg, 4, directory=tmp_path).stat().st_mtime_ns == stamp   # reused
    np.testing.assert_array_equal(again.cosine[0], study.cosine[1])
    one = lora_study(cfg, ranks=(4,), seeds=(2,), model=top, ds=ds, directory=tmp_path)
    assert one.seeds == (2,) and lora_gold_path(cfg, 4, seeds=(2,), directory=tmp_path).exists()
    lora2 = load_npz(lora_gold_path(cfg, 4, seeds=(2,), directory=tmp_path))
    np.testing.assert_array_equal(lora2["seeds"], [2])
    a_full2 = gold_scores(full["loss_full"][1:], full["loss_loo"][1:], adjust="mean")
    a2 = gold_scores(lora2["loss_full"], lora2["loss_loo"], adjust="mean")
    u, v = a_full2[:, -1, 0], a2[:, -1, 0]
    assert one.cosine[0, -1, 0] == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v),
                                                 abs=1e-12)
    with pytest.raises(ValueError, match="must be distinct seeds of the full gold"):
        lora_study(cfg, ranks=(4,), seeds=(7,), model=top, ds=ds, directory=tmp_path)
    # methods on the adapters against the LoRA gold, beside notebook 03's on all parameters
    from fimoda.paper.experiment import make_attributor, run_method, select_loo_indices
    from fimoda.paper.experiment import select_test_indices
    loo_idx, test_idx = select_loo_indices(cfg, 30), select_test_indices(cfg, 10)
    with pytest.raises(ValueError, match="run notebooks/03_attribution_methods first"):
        lora_study(cfg, ranks=(4,), methods=("grad_dot",), model=top, ds=ds, directory=tmp_path)
    att = make_attributor(top, ds, cfg, loo_idx, test_idx, progress=False)
    full_gd = run_method("grad_dot", att, cfg, loo_idx, test_idx, directory=tmp_path)
    with_m = lora_study(cfg, ranks=(4,), methods=("grad_dot",), model=top, ds=ds,
                        directory=tmp_path)
    on_adapters, on_full = with_m.methods["grad_dot"]
    lora_gd = load_npz(tmp_path / "lora_scores_r4_grad_dot.npz")["scores"]
    lora4 = load_npz(lora_gold_path(cfg, 4, directory=tmp_path))
    a4 = gold_scores(lora4["loss_full"], lora4["loss_loo"], adjust="mean")
    for scores, gold, got in ((lora_gd, a4, on_adapters[0]), (full_gd, a_full, on_full)):
        u, v = gold[:, -1, 1], scores[1]
        assert got[-1, 1] == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v),
                                           abs=1e-12)
    assert not np.allclose(lora_gd, full_gd) and list(with_m.method_means()["rank"]) == [4]
    mean_a, se_a, mean_f, se_f = with_m.method_cosines()["grad_dot"]   # over the test points
    last = on_adapters[0, -1]
    assert mean_a[0] == pytest.approx(last.sum() / len(last), abs=1e-12)
    assert se_a[0] == pytest.approx(np.sqrt(((last - last.mean()) ** 2).sum()
                                            / (len(last) - 1) / len(last)), abs=1e-12)
    assert mean_f == pytest.approx(on_full[-1].sum() / len(on_full[-1]), abs=1e-12)
    fig = lora_figure(study)
    assert len(fig.axes) == 2
    assert f"{len(study.seeds)} batch-order seeds (" in fig._suptitle.get_text()
    assert "batch-order seed 2," in lora_figure(one)._suptitle.get_text()   # one seed: its number
    fig.savefig(tmp_path / "lora.png")
    with pytest.raises(ValueError, match="rank must be an integer"):
        lora_study(cfg, ranks=(0,), model=top, ds=ds, directory=tmp_path)
    f32 = get_config("sst2", "smoke")                       # names what differs from the full gold
    assert [lora_gold_path(f32, 8, **kw).name for kw in ({}, {"dtype": "float64"},
                                                         {"lr": 1e-4, "seeds": (1,)})] == [
        "lora_gold_r8_adamw_subtract.npz", "lora_gold_r8_float64_adamw_subtract.npz",
        "lora_gold_r8_lr0.0001_seeds1_adamw_subtract.npz"]
