"""Notebook 00's figures read back from the figure objects: the class shares and the target
histograms are the data's, counted here by hand on datasets small enough to count."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from fimoda.paper import data_figures
from fimoda.data.dataset import Dataset


def tiny(name, task, y_train, y_test, n_classes=0, X=None):
    X = np.zeros((len(y_train), 3)) if X is None else X
    return Dataset(name, task, n_classes, X, np.asarray(y_train), np.zeros((len(y_test), 3)),
                   np.asarray(y_test), np.arange(len(y_train)), np.arange(len(y_test)), [],
                   None, None, None, {})


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_class_shares_and_the_majority_line_are_the_data_s():
    # train: 3 of class 0, 1 of class 1, 0 of class 2 -> 3/4, 1/4, 0; test: 1 each of 0 and 2
    ds = tiny("toy", "classification", [0, 0, 1, 0], [2, 0], n_classes=3)
    fig = data_figures.targets_figure({"toy": ds})
    (ax,) = [a for a in fig.axes if a.get_visible()]
    bars = sorted(ax.patches, key=lambda p: p.get_x())
    heights = [round(b.get_height(), 12) for b in bars]
    assert heights == [0.75, 0.5, 0.25, 0.0, 0.0, 0.5]        # (train, test) per class
    (line,) = [l for l in ax.lines if l.get_label() == "majority share (train)"]
    assert line.get_ydata()[0] == pytest.approx(0.75)
    assert ax.get_title() == "toy: 4 train / 2 test"


def test_regression_histograms_are_densities_of_each_split():
    y_train = np.array([0.0, 0.1, 0.2, 1.9, 2.0])
    y_test = np.array([1.0, 1.0])
    fig = data_figures.targets_figure({"r": tiny("r", "regression", y_train, y_test)})
    (ax,) = [a for a in fig.axes if a.get_visible()]
    filled = [p for p in ax.patches if p.get_fill()]          # the training histogram's bars
    widths = np.array([p.get_width() for p in filled])
    heights = np.array([p.get_height() for p in filled])
    assert len(filled) == 30 and (widths * heights).sum() == pytest.approx(1.0)
    # the first bin [0, 2/30) holds the training rows 0.0 only: density (1/5) / (2/30) = 3
    assert heights[0] == pytest.approx(3.0)


def test_one_panel_per_dataset_and_images_only_for_images():
    a = tiny("a", "classification", [0, 1], [1, 0], n_classes=2)
    b = tiny("b", "regression", [0.0, 1.0], [0.5, 0.5])
    fig = data_figures.targets_figure({"a": a, "b": b})
    assert [x.get_title().split(":")[0] for x in fig.axes if x.get_visible()] == ["a", "b"]
    with pytest.raises(ValueError, match="not an image dataset"):
        data_figures.images_figure(a)
    imgs = tiny("im", "classification", [3, 1, 4], [0], n_classes=5,
                X=np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32))
    fig = data_figures.images_figure(imgs, n=3, cols=3)
    titles = [x.get_title() for x in fig.axes if x.images]
    assert titles == ["class 3", "class 1", "class 4"]
    with pytest.raises(ValueError, match="no datasets"):
        data_figures.targets_figure({})
