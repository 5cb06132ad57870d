"""The small float64 models and problems the tests attribute and further-train, built once here
so every test file sets them up alike, and the checks their further-training runs share."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from fimoda.paper.config import get_config
from fimoda.gold import GoldConfig, further_train
from fimoda.models import MLP

TOL = 1e-10        # vectorised engine vs reference loop, in loss units (float64)


def near_minimum_mlp(X, y, hidden=6, seed=0, steps=50, lr=0.05):
    """MLP(d, 1) in float64 after ``steps`` full-batch SGD steps of lr ``lr`` on the mean squared
    error of (X, y), from the init of torch seed ``seed``: theta^f near, not at, a minimum (a
    non-zero mean gradient, as a downloaded model has)."""
    torch.manual_seed(seed)
    model = MLP(X.shape[1], 1, hidden=hidden).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((model(torch.as_tensor(X))[:, 0] - torch.as_tensor(y)) ** 2).mean().backward()
        opt.step()
    return model


def regression_problem(n=41, d=5, n_test=6, seed=0, hidden=16):
    """(model, X, y, X_test, y_test): n rows of d standard-normal features with targets
    sin(X w) plus noise of sd 0.1 (noise-free on the n_test test rows), and an untrained
    MLP(d, 1) in float64 from torch seed ``seed``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = torch.sin(X @ w) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    Xt = torch.randn(n_test, d, generator=g, dtype=torch.float64)
    yt = torch.sin(Xt @ w)
    torch.manual_seed(seed)
    return MLP(d, 1, hidden=hidden).double(), X, y, Xt, yt


def retraining_problem(n, epochs, hidden):
    """(cfg, init, X, y, X_test, y_test) for re-training from scratch: Concrete's smoke
    configuration trained ``epochs`` epochs of batch 8 at lr 0.05, a ``regression_problem`` of
    n rows and 4 features, and theta^0 an MLP(4, 1) of ``hidden`` units from the training seed."""
    cfg = get_config("concrete", "smoke")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs,
                                                             batch_size=8, lr=0.05))
    _, X, y, Xt, yt = regression_problem(n=n, d=4)
    torch.manual_seed(cfg.train.seed)
    return cfg, MLP(4, 1, hidden=hidden).double(), X, y, Xt, yt


class ConvBN(nn.Module):
    """A convolution, batch norm, dropout and a linear head: a model only the generic engines
    further-train (buffers, eval-mode layers), on 2-channel images to 3 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def flip_augment(x, generator):
    """Each image flipped left-right with probability 1/2, drawn from ``generator``."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def conv_bn_problem():
    """(net, X, y, X_test, y_test): a float64 ``ConvBN`` from torch seed 0, 17 training and 4
    test images of 2 x 6 x 6 with labels in {0, 1, 2}."""
    torch.manual_seed(0)
    net = ConvBN().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(17, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (17,), generator=g)
    Xt = torch.randn(4, 2, 6, 6, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (4,), generator=g)
    return net, X, y, Xt, yt


def conv_bn_gold_config(mechanism, engine):
    """The further training of ``conv_bn_problem``: SGD at lr 0.2, batch 4, 7 steps over 2
    epochs evaluated every 2, two seeds, chunks of 2 runs."""
    return GoldConfig(optimizer="sgd", lr=0.2, epochs=2, max_steps=7, eval_every=2, batch_size=4,
                      mechanism=mechanism, seeds=2, max_runs_per_chunk=2, progress=False,
                      engine=engine)


def assert_close_and_nontrivial(a, b):
    """Two further-training results agree to TOL, and the runs really moved and really differ."""
    assert a.loss_loo.shape == b.loss_loo.shape and a.loss_full.shape == b.loss_full.shape
    np.testing.assert_allclose(a.loss_loo, b.loss_loo, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.loss_full, b.loss_full, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.param_dist, b.param_dist, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.param_dist_loo, b.param_dist_loo, rtol=0, atol=TOL)
    assert np.all(a.loss_loo[:, :, 0] == a.loss_full[:, None, 0])      # t = 0 is theta^f
    assert np.all(a.param_dist[:, 0] == 0) and np.all(a.param_dist[:, -1] > 1e-4)
    effect = np.abs(a.loss_loo[:, :, 1:] - a.loss_full[:, None, 1:]).max()
    assert effect > 1e3 * TOL, effect                                   # LOO differs from full


class Killed(Exception):
    """What stops a further training as a killed process would stop."""


def _kill(seed, chunk):
    raise Killed


def killed_after_first_piece(model, X, y, Xt, yt, left_out, cfg, workdir):
    """A regression further training into ``workdir`` stopped right after its first piece is
    saved, as a process killed there; returns the names of the piece files it left."""
    with pytest.raises(Killed):
        further_train(model, "regression", X, y, Xt, yt, left_out, cfg, workdir=workdir,
                      callback=_kill)
    return sorted(p.name for p in workdir.glob("seed*_chunk*.npz"))
