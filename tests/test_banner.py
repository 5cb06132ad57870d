"""The banner: a table naming the dataset, stand-in, model and gold standard, then every change
from the paper on its own row with its reason, in human text."""
import dataclasses
import re

import pytest

from fimoda.paper import banner
from fimoda.paper.banner import banner_rows, banner_table, banner_text, show_banner
from fimoda.paper.config import DATASETS, get_config, reductions
from fimoda.data.catalog import STAND_IN_WHY

REPR = re.compile(r"\(\(|\('|\{'|\[\(|None\b|True\b|False\b")    # tuple, dict, Python literals


def changed(rows):
    return {r[0].removeprefix("changed: "): r for r in rows if r[0].startswith("changed: ")}


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("profile", ["cpu", "smoke"])
def test_each_reduction_has_its_own_row_with_a_reason(dataset, profile):
    cfg = get_config(dataset, profile)
    rows = banner_rows(cfg)
    table = changed(rows)
    paper_skips = dict(get_config(dataset, "paper").methods.skip)
    expected = 0
    for item in reductions(cfg):                 # "part.name: paper -> this run"
        key = item.split(":")[0]
        if key == "methods.skip":
            for name, reason in cfg.methods.skip:
                if name not in paper_skips:
                    expected += 1
                    assert table[f"method {name}"][1:] == ("not run", "run", reason)
            continue
        if key == "encoder":
            continue                             # the model row names the encoder
        expected += 1
        label = banner._LABELS.get(key, key)
        run, paper, why = table[label][1:]
        assert run != paper and why, (key, table[label])
    assert len(table) == expected
    for row in rows:
        assert len(row) == 4 and all(isinstance(x, str) for x in row)
        assert not REPR.search(" ".join(row)), row
    text = banner_text(cfg)
    assert len(text.splitlines()) == 1 + len(rows)          # one line per row
    assert f"{expected} settings changed from the paper" in text.splitlines()[0]


def test_cpu_reasons_are_the_profiles_own():
    rows = changed(banner_rows(get_config("concrete", "cpu")))
    assert rows["gold: further-training seeds averaged"][1:3] == ("4", "100")
    assert "seeds averaged" in rows["gold: further-training seeds averaged"][3]
    assert rows["gold: further-training epochs"][1:3] == ("100", "500")
    sst2 = changed(banner_rows(get_config("sst2", "cpu")))
    assert sst2["mislabelled-example detection"][3].startswith("2 flipped sentences")
    assert sst2["encoder layers trained"][1:3] == ("3", "all")
    smoke = changed(banner_rows(get_config("concrete", "smoke")))
    assert {r[3] for r in smoke.values()} == {banner._PROFILE["smoke"]}


def test_a_setting_chosen_for_the_run_says_so():
    cfg = get_config("energy", "cpu")
    cfg = dataclasses.replace(cfg, further=dataclasses.replace(cfg.further, seeds=7))
    row = changed(banner_rows(cfg))["gold: further-training seeds averaged"]
    assert row[1:] == ("7", "100", "set for this run (its parameters or command-line options)")


def test_the_paper_profile_flags_the_offline_encoder_and_nothing_else():
    rows = {r[0]: r for r in banner_rows(get_config("sst2", "paper"))}
    assert not changed(rows.values())
    model = rows["model"]
    assert "all-MiniLM-L6-v2" in model[1] and "NOT the paper's encoder" in model[1]
    assert model[2] == "bert-base-uncased" and "offline" in model[3]
    assert "NOT the paper's" in banner_text(get_config("sst2", "paper"))
    concrete = {r[0]: r for r in banner_rows(get_config("concrete", "paper"))}
    assert not changed(concrete.values()) and "NOT" not in concrete["model"][1]
    assert banner_text(get_config("concrete", "paper")).splitlines()[0] == (
        "concrete [paper profile]: the paper's settings")


def test_stand_ins_and_the_gold_standard_rows():
    rows = {r[0]: r for r in banner_rows(get_config("adult", "cpu"))}
    assert rows["dataset"][1:] == ("adult (STAND-IN for folktables)", "folktables",
                                   STAND_IN_WHY)
    gold = rows["gold standard"]
    assert gold[1] == ("SGD, lr 0.0001, 5 epochs, batch 128, 4 seeds; leave-out 'remove': z_i "
                       "dropped from every epoch's batch order")
    assert "25 epochs" in gold[2] and "100 seeds" in gold[2] and "reference code" in gold[3]
    text = banner_rows(get_config("sst2", "cpu"))
    assert any(r[0] == "gold standard" and r[1].startswith("ADAMW, lr 1e-06, 10 steps")
               for r in text)


def test_the_table_and_where_it_shows(monkeypatch, capsys):
    cfg = get_config("fashion_mnist", "cpu")
    table = banner_table(cfg)
    assert list(table.columns) == ["this run", "paper", "why"]
    assert list(table.index) == [r[0] for r in banner_rows(cfg)]
    show_banner(cfg)                             # not in a kernel: the text
    assert capsys.readouterr().out == banner_text(cfg) + "\n"
    shown = []
    monkeypatch.setattr("fimoda.progress.in_kernel", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda d, raw: shown.append(d))
    show_banner(cfg)
    assert capsys.readouterr().out == "" and len(shown) == 1
    assert shown[0]["text/plain"] == banner_text(cfg)
    html = shown[0]["text/html"]
    assert "<table" in html and "ResNet-9 on 2 CPU cores" in html and "STAND-IN" in html


def test_a_variants_banner_shows_its_own_gold_standard_beside_the_papers_same_variant():
    """The pipeline's Adam and subtract runs of a tabular dataset: the gold-standard row names
    the variant's optimizer, learning rate, epochs and mechanism, in this run and in the paper's
    column; the dataset's own banner is unchanged."""
    from fimoda.paper.banner import banner_rows
    cfg = get_config("concrete", "cpu")
    row = lambda rows: next(r for r in rows if r[0] == "gold standard")
    own = row(banner_rows(cfg))
    assert own[1].startswith("SGD, lr 0.03, 100 epochs") and "'remove'" in own[1]
    adam = row(banner_rows(cfg, "adam"))
    assert adam[1].startswith("ADAM, lr 0.0001, 50 epochs") and "'remove'" in adam[1]
    assert adam[2].startswith("ADAM, lr 0.0001, 500 epochs")          # the paper's App. E.1 run
    sub = row(banner_rows(cfg, None, "subtract"))
    assert "'subtract'" in sub[1] and "'subtract'" in sub[2] and "App. D.3" in sub[3]
    assert banner_rows(cfg) == banner_rows(cfg, None, None)
