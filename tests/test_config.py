import numpy as np
import pytest

from fimoda.paper import experiment as ex
from fimoda.paper.config import DATASETS, STAND_INS, describe, get_config, reductions
from fimoda.data.specs import PROFILES


def test_paper_profile_holds_the_papers_numbers():
    c = get_config("concrete", "paper")
    assert (c.train.lr, c.train.epochs, c.train.batch_size) == (0.3, 1000, 128)
    assert (c.further.lr, c.further.adam_lr, c.further.epochs, c.further.seeds) == (3e-2, 1e-4, 500, 100)
    assert c.dtype == "float64" and reductions(c) == []
    f = get_config("fico", "paper")
    assert (f.train.lr, f.further.lr, f.further.adam_lr, f.further.epochs) == (1e-3, 1e-4, 1e-6, 200)
    k = get_config("folktables", "paper")
    assert (k.train.lr, k.train.epochs, k.further.epochs) == (1e-2, 100, 25)
    assert (ex.method_config("lissa", k).scale, ex.method_config("lissa_h", k).scale) == \
        (20.0, 200.0)
    assert get_config("energy", "paper").methods.damping_grid == (1.0, 10.0, 100.0, 1000.0)
    s = get_config("sst2", "paper")
    assert (s.train.optimizer, s.train.lr, s.train.grad_clip, s.further.lr, s.further.eval_every) == \
        ("adamw", 1e-5, 1.0, 1e-6, 5)
    r = get_config("cifar10", "paper")
    assert (r.train.lr, r.train.batch_size, r.train.weight_decay, r.further.lr, r.further.max_steps) == \
        (0.4, 512, 1e-3, 0.04, 50)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_papers_method_choices_are_every_profiles_defaults(profile):
    """IBM/fimoda's notebooks: CG and LiSSA over lambda_G x {0.1, 1, 10, 100} (Energy x10),
    the largest plotted; LiSSA-H at the largest damping; DataInf with c = 10; LiSSA's scale the
    smallest of [10, 20, 50, 100, 150, 200, 250, 300, 400, 500] that does not diverge; the
    leave-out mechanism that produced each figure."""
    from fimoda.influence.lissa import LissaConfig
    SCALES = (10.0, 20.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 400.0, 500.0)
    for ds in DATASETS:
        c = get_config(ds, profile)
        m = c.methods
        grid = (1.0, 10.0, 100.0, 1000.0) if ds == "energy" else (0.1, 1.0, 10.0, 100.0)
        assert m.damping_grid == grid and m.damping_grid[m.damping_index] == grid[-1]
        di = ex.method_config("datainf", c)
        assert di.c_grid[di.c_index] == 10.0
        for name in ("cg", "lissa", "lissa_h"):
            mc = ex.method_config(name, c)
            assert mc.damping_grid[mc.damping_index] == grid[-1], (ds, name)
            if name != "cg":                     # the grid's scales from this one's on
                assert mc.scale_grid == tuple(s for s in SCALES if s >= mc.scale), (ds, name)
        tabular = c.model == "mlp"
        assert c.further.mechanism == ("remove" if tabular else "subtract"), ds
    assert LissaConfig().scale_grid == SCALES


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_profile_builds_and_reports_reductions(dataset, profile):
    c = get_config(dataset, profile)
    assert c.profile == profile
    text = describe(c)
    assert dataset in text
    if profile != "paper":
        assert reductions(c) and "changed from the paper" in text
    if dataset in ("adult", "fashion_mnist"):
        assert "STAND-IN" in text


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        get_config("mnist", "cpu")
    with pytest.raises(ValueError, match="unknown profile"):
        get_config("concrete", "gpu")


def test_loo_and_test_selection_match_the_paper():
    c = get_config("concrete", "paper")
    idx = ex.select_loo_indices(c, 927)
    assert len(idx) == 100 and idx[0] == 0 and idx[1] == 9 and idx[-1] == 891
    e = ex.select_loo_indices(get_config("energy", "paper"), 691)
    assert len(e) == 100 and e[-2] == 686 and e[-1] == 690
    f = get_config("fico", "paper")
    r = ex.select_loo_indices(f, 8883)
    assert len(r) == 100 and len(set(r)) == 100 and np.array_equal(r, ex.select_loo_indices(f, 8883))
    assert np.array_equal(ex.select_test_indices(f, 988), np.arange(100))
    assert np.array_equal(ex.select_test_indices(c, 103), np.arange(103))
    smoke = ex.select_loo_indices(get_config("concrete", "smoke"), 927)
    assert np.array_equal(smoke, idx[:len(smoke)])
    with pytest.raises(ValueError, match="exceeds"):
        ex.select_loo_indices(c, 50)


def test_paper_values_name_known_datasets_methods_and_settings():
    """Every value transcribed from the reference notebooks is keyed by a dataset, gold
    optimizer, equation and metric fimoda produces, and by one of its methods."""
    from fimoda.gold import OPTIMIZERS
    from fimoda.influence import METHODS
    from fimoda.paper.report import PAPER_VALUES
    for ds, tables in PAPER_VALUES.items():
        assert ds in DATASETS and ds not in STAND_INS, ds
        for (opt, eq, metric), values in tables.items():
            assert opt in OPTIMIZERS and eq in (13, 17) and metric in ("cosine", "spearman")
            points = values.get("epochs") or values.get("steps")
            assert len(points) == 2 and points[0] < points[1]
            for m, pair in values.items():
                if m not in ("epochs", "steps"):
                    assert m in METHODS and len(pair) == 2 and all(-1 <= v <= 1 for v in pair)
