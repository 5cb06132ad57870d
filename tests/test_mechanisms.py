"""The leave-out mechanism as a strategy (``fimoda.gold.mechanisms``): a new mechanism is one class
registered by name, and the vectorised engines and the reference loop run it with no other change.

Two toy mechanisms are registered here (and unregistered afterwards), each checked against a
hand-written SGD loop that shares no code with fimoda but the initial weights:

- ``keep_toy``: z_i stays in and nothing is added, so every run is the full run;
- ``upweight_toy``: run i minimises ``mean_{z in b_k} L(z) + L(z_i)/n`` at every step, z_i counted
  once more (the finite up-weighting of the influence function, the mirror of ``subtract``).
"""
import numpy as np
import pytest
import torch

from fimoda.gold import (MECHANISMS, GoldConfig, Mechanism, further_train, mechanism,
                         mechanism_names, reference_further_train, register_mechanism,
                         unregister_mechanism)
from fimoda.gold.infinitesimal import infinitesimal_further_train
from fimoda.models import MLP

# float64 vectorised, reference and hand-written runs differ only in summation order: roundoff of
# order 1e-15 per step on losses of order 1, far below this; a mechanism's term (lr/n ~ 1e-3 per
# step) far above it (checked by the effect assertion)
TOL = 1e-10
LR, EPOCHS, B = 0.05, 3, 8


class KeepToy(Mechanism):
    """z_i is left in: the run is the full run."""
    name = "keep_toy"
    how = "z_i left in"
    source = "a test of the registry"

    def kept(self, n, size):
        return n + 0 * size

    def order(self, perm, left):
        return perm

    def positions(self, q, e, inv, left, member, n):
        return q


class UpweightToy(KeepToy):
    """z_i counted once more: ``mean_{z in b_k} L(z) + (1/n) sum_{i in S} L(z_i)``."""
    name = "upweight_toy"
    how = "z_i's scaled loss term added"

    def extra_slots(self, group):
        return group

    def extra_terms(self, left, member, n):
        w = torch.where(member, torch.tensor(1.0 / n, dtype=torch.float64),
                        torch.tensor(0.0, dtype=torch.float64))
        return left.clamp(min=0), w

    def reference_loss(self, batch_mean, left_out_losses, n):
        return batch_mean + left_out_losses().sum() / n


@pytest.fixture
def toys():
    register_mechanism(KeepToy)
    register_mechanism(UpweightToy)
    try:
        yield
    finally:
        unregister_mechanism("keep_toy")
        unregister_mechanism("upweight_toy")


def _problem(n=37, d=4, n_test=5):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(X @ torch.randn(d, generator=g, dtype=torch.float64))
    Xt = torch.randn(n_test, d, generator=g, dtype=torch.float64)
    yt = torch.sin(Xt.sum(1))
    torch.manual_seed(1)
    return MLP(d, 1, hidden=6).double(), X, y, Xt, yt


def _hand_run(model, X, y, Xt, yt, seed, group, weight):
    """Plain SGD from the model's weights: every epoch the order is ``randperm(n)`` of a generator
    seeded with ``seed`` (then one more randperm drawn and discarded, as RandomSampler does),
    batches of B in that order; the loss is the batch mean of (f - y)^2 plus ``weight / n`` times
    the group's summed losses. Returns the test losses (EPOCHS + 1, J)."""
    W = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    def f(x):
        h = torch.relu(x @ W[0].T + W[1])
        h = torch.relu(h @ W[2].T + W[3])
        return (h @ W[4].T + W[5]).reshape(-1)

    n = len(X)
    g = torch.Generator().manual_seed(seed)
    out = [((f(Xt) - yt) ** 2).detach()]
    for _ in range(EPOCHS):
        perm = torch.randperm(n, generator=g)
        torch.randperm(n, generator=g)
        for a in range(0, n, B):
            rows = perm[a:a + B]
            loss = ((f(X[rows]) - y[rows]) ** 2).mean()
            loss = loss + weight / n * ((f(X[group]) - y[group]) ** 2).sum()
            grads = torch.autograd.grad(loss, W)
            with torch.no_grad():
                for p, gr in zip(W, grads):
                    p -= LR * gr
        out.append(((f(Xt) - yt) ** 2).detach())
    return torch.stack(out).numpy()


@pytest.mark.parametrize("engine", ["mlp", "func"])
@pytest.mark.parametrize("name,weight", [("keep_toy", 0.0), ("upweight_toy", 1.0)])
def test_a_registered_mechanism_runs_in_the_engines_and_the_reference_loop(toys, engine, name,
                                                                           weight):
    model, X, y, Xt, yt = _problem()
    seeds = (2, 5)
    left = [[0], [4, 36], [17]]
    cfg = GoldConfig(optimizer="sgd", lr=LR, epochs=EPOCHS, batch_size=B, mechanism=name,
                     seeds=seeds, engine=engine, max_runs_per_chunk=2, progress=False)
    vec = further_train(model, "regression", X, y, Xt, yt, left, cfg)
    ref = reference_further_train(model, "regression", X, y, Xt, yt, left, cfg)
    assert vec.config["engine"] == engine and vec.config["mechanism"] == name
    for si, seed in enumerate(seeds):
        full = _hand_run(model, X, y, Xt, yt, seed, [], 0.0)
        for res in (vec, ref):
            np.testing.assert_allclose(res.loss_full[si], full, rtol=0, atol=TOL)
        for r, group in enumerate(left):
            hand = _hand_run(model, X, y, Xt, yt, seed, group, weight)
            for res in (vec, ref):
                np.testing.assert_allclose(res.loss_loo[si, r], hand, rtol=0, atol=TOL)
    effect = np.abs(vec.loss_loo - vec.loss_full[:, None]).max()
    if weight:
        assert effect > 1e3 * TOL, effect                 # the added term really moved the runs
    else:
        assert effect == 0.0                               # left in: the full run, bit for bit
    assert np.abs(vec.loss_full[:, -1] - vec.loss_full[:, 0]).max() > 1e3 * TOL   # runs trained


def test_the_registry_names_lookups_and_errors(toys):
    assert MECHANISMS == ("remove", "subtract")            # the built-ins, in this order
    assert mechanism_names() == MECHANISMS + ("keep_toy", "upweight_toy")
    assert isinstance(mechanism("upweight_toy"), UpweightToy)
    assert mechanism("remove").name == "remove" and mechanism("subtract").infinitesimal
    with pytest.raises(ValueError, match="already registered"):
        register_mechanism(KeepToy)
    with pytest.raises(ValueError, match="Mechanism subclass"):
        register_mechanism(object)
    with pytest.raises(ValueError, match="cannot be unregistered"):
        unregister_mechanism("remove")
    with pytest.raises(ValueError, match=r"unknown mechanism 'drop'; choose from \('remove', "
                                         r"'subtract', 'keep_toy', 'upweight_toy'\)"):
        mechanism("drop")
    # the infinitesimal gold is the eps -> 0 limit of subtract only: refused before any work
    model, X, y, Xt, yt = _problem()
    with pytest.raises(ValueError, match="mechanism='subtract'"):
        infinitesimal_further_train(model, "regression", X, y, Xt, yt, [0],
                                    GoldConfig(mechanism="upweight_toy", progress=False))


def test_an_unregistered_mechanism_is_refused_by_the_config():
    assert "keep_toy" not in mechanism_names()             # the fixture cleaned up
    with pytest.raises(ValueError, match="GoldConfig: unknown mechanism 'keep_toy'; choose from "
                                         r"\('remove', 'subtract'\)"):
        GoldConfig(mechanism="keep_toy")


def test_a_mechanism_whose_runs_keep_more_than_the_full_set_is_refused_before_any_work(tmp_path):
    class DuplicateToy(KeepToy):          # z_i twice per epoch: more batches than the full run
        name = "duplicate_toy"

        def kept(self, n, size):
            return n + size

    register_mechanism(DuplicateToy)
    try:
        model, X, y, Xt, yt = _problem(n=32)            # 32 % 8 = 0: one instance more is a batch
        cfg = GoldConfig(mechanism="duplicate_toy", epochs=1, batch_size=B, seeds=1,
                         progress=False)
        with pytest.raises(ValueError, match="keeps more than the full set's 32"):
            further_train(model, "regression", X, y, Xt, yt, [0], cfg, workdir=tmp_path / "w")
        assert not (tmp_path / "w").exists()
    finally:
        unregister_mechanism("duplicate_toy")
