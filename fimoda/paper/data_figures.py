"""Notebook 00's figures: what each model has to predict (the targets of the training and test
splits) and, for the image datasets, what the inputs look like; in the theme of
:mod:`fimoda.style`."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..style import themed
from .plots import grid_shape

__all__ = ["targets_figure", "images_figure"]

_TRAIN, _TEST = "#4c72b0", "#dd8452"      # the two splits, in every panel


def _grid(n: int, max_cols: int = 3):
    """A figure of n panels (:func:`~fimoda.paper.plots.grid_shape`) and its n axes."""
    rows, cols = grid_shape(n, max_cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


@themed
def targets_figure(datasets: dict):
    """One panel per dataset (``{name: fimoda.data.Dataset}``): for a regression, the
    histogram of the target over the training rows (filled) and the test rows (outline), as
    densities so that the two splits compare; for a classification, each class's share of the
    training and the test rows side by side (a trivial predictor's accuracy is the largest
    share: notebook 01 checks each final model against it)."""
    if not datasets:
        raise ValueError("no datasets to draw")
    fig, axes = _grid(len(datasets))
    for ax, (name, ds) in zip(axes, datasets.items()):
        ytr, yte = np.asarray(ds.y_train), np.asarray(ds.y_test)
        stand_in = f" (for {ds.stand_in_for})" if ds.stand_in_for else ""
        ax.set_title(f"{name}{stand_in}: {len(ytr):,} train / {len(yte):,} test", fontsize=9)
        if ds.task == "regression":
            bins = np.histogram_bin_edges(np.concatenate([ytr, yte]), bins=30)
            ax.hist(ytr, bins=bins, density=True, color=_TRAIN, alpha=0.6, label="train")
            ax.hist(yte, bins=bins, density=True, histtype="step", color=_TEST, lw=1.5,
                    label="test")
            ax.set_xlabel("target y")
            ax.set_ylabel("density")
        else:
            k = np.arange(ds.n_classes)
            share = lambda y: np.bincount(y.astype(np.int64), minlength=ds.n_classes) / len(y)
            ax.bar(k - 0.2, share(ytr), width=0.4, color=_TRAIN, label="train")
            ax.bar(k + 0.2, share(yte), width=0.4, color=_TEST, label="test")
            ax.axhline(share(ytr).max(), color="0.4", lw=0.8, ls=":",
                       label="majority share (train)")
            ax.set_xticks(k)
            ax.set_xlabel("class")
            ax.set_ylabel("share of rows")
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.3)                    # room for the legend above the data
        ax.legend(fontsize=7, frameon=False, loc="upper center", ncol=3)
    fig.tight_layout()
    return fig


@themed
def images_figure(ds, n: int = 16, cols: int = 8):
    """The first ``n`` training images of an image dataset as the models see them (after the
    loader's preprocessing, each image rescaled to its own range for display), titled with
    their class."""
    X = np.asarray(ds.X_train[:n], dtype=np.float64)
    if X.ndim != 4:
        raise ValueError(f"{ds.name}: not an image dataset (inputs of shape {X.shape})")
    rows = -(-len(X) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.35 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, x, y in zip(axes.flat, X, np.asarray(ds.y_train[:n])):
        img = x.transpose(1, 2, 0)                        # (C, H, W) -> (H, W, C)
        img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray")
        ax.set_title(f"class {int(y)}", fontsize=7)
    stand_in = f" (stand-in for {ds.stand_in_for})" if ds.stand_in_for else ""
    fig.suptitle(f"{ds.name}{stand_in}: the first {len(X)} training images", fontsize=9)
    fig.tight_layout()
    return fig
