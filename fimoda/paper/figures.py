"""Every figure and table file the notebooks write to ``figures/<profile>/``, by kind: what it
shows, the notebook that draws it, the paper's figure or table it reproduces, and the settings
that are part of its file name. :func:`figure_name` (:func:`figure_path`) builds a file's name
from its kind and settings, and is what every notebook saves under; :func:`read_figure_name`
reads a name back into the same kind and settings, and is what the figure index
(:func:`fimoda.paper.report.figure_index`) lists each file by. A name the registry cannot build is
an error where it would be written, one it cannot read an error where it is listed.

A kind's file name is a template: ``{setting}`` is the setting's value and ``[...]`` a part left
out while its setting has its default; e.g. Figure 2's grid,
``figure2[_{optimizer}][_{mechanism}][_eq{eq}].png``, is ``figure2.png`` for each dataset's own
gold standard and eq. 13, ``figure2_adam_eq17.png`` for the Adam gold standard and eq. 17.

Settings (:data:`SETTINGS`):

- ``dataset``: a dataset's name (``fimoda.paper.config``), words of letters and digits joined by
  ``_``
- ``method``: a method's key (``fimoda.influence.METHODS``), the same form
- ``optimizer``: the gold standard's optimizer, one of :data:`fimoda.gold.OPTIMIZERS`
- ``mechanism``: the gold standard's leave-out mechanism, one of :data:`fimoda.gold.MECHANISMS`
- ``eq``: the gold scores' equation, 13 (adjusted by the mean over the left-out set) or 17
  (adjusted by the full run), an int (the strings "13" and "17" are taken too)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Optional, Union

from ..gold import MECHANISMS, OPTIMIZERS

__all__ = ["FigureKind", "KINDS", "SETTINGS", "figure_name", "figure_path", "read_figure_name",
           "paper_figure"]

_WORDS = r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*"           # a name: words joined by "_"


def _one_of(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


# setting -> (regular expression of its value in a file name, its label in the index's settings)
SETTINGS = {
    "dataset": (_WORDS + "?", "ds"),                    # the shortest that fits
    "method": (_WORDS + "?", "m"),
    "optimizer": (_one_of(OPTIMIZERS), "opt"),
    "mechanism": (_one_of(MECHANISMS), "mech"),
    "eq": ("13|17", "eq"),
}

_SEGMENT = re.compile(r"\[([^\[\]]*)\]|([^\[\]]+)")        # an optional part, or a fixed one
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class FigureKind:
    """One kind of file in ``figures/<profile>/``.

    ``name``: the kind's key in :data:`KINDS`; ``template``: its file name (module docstring),
    ending in ``.png`` (a figure; saved with a PDF of the same name beside it) or ``.csv`` (a
    table); ``shows``: what it shows, a sentence of the figure index; ``notebook``: the prefix of
    the notebook that writes it (:data:`fimoda.paper.pipeline.STEPS`); ``paper``: the paper's
    figure or table number it reproduces ("" where none), or three of them, for the SGD gold
    standard with eq. 13, the Adam one with eq. 13, and eq. 17; ``defaults``: the value of each
    optional setting when its part is left out of the name; ``absent``: what the index says of an
    optional setting left out, where it says anything."""

    name: str
    template: str
    shows: str
    notebook: str
    paper: Union[str, tuple] = ""
    defaults: Mapping = field(default_factory=dict)
    absent: Mapping = field(default_factory=dict)

    def __post_init__(self):
        for opt, _ in self._segments:
            if opt is not None and opt not in self.defaults:
                raise ValueError(f"figure kind {self.name!r}: optional part of {self.template!r} "
                                 f"has no default for {opt!r}")
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown:
            raise ValueError(f"figure kind {self.name!r}: unknown settings {unknown}")

    @cached_property
    def _segments(self) -> list:
        """(optional setting or None, text) for each part of the template."""
        out = []
        for optional, fixed in _SEGMENT.findall(self.template):
            names = _FIELD.findall(optional)
            if optional and len(names) != 1:
                raise ValueError(f"figure kind {self.name!r}: an optional part of "
                                 f"{self.template!r} holds exactly one setting")
            out.append((names[0], optional) if optional else (None, fixed))
        return out

    @cached_property
    def settings(self) -> tuple:
        """The settings in this kind's file name, in the template's order."""
        return tuple(_FIELD.findall(self.template))

    @cached_property
    def _pattern(self) -> re.Pattern:
        def rx(text):
            parts = _FIELD.split(text)   # literal, setting, literal, ...
            return "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{SETTINGS[p][0]})"
                           for k, p in enumerate(parts))
        return re.compile("".join(rx(t) if opt is None else f"(?:{rx(t)})?"
                                  for opt, t in self._segments))

    def build(self, **settings) -> str:
        """The file name of this kind with these settings (each one of :attr:`settings`; an
        optional one may be left out for its default). A missing, extra or malformed setting is
        a ValueError, as is a name that would not read back into the same settings."""
        missing = [s for s in self.settings if s not in settings and s not in self.defaults]
        extra = [s for s in settings if s not in self.settings]
        if missing or extra:
            raise ValueError(f"figure kind {self.name!r} ({self.template}) takes the settings "
                             f"{', '.join(self.settings) or 'none'}"
                             + (f"; missing: {', '.join(missing)}" if missing else "")
                             + (f"; not its settings: {', '.join(extra)}" if extra else ""))
        values = {s: self.defaults[s] if settings.get(s) is None and s in self.defaults
                  else _checked(self.name, s, settings.get(s)) for s in self.settings}
        name = "".join(t.format(**values) for opt, t in self._segments
                       if opt is None or values[opt] != self.defaults[opt])
        if self.read(name) != values:
            raise ValueError(f"figure kind {self.name!r}: settings {values} give the name "
                             f"{name!r}, which reads back otherwise")
        return name

    def read(self, name: str) -> Optional[dict]:
        """The settings of file name ``name`` if it is of this kind (every setting of the kind,
        an optional one left out of the name at its default), else None."""
        m = self._pattern.fullmatch(name)
        if m is None:
            return None
        out = {}
        for s in self.settings:
            v = m.group(s)
            out[s] = self.defaults[s] if v is None else (int(v) if s == "eq" else v)
            if v is not None and s in self.defaults and out[s] == self.defaults[s]:
                return None                    # "figure2_eq13": eq. 13 is written as nothing
        return out

    def paper_figure(self, settings: Mapping) -> str:
        """The paper's figure or table number for a file of this kind with ``settings``."""
        if isinstance(self.paper, str):
            return self.paper
        sgd, adam, eq17 = self.paper
        if settings.get("eq") == 17:
            return eq17
        return adam if settings.get("optimizer") == "adam" else sgd

    def describe(self, settings: Mapping) -> str:
        """The index's settings column: each setting in the name (``ds=concrete``,
        ``eq. 13``), then what an optional setting left out means."""
        shown = [s for s in SETTINGS if s in self.settings             # eq last
                 and (s not in self.defaults or settings[s] != self.defaults[s])]
        out = [f"eq. {settings[s]}" if s == "eq" else f"{SETTINGS[s][1]}={settings[s]}"
               for s in shown]
        return ", ".join(out + [self.absent[s] for s in self.absent if s not in shown])


def _checked(kind: str, setting: str, value):
    """``value`` of ``setting`` as it goes into a file name (eq as an int), or a ValueError."""
    if setting == "eq" and str(value) in ("13", "17") and not isinstance(value, bool):
        return int(value)
    ok = {"optimizer": OPTIMIZERS, "mechanism": MECHANISMS}.get(setting)
    if ok is not None and value in ok:
        return value
    if ok is None and setting != "eq" and isinstance(value, str) and re.fullmatch(_WORDS, value):
        return value
    allowed = (f"one of {tuple(ok)}" if ok is not None else "13 or 17" if setting == "eq"
               else "words of letters and digits joined by '_'")
    raise ValueError(f"figure kind {kind!r}: {setting} {value!r} is not {allowed}")


_GRID = {"optimizer": None, "mechanism": None, "eq": 13}
_GRID_ABSENT = {"optimizer": "each dataset's default gold standard", "eq": "eq. 13"}
_EQ = ("Fig. 2 (panel)", "Fig. 4 (panel)", "Fig. 5 (panel)")

KINDS = {k.name: k for k in [
    FigureKind("figure2", "figure2[_{optimizer}][_{mechanism}][_eq{eq}].png",
               "cosine (gold vs method) against further training, every dataset, one panel each",
               "05", ("Fig. 2", "Fig. 4", "Fig. 5"), _GRID, _GRID_ABSENT),
    FigureKind("max_cosine", "max_cosine[_{optimizer}][_{mechanism}][_eq{eq}].csv",
               "each method's maximum mean cosine per dataset (the numbers of the grid)",
               "05", ("Fig. 2", "Fig. 4", "Fig. 5"), _GRID, _GRID_ABSENT),
    FigureKind("cosine", "{dataset}_cosine_{optimizer}_{mechanism}_eq{eq}.png",
               "cosine against further training, mean +- SE over test points", "04", _EQ),
    FigureKind("spearman", "{dataset}_spearman_{optimizer}_{mechanism}_eq{eq}.png",
               "Spearman correlation against further training", "04", ("Fig. 6 (panel)", "", "")),
    FigureKind("seeds", "{dataset}_seeds_{optimizer}_{mechanism}_eq{eq}.png",
               "maximum cosine against the number of seeds averaged in the gold standard", "04",
               ("Figs. 3, 7", "Fig. 8", "Fig. 9")),
    FigureKind("sorted_scores", "{dataset}_fig10_sorted_scores_{optimizer}_{mechanism}.png",
               "gold scores sorted per test point and averaged (with Grad-Dot, Grad-Cos), "
               "normalised", "04", "Fig. 10"),
    FigureKind("sorted_gold", "{dataset}_sorted_gold_{optimizer}_{mechanism}.png",
               "sorted gold scores of one test point at several amounts of further training",
               "02", "Fig. 10 (one test point)"),
    FigureKind("table2", "{dataset}_table2_{optimizer}_{mechanism}.csv",
               "most helpful / most harmful training instances for the first test points", "06",
               "Table 2"),
    FigureKind("examples", "{dataset}_examples_{optimizer}_{mechanism}.png",
               "each method's score of every left-out instance against its gold score for the "
               "first test point, the most helpful and harmful by the gold ringed", "06",
               ""),
    FigureKind("mislabel_auc", "{dataset}_mislabel_auc_{optimizer}_{mechanism}.csv",
               "mislabelled-example detection AUC, mean +- SE over trials", "06", "App. E.2.1"),
    FigureKind("retrain_cosine", "{dataset}_retrain_cosine.csv",
               "cosine to LOO re-training from scratch", "04", "Fig. 11"),
    FigureKind("damping_sweep",
               "{dataset}_damping_sweep_{method}_{optimizer}_{mechanism}_eq{eq}.png",
               "cosine of one method at every damping of its grid (beyond the paper, Sec. 7), "
               "with Grad-Dot for reference", "04"),
    FigureKind("mechanisms", "{dataset}_mechanisms_{optimizer}_eq{eq}.png",
               "Grad-Dot, CG and LiSSA against the gold standard under each leave-out mechanism "
               f"({', '.join(MECHANISMS)}), side by side (beyond the paper)", "04"),
    FigureKind("infinitesimal", "{dataset}_infinitesimal_{optimizer}.png",
               "the exact infinitesimal gold standard against the finite subtract gold on "
               "identical work, and float32 against float64 (beyond the paper, notebook 07)", "07"),
    FigureKind("trajectory", "{dataset}_trajectory_{optimizer}_{mechanism}_eq{eq}.png",
               "trajectory-matched influence and the damping schedule 1/(lr t) at every "
               "evaluation point, beside the paper's methods (beyond the paper, notebook 07)",
               "07"),
    FigureKind("additivity", "{dataset}_additivity_{optimizer}_{mechanism}.png",
               "group leave-out further training against the sum of single leave-outs: "
               "additivity error against the group size (beyond the paper, notebook 08)", "08"),
    FigureKind("group_cosine", "{dataset}_group_cosine_{optimizer}_{mechanism}.png",
               "cosine over groups between each method's summed score and the group gold, "
               "against the group size (beyond the paper, notebook 08)", "08"),
    FigureKind("lds", "{dataset}_lds_{optimizer}_{mechanism}.csv",
               "linear datamodeling score of every method, further training from theta^f and "
               "re-training from scratch (beyond the paper, notebook 08)", "08"),
    FigureKind("lora_gold", "{dataset}_lora_gold_{optimizer}_{mechanism}.png",
               "LoRA further training (adapters only) against the full-parameter gold: cosine "
               "per rank over further training, and its cost (beyond the paper, Sec. 7's next "
               "step; notebook 08)", "08"),
    FigureKind("param_distance", "{dataset}_param_distance_{optimizer}.png",
               "distance of further-trained parameters from theta^f", "02"),
    FigureKind("final_training", "{dataset}_final_training.png",
               "training curves of the final model", "01"),
    FigureKind("method_agreement", "{dataset}_method_agreement.png",
               "cosine between every pair of methods", "03"),
    FigureKind("data_targets", "data_targets.png",
               "the target of every dataset of the profile: its distribution (regression) or "
               "class shares (classification) over the training and test rows", "00_data"),
    FigureKind("data_images", "{dataset}_images.png",
               "the first training images of an image dataset, as the models see them",
               "00_data"),
    FigureKind("walkthrough_landscape", "walkthrough_landscape.png",
               "the unifying view on a two-parameter toy (notebook 00): further training without "
               "a point, and where each approximation puts it", "00_walkthrough"),
    FigureKind("walkthrough_difference", "walkthrough_difference.png",
               "notebook 00's toy: one test-loss change against further-training steps, exact, "
               "first order, second order, linearised", "00_walkthrough"),
    FigureKind("walkthrough_cosine", "walkthrough_cosine.png",
               "notebook 00's toy: cosine to further training against steps (Figure 2 in "
               "miniature)", "00_walkthrough"),
]}


def _kind(kind: str) -> FigureKind:
    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}; the kinds are {', '.join(KINDS)}")
    return KINDS[kind]


def figure_name(kind: str, **settings) -> str:
    """The file name of a figure (or table) of ``kind`` (a key of :data:`KINDS`) with
    ``settings``, e.g. ``figure_name("cosine", dataset="concrete", optimizer="sgd",
    mechanism="remove", eq=13)`` is ``concrete_cosine_sgd_remove_eq13.png``. An unknown kind, a
    missing or extra setting, or a value a setting cannot take is a ValueError."""
    return _kind(kind).build(**settings)


def figure_path(directory, kind: str, **settings) -> Path:
    """``directory / figure_name(kind, **settings)`` (:func:`figure_name`)."""
    return Path(directory) / figure_name(kind, **settings)


def read_figure_name(name: str) -> tuple:
    """(kind, settings) of the file name ``name`` (no folder): the :class:`FigureKind` whose
    template it fits and every setting of that kind, as :func:`figure_name` takes them. A name
    that fits no kind, or more than one, is a ValueError naming it."""
    found = [(k, s) for k in KINDS.values() if (s := k.read(name)) is not None]
    if len(found) != 1:
        raise ValueError(f"{name!r} is " + ("the name of no figure kind" if not found else
                                            "ambiguous: " + ", ".join(k.name for k, _ in found))
                         + f" of fimoda.paper.figures (templates: "
                         + ", ".join(k.template for k in KINDS.values()) + ")")
    return found[0]


def paper_figure(kind: str, optimizer: Optional[str] = None, eq=None) -> str:
    """The paper's figure or table number for a file of ``kind`` with the gold standard's
    ``optimizer`` and equation ``eq`` (13 or 17; None: 13); "" where the paper has none."""
    return _kind(kind).paper_figure({"optimizer": optimizer,
                                     "eq": None if eq is None else int(eq)})
