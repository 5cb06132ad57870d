"""The reproduction report's claim checks, on gold and method scores built so that each claim's
truth is known, and the folder it writes."""
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fimoda.paper import report
from fimoda.paper import reproduction as rep
from fimoda.paper.config import get_config
from fimoda import store
from fimoda.paper.experiment.gold_runs import gold_reader_inputs
from fimoda.paper.experiment.methods import scores_reader_inputs
from fimoda.paper.experiment.records import config_without
from fimoda.gold import GoldResult, save_gold
from fimoda.io import results_dir, save_npz


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    for var, sub in (("FIMODA_RESULTS_DIR", "results"), ("FIMODA_FIGURES_DIR", "figures")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def _basis(n_left=40, n_test=3, k=6, seed=0):
    """Per test point, k orthonormal vectors over the left-out set, each with mean zero (so
    eq. 13's mean subtraction leaves them as they are): (k, n_left, n_test)."""
    rng = np.random.RandomState(seed)
    out = np.empty((k, n_left, n_test))
    for j in range(n_test):
        A = np.column_stack([np.ones(n_left), rng.randn(n_left, k)])
        q, _ = np.linalg.qr(A)
        out[:, :, j] = q[:, 1:].T
    return out


def _gold_and_scores():
    """Gold (eq. 13) that turns from direction u to w over three evaluation points; seed noise n
    (+n for seed 1, -n for seed 2) that averaging two seeds removes; methods built from u, w and
    two directions z, r orthogonal to the gold at every point."""
    u, w, z, r, n, _ = _basis()
    ang = np.array([0.0, 0.6, 1.2])
    v = np.cos(ang)[None, :, None] * u[:, None, :] + np.sin(ang)[None, :, None] * w[:, None, :]
    noise = 0.5 * n[:, None, :]
    loss_loo = np.stack([v + noise, v - noise])                      # (seeds, i, t, j)
    gold = {"loss_full": np.zeros((2,) + v.shape[1:]), "loss_loo": loss_loo,
            "eval_points": np.array([1, 2, 3])}
    T = lambda a: a.T                                                # (i, j) -> scores[j, i]
    scores = {"grad_dot": T(u), "grad_cos": T(u + 0.8 * z), "datainf": T(u + 0.1 * z),
              "cg": T(w), "lissa": T(w + 0.5 * u), "lissa_h": T(r), "trak": T(z)}
    return gold, scores


def test_every_claim_holds_where_built_to_hold(isolated):
    gold, scores = _gold_and_scores()
    rows = {r["claim"]: r for r in rep.check_claims(get_config("concrete", "smoke"), gold, scores)}
    assert len(rows) == 8
    for claim, r in rows.items():
        if claim.startswith("Near-zero cosine to LOO"):
            assert r["status"] == "n/a" and "no re-training results" in r["ours"]
        else:
            assert r["status"] == "reproduced", (claim, r["ours"])
    assert "first 1.000" in rows["Grad-Dot starts highest (DataInf aside) and decays"]["ours"]
    assert "cos(DataInf, Grad-Dot) 0.995" in rows[
        f"DataInf ~ Grad-Dot (their cosine > {rep.MUTUAL_DATAINF})"]["ours"]


def test_claims_fail_where_built_to_fail(isolated):
    gold, scores = _gold_and_scores()
    u = scores["grad_dot"]
    scores.update(grad_dot=scores["cg"], cg=u, grad_cos=u, lissa_h=u, trak=0.5 * u + scores["trak"])
    rows = {r["claim"]: r["status"] for r in
            rep.check_claims(get_config("concrete", "smoke"), gold, scores)}
    for claim in ("Grad-Dot starts highest (DataInf aside) and decays", "Grad-Cos below Grad-Dot",
                  f"DataInf ~ Grad-Dot (their cosine > {rep.MUTUAL_DATAINF})",
                  "CG and LiSSA flat or rising, never as high as Grad-Dot",
                  "LiSSA-H the worst of CG, LiSSA, LiSSA-H",
                  f"TRAK (M = 1) near zero (absolute cosine < {rep.NEAR_ZERO})"):
        assert rows[claim] == "not reproduced", claim
    one_seed = dict(gold, loss_full=gold["loss_full"][:1], loss_loo=gold["loss_loo"][:1])
    rows = {r["claim"] for r in rep.check_claims(get_config("concrete", "smoke"), one_seed, scores)}
    assert not any(c.startswith("Cosine rises with the number of seeds") for c in rows)


def _save_results(cfg, gold, scores, optimizer, mechanism):
    """``gold`` as run_gold writes it (gold_<optimizer>_<mechanism>.npz and its record) and each
    method's scores as run_method writes them, in ``cfg``'s results folder."""
    d = results_dir(cfg.profile, cfg.dataset)
    S, n, T, J = gold["loss_loo"].shape
    res = GoldResult(loss_full=gold["loss_full"], loss_loo=gold["loss_loo"],
                     param_dist=np.zeros((S, T)), param_dist_loo=np.zeros((S, n, T)),
                     eval_points=gold["eval_points"], eval_unit="epoch", seeds=np.arange(S),
                     loo_indices=np.arange(n), test_indices=np.arange(J),
                     config={"optimizer": optimizer, "mechanism": mechanism})
    record = {"gold": res.config, "experiment": config_without(cfg, "methods")}
    gp = save_gold(d, res, {"record": record, "loo_indices": np.arange(n), "test_indices": np.arange(J)})
    store.write_record(gp, gold_reader_inputs(cfg, *res.config.values(), d),
                       files=[gp.with_suffix(".json")])
    for m, s in scores.items():
        store.write_record(save_npz(d / f"scores_{m}.npz", scores=s, loo_indices=np.arange(n),
                                    test_indices=np.arange(J)), scores_reader_inputs(cfg, m, d))


def test_write_folder_reads_each_gold_standard_once(isolated, monkeypatch):
    """The folder's summary, claims and paper-comparison tables share one read of each gold
    file, and come out as the functions that read the files themselves write them."""
    cfg = get_config("concrete", "smoke")
    gold, scores = _gold_and_scores()
    _save_results(cfg, gold, scores, "sgd", "remove")          # Concrete's own gold standard
    _save_results(cfg, gold, scores, "adam", "remove")         # App. E.1's, in summary.md too
    reads = Counter()
    np_load = np.load

    def counting_load(file, *args, **kwargs):
        if Path(file).name.startswith("gold_"):
            reads[Path(file).name] += 1
        return np_load(file, *args, **kwargs)

    out = isolated / "reproduction"
    with monkeypatch.context() as mp:
        mp.setattr(np, "load", counting_load)
        readme = rep.write_folder("smoke", ["concrete"], out=out, commit="abc1234").read_text()
    assert reads == {"gold_sgd_remove.npz": 1, "gold_adam_remove.npz": 1}
    statuses = re.findall(r"^\| concrete \| [^|]+ \| (reproduced|not reproduced|n/a) \|",
                          readme, flags=re.M)
    assert statuses == ["reproduced"] * 7 + ["n/a"]             # as built: no re-training run
    # the same tables as the default path of each function, which loads the results itself
    assert report.markdown_table(rep.claims_table("smoke", ["concrete"])) in readme
    again = report.write_summary("smoke", ["concrete"], path=isolated / "summary_again.md")
    assert (out / "summary.md").read_bytes() == again.read_bytes()
    assert "## Adam gold standard (App. E.1), eq. 17" in again.read_text()
