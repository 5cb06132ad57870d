"""The image and text models of the paper through the shared machinery, against independent
one-example / one-model references (float64):

- per-example gradients (``fimoda.gradients.Problem.loss_grads``, vmap) of a tiny
  ``fimoda.models.ResNet9`` in eval mode (randomised BatchNorm statistics) and of a 2-layer BERT
  encoder + linear head (``TextClassifier`` built offline from a ``transformers.BertConfig``)
  equal a plain autograd loop over the examples; for the encoder the reference runs the
  encoder itself on each sentence with its padding cut off, so it also checks the additive mask
  ``TextClassifier.forward`` builds;
- the vectorised further training (``further_train``) equals the one-model-at-a-time
  ``reference_further_train`` for both models and both mechanisms: ResNet9 with SGD + weight
  decay and augmentation, the encoder with the SST-2 algorithm (AdamW, gradient clipping at 1,
  evaluation every few steps).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fimoda.gold import GoldConfig, further_train, reference_further_train
from fimoda.gradients import Problem
from fimoda.models import ResNet9, TextClassifier, row_groups
from small_models import flip_augment

GRAD_RTOL = 1e-10      # per-example gradients: relative to the largest reference entry
TRAIN_TOL = 1e-9       # further training: losses and parameter distances, absolute


# ----------------------------------------------------------------------------- models and data
def tiny_resnet(seed=0):
    """ResNet9(in_channels=1, width=4, 3 classes), float64, eval mode, with random BatchNorm
    running statistics and affine parameters (so eval mode differs from the default stats)."""
    torch.manual_seed(seed)
    m = ResNet9(in_channels=1, n_classes=3, width=4).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            c = bn.num_features
            bn.running_mean.copy_(0.3 * torch.randn(c, generator=g, dtype=torch.float64))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
            bn.weight.copy_(1 + 0.2 * torch.randn(c, generator=g, dtype=torch.float64))
            bn.bias.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
    return m.eval()


def image_data(n, n_test, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    Xt = torch.randn(n_test, 1, size, size, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (n_test,), generator=g)
    return X, y, Xt, yt


def tiny_text_model(seed=0):
    """TextClassifier around a randomly initialised 2-layer BERT (hidden 32, 2 heads,
    intermediate 64, vocabulary 100), built offline, float64, eval mode (dropout off)."""
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(seed)
    encoder = BertModel(cfg, add_pooling_layer=False).double()
    return TextClassifier.from_encoder(encoder, n_classes=2).eval()


def text_data(n, L=10, seed=2):
    """(n, 2, L) int64 stacking token ids and attention masks (lengths 2..L, so most sentences
    are padded; padding carries id 0) and binary labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, L), generator=g)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    lengths[0] = L                                  # at least one unpadded sentence
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * mask
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.stack([ids, mask], 1), y


# ----------------------------------------------------------------------------- gradients
def autograd_rows(loss_of, params, n):
    """(n, P): row i = d loss_of(i) / d params by plain reverse-mode autograd, one example at
    a time."""
    rows = []
    for i in range(n):
        gs = torch.autograd.grad(loss_of(i), params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def assert_grads_close(G, ref):
    assert G.shape == ref.shape
    scale = float(ref.abs().max())
    dev = float((G - ref).abs().max())
    assert scale > 1e-6 and dev <= GRAD_RTOL * scale, (dev, scale)
    return dev / scale


def test_resnet9_per_example_gradients_equal_an_autograd_loop():
    m = tiny_resnet()
    X, y, _, _ = image_data(4, 1, size=12)
    # the running statistics matter: the default ones give other outputs
    plain = copy.deepcopy(m)
    for bn in (mod for mod in plain.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
    with torch.no_grad():
        assert (m(X) - plain(X)).abs().max() > 1e-3
    pb = Problem(m, X, y, "classification", chunk=3, progress=False)    # two chunks: 3 + 1
    assert pb.vmap_ok and not m.training
    G = pb.loss_grads(X, y, desc=None)
    params = list(m.parameters())
    ref = autograd_rows(lambda i: F.cross_entropy(m(X[i:i + 1]), y[i:i + 1]), params, len(X))
    assert G.shape == (4, sum(p.numel() for p in params))
    assert_grads_close(G, ref)
    # a subset: the last residual block and the linear layer
    names = ["net.5", "fc"]
    sub = Problem(m, X, y, "classification", names=names, progress=False)
    chosen = [p for n, p in m.named_parameters() if n.startswith("net.5.") or n == "fc.weight"]
    assert sub.names == [n for n, _ in m.named_parameters()
                         if n.startswith("net.5.") or n == "fc.weight"]
    ref_sub = autograd_rows(lambda i: F.cross_entropy(m(X[i:i + 1]), y[i:i + 1]), chosen, len(X))
    assert_grads_close(sub.loss_grads(X, y, desc=None), ref_sub)


@pytest.mark.parametrize("subset", [False, True], ids=["all", "top-layer+head"])
def test_text_classifier_per_example_gradients_equal_an_autograd_loop(subset):
    m = tiny_text_model()
    x, y = text_data(4)
    x, y = x[[0, 3, 1, 2]], y[[0, 3, 1, 2]]
    lengths = x[:, 1].sum(1)
    # groups of 2 by length (fimoda.models.row_groups): rows 3 and 2 (the padded sentences, cut
    # to 6 tokens before the model sees them), then rows 0 and 1 -- the rows come back in order
    assert lengths.tolist() == [10, 10, 6, 3] and set(y.tolist()) == {0, 1}
    assert [g.tolist() for g in row_groups(m, x, 2)] == [[3, 2], [0, 1]]
    names = ["encoder.encoder.layer.1", "head"] if subset else None
    pb = Problem(m, x, y, "classification", names=names, chunk=2, progress=False)
    assert pb.vmap_ok
    G = pb.loss_grads(x, y, desc=None)
    named = dict(m.named_parameters())
    chosen = [named[n] for n in pb.names]
    if subset:
        assert pb.names == [n for n in named if n.startswith("encoder.encoder.layer.1.")
                            or n.startswith("head.")]
    else:
        # the unused pooler is not built; every parameter gets a gradient
        assert pb.names == list(named)

    def loss_of(i):
        """The encoder itself on sentence i without its padding, no mask: independent of the
        additive mask and of torch.func."""
        k = int(x[i, 1].sum())
        h = m.encoder(input_ids=x[i:i + 1, 0, :k]).last_hidden_state[:, 0]
        return F.cross_entropy(m.head(h), y[i:i + 1])

    ref = autograd_rows(loss_of, chosen, len(x))
    assert_grads_close(G, ref)


def test_row_groups_cover_every_row_once_by_length():
    m = tiny_text_model()
    x, _ = text_data(40)
    lengths = m.input_lengths(x)
    assert torch.equal(lengths, x[:, 1].sum(1))                # masks are 1s then 0s
    groups = row_groups(m, x, size=64, text_group=16)
    assert [len(g) for g in groups] == [16, 16, 8]
    order = torch.cat(groups)
    assert sorted(order.tolist()) == list(range(40))
    assert torch.all(lengths[order][1:] >= lengths[order][:-1])   # shortest first
    assert row_groups(torch.nn.Linear(3, 1), torch.zeros(5, 3), 2) == [slice(0, 2), slice(2, 4),
                                                                      slice(4, 6)]


# ----------------------------------------------------------------------------- further training
def assert_training_close(a, b):
    """Vectorised == reference to TRAIN_TOL, and the runs really moved and really differ.
    Returns the largest deviation."""
    assert a.loss_loo.shape == b.loss_loo.shape and a.loss_full.shape == b.loss_full.shape
    devs = [np.abs(getattr(a, k) - getattr(b, k)).max()
            for k in ("loss_full", "loss_loo", "param_dist", "param_dist_loo")]
    assert max(devs) <= TRAIN_TOL, devs
    assert np.all(a.loss_loo[:, :, 0] == a.loss_full[:, None, 0])      # t = 0 is theta^f
    assert np.all(a.param_dist[:, 0] == 0) and np.all(a.param_dist[:, -1] > 1e-3)
    effect = np.abs(a.loss_loo[:, :, 1:] - a.loss_full[:, None, 1:]).max()
    assert effect > 1e3 * TRAIN_TOL, effect                             # LOO differs from full
    return max(devs)


@pytest.mark.parametrize("mechanism", ["remove", "subtract"])
@pytest.mark.parametrize("engine", ["auto", "func"])
def test_resnet9_further_training_equals_reference_with_augmentation(mechanism, engine):
    """n = 3B + 1: in steps, LOO runs (``remove``) start their second epoch one step before the
    full run, so one step mixes two epochs' augmented views."""
    m = tiny_resnet()
    m.train()                                    # further training must switch to eval mode
    X, y, Xt, yt = image_data(25, 3)
    loo = [0, 11, 24]
    cfg = GoldConfig(optimizer="sgd", lr=0.5, weight_decay=1e-3, epochs=1, max_steps=5,
                     eval_every=2, batch_size=8, mechanism=mechanism, seeds=2, progress=False,
                     engine=engine)
    a = further_train(m, "classification", X, y, Xt, yt, loo, cfg, augment=flip_augment)
    b = reference_further_train(m, "classification", X, y, Xt, yt, loo, cfg,
                                augment=flip_augment)
    # auto: the per-run loop for a convolutional model on a CPU (faster than vmap there)
    assert a.config["engine"] == ("loop" if engine == "auto" else "func")
    assert m.training                                                 # the caller's model intact
    assert list(a.eval_points) == [0, 2, 4, 5] and a.eval_unit == "step"
    assert_training_close(a, b)
    with torch.no_grad():                                             # eval mode at t = 0
        ref0 = F.cross_entropy(copy.deepcopy(m).eval()(Xt), yt, reduction="none").numpy()
    np.testing.assert_allclose(a.loss_full[0, 0], ref0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("engine", ["auto", "loop"])
@pytest.mark.parametrize("mechanism", ["remove", "subtract"])
def test_text_classifier_further_training_equals_reference(mechanism, engine, monkeypatch):
    """The SST-2 further-training algorithm (AdamW, gradient clipping at 1.0, evaluation every
    k steps) on the tiny encoder; ``auto`` picks the vmap engine. The engines sum each batch's
    gradient over groups of 3 sentences of similar length (the reference over the whole batch)."""
    import fimoda.gold.engines as ft
    monkeypatch.setattr(ft, "TEXT_GROUP", 3)
    m = tiny_text_model()
    x, y = text_data(27)
    X, Y, Xt, Yt = x[:24], y[:24], x[24:], y[24:]
    # clipping is active: a batch gradient at theta^f is longer than the clip norm
    loss = F.cross_entropy(m(X[:8]), Y[:8])
    norm = torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(loss, m.parameters())))
    assert norm > 1.0, float(norm)
    loo = [0, 9, 23]
    cfg = GoldConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01, grad_clip=1.0, epochs=1,
                     max_steps=5, eval_every=2, batch_size=8, mechanism=mechanism, seeds=2,
                     engine=engine, progress=False)
    a = further_train(m, "classification", X, Y, Xt, Yt, loo, cfg)
    b = reference_further_train(m, "classification", X, Y, Xt, Yt, loo, cfg)
    assert a.config["engine"] == ("func" if engine == "auto" else "loop")
    assert list(a.eval_points) == [0, 2, 4, 5]
    assert_training_close(a, b)
