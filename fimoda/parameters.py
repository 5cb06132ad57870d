"""Which of a model's parameters to attribute: a subset chosen by module or as the model's top
layers (:func:`select_parameters`), and the one line that says how much of the model a choice is
(:func:`describe`).

Every method differentiates the loss with respect to the parameters named by ``names=``
(:func:`fimoda.attribute`, :func:`fimoda.attributor`, :func:`fimoda.gold_standard`), exact
parameter names or module prefixes (``"classifier"`` names ``classifier.weight`` and
``classifier.bias``); the rest stay at theta^f. :func:`select_parameters` builds such a list:

    names = fimoda.select_parameters(model, top_layers=2)           # last 2 blocks + the head
    names = fimoda.select_parameters(model, modules=["bert.encoder.layer.5", "classifier"])
    fimoda.attribute(model, ..., names=names)

A model's *layers* are the blocks of its layer stack (:func:`layer_stack`): the longest
``nn.ModuleList`` / ``nn.Sequential`` of two or more blocks of one class (a transformer's
``encoder.layer``, ``h``, ``layers``); a model without one (an MLP) has as layers its modules that
hold parameters themselves, in order. The *top k layers* are the last k of them and every
trainable parameter registered after the stack (pooler, final norm, head).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _under(names: Sequence[str], prefix: str) -> list[str]:
    return [n for n in names if n == prefix or n.startswith(prefix + ".")]


def layer_stack(model: nn.Module) -> tuple[str, list[str]]:
    """(the stack's name, its layers' module names, bottom first): the ``nn.ModuleList`` or
    ``nn.Sequential`` of two or more blocks of one class holding the most parameters (the last
    such on a tie); without one, ("", the modules holding parameters themselves, in order)."""
    best, size = None, 0
    for name, m in model.named_modules():
        blocks = list(m.children())
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(blocks) < 2 or \
                len({type(b) for b in blocks}) != 1:
            continue
        count = sum(p.numel() for p in m.parameters())
        if count > 0 and count >= size:
            best, size = (name, [f"{name}.{k}" if name else k for k, _ in m.named_children()]), \
                count
    if best is not None:
        return best
    return "", [n for n, m in model.named_modules()
                if any(True for _ in m.parameters(recurse=False))]


def select_parameters(model: nn.Module, *, top_layers: Optional[int] = None,
                      modules: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the model's trainable parameters in the ``top_layers`` last layers of its layer
    stack and what follows it (see the module's docstring), and / or under the named
    ``modules`` (module or parameter names; the union when both are given), in the model's
    order: what ``names=`` takes. One ValueError, before any work, for a module the model does
    not have or a ``top_layers`` outside 1..its number of layers."""
    if top_layers is None and modules is None:
        raise ValueError("select_parameters needs top_layers=k and/or modules=[...]")
    trainable = _trainable(model)
    chosen: set[str] = set()
    if modules is not None:
        if isinstance(modules, str):
            modules = [modules]
        known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
        for m in modules:
            if m not in known:
                tops = sorted({n.split(".")[0] for n in known if n})
                raise ValueError(f"the model has no module or parameter {m!r}; its top-level "
                                 f"modules are {tops}")
            hits = _under(trainable, m)
            if not hits:
                raise ValueError(f"module {m!r} has no trainable parameter")
            chosen.update(hits)
    if top_layers is not None:
        stack, layers = layer_stack(model)
        if isinstance(top_layers, bool) or not isinstance(top_layers, int) or \
                not 1 <= top_layers <= len(layers):
            where = f"its layer stack {stack!r}" if stack else "it"
            raise ValueError(f"top_layers must be an integer in 1..{len(layers)} (the model's "
                             f"layers: {where} has {len(layers)}), got {top_layers!r}")
        for layer in layers[len(layers) - top_layers:]:
            chosen.update(_under(trainable, layer))
        if stack:                                 # the head: registered after the stack
            order = [n for n, _ in model.named_parameters()]
            inside = _under(order, stack)
            last = max(order.index(n) for n in inside)
            chosen.update(n for n in order[last + 1:] if n in trainable)
    return [n for n in trainable if n in chosen]


def _compact(all_names: Sequence[str], chosen: Sequence[str]) -> list[str]:
    """The fewest module prefixes that name exactly ``chosen``: each name climbs to its highest
    ancestor whose parameters are all chosen."""
    chosen_set, out = set(chosen), []
    for n in chosen:
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if set(_under(all_names, prefix)) <= chosen_set:
                break
        if prefix not in out:
            out.append(prefix)
    return out


def describe(model: nn.Module, names: Sequence[str], verb: str = "attributing") -> str:
    """One line: how many of the model's parameters the parameters ``names`` hold, and which
    modules they are, e.g. ``attributing 1,538 of the model's 22,714,370 parameters (0.0068 %):
    classifier``."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    k = sum(params[n].numel() for n in names)
    if k == total:
        return f"{verb} all {total:,} parameters of the model"
    parts = _compact(list(params), names)
    shown = ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")
    return f"{verb} {k:,} of the model's {total:,} parameters ({100 * k / total:.3g} %): {shown}"


__all__ = ["layer_stack", "select_parameters", "describe"]
