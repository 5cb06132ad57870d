"""A small float64 regression MLP trained near, not at, a minimum: the model the trajectory
tests attribute (theta^f with a non-zero mean gradient, as a downloaded model has)."""
import numpy as np
import torch

from fimoda.models import MLP


def near_minimum_mlp(X, y, hidden=6, seed=0, steps=50, lr=0.05):
    """MLP(d, 1) in float64 after ``steps`` full-batch SGD steps of lr ``lr`` on the mean squared
    error of (X, y), from the init of torch seed ``seed``."""
    torch.manual_seed(seed)
    model = MLP(X.shape[1], 1, hidden=hidden).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((model(torch.as_tensor(X))[:, 0] - torch.as_tensor(y)) ** 2).mean().backward()
        opt.step()
    return model
