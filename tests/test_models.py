"""Models of the paper: output shapes, parameter counts against hand-computed formulas, dtype and
seeded initialisation of build_model, the offline MiniLM text classifier, per-example losses."""
import pytest
import torch
import torch.nn.functional as F

from fimoda.paper.config import get_config
from fimoda.losses import per_example_loss
from fimoda.models import MLP, ResNet9, TextClassifier, build_model, n_params, resolve_dtype




def _mlp_count(d, n_out, h=128):
    return (d * h + h) + (h * h + h) + (h * n_out + n_out)


def _resnet9_count(c_in, n_classes, w=64):
    def conv_bn(a, b):
        return 9 * a * b + 2 * b  # 3x3 conv without bias + BatchNorm weight and bias
    return (conv_bn(c_in, w) + conv_bn(w, 2 * w) + 2 * conv_bn(2 * w, 2 * w)
            + conv_bn(2 * w, 4 * w) + conv_bn(4 * w, 8 * w) + 2 * conv_bn(8 * w, 8 * w)
            + 8 * w * n_classes)


def test_mlp_shapes_and_params():
    for n_out in (1, 2):
        m = MLP(8, n_out)
        assert m(torch.randn(5, 8)).shape == (5, n_out)
        assert n_params(m) == _mlp_count(8, n_out)


def test_build_model_mlp_float64_and_seeded():
    cfg = get_config("concrete", "smoke")
    assert cfg.dtype == "float64"
    a = build_model(cfg, n_features=8)
    b = build_model(cfg, n_features=8)
    c = build_model(cfg, n_features=8, seed=1)
    assert all(p.dtype == torch.float64 for p in a.parameters())
    assert a(torch.randn(3, 8, dtype=torch.float64)).shape == (3, 1)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    fico = build_model(get_config("fico", "smoke"), n_features=23, n_classes=2)
    assert fico(torch.randn(4, 23, dtype=torch.float64)).shape == (4, 2)
    with pytest.raises(ValueError, match="n_features"):
        build_model(cfg)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float16")


def test_resnet9_shapes_and_params():
    m = ResNet9(3, 10)
    assert n_params(m) == _resnet9_count(3, 10)
    assert 6.4e6 < n_params(m) < 6.7e6  # "about 6.5M" at width 64
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    g = ResNet9(1, 10, width=8)
    assert n_params(g) == _resnet9_count(1, 10, w=8)
    g.eval()
    assert g(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    cfg = get_config("fashion_mnist", "smoke")
    b = build_model(cfg, in_channels=1, n_classes=10)
    assert isinstance(b, ResNet9) and next(b.parameters()).dtype == torch.float32


@pytest.fixture(scope="module")
def text_model():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        yield build_model(get_config("sst2", "smoke"), n_classes=2)
    finally:
        mp.undo()


def test_text_classifier_offline_forward(text_model):
    assert isinstance(text_model, TextClassifier)
    x = torch.randint(1000, 2000, (2, 2, 16))
    x[:, 1] = 1
    x[1, 1, 10:] = 0  # second sentence is padded
    text_model.eval()
    out = text_model(x)
    assert out.shape == (2, 2) and out.dtype == torch.float32
    assert torch.equal(out, text_model(x))  # eval mode: deterministic
    # The encoder's dropout is real (train mode changes the output), off in eval mode.
    text_model.train()
    torch.manual_seed(0)
    assert not torch.allclose(text_model(x), out)
    text_model.eval()
    # Padding columns do not matter: the padded sentence gives the same logits when trimmed.
    assert torch.allclose(text_model(x[1:, :, :10]), out[1:], atol=1e-5)


def test_text_classifier_per_example_gradients_vmap(text_model):
    """The encoder's mask is built outside it, so torch.func.vmap traces the model: per-example
    gradients by vmap equal the Python loop's (and the mask semantics equal the encoder's own)."""
    from fimoda.gradients import Problem
    text_model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (5, 12), generator=g)
    mask = torch.ones(5, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    x, y = torch.stack([ids, mask], 1), torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        own = text_model.head(text_model.encoder(input_ids=ids, attention_mask=mask)
                              .last_hidden_state[:, 0])
        assert torch.allclose(text_model(x), own, atol=1e-5)
    names = ["head.weight", "head.bias", "encoder.encoder.layer.5.output.dense.weight"]
    fast = Problem(text_model, x, y, "classification", names=names, progress=False)
    assert fast.vmap_ok
    G = fast.loss_grads(x, y, desc=None)
    text_model.supports_vmap = False
    try:
        slow = Problem(text_model, x, y, "classification", names=names, progress=False)
        G_loop = slow.loss_grads(x, y, desc=None)
    finally:
        del text_model.supports_vmap
    assert G.shape == (5, sum(dict(text_model.named_parameters())[n].numel() for n in names))
    assert torch.allclose(G, G_loop, rtol=1e-4, atol=1e-6 * float(G_loop.abs().max()))


def test_per_example_loss():
    out = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(per_example_loss("regression")(out, y),
                          torch.tensor([0.25, 4.0], dtype=torch.float64))
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.5]])
    lab = torch.tensor([1, 1])
    expect = -torch.log_softmax(logits, 1)[torch.arange(2), lab]
    assert torch.allclose(per_example_loss("classification")(logits, lab), expect)
    assert torch.allclose(expect, F.cross_entropy(logits, lab, reduction="none"))
    with pytest.raises(ValueError, match="task"):
        per_example_loss("ranking")
