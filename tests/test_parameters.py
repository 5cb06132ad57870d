"""Parameter subsets (fimoda.parameters): the top layers / named modules of a model as ``names=``,
the line saying how much of the model is attributed, Grad-Dot on a subset against autograd
gradients of those parameters alone, and the gold standard on a subset against the
one-model-at-a-time reference with the other parameters frozen."""
import copy

import numpy as np
import pytest
import torch

import fimoda
from fimoda.gold import GoldConfig, gold_scores
from fimoda.gold.reference import reference_further_train
from fimoda.parameters import describe, layer_stack
from small_models import regression_problem
from test_hf_streaming import tiny_bert

LEFT = [0, 3, 7, 20, 40]


def test_top_layers_of_a_transformer_are_its_last_blocks_and_the_head():
    model = tiny_bert()
    assert layer_stack(model) == ("bert.encoder.layer",
                                  ["bert.encoder.layer.0", "bert.encoder.layer.1"])
    names = fimoda.select_parameters(model, top_layers=1)
    assert all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier."))
               for n in names)
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    assert len(names) == 16 + 2 + 2                   # a BERT layer holds 16 tensors
    both = fimoda.select_parameters(model, top_layers=1, modules=["bert.embeddings"])
    assert both[:5] == [n for n, _ in model.named_parameters()][:5] and len(both) == 20 + 5
    assert fimoda.select_parameters(model, top_layers=2) == \
        [n for n, _ in model.named_parameters() if not n.startswith("bert.embeddings")]


def test_top_layers_of_an_mlp_are_its_hidden_layers_and_output():
    model, *_ = regression_problem()
    assert layer_stack(model) == ("hidden", ["hidden.0", "hidden.1"])
    assert fimoda.select_parameters(model, top_layers=1) == \
        ["hidden.1.weight", "hidden.1.bias", "out.weight", "out.bias"]
    assert fimoda.select_parameters(model, modules="out") == ["out.weight", "out.bias"]


@pytest.mark.parametrize("kw, match", [
    (dict(top_layers=0), r"top_layers must be an integer in 1\.\.2 .*'hidden' has 2"),
    (dict(top_layers=3), r"in 1\.\.2"),
    (dict(top_layers=True), r"in 1\.\.2"),
    (dict(modules=["hiden"]), r"no module or parameter 'hiden'.*\['hidden', 'out'\]"),
    (dict(), "needs top_layers"),
])
def test_bad_selections_are_one_clear_error(kw, match):
    model, *_ = regression_problem()
    with pytest.raises(ValueError, match=match):
        fimoda.select_parameters(model, **kw)


def test_the_description_counts_the_chosen_parameters():
    model, *_ = regression_problem(d=5, hidden=16)
    total = 5 * 16 + 16 + 16 * 16 + 16 + 16 + 1        # two hidden layers and the output
    assert describe(model, [n for n, _ in model.named_parameters()]) == \
        f"attributing all {total:,} parameters of the model"
    line = describe(model, ["hidden.1.weight", "hidden.1.bias", "out.bias"])
    assert line == f"attributing {16 * 16 + 16 + 1} of the model's {total} parameters " \
                   f"({100 * 273 / total:.3g} %): hidden.1, out.bias"


def test_an_attributor_on_a_subset_says_so_and_its_grad_dot_uses_those_gradients(capsys):
    model, X, y, Xt, yt = regression_problem()
    names = fimoda.select_parameters(model, top_layers=1)
    att = fimoda.attributor(model, X, y, LEFT, Xt, yt, task="regression", names=names)
    out = capsys.readouterr().out.strip()
    assert out.startswith("attributing ") and out.endswith("): hidden.1, out")
    assert out in repr(att) and att.description == out
    fimoda.attributor(model, X, y, LEFT, Xt, yt, task="regression")
    assert capsys.readouterr().out == ""                # every parameter, progress off: silent
    scores = fimoda.attribute(model, X, y, LEFT, Xt, yt, task="regression", att=att)

    def grads(xs, ys):                                 # autograd, one row at a time, float64
        chosen = dict(model.named_parameters())
        rows = []
        for x, t in zip(xs, ys):
            loss = (model(x[None])[0, 0] - t) ** 2
            rows.append(torch.cat([g.reshape(-1) for g in
                                   torch.autograd.grad(loss, [chosen[n] for n in names])]))
        return torch.stack(rows)

    ref = (grads(Xt, yt) @ grads(X[LEFT], y[LEFT]).T).detach().numpy()
    np.testing.assert_allclose(scores, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())


def test_gold_standard_on_a_subset_moves_only_those_parameters(capsys):
    model, X, y, Xt, yt = regression_problem()
    kw = dict(epochs=2, seeds=2, batch_size=8, lr=0.05)
    got = fimoda.gold_standard(model, X, y, LEFT, Xt, yt, task="regression", names=["out"], **kw)
    assert capsys.readouterr().out.startswith("further-training 17 of the model's ")
    assert all(p.requires_grad for p in model.parameters())       # the caller's flags restored
    frozen = copy.deepcopy(model)
    for n, p in frozen.named_parameters():
        p.requires_grad_(n.startswith("out."))
    cfg = GoldConfig(mechanism="remove", progress=False, **kw)
    res = reference_further_train(frozen, "regression", X, y, Xt, yt, LEFT, cfg)
    ref = gold_scores(res.loss_full, res.loss_loo, adjust="mean")[:, -1, :].T
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    every = fimoda.gold_standard(model, X, y, LEFT, Xt, yt, task="regression", **kw)
    assert np.abs(every - got).max() > 1e-3 * np.abs(every).max()   # the subset mattered
