"""Models and batches as they come from Hugging Face: a model whose output object holds
``.logits``, fed dict / ``BatchEncoding`` batches of token-level tensors with attention masks.

Every method works on one input tensor whose rows it can index, chunk and trim. Token inputs are
therefore packed (:func:`pack_inputs`) into one int64 tensor (N, K, L): channel k is the k-th key
(``input_ids``, ``attention_mask``, ``token_type_ids``, ...), rows padded to the longest sequence
of all batches (padding: the model's pad token id, mask 0). :class:`HFTokenModel` unpacks them into
the model's keyword arguments and returns ``.logits`` (:class:`HFModel`: a model given one tensor
as it is); like :class:`fimoda.models.TextClassifier` it
cuts each batch to its own longest sequence (``trim_inputs``), so a chunk is padded only to its
longest sentence, and it gives the attention mask in the additive (B, 1, 1, L) form when the
model takes it with the same outputs, which lets ``torch.func.vmap`` batch per-example
gradients (the mask handling of transformers branches on the mask's values otherwise).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Optional, Sequence

import torch
from torch import nn

MASK = "attention_mask"
# keys that are targets, not inputs: given as y, or taken from the batch when y is None
LABEL_KEYS = ("labels", "label")


def is_batch(X) -> bool:
    """Whether ``X`` is a dict-like batch (dict, ``BatchEncoding``) or a list / tuple of them."""
    if isinstance(X, Mapping):
        return True
    return isinstance(X, (list, tuple)) and len(X) > 0 and all(isinstance(b, Mapping) for b in X)


def _columns(batch: Mapping) -> dict:
    """The batch's values as tensors (lists and arrays converted), by key."""
    return {k: v.detach() if torch.is_tensor(v) else torch.as_tensor(v) for k, v in batch.items()}


def split_labels(X, y):
    """(batches without label keys, y): the labels of the batches are used when ``y`` is None;
    given both, the batches' labels are dropped (``y`` is the target)."""
    batches = [X] if isinstance(X, Mapping) else list(X)
    cols = [_columns(b) for b in batches]
    found = [c.pop(k) for c in cols for k in LABEL_KEYS if k in c]
    if y is None:
        if len(found) != len(cols):
            raise ValueError("y is None and the batches hold no 'labels' / 'label' key")
        y = torch.cat(found)
    return cols, y


def pack_inputs(cols: Sequence[dict], keys: Optional[Sequence[str]] = None, pad_id: int = 0):
    """(N, K, L) int64 tensor of the batches' token tensors (each key (B, L) or (L,) for one
    sequence), padded to the longest, and the key order. ``keys``: the order to use (a test set
    must have the training set's keys). One ValueError, before any
    work, for values that are not token-level integers, batches with different keys, or batches
    of different lengths without an attention mask."""
    keys = list(keys if keys is not None else cols[0].keys())
    rows = []
    for c in cols:
        if sorted(c) != sorted(keys):
            raise ValueError(f"every batch must have the keys {sorted(keys)}, got {sorted(c)}")
        for k in keys:
            t = c[k]
            if t.is_floating_point() or t.dim() not in (1, 2):
                raise ValueError(f"batch key {k!r} must hold token-level integers of shape "
                                 f"(B, L), got {t.dtype} {tuple(t.shape)}; other inputs (images, "
                                 f"embeddings) go in as one tensor with a model taking it")
        rows.append(torch.stack([c[k].reshape(-1, c[k].shape[-1]).long() for k in keys], 1))
    lengths = {r.shape[-1] for r in rows}
    L = max(lengths)
    if len(lengths) > 1 and MASK not in keys:
        raise ValueError("batches of different sequence lengths need an 'attention_mask' key "
                         "(padding must be masked)")
    out = []
    for r in rows:
        pad = r.new_zeros(r.shape[0], r.shape[1], L - r.shape[-1])
        pad[:, keys.index("input_ids")] = pad_id if "input_ids" in keys else 0
        out.append(torch.cat([r, pad], -1))
    return torch.cat(out), keys


class HFModel(nn.Module):
    """A Hugging Face (or any) model returning an object with ``.logits``, as a model of
    :mod:`fimoda` taking one tensor and returning logits. Its parameters, buffers and submodules
    ARE the wrapped model's (the same dicts): names match, ``names=`` takes the model's own
    parameter names, and training or attributing this is training or attributing the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "wrapped", model)      # not a submodule: no name prefix
        self._parameters, self._buffers, self._modules = \
            model._parameters, model._buffers, model._modules

    def train(self, mode: bool = True):
        """Set training mode here and on the wrapped model (its dropout follows)."""
        self.wrapped.training = mode
        return super().train(mode)

    def call(self, x: torch.Tensor):
        """The wrapped model's own output for one input tensor (an output object or logits)."""
        return self.wrapped(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits: the output's ``.logits`` where it has them, else the output itself."""
        out = self.call(x)
        return out.logits if hasattr(out, "logits") else out


class HFTokenModel(HFModel):
    """:class:`HFModel` fed packed token batches (N, K, L) (:func:`pack_inputs`): channel k is
    keyword ``keys[k]``. With an ``attention_mask`` channel each batch is cut to its longest
    sequence and rows are grouped by length (``trim_inputs``, ``input_lengths``, as
    :class:`fimoda.models.TextClassifier`)."""

    def __init__(self, model: nn.Module, keys: Sequence[str]):
        super().__init__(model)
        self.keys = list(keys)
        self.masked = MASK in self.keys
        self.additive = False        # give the mask in additive 4-D form (choose_mask_form)

    def call(self, x: torch.Tensor):
        """The wrapped model called with the packed tensor's slices as keyword inputs
        (``x[:, i]`` as ``keys[i]``; an additive attention mask made from the 0/1 one where the
        model wants it)."""
        kw = {k: x[:, i] for i, k in enumerate(self.keys)}
        if self.additive:
            dtype = next(iter(self.wrapped.parameters())).dtype
            m = kw[MASK]
            kw[MASK] = (1.0 - m[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        return self.wrapped(**kw)

    def input_lengths(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens per row of ``x`` (B, K, L) up to its last real one (every column without a
        mask channel): what a row costs."""
        from .models import last_used
        if not self.masked:
            return torch.full((len(x),), x.shape[-1], device=x.device)
        return last_used(x[:, self.keys.index(MASK)])

    def trim_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., K, L) without the trailing columns that are padding in every row
        (unchanged without a mask channel)."""
        from .models import used_length
        if not self.masked:
            return x
        return x[..., :used_length(x[..., self.keys.index(MASK), :])]

    @torch.no_grad()
    def choose_mask_form(self, x: torch.Tensor) -> None:
        """Use the additive attention mask when the model gives the same logits with it on the
        rows ``x`` (it then runs under vmap); else keep the model's own 2-D mask."""
        if not self.masked:
            return
        plain = self(x)
        self.additive = True
        try:
            ok = torch.allclose(self(x), plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))
        except Exception:        # a model that refuses a 4-D mask keeps its own form
            ok = False
        self.additive = ok


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Run the block with a Hugging Face model's attention switched to ``"eager"`` (restored
    afterwards): its products are twice differentiable, which the true-Hessian methods (LiSSA-H,
    Arnoldi, Prop. 1, eq. 16) need -- the scaled-dot-product kernels of CPU torch have no
    double backward -- and vmap batches it without a fallback loop. Other models: unchanged. A
    model that cannot switch keeps its own; build it with ``attn_implementation="eager"``."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def adapt(model: nn.Module, X_train, y_train, X_test, y_test, probe_rows: int = 2):
    """(model, X, y, X_test, y_test) with dict batches packed (:func:`pack_inputs`, the test set
    with the training keys) and the model wrapped in :class:`HFTokenModel`; anything else is
    returned unchanged (:func:`wrap_if_logits` wraps a model given tensors)."""
    if is_batch(X_train) != is_batch(X_test):
        raise ValueError("X_train and X_test must both be dict batches or both be arrays")
    if is_batch(X_train):
        cols, y_train = split_labels(X_train, y_train)
        cols_t, y_test = split_labels(X_test, y_test)
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        X, keys = pack_inputs(cols, pad_id=pad_id)
        Xt, _ = pack_inputs(cols_t, keys, pad_id=pad_id)
        wrapped = HFTokenModel(model, keys)
        was = [(m, m.training) for m in model.modules()]
        wrapped.eval()
        try:
            wrapped.choose_mask_form(wrapped.trim_inputs(X[:probe_rows]))
        finally:
            for m, mode in was:
                m.training = mode
        return wrapped, X, y_train, Xt, y_test
    return model, X_train, y_train, X_test, y_test


def wrap_if_logits(model: nn.Module, out) -> nn.Module:
    """``model`` in an :class:`HFModel` when its output ``out`` is an object holding
    ``.logits`` (a Hugging Face model given one input tensor), else ``model``."""
    if not torch.is_tensor(out) and hasattr(out, "logits") and not isinstance(model, HFModel):
        return HFModel(model)
    return model


__all__ = ["HFModel", "HFTokenModel", "adapt", "eager_attention", "is_batch", "pack_inputs",
           "split_labels", "wrap_if_logits"]
