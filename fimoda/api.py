"""The front door: attribute a model of your own, and compute its gold standard, in one call each.

Both take the same arguments in the same order -- the model, its training data, the indices of the
training instances to attribute, the test data -- and return ``scores[test, left_out]`` with the
same sign: positive means the test loss rises when the training instance is left out.

    scores = fimoda.attribute(model, X, y, left_out, X_test, y_test, task="regression",
                              method="cg")
    gold = fimoda.gold_standard(model, X, y, left_out, X_test, y_test, task="regression")
    fimoda.cosine_to_gold(gold, scores)        # one cosine per test point

Inputs may be numpy arrays or tensors; they are converted to the model's dtype and device
(integer inputs such as token ids stay integer; class labels become int64). Text inputs may also
come as Hugging Face batches: a dict / ``BatchEncoding`` of (N, L) token tensors with an
``attention_mask``, or a list of such batches of different lengths (``y`` None: their ``labels``);
a model returning an object with ``.logits`` is taken as it is (:mod:`fimoda.hf`). Any of these
may also come as a ``torch.utils.data.Dataset`` or ``DataLoader`` (:mod:`fimoda.inputs`: row i is
``dataset[i]``, also for a loader that shuffles). ``names=`` restricts every method and the gold
standard to a subset of the parameters (:func:`fimoda.select_parameters`). The caller's
model is left as it was: its train/eval mode and which parameters require gradients are restored,
and the gold standard trains copies. ``loss=`` takes a per-example loss of the user's
(:func:`attribute`); ``memory=`` bounds the memory of streamed per-example gradients, and
:func:`estimate_cost` says what a method will cost before it runs.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .gradients import param_names
from .hf import adapt, eager_attention, wrap_if_logits
from .inputs import rows
from .losses import TASKS, check_task
from .parameters import describe
from .tensors import as_inputs, as_targets, as_tensor, check_data


def _model_dtype_device(model: torch.nn.Module):
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("the model has no parameters to attribute")
    return p.dtype, p.device


def _inputs(model: torch.nn.Module, X) -> torch.Tensor:
    """``X`` as the model's inputs (:func:`fimoda.tensors.as_inputs`)."""
    return as_inputs(X, *_model_dtype_device(model))


def _targets(model: torch.nn.Module, y, task: str) -> torch.Tensor:
    """``y`` as targets (:func:`fimoda.tensors.as_targets`) of shape (N,) (an (N, 1) column is
    accepted); classification labels given as floats must be whole numbers."""
    t = as_tensor(y)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"targets must have shape (N,) or (N, 1), got {tuple(t.shape)}")
    if task == "classification" and t.is_floating_point():
        if not bool(torch.all(t == t.round())):
            raise ValueError("classification labels must be whole numbers (class indices)")
    return as_targets(t, task, *_model_dtype_device(model))


@contextlib.contextmanager
def _model_left_as_it_was(model: torch.nn.Module):
    """Run the block with the model in eval mode (attribution is of theta^f as a function:
    no dropout, BatchNorm on its running statistics) and, for a Hugging Face model, with eager
    attention (:func:`fimoda.hf.eager_attention`), then restore its train/eval mode (every
    submodule), requires_grad flags and attention implementation."""
    # a wrapped Hugging Face model (fimoda.hf.HFModel) shares all but its root module
    modes = [(m, m.training) for m in [*getattr(model, "wrapped", model).modules(),
                                       *model.modules()]]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        with eager_attention(getattr(model, "wrapped", model)):
            yield
    finally:
        for m, mode in modes:
            m.training = mode           # the flag alone: train() would recurse
        for p, flag in flags:
            p.requires_grad_(flag)


def _as_indices(left_out, n: int):
    """``left_out`` with a boolean mask over the n training rows turned into its indices (a
    mask of another length is named as one); anything else as given."""
    a = left_out.cpu().numpy() if torch.is_tensor(left_out) else left_out
    if isinstance(a, np.ndarray):
        is_mask = a.dtype == bool and a.ndim == 1
    else:       # a list of indices, of groups (ragged), or of booleans
        is_mask = isinstance(a, (list, tuple)) and len(a) > 0 and \
            all(isinstance(v, (bool, np.bool_)) for v in a)
    if is_mask:
        if len(a) != n:
            raise ValueError(f"left_out is a boolean mask of {len(a)} entries; a mask must have "
                             f"one entry per training row ({n})")
        return np.flatnonzero(np.asarray(a, dtype=bool))
    return left_out


def _rows(left_out, n: int) -> torch.Tensor:
    left_out = _as_indices(left_out, n)
    a = np.asarray(left_out.cpu() if torch.is_tensor(left_out) else left_out)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"left_out must hold integer training indices (or a boolean mask over "
                         f"the training rows), got dtype {a.dtype}: e.g. {a.reshape(-1)[:3]}")
    idx = torch.as_tensor(a.astype(np.int64))
    if idx.dim() != 1 or len(idx) == 0:
        raise ValueError("left_out must be a non-empty 1-D sequence of training indices")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"left_out indices must lie in [0, {n}); got {int(idx.min())}.."
                         f"{int(idx.max())}")
    if len(torch.unique(idx)) != len(idx):
        raise ValueError("left_out indices must be distinct")
    return idx


def _check_outputs(out: torch.Tensor, task: str, y: torch.Tensor, yt: torch.Tensor) -> None:
    """The model's output width against the task, and class labels against the output width."""
    if task == "regression":
        if not (out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1)):
            raise ValueError(f"task 'regression' needs one output per row, but the model "
                             f"returns shape {tuple(out.shape)} for 2 rows")
        return
    if out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(f"task 'classification' needs one logit per class (2 or more), but "
                         f"the model returns shape {tuple(out.shape)} for 2 rows")
    classes = out.shape[1]
    for name, labels in (("y_train", y), ("y_test", yt)):
        bad = (labels < 0) | (labels >= classes)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} holds label {int(labels[row])} in row {row}, outside "
                             f"[0, {classes}): the model has {classes} outputs")


def _check_model(model, X, y, loss, task: str, yt) -> torch.nn.Module:
    """Run the model on two rows: it must return a tensor of outputs or an object holding
    ``.logits`` (a Hugging Face model: returned wrapped, :class:`fimoda.hf.HFModel`), and a
    custom ``loss`` must give one value per row; it must have a trainable parameter, and its
    output width must fit ``task`` and the labels ``y``, ``yt``. Returns the model to
    attribute."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter (every requires_grad is False): "
                         "attribution differentiates the loss with respect to them")
    with torch.no_grad(), _model_left_as_it_was(model):
        model = wrap_if_logits(model, model(X[:2]))
        out = model(X[:2])
        if not torch.is_tensor(out):
            raise TypeError(f"model(x) must return a tensor of outputs (or an object holding "
                            f".logits), got {type(out).__name__}")
        _check_outputs(out, task, y, yt)
        if loss is not None:
            value = loss(out, y[:2])
            if not torch.is_tensor(value) or tuple(value.shape) != (len(out),):
                raise ValueError(f"loss(outputs, targets) must return one loss per example, "
                                 f"shape ({len(out)},), got "
                                 f"{tuple(value.shape) if torch.is_tensor(value) else value!r}")
    return model


def _check_numeric(name: str, a) -> None:
    """A ValueError naming ``name`` when it holds strings or objects rather than numbers."""
    if torch.is_tensor(a) or a is None:
        return
    kind = np.asarray(a).dtype.kind if not hasattr(a, "dtypes") else \
        ("O" if any(d.kind in "OSU" for d in np.asarray(a.dtypes)) else "f")
    if kind in "OSU":
        raise ValueError(f"{name} holds strings or objects (dtype {np.asarray(a).dtype}), not "
                         "numbers: encode them (e.g. one-hot columns, label indices) first")


def _prepare(model, X_train, y_train, left_out, X_test, y_test, task, loss=None,
             groups: bool = False):
    """(model to attribute, X, y, left-out rows, X_test, y_test) as tensors, a Dataset /
    DataLoader read into its rows (:func:`fimoda.inputs.rows`), dict batches packed
    (:func:`fimoda.hf.adapt`); one error for bad input before any work. ``left_out``:
    a 1-D index tensor, or with ``groups`` in any form :func:`fimoda.gold.groups.as_left_out`
    takes (indices or groups)."""
    check_task(task)
    X_train, y_train = rows(X_train, y_train, "X_train", "y_train")     # Dataset / DataLoader
    X_test, y_test = rows(X_test, y_test, "X_test", "y_test")
    model, X_train, y_train, X_test, y_test = adapt(model, X_train, y_train, X_test, y_test)
    dtype, _ = _model_dtype_device(model)
    if not dtype.is_floating_point or dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the model's parameters are {str(dtype).replace('torch.', '')}, which "
                         "fimoda does not support: use float32 or float64 (gold scores are "
                         "tiny differences of losses)")
    for name, a in (("X_train", X_train), ("y_train", y_train), ("X_test", X_test),
                    ("y_test", y_test)):
        _check_numeric(name, a)
    X, y = _inputs(model, X_train), _targets(model, y_train, task)
    Xt, yt = _inputs(model, X_test), _targets(model, y_test, task)
    if len(Xt) == 0:
        raise ValueError("X_test is empty: give at least one test point")
    check_data(task, X, y, Xt, yt, padded=hasattr(model, "trim_inputs"))
    if groups:
        from .gold.groups import as_left_out
        idx = torch.as_tensor(as_left_out(_as_indices(left_out, len(X)), len(X)))
    else:
        idx = _rows(left_out, len(X))
    model = _check_model(model, X, y, loss, task, yt)
    return model, X, y, idx, Xt, yt


def attributor(model, X_train, y_train, left_out, X_test, y_test, *, task: str,
               names: Optional[Sequence[str]] = None, chunk: int = 256, progress: bool = False,
               loss: Optional[Callable] = None, memory: Optional[int] = None,
               hvp_batch: int = 1024):
    """The compute-once state of every method (:class:`fimoda.influence.Attributor`): theta^f
    with its whole training set, the left-out rows ``left_out`` and the test set. Reuse it to run
    several methods on the same per-example gradients. ``loss``, ``memory``, ``hvp_batch``: see
    :func:`attribute`; ``chunk``: most rows batched by vmap at once. ``names``: the parameters
    to attribute (exact names or module prefixes, :func:`fimoda.select_parameters`; None: every
    trainable one). How many of the model's parameters that is (its ``description``) is printed
    with ``progress`` and whenever it is not all of them."""
    from .gradients import Problem
    from .influence import Attributor
    with _model_left_as_it_was(model):
        wrapped, X, y, idx, Xt, yt = _prepare(model, X_train, y_train, left_out, X_test, y_test,
                                              task, loss)
        problem = Problem(wrapped, X, y, task, names=names, chunk=chunk, progress=progress,
                          loss_fn=loss, memory=memory, batch_size=hvp_batch)
    att = Attributor(problem, X[idx], y[idx], Xt, yt, loo_rows=idx)
    if progress or problem.n_params < sum(p.numel() for p in wrapped.parameters()):
        print(att.description)
    return att


def attribute(model, X_train, y_train, left_out, X_test, y_test, *, task: str,
              method: str = "grad_dot", names: Optional[Sequence[str]] = None, att=None,
              loss: Optional[Callable] = None, memory: Optional[int] = None,
              hvp_batch: int = 1024, chunk: int = 256, progress: bool = False,
              **options) -> np.ndarray:
    """``scores[j, i]`` (float64) of ``method`` (see :data:`fimoda.influence.METHODS`) for test
    point j and training instance ``left_out[i]``; ``options`` are the method's config fields
    (e.g. ``damping_index``, ``depth``, ``rank``). ``att``: an :func:`attributor` to reuse.

    ``loss(outputs, targets) -> (B,)``: the model's per-example training loss when it is not the
    task's (squared error / cross-entropy), e.g. a Huber loss; it must be twice differentiable.
    Methods built on loss gradients and the true Hessian use it (grad_dot, grad_cos, datainf,
    lissa_h, arnoldi, prop1, eq16; cg, dense and trajectory with ``hessian="true"``). The Gauss-Newton
    methods (cg, lissa, dense, trak, ekfac, cor2) need the loss as l(f), convex in one scalar
    output f, which is known for the task's losses only: with a custom loss they raise
    :class:`fimoda.gradients.CustomLossError`.

    What sets memory, all arguments here (:func:`estimate_cost` gives the resulting peak, the
    per-example gradients and Hessian products before any work; with ``progress=True`` each
    method prints it as one line, and a budget that cannot hold a method is one
    :class:`fimoda.influence.errors.MemoryBudgetError` naming the setting to change, raised
    before any work):

    - ``memory``: the budget in bytes from which every chunk of streamed per-example gradients
      and every block of right-hand sides of a solver is sized (:mod:`fimoda.memory`; None: half
      the free memory of the model's device). Training-set gradients are never held whole; the
      test and left-out gradients are kept when they fit a quarter of it each, else streamed
      (every method but trajectory, which keeps both sides). The damped-inverse
      methods (cg, lissa, lissa_h, dense, prop1, cor2, eq16) solve for the smaller side in
      blocks that fit half of it.
    - ``hvp_batch``: training rows per forward/backward pass of the full-data gradient and
      Hessian (or Gauss-Newton) products of the second-order methods; their memory grows with
      it (activations of that many rows, and their second derivatives).
    - ``chunk``: most rows whose per-example gradients vmap batches at once (activations).
    - ``names``: the parameters attributed (module prefixes allowed, e.g. ``["classifier"]``):
      every gradient row has one float per attributed parameter.
    - method options: ``memory_gb`` (GB for the damped methods' materialised matrices: the
      Gauss-Newton Phi and its spectrum, a dense P x P matrix, the Arnoldi and Krylov bases),
      ``n_iter`` (arnoldi's basis columns), ``depth`` and ``batch_size`` (lissa: products, and
      rows per stochastic product), trak's ``proj_dim``, ``chunk``, ``grad_bytes``,
      ``block_elems`` and ``cache_bytes``, datainf's ``chunk`` and ``n_samples``, ekfac's
      ``batch_size`` (rows per factor-fitting pass).

    Second-order methods need double backward: a Hugging Face model runs with eager attention
    (:func:`fimoda.hf.eager_attention`) and gets its own attention implementation back."""
    from .influence import METHODS, compute_scores
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if att is None:
        att = attributor(model, X_train, y_train, left_out, X_test, y_test, task=task,
                         names=names, loss=loss, memory=memory, hvp_batch=hvp_batch,
                         chunk=chunk, progress=progress)
    with _model_left_as_it_was(model):
        return np.asarray(compute_scores(method, att, **options), dtype=np.float64)


def estimate_cost(model, X_train, y_train, left_out, X_test, y_test, *, task: str,
                  method: str = "grad_dot", names: Optional[Sequence[str]] = None, att=None,
                  loss: Optional[Callable] = None, memory: Optional[int] = None,
                  hvp_batch: int = 1024, chunk: int = 256, **options):
    """What :func:`attribute` with the same arguments would cost, estimated without computing
    any gradient: a :class:`fimoda.influence.cost.Cost` with ``peak_bytes`` (bytes of the
    arrays the method holds at its peak, an upper bound; not the activations of one
    forward/backward pass), ``gradient_rows`` (per-example gradients computed),
    ``products`` (Hessian or Gauss-Newton vector products over ``product_rows`` training rows,
    at most that many when ``products_bound``), ``refusal`` (None, or why the budget cannot
    hold it and which setting to change) and ``line()`` (all of it in one line)."""
    from .influence import METHODS
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if att is None:
        att = attributor(model, X_train, y_train, left_out, X_test, y_test, task=task,
                         names=names, loss=loss, memory=memory, hvp_batch=hvp_batch,
                         chunk=chunk)
    return att.cost(method, **options)


def gold_standard(model, X_train, y_train, left_out, X_test, y_test, *, task: str,
                  epochs: int = 5, seeds: int = 5, lr: float = 1e-2, optimizer: str = "sgd",
                  batch_size: int = 128, mechanism: str = "remove", adjust: str = "mean",
                  at: Optional[int] = -1, loss: Optional[Callable] = None,
                  names: Optional[Sequence[str]] = None, **gold_options):
    """The further-training gold standard (eq. 13, ``adjust="full"``: eq. 17) as
    ``scores[j, i]``, the layout of :func:`attribute`: further-train copies of the model on the
    full training set and without each ``left_out[i]``, ``seeds`` batch orders, ``epochs`` epochs.
    ``at``: the evaluation point (index into the eval points, 0 = theta^f itself, where every
    score is 0; -1 the last); None returns (scores[t, j, i], eval points) for every point.
    ``left_out`` may also hold groups, ``[[0, 5], [3], ...]`` or a 2-D index array (m, k)
    (:mod:`fimoda.gold.groups`): then each run leaves out a whole group S and ``scores[j, g]`` is
    group g's gold; with ``adjust="full"`` it is a_S(z_j) = mean_s (loss_{-S} - loss_full), the
    group effect to set beside the additive estimate sum_{i in S} a_i(z_j) (``"mean"``
    subtracts its mean over the groups, per test point).
    ``mechanism``: how each run leaves out z_i, the name of a registered leave-out mechanism
    (:mod:`fimoda.gold.mechanisms`: ``remove`` drops it from every epoch's batch order,
    ``subtract`` subtracts L(z_i)/n from every batch's loss).
    ``gold_options``: other :class:`fimoda.gold.GoldConfig` fields
    (``weight_decay``, ``max_steps``, ...). ``loss(outputs, targets) -> (B,)``: the per-example
    loss further training minimises when it is not the task's (any twice differentiable loss).
    ``names``: the parameters further training moves (exact names or module prefixes,
    :func:`fimoda.select_parameters`; None: every trainable one), the others stay at theta^f;
    a subset is printed as one line.

    The defaults are a first look (5 seeds x 5 epochs); the paper used 100 seeds and its
    datasets' epochs (``fimoda.paper.config``)."""
    from .gold import GoldConfig, further_train, gold_scores
    with _model_left_as_it_was(model):
        wrapped, X, y, idx, Xt, yt = _prepare(model, X_train, y_train, left_out, X_test, y_test,
                                              task, loss, groups=True)
    gcfg = GoldConfig(optimizer=optimizer, lr=lr, epochs=epochs, seeds=seeds,
                      batch_size=batch_size, mechanism=mechanism,
                      **{"progress": False, **gold_options})
    moved = None if names is None else param_names(wrapped, names)
    if at is not None:                   # before any training: the evaluation points are known
        from .gold.schedule import make_schedule
        T = len(make_schedule(len(X), gcfg).eval_steps)
        if isinstance(at, bool) or not isinstance(at, (int, np.integer)) or not -T <= at < T:
            raise ValueError(f"at={at!r} is not an evaluation point: there are {T} (0 = theta^f "
                             f"itself ... {T - 1}; negative counts from the end; None: all)")
    with _model_left_as_it_was(model):
        if moved is not None:
            for n, p in wrapped.named_parameters():
                p.requires_grad_(n in moved)   # frozen in further_train's copies (engine: not mlp)
            if sum(p.numel() for p in wrapped.parameters() if p.requires_grad) < \
                    sum(p.numel() for p in wrapped.parameters()):
                print(describe(wrapped, moved, "further-training") + "; the others stay fixed")
        res = further_train(wrapped, task, X, y, Xt, yt, idx.numpy(), gcfg, loss=loss)
    a = gold_scores(res.loss_full, res.loss_loo, adjust=adjust)      # a[i, t, j]
    if at is None:
        return a.transpose(1, 2, 0), np.asarray(res.eval_points)
    return np.ascontiguousarray(a[:, at, :].T)


def cosine_to_gold(gold: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Cosine between the gold and a method's score vectors over the left-out set, one per test
    point (both ``scores[test, left_out]``); the paper's evaluation metric."""
    from .metrics import cosine
    g, s = np.asarray(gold, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if g.shape != s.shape:
        raise ValueError(f"gold {g.shape} and scores {s.shape} differ in shape")
    return cosine(g.T[:, None, :], s)[0]
