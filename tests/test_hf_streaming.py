"""Hugging Face models and batches as they come (fimoda.hf), and per-example gradients streamed
under a memory budget (fimoda.memory): scores with a budget small enough to force several chunks
equal the in-memory scores, on an MLP and on a tiny randomly initialised BERT classifier fed
dict batches of different lengths; Grad-Dot on that BERT equals an autograd loop over each
unpadded sentence alone."""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fimoda
from fimoda.gradients import Problem
from fimoda.hf import HFTokenModel, pack_inputs
from fimoda.influence import Attributor, compute_scores
from fimoda.influence.errors import MemoryBudgetError
from fimoda.memory import CHUNK_COPIES, chunk_rows, resolve_budget
from fimoda.models import MLP

DT = torch.float64
STREAMED = ("grad_dot", "grad_cos", "trak", "datainf", "ekfac")
# TRAK with fewer projected dimensions than training rows: Phi^T Phi is well conditioned, so
# the order of its chunked sum shows only as round-off
OPTIONS = {"trak": {"proj_dim": 8, "seed": 1}}
# methods that keep no per-example gradients of the left-out or test sets under a tight budget
# (DataInf streams its training set once per block of each side)
NOTHING_KEPT = ("grad_dot", "grad_cos", "trak", "datainf", "ekfac")


def tiny_bert(seed=0):
    """BertForSequenceClassification, 2 layers of width 16, vocabulary 50, float64, eval mode,
    eager attention (twice differentiable, and quick under vmap on CPU)."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2,
                     attn_implementation="eager")
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).to(DT).eval()


def token_batch(n, L, g):
    """A dict batch like a tokenizer's: ids padded with 0 to L, lengths 2..L, labels."""
    ids = torch.randint(1, 50, (n, L), generator=g)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (n,), generator=g)}


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(1)
    train = [token_batch(4, 6, g), token_batch(4, 9, g), token_batch(3, 4, g)]
    test = [token_batch(3, 7, g)]
    return tiny_bert(), train, test, [0, 3, 5, 9, 10]


def mlp_attributor(memory=None, n=30, rows=None):
    """An MLP's attributor (classification, 30 training rows, 10 left out, 6 test rows); with
    ``rows``, under :func:`tight_budget` of that many rows."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(3, 3, hidden=5).to(DT)
    if rows is not None:
        memory = tight_budget(sum(p.numel() for p in model.parameters()), rows)
    X, Y = torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    Xt, Yt = torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    prob = Problem(model, X, Y, "classification", chunk=7, progress=False, memory=memory)
    loo = torch.arange(0, n, 3)
    return Attributor(prob, X[loo], Y[loo], Xt, Yt, loo_rows=loo)


def tight_budget(n_params, rows=2):
    """A budget whose streamed chunks hold ``rows`` float64 gradient rows and that keeps fewer
    than 2 * rows rows whole (so neither the test nor the left-out side is kept)."""
    return 2 * CHUNK_COPIES * rows * n_params * 8


# ----------------------------------------------------------------------------- the budget
def test_budget_sets_chunk_rows_and_refuses_before_work():
    assert chunk_rows(2 * CHUNK_COPIES * 5 * 80, 10, DT) == 5          # 10 float64 = 80 bytes
    assert chunk_rows(2 * CHUNK_COPIES * 5 * 80 - 1, 10, DT) == 4
    assert resolve_budget(None, "cpu") > 0
    for bad in (0, -1.0, True):
        with pytest.raises(ValueError, match="memory must be a positive"):
            resolve_budget(bad, "cpu")
    att = mlp_attributor(memory=100)
    with pytest.raises(MemoryBudgetError, match=r"raise memory= or .*names="):
        compute_scores("grad_dot", att)
    assert "test_grads" not in att.__dict__ and "train_grads" not in att.__dict__


@pytest.mark.parametrize("method", STREAMED)
def test_streamed_scores_equal_the_in_memory_scores_on_an_mlp(method):
    full, tight = mlp_attributor(), mlp_attributor(rows=2)
    assert tight.problem.grad_rows() == 2
    assert not tight.keeps("left") and not tight.keeps("test") and full.keeps("left")
    opts = OPTIONS.get(method, {})
    a, b = compute_scores(method, full, **opts), compute_scores(method, tight, **opts)
    np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12 * np.abs(a).max())
    if method in NOTHING_KEPT:
        assert "train_grads" not in tight.__dict__ and "test_grads" not in tight.__dict__
    np.testing.assert_allclose(tight.lambda_G, full.lambda_G, rtol=1e-12)


def test_grad_dot_blocks_cover_every_pair_once():
    att = mlp_attributor(rows=2)
    G_test = att.problem.loss_grads(att.X_test, att.Y_test)
    G_left = att.problem.loss_grads(att.X_loo, att.Y_loo)
    blocks = [(ts, len(G)) for ts, G in att.grad_blocks("test")]
    assert [n for _, n in blocks] == [2, 2, 2]
    np.testing.assert_allclose(att.pairwise().numpy(), (G_test @ G_left.T).numpy(),
                               rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- HF batches
def test_dict_batches_are_packed_padded_and_checked():
    a = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    b = {"input_ids": torch.tensor([[7, 8, 9, 4, 3]]), "attention_mask": torch.ones(1, 5).long()}
    X, keys = pack_inputs([a, b], pad_id=2)
    assert keys == ["input_ids", "attention_mask"] and X.shape == (2, 2, 5)
    assert X[0, 0].tolist() == [5, 6, 0, 2, 2] and X[0, 1].tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="need an 'attention_mask'"):
        pack_inputs([{"input_ids": a["input_ids"]}, {"input_ids": b["input_ids"]}])
    with pytest.raises(ValueError, match="token-level integers"):
        pack_inputs([{"input_ids": a["input_ids"], "pixel_values": torch.zeros(1, 3, 4, 4)}])
    with pytest.raises(ValueError, match="must have the keys"):
        pack_inputs([a, {"input_ids": b["input_ids"]}])


def test_grad_dot_on_a_hugging_face_model_equals_an_autograd_loop_over_unpadded_sentences(text):
    model, train, test, left = text
    model.train()                                    # the caller's mode is restored afterwards
    scores = fimoda.attribute(model, train, None, left, test, None, task="classification")
    assert model.training and all(m.training for m in model.modules())
    model.eval()

    def rows(batches):
        out = []
        for b in batches:
            for ids, mask, y in zip(b["input_ids"], b["attention_mask"], b["labels"]):
                L = int(mask.sum())                  # the sentence alone, no padding at all
                model.zero_grad()
                logits = model(input_ids=ids[None, :L], attention_mask=mask[None, :L]).logits
                F.cross_entropy(logits, y[None]).backward()
                out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        return torch.stack(out)

    G_train, G_test = rows(train), rows(test)
    ref = (G_test @ G_train[left].T).numpy()
    np.testing.assert_allclose(scores, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


@pytest.mark.filterwarnings("ignore:DataInf. layers whose")
@pytest.mark.parametrize("method", STREAMED)
def test_streamed_scores_equal_the_in_memory_scores_on_a_transformer(text, method):
    model, train, test, left = text
    P = sum(p.numel() for p in model.parameters())
    opts = OPTIONS.get(method, {})
    # DataInf leaves out the attention key biases, whose gradients softmax makes zero: their
    # lambda_l is round-off, and dividing by it would make the scores round-off too
    warns = pytest.warns(UserWarning, match=r"round-off.*key\.bias.*key\.bias'\]") \
        if method == "datainf" else contextlib.nullcontext()
    with warns:
        a = fimoda.attribute(model, train, None, left, test, None, task="classification",
                             method=method, **opts)
    b = fimoda.attribute(model, train, None, left, test, None, task="classification",
                         method=method, memory=tight_budget(P, rows=2), **opts)
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-11 * np.abs(a).max())


def test_the_model_is_wrapped_with_its_own_names_and_vmap(text):
    model, train, test, left = text
    att = fimoda.attributor(model, train, None, left, test, None, task="classification",
                            names=["classifier"])
    assert isinstance(att.problem.model, HFTokenModel)
    assert att.problem.names == ["classifier.weight", "classifier.bias"]
    assert att.problem.vmap_ok and att.problem.model.additive
    labels = torch.cat([b["labels"] for b in train])
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in train]
    test_y = torch.cat([b["labels"] for b in test])
    a = fimoda.attribute(model, train, None, left, test, None, task="classification",
                         names=["classifier"], att=att)
    b = fimoda.attribute(model, no_labels, labels, left, test, test_y, task="classification",
                         names=["classifier"])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no 'labels'"):
        fimoda.attribute(model, no_labels, None, left, test, None, task="classification")


def test_true_hessian_methods_switch_a_models_attention_to_eager_and_back(text):
    """CPU scaled-dot-product attention has no double backward: LiSSA-H on a model built with
    the default (sdpa) attention runs on eager attention, equals the model built eager, and the
    model's own setting is restored."""
    from transformers import BertForSequenceClassification
    eager, train, test, left = text
    sdpa = BertForSequenceClassification(eager.config.__class__(
        **{**eager.config.to_dict(), "attn_implementation": "sdpa"})).to(DT).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    a = fimoda.attribute(sdpa, train, None, left[:2], test, None, task="classification",
                         method="lissa_h", depth=2)
    assert sdpa.config._attn_implementation == "sdpa"
    b = fimoda.attribute(eager, train, None, left[:2], test, None, task="classification",
                         method="lissa_h", depth=2)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())


def test_readme_hugging_face_example_runs(capsys):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- example: hugging-face -->\n```python\n(.*?)```", readme, re.S)
    exec(compile(block.group(1), "README Hugging Face example", "exec"), {})
    assert capsys.readouterr().out.strip() == "(3, 3)"


def test_the_hessian_product_batch_is_an_argument():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    torch.manual_seed(0)
    model = MLP(3, 1, hidden=4).to(DT)
    kw = dict(task="regression", method="cg")
    att = fimoda.attributor(model, X, y, [0, 4, 8], X[:4], y[:4], task="regression", hvp_batch=7)
    assert att.problem.batch_size == 7
    a = fimoda.attribute(model, X, y, [0, 4, 8], X[:4], y[:4], att=att, **kw)
    b = fimoda.attribute(model, X, y, [0, 4, 8], X[:4], y[:4], **kw)      # one batch of 30
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())
