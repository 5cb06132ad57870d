"""One spec per method (fimoda.influence.specs): the registry and the tables derived from it, a
method registered from outside the package, and profiles that set a method's fields by name."""
import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import fimoda
from fimoda.paper import beyond, config, plots
from fimoda import style
from fimoda.paper import experiment as ex
from fimoda.settings import MethodConfig
from fimoda.paper.config import get_config
from fimoda.influence import METHODS, PAPER_METHODS, compute_scores, default_methods, specs
from fimoda.models import MLP

INFLUENCE = Path(fimoda.__file__).parent / "influence"


@dataclass(frozen=True)
class ToyConfig:
    """The toy method's settings."""
    factor: float = 1.0     # multiplies grad g(z_j)^T grad L(z_i)


def toy(att, cfg: ToyConfig = ToyConfig()):
    """factor x Grad-Dot, computed from the attributor's cached gradients."""
    return cfg.factor * (att.test_grads @ att.train_grads.T).detach().cpu().numpy()


TOY = specs.MethodSpec("toy", toy, ToyConfig, "factor x (6)", paper=False)


@pytest.fixture
def registered_toy():
    style.add_look("toy", "#123456", ":", "1", "Toy method")
    try:
        yield specs.register(TOY)
    finally:
        if "toy" in METHODS:
            specs.unregister("toy")
        style.remove_look("toy")


def per_example_grads(model, X, y):
    """grad of the squared error (f(x) - y)^2 per row, by plain autograd, one row at a time."""
    out = []
    for x, t in zip(X, y):
        model.zero_grad()
        ((model(x[None])[0, 0] - t) ** 2).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    return torch.stack(out)


def test_a_method_registered_in_a_test_runs_through_the_front_door_and_is_removed(registered_toy):
    assert "toy" in METHODS and METHODS["toy"] == __name__
    assert "toy" in default_methods() and "toy" not in PAPER_METHODS
    look = plots.method_style("toy")
    assert (look["color"], look["linestyle"], look["marker"]) == ("#123456", ":", "1")
    assert registered_toy.label == "Toy method" == look["label"]
    torch.manual_seed(0)
    model = MLP(3, 1, hidden=5).double()
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    Xt, yt = rng.normal(size=(4, 3)), rng.normal(size=4)
    rows = [1, 4, 7]
    got = fimoda.attribute(model, X, y, rows, Xt, yt, task="regression", method="toy",
                           factor=-2.5)
    Xs, ys = torch.as_tensor(X), torch.as_tensor(y)
    expected = -2.5 * (per_example_grads(model, torch.as_tensor(Xt), torch.as_tensor(yt))
                       @ per_example_grads(model, Xs[rows], ys[rows]).T)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="'toy' has no setting 'factr'"):
        fimoda.attribute(model, X, y, rows, Xt, yt, task="regression", method="toy", factr=2.0)
    specs.unregister("toy")
    assert "toy" not in METHODS and "toy" not in default_methods()
    with pytest.raises(ValueError, match="unknown method 'toy'"):
        fimoda.attribute(model, X, y, rows, Xt, yt, task="regression", method="toy")


def test_registering_refuses_a_method_without_a_look_or_with_a_taken_name():
    with pytest.raises(ValueError, match="no look 'toy' in fimoda.style"):
        specs.register(TOY)
    with pytest.raises(ValueError, match="'grad_dot' is already registered"):
        specs.register(dataclasses.replace(TOY, name="grad_dot", style="grad_dot"))
    with pytest.raises(ValueError, match="lacks"):
        specs.register(dataclasses.replace(TOY, style="grad_dot", shared=("damping_grid",)))
    assert "toy" not in METHODS


def test_a_look_cannot_repeat_another_keys_line_and_marker():
    with pytest.raises(ValueError, match="'grad_dot'"):
        style.add_look("toy", "#123456", "-", "o", "Toy method")
    assert not style.has_look("toy")


def test_the_derived_tables_are_the_papers():
    assert PAPER_METHODS == ("grad_dot", "grad_cos", "datainf", "cg", "lissa", "lissa_h",
                             "trak", "ekfac")                      # Figure 2's legend
    assert list(METHODS) == ["grad_dot", "grad_cos", "cg", "lissa", "lissa_h", "dense",
                             "arnoldi", "trak", "ekfac", "datainf", "prop1", "cor2", "eq16",
                             "trajectory"]
    assert default_methods() == tuple(m for m in METHODS if m != "dense")
    assert beyond.PAPER_SIDE == PAPER_METHODS + ("arnoldi", "prop1", "cor2", "eq16")
    assert ex.ASSUMPTION1_METHODS == ("prop1", "eq16")
    large = dict(get_config("cifar10", "paper").methods.skip)
    assert list(large) == ["cg", "prop1", "cor2", "eq16", "trajectory"]
    assert get_config("concrete", "paper").methods.skip == ()


def test_method_modules_keep_their_own_defaults_and_do_not_import_the_experiment_config():
    for spec in specs.method_specs():
        spec.config()                              # every field has a default of its own
        tree = ast.parse((INFLUENCE / f"{spec.module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.level >= 1 and node.module == "config"
                            or node.module == "fimoda.paper.config"), spec.module


@pytest.fixture
def smoke_concrete(monkeypatch):
    """Patch the smoke profile's concrete entry with method settings; yields the setter."""
    import dataclasses
    from fimoda.data import specs

    original = specs.get_spec("concrete")

    def with_methods(methods):            # the registered spec, its smoke overrides' methods set
        smoke = dataclasses.replace(original.profiles["smoke"], methods=methods)
        # set in place (restored after the test): the registry keeps its order
        monkeypatch.setitem(specs._SPECS, "concrete", dataclasses.replace(
            original, profiles={**original.profiles, "smoke": smoke}))
        return get_config("concrete", "smoke")
    return with_methods


def test_a_profile_sets_a_methods_fields_by_name(smoke_concrete):
    cfg = smoke_concrete({"lissa": {"depth": 7}, "cg": {"max_iter": 11}, "fit_rows": 50})
    assert ex.method_config("lissa", cfg).depth == 7
    assert ex.method_config("lissa_h", cfg).depth == 5000           # LiSSA-H's own default
    assert ex.method_config("cg", cfg).max_iter == 11 and cfg.methods.fit_rows == 50
    assert "methods.lissa.depth: 5000 -> 7" in config.reductions(cfg)
    paper = get_config("adult", "paper")                            # the paper's LiSSA scales
    assert cfg.methods.setting("lissa", "scale") == 10.0
    assert (paper.methods.setting("lissa", "scale"), paper.methods.setting("lissa_h", "scale")) \
        == (20.0, 200.0)


@pytest.mark.parametrize("methods, named", [
    ({"lisa": {"depth": 7}}, "lisa"),
    ({"lissa": {"dept": 7}}, "dept"),
    ({"grad_dot": {"depth": 7}}, "depth"),         # LiSSA's field: no other method takes it
    ({"lissa": 7}, "lissa"),
])
def test_an_unknown_method_or_field_in_a_profile_is_an_error_naming_it(smoke_concrete, methods,
                                                                      named):
    with pytest.raises(ValueError, match=f"'{named}'"):
        smoke_concrete(methods)


def test_an_unknown_method_or_field_anywhere_else_is_an_error_naming_it():
    cfg = get_config("concrete", "smoke")
    with pytest.raises(ValueError, match="no setting 'scale'"):       # grad_cos has no scale
        ex.method_config("grad_cos", cfg, scale=True)
    with pytest.raises(ValueError, match="unknown method 'nosuch'"):
        ex.method_config("nosuch", cfg)
    with pytest.raises(ValueError, match="'lissa' has no setting 'dept'"):
        MethodConfig(settings={"lissa": {"dept": 3}})
    with pytest.raises(ValueError, match="unknown method 'nosuch'"):
        MethodConfig(skip=(("nosuch", "why"),))
    with pytest.raises(ValueError, match="no setting 'dept'"):
        compute_scores("lissa", None, dept=3)
