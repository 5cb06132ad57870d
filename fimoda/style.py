"""The one look of every figure: a seaborn theme and a fixed map from each curve a figure draws
(the gold standard, every attribution method, notebook 07's trajectory-matched curves, a method
at one damping of a sweep) to its colour, line style, marker and legend label.

The look of a key never depends on which other keys a figure draws, so a panel that skips a
method shifts no other colour. Line styles group the families (first-order solid, the influence
function solvers dashed, TRAK and EK-FAC dash-dot, the paper's generalised IFs dotted; in
notebook 07 Gauss-Newton solid and true Hessian dashed) and every key has a marker of its own
within its line style, so no two keys share (line style, marker) and a greyscale print still
tells them apart. Use it as ``ax.plot(x, y, **method_style(m))`` (see :func:`method_style`);
:mod:`fimoda.paper.plots` re-exports it."""
from __future__ import annotations

import colorsys
import contextlib
import math
import re

# key: (colour, line style, marker, legend label); the order is the legend order of every figure
_LOOK = {
    "gold": ("#000000", "-", "", "further training (gold)"),
    # first-order methods: solid
    "grad_dot": ("#0173b2", "-", "o", "Grad-Dot"),
    "grad_cos": ("#56b4e9", "-", "s", "Grad-Cos"),
    "datainf": ("#029e73", "-", "^", "DataInf"),
    # random projection / Kronecker-factored: dash-dot
    "trak": ("#cc78bc", "-.", "v", "TRAK (M=1)"),
    "ekfac": ("#ca9161", "-.", "D", "EK-FAC"),
    # influence-function solvers and the dense reference: dashed
    "cg": ("#de8f05", "--", "P", "CG"),
    "lissa": ("#d55e00", "--", "X", "LiSSA"),
    "lissa_h": ("#8c0800", "--", "<", "LiSSA-H"),
    "arnoldi": ("#591e71", "--", ">", "Arnoldi"),
    "dense": ("#006374", "--", "h", "Dense IF"),
    # the paper's generalised influence functions: dotted
    "prop1": ("#a23582", ":", "p", "Prop. 1"),
    "cor2": ("#b8850a", ":", "d", "Cor. 2"),
    "eq16": ("#12711c", ":", "*", "Eq. (16)"),
    # notebook 07: curves matched to the further-training trajectory; Gauss-Newton solid, true
    # Hessian dashed; a generalised-IF term keeps that method's colour
    "trajectory": ("#000000", "-", "H", "trajectory (GN)"),
    "trajectory_h": ("#000000", "--", "H", "trajectory (true H)"),
    "schedule": ("#7a7a7a", "-", "*", "CG, λ(t)=1/(ηt) (GN)"),
    "schedule_h": ("#7a7a7a", "--", "*", "λ(t)=1/(ηt) (true H)"),
    "trajectory_adam": ("#d62728", "-", "x", "trajectory, Adam D (GN)"),
    "trajectory_adam_h": ("#d62728", "--", "x", "trajectory, Adam D (true H)"),
    "trajectory_adam_dv": ("#ff7f7f", "-", "+", "trajectory, Adam D_eff (GN)"),
    "trajectory_adam_dv_h": ("#ff7f7f", "--", "+", "trajectory, Adam D_eff (true H)"),
    "trajectory_prop1": ("#a23582", "--", "p", "trajectory + Prop. 1 term (true H)"),
    "trajectory_cor2": ("#b8850a", "-", "d", "trajectory + Cor. 2 term (GN)"),
    "trajectory_adam_prop1": ("#a23582", "--", "v", "trajectory, Adam D + Prop. 1 term (true H)"),
    "trajectory_adam_cor2": ("#b8850a", "-", "D", "trajectory, Adam D + Cor. 2 term (GN)"),
}
STYLE_KEYS = tuple(_LOOK)
LABELS = {k: v[3] for k, v in _LOOK.items()}

# markers on every curve at about this fraction of the axes diagonal apart, each key starting a
# little further along so that curves over the same x do not stack their markers
MARK_STEP = 0.12
_MARK_OFFSET = {k: (i % 8) * MARK_STEP / 8 for i, k in enumerate(STYLE_KEYS)}

# "CG, λ = λ_G × 10": a method at one damping of a sweep (notebook 04)
_DAMPING = re.compile(r"^(?P<label>.+), λ = λ_G × (?P<factor>\S+)$")
_BY_LABEL = {v: k for k, v in LABELS.items()}
_BUILTIN_KEYS = frozenset(_LOOK)

# seaborn's "whitegrid" style and "paper" context scaled up a little: the PNG a notebook shows is
# the file saved for print, so one context has to read at notebook width and in a paper column
CONTEXT, FONT_SCALE, STYLE_NAME = "paper", 1.15, "whitegrid"


def __getattr__(name: str):
    if name == "METHOD_KEYS":     # the paper's methods in legend order, from their specs
        from .influence.specs import method_specs
        paper = {s.look for s in method_specs() if s.paper}
        return tuple(k for k in _LOOK if k in paper)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def has_look(key: str) -> bool:
    """Whether ``key`` has a look of its own here."""
    return key in _LOOK


def add_look(key: str, colour: str, linestyle: str, marker: str, label: str) -> None:
    """Give ``key`` (e.g. a method registered with :func:`fimoda.influence.register`) its look:
    a hex ``colour``, a matplotlib ``linestyle`` and ``marker``, and its legend ``label``; it
    goes last in the legend order. A key that has one, a (line style, marker) pair or a label
    already taken is a ValueError: every key must stay distinguishable, in greyscale too."""
    global STYLE_KEYS
    if key in _LOOK:
        raise ValueError(f"{key!r} has a look already")
    taken = {(v[1], v[2]): k for k, v in _LOOK.items()}
    if (linestyle, marker) in taken:
        raise ValueError(f"line style {linestyle!r} with marker {marker!r} is "
                         f"{taken[(linestyle, marker)]!r}'s")
    if label in _BY_LABEL:
        raise ValueError(f"label {label!r} is {_BY_LABEL[label]!r}'s")
    _LOOK[key] = (colour, linestyle, marker, label)
    LABELS[key], _BY_LABEL[label] = label, key
    _MARK_OFFSET[key] = (len(_LOOK) - 1) % 8 * MARK_STEP / 8
    STYLE_KEYS = tuple(_LOOK)


def remove_look(key: str) -> None:
    """Take back a look given by :func:`add_look` (the built-in looks stay)."""
    global STYLE_KEYS
    if key not in _LOOK or key in _BUILTIN_KEYS:
        raise ValueError(f"{key!r} is not a look added by add_look")
    _BY_LABEL.pop(_LOOK.pop(key)[3])
    del LABELS[key], _MARK_OFFSET[key]
    STYLE_KEYS = tuple(_LOOK)


def damping_label(method: str, factor: float) -> str:
    """The key and legend label of ``method`` at damping λ = λ_G × ``factor`` (a damping sweep);
    :func:`method_style` draws it in the method's marker and line style, in a shade of its colour
    that darkens as the damping decreases (0.01 darkest, 1000 lightest)."""
    return f"{label(method)}, λ = λ_G × {factor:g}"


def label(method: str) -> str:
    """The legend label of a key of :data:`STYLE_KEYS` or of a :func:`damping_label`."""
    return LABELS.get(method, method)


def _shade(colour: str, factor: float) -> str:
    """``colour`` with its lightness set by log10(``factor``) over [-2, 3]: dark to light."""
    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    h, _, s = colorsys.rgb_to_hls(r, g, b)
    t = min(1.0, max(0.0, (math.log10(factor) + 2) / 5))
    r, g, b = colorsys.hls_to_rgb(h, 0.18 + 0.6 * t, s)
    return "#" + "".join(f"{round(255 * c):02x}" for c in (r, g, b))


def method_style(method: str) -> dict:
    """Matplotlib keyword arguments that draw ``method`` the same way in every figure:
    ``color``, ``linestyle``, ``marker``, ``markevery`` (markers spaced along the line, so dense
    curves stay readable), ``label`` (and ``markeredgewidth`` for the unfilled markers x and +) -- ``ax.plot(x, y, **method_style(m))``, overriding
    ``lw``/``alpha`` as needed. ``method``: a key of :data:`STYLE_KEYS` (the gold standard, the
    methods, notebook 07's curves) or a :func:`damping_label`. Any other name is a ValueError:
    a curve without an entry here would get a colour of its own choosing."""
    if method in _LOOK:
        colour, ls, marker, lab = _LOOK[method]
        return {"color": colour, "linestyle": ls, "marker": marker or "None",
                "markevery": (_MARK_OFFSET[method], MARK_STEP), "label": lab,
                **({"markeredgewidth": 1.8} if marker in ("x", "+") else {})}   # unfilled: thicker
    m = _DAMPING.match(method)
    if m and m["label"] in _BY_LABEL:
        base = method_style(_BY_LABEL[m["label"]])
        return {**base, "color": _shade(base["color"], float(m["factor"])), "label": method}
    raise ValueError(f"no look for {method!r}: add it to fimoda.style (known: "
                     f"{', '.join(STYLE_KEYS)}, or a damping_label)")


def legend_handles(methods) -> tuple:
    """(handles, labels) of a legend for ``methods`` (any iterable, duplicates dropped) in the
    fixed order of :data:`STYLE_KEYS` (damping variants after their method, by damping), one
    line sample per key drawn with its :func:`method_style`."""
    from matplotlib.lines import Line2D

    order = list(_LOOK)

    def rank(m):
        d = _DAMPING.match(m)
        if d and d["label"] in _BY_LABEL:
            return order.index(_BY_LABEL[d["label"]]), float(d["factor"])
        return order.index(m), 0.0
    keys = sorted(dict.fromkeys(methods), key=rank)
    handles = [Line2D([], [], **{**method_style(m), "markevery": None}) for m in keys]
    return handles, [h.get_label() for h in handles]


def rc() -> dict:
    """The matplotlib rcParams of the theme: seaborn's :data:`STYLE_NAME` style and
    :data:`CONTEXT` context (font scale :data:`FONT_SCALE`); curves that are not methods (loss
    curves, distances, notebook 07's comparisons) cycle through seaborn's colour-blind palette
    and, for greyscale print, through line styles with it; markers of size 5."""
    import seaborn as sns
    from cycler import cycler
    colours = sns.color_palette("colorblind")[:6]
    styles = ["-", "--", "-.", ":", (0, (6, 2)), (0, (3, 1, 1, 1, 1, 1))]
    return {**sns.axes_style(STYLE_NAME), **sns.plotting_context(CONTEXT, FONT_SCALE),
            "axes.prop_cycle": cycler(color=colours) + cycler(linestyle=styles),
            "lines.markersize": 5.0, "legend.frameon": True, "legend.framealpha": 0.85}


@contextlib.contextmanager
def theme():
    """Draw inside the theme (:func:`rc`) without changing matplotlib's global settings: every
    figure function of :mod:`fimoda.paper.plots` draws in it; use ``with plots.theme():`` to draw a
    figure of your own the same way."""
    import matplotlib
    with matplotlib.rc_context(rc()):
        yield


def themed(draw):
    """Decorator: ``draw`` (a function returning a figure) runs inside :func:`theme`."""
    import functools

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with theme():
            return draw(*args, **kwargs)
    return wrapper
