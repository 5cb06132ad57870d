"""The dataset registry (fimoda.data.specs): every per-dataset table is a view of the specs, a
dataset registered later gets a config for every profile and appears in every view, and bad
names and bad specs are one clear error."""
import numpy as np
import pytest

from fimoda.paper import config, pipeline, plots
from fimoda.data.specs import PROFILES
from fimoda.settings import FurtherTrainConfig, TrainConfig
from fimoda.paper.config import get_config, reductions
from fimoda.data import LOADERS, Loader, load_dataset
from fimoda.data.specs import (DatasetSpec, Overrides, dataset_names, get_spec, register_dataset,
                               unregister_dataset)

PAPER = ("concrete", "energy", "fico", "folktables", "adult", "cifar10", "fashion_mnist", "sst2")


def test_the_views_are_the_tables_they_replace():
    """The tables the specs replaced, as they were written out by hand."""
    assert config.DATASET_NAMES == config.DATASETS == PAPER
    assert config.TABULAR == ("concrete", "energy", "fico", "folktables", "adult")
    assert config.STAND_INS == {"adult": "folktables", "fashion_mnist": "cifar10"}
    assert config.PROFILE_DATASETS == {
        "smoke": ("concrete",),
        "cpu": ("concrete", "energy", "fico", "adult", "fashion_mnist", "sst2"),
        "paper": ("concrete", "energy", "fico", "folktables", "cifar10", "sst2")}
    assert plots.FIG2_ORDER == PAPER
    assert pipeline.COST_ORDER == ("concrete", "sst2", "cifar10", "fico", "folktables",
                                   "fashion_mnist", "adult", "energy")
    assert tuple(LOADERS) == PAPER
    assert {n: LOADERS[n].task for n in ("concrete", "energy", "fico", "cifar10", "sst2")} == {
        "concrete": "regression", "energy": "regression", "fico": "classification",
        "cifar10": "classification", "sst2": "classification"}
    assert [get_spec(n).model for n in PAPER] == ["mlp"] * 5 + ["resnet9"] * 2 + ["text"]


def test_an_unknown_dataset_is_one_error_naming_the_registered_ones(tmp_path):
    every = ", ".join(PAPER)
    for call in (lambda: get_config("mnist", "cpu"), lambda: get_spec("mnist"),
                 lambda: load_dataset("mnist", data_dir=tmp_path, cache_dir=tmp_path)):
        with pytest.raises(ValueError, match="unknown dataset 'mnist'") as e:
            call()
        assert every in str(e.value)
    with pytest.raises(SystemExit, match=f"unknown dataset 'mnist'; choose from {every}"):
        pipeline.run("smoke", ["mnist"])
    assert not list(tmp_path.iterdir())


def _toy_build(paths, root, **kw):
    """A tiny synthetic regression set: y = x @ w + noise, 40 / 10 rows of 3 features."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(50)
    ids = np.arange(50)
    return dict(X_train=X[:40], y_train=y[:40], X_test=X[40:], y_test=y[40:],
                ids_train=ids[:40], ids_test=ids[40:], feature_names=["a", "b", "c"],
                raw_train=None, raw_test=None, extra={})


def _toy_spec(name="toy", **kw):
    fields = dict(
        loader=Loader("regression", 1, (), _toy_build), model="mlp",
        train=TrainConfig(lr=0.1, epochs=30), further=FurtherTrainConfig(epochs=20, n_loo=10),
        fig2_panel=6, cost_rank=8, default_in=("smoke",),
        profiles={"cpu": Overrides(further=dict(epochs=7, seeds=3)),
                  "smoke": Overrides(train=dict(epochs=5), further=dict(epochs=2, seeds=2,
                                                                        n_loo=4))})
    fields.update(kw)
    return DatasetSpec(name, **fields)


@pytest.fixture
def toy():
    spec = register_dataset(_toy_spec())
    try:
        yield spec
    finally:
        unregister_dataset("toy")


def test_a_registered_dataset_gets_every_profile_and_every_view(toy, tmp_path):
    for profile in PROFILES:
        c = get_config("toy", profile)
        assert (c.dataset, c.profile, c.task, c.model, c.stand_in_for) == (
            "toy", profile, "regression", "mlp", None)
    paper, cpu, smoke = (get_config("toy", p) for p in ("paper", "cpu", "smoke"))
    assert (paper.train.lr, paper.train.epochs, paper.further.epochs, paper.further.seeds) == \
        (0.1, 30, 20, 100) and reductions(paper) == []
    assert (cpu.further.epochs, cpu.further.seeds, cpu.train.epochs) == (7, 3, 30)
    assert reductions(cpu) == ["further.epochs: 20 -> 7", "further.seeds: 100 -> 3"]
    assert (smoke.train.epochs, smoke.further.epochs, smoke.further.n_loo) == (5, 2, 4)

    assert config.DATASET_NAMES == config.DATASETS == PAPER + ("toy",)
    assert config.TABULAR[-1] == "toy" and "toy" not in config.STAND_INS
    assert config.PROFILE_DATASETS["smoke"] == ("concrete", "toy")
    assert "toy" not in config.PROFILE_DATASETS["cpu"]
    assert plots.FIG2_ORDER[-1] == "toy" and pipeline.COST_ORDER[-1] == "toy"
    assert plots.fig2_order(["toy", "sst2", "concrete"]) == ["concrete", "sst2", "toy"]
    assert LOADERS["toy"] is toy.loader
    outputs = [p.name for _, _, p in pipeline.plan("smoke", ["toy"])]
    assert "02_gold_further_training_toy.ipynb" in outputs
    assert "02_gold_further_training_toy_adam.ipynb" in outputs      # a tabular dataset's Adam run

    d = load_dataset("toy", data_dir=tmp_path, cache_dir=tmp_path)
    assert (d.name, d.task, d.n_classes, d.X_train.shape, d.X_test.shape) == (
        "toy", "regression", 1, (40, 3), (10, 3))
    np.testing.assert_array_equal(d.y_train, _toy_build({}, tmp_path)["y_train"])


def test_unregistering_removes_it_from_every_view():
    register_dataset(_toy_spec())
    unregister_dataset("toy")
    assert config.DATASET_NAMES == PAPER and "toy" not in LOADERS
    assert "toy" not in plots.FIG2_ORDER + pipeline.COST_ORDER + config.TABULAR
    assert config.PROFILE_DATASETS["smoke"] == ("concrete",)
    with pytest.raises(ValueError, match="unknown dataset 'toy'"):
        get_config("toy", "smoke")


@pytest.mark.parametrize("change, message", [
    (dict(profiles={"cpu": Overrides(further=dict(epoch=3))}), r"unknown field\(s\) \['epoch'\]"),
    (dict(profiles={"cpu": Overrides(model_size=dict(dataset="x"))}), "unknown field"),
    (dict(profiles={"gpu": Overrides()}), "unknown profile 'gpu'"),
    (dict(default_in=("gpu",)), "unknown profile 'gpu'"),
    (dict(model="transformer"), "model 'transformer'"),
    (dict(loader=Loader("regresion", 1, (), _toy_build)), "task 'regresion'"),
    (dict(loader=Loader("regression", 1, (), _toy_build, stand_in_for="concrete")),
     "stand_in_why"),
    (dict(stand_in_why="because"), "stand_in_why"),
])
def test_a_bad_spec_is_one_error_and_registers_nothing(change, message):
    try:
        with pytest.raises(ValueError, match=message):
            register_dataset(_toy_spec(**change))
        assert dataset_names() == PAPER and "toy" not in LOADERS
    finally:                                    # a wrongly accepted spec must not leak
        if "toy" in dataset_names():
            unregister_dataset("toy")


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="'concrete' is already registered"):
        register_dataset(_toy_spec("concrete"))
    assert get_spec("concrete").loader is LOADERS["concrete"]
    assert get_config("concrete", "paper").further.loo_stride == 9
