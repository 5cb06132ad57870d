"""LoRA (Hu et al., ICLR 2022): a model's chosen linear layers reparametrised with low-rank
adapters, everything else frozen, so that further training (the gold standard) and attribution
act on the adapters only -- the next step the paper names in its Section 7.

A wrapped ``nn.Linear`` layer y = W0 x + b0 becomes

    y = W0 x + b0 + s B A x,      A (r x in), B (out x r), s = alpha / r,

W0, b0 and every other parameter of the model frozen (``requires_grad`` False) and A, B the only
trainable parameters. B starts at zero, so the adapted model starts exactly at theta^f (each
adapter adds 0.0 to its layer's output); A is drawn from a generator seeded with ``seed``, with
peft's initialisation (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))). The
adapters are ``nn.Linear`` modules ``lora_A``, ``lora_B`` (as in peft), so the methods that work
on linear layers (EK-FAC's Kronecker factors, DataInf's layer blocks) see them as layers.

The gold engines (:func:`fimoda.gold.further_train`) and the methods
(:func:`fimoda.attribute`) train and differentiate the parameters that require gradients, so
passing the wrapped model to them IS LoRA further training and attribution on the adapters
(``names=`` the adapter names, which are all its trainable parameters).

Relation to full fine-tuning (SGD at learning rate eta). With G = dL/dW at W = W0 + s B A the
adapters' gradients are dL/dB = s G A^T and dL/dA = s B^T G. From B = 0 the first step moves B
only, B1 = -eta s G0 A^T, so W1 - W0 = -eta s^2 G0 A^T A: when r >= in and s A has orthonormal
columns (s^2 A^T A = I) this is full fine-tuning's step -eta G0 exactly. The second step moves
A too, and then

    W2(LoRA) - W2(full) = -eta^3 s^2 (G0 G0^T G1 + G1 G0^T G1)

exactly, G_k full fine-tuning's gradient at W_k; so full-rank LoRA follows full fine-tuning
step by step up to terms of order eta^3 s^2, and exactly in the limit s -> 0 with s A held
orthogonal. Adam, whose per-element normalisation acts on A and B and not on W, has no such
equivalence at any rank.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["LoRALinear", "add_lora", "adapter_names", "merged_weight", "lora_settings",
           "BERT_TARGETS", "n_trainable"]

# the attention (query, key, value, output) and feed-forward (intermediate, output) linears of
# a BERT-layout encoder layer, as suffixes of module names (``output.dense`` matches both the
# attention output's and the feed-forward output's)
BERT_TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * lora_B(lora_A(x))`` with ``base`` (an ``nn.Linear``) frozen;
    ``lora_A`` (rank x in) drawn from ``generator`` (CPU, float64 draws cast to the base's dtype,
    so the same seed gives the same A on every device), ``lora_B`` (out x rank) zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device,
                                dtype=w.dtype)
        bound = 1.0 / math.sqrt(base.in_features)   # kaiming_uniform_(a=sqrt(5)), as peft
        a = torch.empty(rank, base.in_features, dtype=torch.float64)
        a.uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a.to(w.dtype))
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def lora_settings(rank, alpha=None) -> float:
    """alpha for ``rank`` (None: alpha = rank), after checking both: a ValueError for a rank
    that is not an integer >= 1 or an alpha that is not a positive number."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    alpha = float(rank) if alpha is None else alpha
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and alpha > 0
                                       and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    return float(alpha)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def add_lora(model: nn.Module, rank: int = 8, alpha: Optional[float] = None,
             targets: Sequence[str] = BERT_TARGETS, seed: int = 0):
    """(a copy of ``model`` with LoRA adapters, the adapters' parameter names). ``model`` itself
    is left as it was.

    ``targets``: the ``nn.Linear`` modules to adapt, as module names or suffixes of them (a name
    matches a target when it equals it or ends with ``"." + target``); default
    :data:`BERT_TARGETS`, the attention and feed-forward linears of every BERT-layout layer in
    the model (for :class:`fimoda.models.TextTop`, the trained top layers; the head stays
    frozen). Only modules with a trainable weight are adapted (a frozen trunk's layers are not).
    ``rank`` r >= 1, ``alpha`` > 0 (default: r, i.e. scaling s = 1, peft's default pairing
    r = lora_alpha = 8); ``seed``: of the A matrices, drawn in module order from one generator.
    Every parameter of the copy but the adapters is frozen.

    A target that names no trainable ``nn.Linear`` of the model, or a matching module that is
    not one, is a ValueError before anything is copied."""
    alpha = lora_settings(rank, alpha)
    if isinstance(targets, str):
        targets = (targets,)
    chosen, used = [], set()
    for name, mod in model.named_modules():
        hits = [t for t in targets if _matches(name, t)]
        if not hits:
            continue
        if isinstance(mod, LoRALinear):
            raise ValueError(f"module {name!r} has LoRA adapters already")
        if type(mod) is not nn.Linear:
            raise ValueError(f"target {hits[0]!r} matches module {name!r}, a "
                             f"{type(mod).__name__}; LoRA adapts nn.Linear layers only")
        if mod.weight.requires_grad:
            chosen.append(name)
            used.update(hits)
    unused = [t for t in targets if t not in used]
    if unused:
        linears = [n for n, m in model.named_modules()
                   if type(m) is nn.Linear and m.weight.requires_grad]
        raise ValueError(f"LoRA targets {unused} match no trainable nn.Linear of the model; its "
                         f"trainable linear layers are {linears}")
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(int(seed))
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, g))
    return out, adapter_names(out)


def adapter_names(model: nn.Module) -> list:
    """The parameter names of every LoRA adapter (``lora_A`` and ``lora_B`` weights) of
    ``model``, in module order."""
    return [n for n, _ in model.named_parameters()
            if n.endswith((".lora_A.weight", ".lora_B.weight"))]


def merged_weight(layer: LoRALinear) -> torch.Tensor:
    """The adapted layer's effective weight W0 + s B A (out x in)."""
    return layer.base.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight


def n_trainable(model: nn.Module) -> int:
    """Elements of the parameters that require gradients (what further training trains)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
