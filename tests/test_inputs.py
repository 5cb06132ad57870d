"""Training and test data as a torch Dataset or DataLoader (fimoda.inputs): the scores and the
gold standard equal those of the same rows given as tensors (or as a list of dict batches), on
the small MLP and on the tiny BERT classifier, whatever the loader's batch size, collate function
and shuffle; what is not accepted is one clear error before any work."""
import numpy as np
import pytest
import torch
from torch.utils.data import (DataLoader, Dataset, IterableDataset, RandomSampler,
                              SubsetRandomSampler, TensorDataset, WeightedRandomSampler)

import fimoda
from fimoda.hf import pack_inputs, split_labels
from fimoda.inputs import rows
from small_models import regression_problem
from test_hf_streaming import text  # noqa: F401  (the tiny BERT and its dict batches)

LEFT = [0, 3, 7, 20, 40]
MLP_METHODS = {"grad_dot": {}, "cg": {}, "ekfac": {}, "trak": {"proj_dim": 8, "seed": 1},
               "datainf": {}}
TEXT_METHODS = {"grad_dot": {}, "ekfac": {}, "trak": {"proj_dim": 8, "seed": 1}}


class NumpyRows(Dataset):
    """A map-style Dataset of (numpy row, float target) pairs, as user code often writes one."""

    def __init__(self, X, y):
        self.X, self.y = X.numpy(), y.numpy()

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], float(self.y[i])


def shuffled_loader(dataset, batch_size, collate_fn=None, seed=0):
    """A loader that shuffles (shuffle=True), drawing from a seeded generator."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mlp():
    model, X, y, Xt, yt = regression_problem()
    return model, X, y, Xt, yt


def test_a_shuffling_loader_really_yields_rows_out_of_order(mlp):
    _, X, y, _, _ = mlp
    first = next(iter(shuffled_loader(TensorDataset(X, y), 7)))[0]
    assert not torch.equal(first, X[:7])     # read through a sequential copy, it is X[:7]


@pytest.mark.parametrize("method", MLP_METHODS)
def test_mlp_scores_from_datasets_and_loaders_equal_the_tensor_scores(mlp, method):
    model, X, y, Xt, yt = mlp
    kw = dict(task="regression", method=method, **MLP_METHODS[method])
    ref = fimoda.attribute(model, X, y, LEFT, Xt, yt, **kw)
    for train, test in [
            (shuffled_loader(TensorDataset(X, y), 7), TensorDataset(Xt, yt)),
            (DataLoader(TensorDataset(X, y), batch_size=5), DataLoader(NumpyRows(Xt, yt))),
            (NumpyRows(X, y), DataLoader(TensorDataset(Xt, yt), batch_size=4, shuffle=True))]:
        got = fimoda.attribute(model, train, None, LEFT, test, None, **kw)
        np.testing.assert_array_equal(got, ref)


def test_mlp_inputs_alone_take_their_targets_as_y(mlp):
    model, X, y, Xt, yt = mlp
    ref = fimoda.attribute(model, X, y, LEFT, Xt, yt, task="regression")
    inputs = DataLoader(TensorDataset(X), batch_size=6,
                        collate_fn=lambda batch: torch.stack([r[0] for r in batch]))
    got = fimoda.attribute(model, inputs, y, LEFT, Xt, yt, task="regression")
    np.testing.assert_array_equal(got, ref)


def test_gold_standard_from_a_loader_equals_the_tensor_gold(mlp):
    model, X, y, Xt, yt = mlp
    kw = dict(task="regression", epochs=2, seeds=2, batch_size=8)
    ref = fimoda.gold_standard(model, X, y, LEFT, Xt, yt, **kw)
    got = fimoda.gold_standard(model, shuffled_loader(TensorDataset(X, y), 16), None, LEFT,
                               TensorDataset(Xt, yt), None, **kw)
    assert np.abs(ref).max() > 0
    np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------- text
def sentences(batches):
    """Each row of the dict batches alone, unpadded (its own length), label as a 0-d tensor."""
    out = []
    for b in batches:
        for r in range(len(b["labels"])):
            L = int(b["attention_mask"][r].sum())
            out.append({k: (v[r, :L] if v.dim() == 2 else v[r]) for k, v in b.items()})
    return out


def pad_collate(rows):
    """A tokenizer-style collate: the batch padded with 0 to its own longest row."""
    L = max(len(r["input_ids"]) for r in rows)
    pad = lambda t: torch.cat([t, t.new_zeros(L - len(t))])
    return {k: torch.stack([pad(r[k]) if r[k].dim() else r[k] for r in rows])
            for k in rows[0]}


class ListDataset(Dataset):
    """A map-style Dataset of the given rows."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_text_rows_from_a_dataset_and_a_loader_pack_to_the_batches_rows(text):
    _, train, _, _ = text
    cols, labels = split_labels(train, None)
    ref, keys = pack_inputs(cols)
    one_by_one = ListDataset(sentences(train))
    for data in (one_by_one, shuffled_loader(one_by_one, 3, pad_collate)):
        X, y = rows(data, None, "X_train", "y_train")
        cols, got_y = split_labels(X, y)
        got = pack_inputs(cols, keys)[0]       # padded to the longest sentence, not batch width
        L = got.shape[-1]
        assert torch.equal(got, ref[..., :L]) and torch.equal(got_y, labels)
        assert not ref[:, keys.index("attention_mask"), L:].any()


@pytest.mark.filterwarnings("ignore:DataInf. layers whose")
@pytest.mark.parametrize("method", TEXT_METHODS)
def test_transformer_scores_from_a_loader_equal_the_dict_batch_scores(text, method):
    model, train, test, left = text
    kw = dict(task="classification", method=method, **TEXT_METHODS[method])
    ref = fimoda.attribute(model, train, None, left, test, None, **kw)
    got = fimoda.attribute(model, shuffled_loader(ListDataset(sentences(train)), 3, pad_collate),
                           None, left, ListDataset(sentences(test)), None, **kw)
    np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------- refused
class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3), 0.0


def _ragged_collate(rows):
    """Pairs padded to the batch's own width, without a mask: not packable."""
    return torch.zeros(len(rows), 2 + len(rows)), torch.zeros(len(rows))


@pytest.mark.parametrize("train, y, match", [
    (Stream(), None, "IterableDataset, whose rows have no indices"),
    (DataLoader(Stream(), batch_size=2), None, "IterableDataset"),
    ("subset", None, "SubsetRandomSampler"),
    ("weighted", None, "WeightedRandomSampler"),
    ("replacement", None, "RandomSampler"),
    ("unbatched", None, "without batching"),
    ("pairs", "y", "so y_train must be None"),
    ("alone", None, "inputs alone: give the targets as y_train"),
    (ListDataset([(torch.zeros(5), 0.0), (torch.zeros(4), 1.0)]), None, "cannot be stacked"),
    ("ragged", None, "dict batches with an 'attention_mask'"),
    (ListDataset([{"input_ids": [1, 2], "sentence": "a b", "labels": 0}]), None, "'sentence' holds text"),
    (ListDataset([(torch.zeros(5), 0.0), {"input_ids": [1]}]), None, "mixes dict and pair rows"),
    (ListDataset([(torch.zeros(5), 0.0, 1)]), None, "tuple of 3 values"),
    (ListDataset([]), None, "holds no rows"),
])
def test_what_is_not_accepted_is_one_clear_error(mlp, train, y, match):
    model, X, Y, Xt, yt = mlp
    pairs = TensorDataset(X, Y)
    train = {"subset": DataLoader(pairs, sampler=SubsetRandomSampler(range(10))),
             "weighted": DataLoader(pairs, sampler=WeightedRandomSampler(torch.ones(len(X)), 9)),
             "replacement": DataLoader(pairs, sampler=RandomSampler(pairs, replacement=True)),
             "unbatched": DataLoader(pairs, batch_size=None),
             "pairs": pairs, "alone": TensorDataset(X),
             "ragged": DataLoader(pairs, batch_size=4, collate_fn=_ragged_collate),
             }.get(train, train) if isinstance(train, str) else train
    y = Y if y == "y" else y
    with pytest.raises(ValueError, match=match):
        fimoda.attribute(model, train, y, [0], Xt, yt, task="regression")


def test_targets_as_a_dataset_are_refused(mlp):
    model, X, y, Xt, yt = mlp
    with pytest.raises(ValueError, match="y_test is a TensorDataset"):
        fimoda.attribute(model, X, y, [0], Xt, TensorDataset(yt), task="regression")
