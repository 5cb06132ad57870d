"""What a method will cost, said before it is paid: its peak memory, its per-example gradients
and its Hessian (or Gauss-Newton) vector products, estimated from the sizes of the problem alone
(:class:`Shape`: no gradient is computed), and a refusal, naming the setting to change, when the
memory budget cannot hold even one chunk of its work or its fixed state.

Each method's :class:`~.specs.MethodSpec` has a ``cost(shape, cfg) -> Cost`` hook (this module's
functions); :func:`fimoda.influence.compute_scores` prints :meth:`Cost.line` before the heavy
work when progress is on and raises :class:`~.errors.MemoryBudgetError` with the refusal before
any of it; :meth:`fimoda.influence.Attributor.cost` and :func:`fimoda.estimate_cost` return the
:class:`Cost` on request.

The memory model is :mod:`fimoda.memory`'s: per-example gradient rows of P floats stream in
chunks of :func:`~fimoda.memory.chunk_rows` rows (:data:`~fimoda.memory.CHUNK_COPIES` copies
alive), a side (test or left-out gradients) is kept whole when :func:`~fimoda.memory.storable`,
a solver holds :data:`~fimoda.memory.SOLVE_COPIES` copies of its block of right-hand sides
(:func:`~fimoda.memory.solve_columns`); the damped-inverse methods' materialised matrices
(Gauss-Newton Phi and its spectrum, a dense P x P matrix, the Arnoldi and Krylov bases) are
bounded by their own ``memory_gb``. The peak counts these arrays and the scores; it does not
count the activations of one forward/backward pass (of ``chunk`` rows for per-example
gradients, of ``hvp_batch`` rows for a full-data product), which depend on the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..memory import (CHUNK_COPIES, ROTATION_COPIES, SOLVE_COPIES, chunk_rows, kept_rows,
                      rotation_rows, row_bytes, solve_columns, storable)
from .errors import MemoryBudgetError

__all__ = ["Shape", "Cost", "shape_of", "pairwise_cost", "damped_cost", "arnoldi_cost",
           "trak_cost", "ekfac_cost", "datainf_cost", "trajectory_cost", "fmt_bytes"]

GIB = 2 ** 30
# what EK-FAC's block of the test side holds per row
EKFAC_TEST_ROW = "EK-FAC: one test gradient of the factored layers"
# P-vectors a full-data Hessian product holds besides its block: the gradient with its graph,
# the per-parameter products and the flattened result
PRODUCT_COPIES = 4


@dataclass(frozen=True)
class Shape:
    """The sizes a method's cost depends on, known before any work (:func:`shape_of`)."""
    n: int                  # training rows of the full-data products and fits
    n_left: int             # left-out instances (columns of the scores)
    n_test: int             # test instances (rows of the scores)
    P: int                  # parameters attributed (floats per gradient row)
    dtype: torch.dtype      # the model's float type; a gradient row takes P x its size bytes
    work_itemsize: int      # bytes per float of the Gauss-Newton spectrum (float64 off MPS)
    memory: int             # the memory budget, bytes (memory=)
    hvp_batch: int          # training rows per forward/backward of a full-data product
    chunk: int              # rows vmapped at once for per-example gradients
    tensors: int = 1        # parameter tensors attributed (DataInf's layers)
    layers: tuple = ()      # (out, in') of each layer EK-FAC factors (bias column included)
    cached: tuple = ()      # sides whose gradients the Attributor holds already ("left", "test")

    @property
    def row(self) -> int:
        """Bytes of one per-example gradient row."""
        return self.P * self.dtype.itemsize

    def keeps(self, side: str) -> bool:
        """Whether the loss gradients of ``side`` are (or may be) kept whole."""
        rows = self.n_left if side == "left" else self.n_test
        return side in self.cached or storable(self.memory, rows, self.P, self.dtype)


@dataclass(frozen=True)
class Cost:
    """A method's estimated cost for a problem (all counts for one call)."""
    method: str
    peak_bytes: int          # bytes of the arrays it holds at its peak: gradient rows and their
    #                          copies, solver blocks, fitted and materialised matrices, the scores
    #                          (an upper bound; not the activations of one forward/backward pass)
    budget_bytes: int        # the memory budget (memory=), bytes
    gradient_rows: int       # per-example gradients computed (rows of P floats), recomputations
    #                          of streamed sides included
    products: Optional[int]  # Hessian or Gauss-Newton vector products with the training risk,
    #                          each over product_rows rows (None: not estimated)
    products_bound: bool     # products is an upper bound (a solver that stops on convergence)
    product_rows: int        # training rows one product runs over
    product_batch: int       # rows per forward/backward pass of a product (hvp_batch=)
    chunk_rows: int          # per-example gradient rows streamed at once (0: nothing streamed)
    solve_columns: int       # right-hand sides solved at once (0: no linear solve)
    example_products: int = 0  # per-example Hessian-vector products (rows; Prop. 1)
    captured_rows: int = 0   # rows through batched forward/backward passes whose layer inputs
    #                          and output gradients give per-example layer gradients (EK-FAC)
    capture_batch: int = 0   # rows per such pass (batch_size=)
    refusal: Optional[str] = None  # why the budget cannot hold it, naming the setting to
    #                                change; None: it fits

    def line(self) -> str:
        """One line: the estimate, or the refusal."""
        if self.refusal:
            return f"{self.method}: refused before any work: {self.refusal}"
        over = "over" if self.peak_bytes > self.budget_bytes else "of"
        parts = [f"peak ~{fmt_bytes(self.peak_bytes)} {over} memory={fmt_bytes(self.budget_bytes)}",
                 f"{self.gradient_rows:,} per-example gradients"]
        if self.chunk_rows:
            parts[-1] += f" (streamed {self.chunk_rows:,} rows at a time)"
        if self.solve_columns:
            parts.append(f"solves {self.solve_columns:,} right-hand sides at a time")
        if self.products is None:
            parts.append("Hessian products not estimated")
        elif self.products:
            bound = "<= " if self.products_bound else ""
            parts.append(f"{bound}{self.products:,} Hessian/GN products over "
                         f"{self.product_rows:,} rows (batches of {self.product_batch:,})")
        if self.example_products:
            parts.append(f"{self.example_products:,} per-example Hessian products")
        if self.captured_rows:
            parts.append(f"{self.captured_rows:,} rows through layer captures (batches of "
                         f"{self.capture_batch:,})")
        return f"{self.method}: " + ", ".join(parts)

    def check(self) -> None:
        """Raise :class:`~.errors.MemoryBudgetError` with the refusal, if there is one."""
        if self.refusal:
            raise MemoryBudgetError(f"{self.method}: {self.refusal}")


def fmt_bytes(b: float) -> str:
    """Bytes in the largest binary unit that keeps them >= 1 (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def shape_of(att) -> Shape:
    """The :class:`Shape` of an :class:`~.common.Attributor` (no gradient computed)."""
    from .ekfac import kfac_layers
    from .operators import work_dtype
    p = att.problem
    layers = []
    try:
        found = kfac_layers(p)
    except ValueError:                  # no layer EK-FAC can factor: EK-FAC refuses by itself
        found = []
    for _, mod, w, b in found:
        out = p.params[w].shape[0]
        layers.append((out, p.params[w].numel() // out + (b is not None)))
    cached = tuple(s for s, name in (("left", "train_grads"), ("test", "test_grads"))
                   if name in att.__dict__)
    return Shape(n=len(p.X), n_left=len(att.X_loo), n_test=len(att.X_test), P=p.n_params,
                 dtype=p.dtype, work_itemsize=work_dtype(p.dtype, p.device).itemsize,
                 memory=p.memory, hvp_batch=p.batch_size, chunk=p.chunk,
                 tensors=len(p.names), layers=tuple(layers),
                 cached=cached)


# ----------------------------------------------------------------------------- building blocks
def _rows(shape: Shape):
    """(streamed chunk rows, refusal or None)."""
    try:
        return chunk_rows(shape.memory, shape.P, shape.dtype), None
    except MemoryBudgetError as e:
        return 0, str(e)


def _vmap_bytes(shape: Shape, rows: int) -> int:
    """The autograd intermediates of one vmapped batch of per-example gradients (``chunk`` rows,
    at most ``rows``), as many bytes as its gradient rows."""
    return min(shape.chunk, max(rows, 1)) * shape.row


def _scores_bytes(shape: Shape) -> int:
    """The scores as a torch matrix and its float64 numpy copy."""
    return shape.n_test * shape.n_left * (shape.dtype.itemsize + 8)


def _refused(name: str, shape: Shape, why: str) -> Cost:
    return Cost(name, 0, shape.memory, 0, 0, False, shape.n, shape.hvp_batch, 0, 0, refusal=why)


def pairwise_cost(name: str, shape: Shape, copies: int = 0) -> Cost:
    """Grad-Dot-like methods (:meth:`~.common.Attributor.pairwise`): test blocks outside, the
    left-out side streamed again for each test block unless kept. ``copies``: transformed
    copies of a block alive at once (Grad-Cos's normalisation, EK-FAC's rotation)."""
    r, refusal = _rows(shape)
    if refusal:
        return _refused(name, shape, refusal)
    T, nl = shape.n_test, shape.n_left
    kt, kl = shape.keeps("test"), shape.keeps("left")
    test_blocks = 1 if kt else math.ceil(T / r)
    rows = (0 if "test" in shape.cached else T) + \
        (0 if "left" in shape.cached else nl) * (1 if kl else test_blocks)
    kept = (T if kt else 0) + (nl if kl else 0)
    block = max(min(r, shape.chunk, max(T, nl)), 0 if kt and kl else min(r, max(T, nl)))
    work = CHUNK_COPIES * block + copies * max(T if kt else min(r, T), nl if kl else min(r, nl))
    peak = (kept + work) * shape.row + _vmap_bytes(shape, r) + _scores_bytes(shape)
    return Cost(name, peak, shape.memory, rows, 0, False, shape.n, shape.hvp_batch,
                0 if kt and kl else r, 0)


def gauss_newton_materialised(shape: Shape, hessian: str, cfg) -> bool:
    """Whether the damped operator materialises Phi (:func:`.operators.gauss_newton_fits`)."""
    if hessian != "gn" or cfg.materialize == "never":
        return False
    return cfg.materialize == "always" or _gn_bytes(shape) <= cfg.memory_gb * GIB


def _gn_bytes(shape: Shape) -> int:
    from .operators import gauss_newton_bytes
    return gauss_newton_bytes(shape.n, shape.P, shape.work_itemsize)


def damped_cost(name: str, shape: Shape, cfg, hessian: str, products_per_column=None,
                bound: bool = True, extra_columns: int = 0, left_copies: int = 0,
                left_fresh: bool = False, example_products: bool = False, fixed: int = 0,
                product_rows: Optional[int] = None) -> Cost:
    """A damped-inverse method through :func:`~.common.scores_with`: the smaller side solved in
    blocks of :func:`~fimoda.memory.solve_columns` right-hand sides, the other kept or streamed.
    ``products_per_column(k)``: full-data products to solve a block of k columns on the
    product route (None: not estimated); ``bound``: it is an upper bound.
    ``extra_columns``: columns solved besides the scores' (the Newton step). ``left_copies``:
    extra copies of a block of left-hand rows (W of the generalized methods); ``left_fresh``:
    its rows are computed afresh, not taken from the cached loss gradients.
    ``example_products``: one per-example Hessian product per left-hand row (Prop. 1).
    ``fixed``: bytes the method holds besides (a basis, a dense matrix). ``product_rows``:
    training rows per product (default: all n; stochastic LiSSA: its batch)."""
    r, refusal = _rows(shape)
    try:
        cols = solve_columns(shape.memory, shape.P, shape.dtype)
    except MemoryBudgetError as e:
        refusal = refusal or str(e)
    if refusal:
        return _refused(name, shape, refusal)
    T, nl = shape.n_test, shape.n_left
    solved, other = ("test", "left") if T <= nl else ("left", "test")
    k, m = (T, nl) if solved == "test" else (nl, T)
    blocks = math.ceil(k / cols)
    other_kept = shape.keeps(other)
    w = 1 + left_copies                        # rows of a left-hand block alive per row
    w_solved, w_other = (w, 1) if solved == "left" else (1, w)

    def new(side, count):               # rows not already held by the Attributor
        return 0 if side in shape.cached and not (side == "left" and left_fresh) else count
    rows = new(solved, k) + new(other, m) * (1 if other_kept else blocks)
    if cfg.damping is None and not shape.keeps("left") and "left" not in shape.cached:
        rows += nl                             # lambda_G, summed over a streamed pass
    mat = gauss_newton_materialised(shape, hessian, cfg)
    products = 0
    if mat:
        rows += shape.n                        # Phi: output gradients of the training set
        fixed += _gn_bytes(shape)
    else:                                      # a product's gradient, graph and result vectors
        fixed += PRODUCT_COPIES * shape.row
        products = None
        if products_per_column is not None:
            per_block = [min(cols, k - a) for a in range(0, k, cols)]
            products = sum(products_per_column(c) for c in per_block)
            if extra_columns:
                products += products_per_column(extra_columns)
    kept_side = k * shape.row * w_solved if shape.keeps(solved) else 0  # its cache, besides B
    if left_fresh and cfg.damping is None and shape.keeps("left"):
        fixed += nl * shape.row                # lambda_G's cached loss gradients, besides W
    other_bytes = (m if other_kept else CHUNK_COPIES * min(r, m)) * w_other * shape.row
    block = (SOLVE_COPIES + w_solved - 1) * min(k, cols) * shape.row
    peak = block + kept_side + other_bytes + fixed + _vmap_bytes(shape, r) + _scores_bytes(shape)
    return Cost(name, peak, shape.memory, rows, products, bound,
                shape.n if product_rows is None else product_rows, shape.hvp_batch,
                0 if other_kept else r, min(k, cols),
                example_products=(nl if (other_kept or solved == "left") else nl * blocks)
                if example_products else 0)


def arnoldi_cost(name: str, shape: Shape, cfg, basis_bytes: int) -> Cost:
    """Arnoldi: m products with one vector each (none when Phi is materialised), its basis, and
    both sides projected on the k Ritz vectors as they come (:meth:`.common.Attributor.
    grad_blocks`)."""
    if basis_bytes > cfg.memory_gb * GIB:
        return _refused(name, shape, f"the Arnoldi basis needs {fmt_bytes(basis_bytes)} > "
                                     f"memory_gb={cfg.memory_gb}: lower n_iter= or raise "
                                     f"memory_gb=")
    base = pairwise_cost(name, shape)
    if base.refusal:
        return base
    m = min(max(cfg.n_iter, min(cfg.rank, shape.P)), shape.P)
    mat = gauss_newton_materialised(shape, cfg.hessian, cfg)
    rows = base.gradient_rows                  # each side streamed once, not per test block
    if not shape.keeps("test") and not shape.keeps("left") and "left" not in shape.cached:
        rows -= shape.n_left * (math.ceil(shape.n_test / base.chunk_rows) - 1)
    extra = _gn_bytes(shape) if mat else PRODUCT_COPIES * shape.row
    return Cost(name, base.peak_bytes + basis_bytes + extra, shape.memory,
                rows + (shape.n if mat else 0), 0 if mat else m, False, shape.n,
                shape.hvp_batch, base.chunk_rows, 0)


def trak_cost(name: str, shape: Shape, cfg) -> Cost:
    """TRAK: output gradients of all n training rows, the left-out and the test rows, projected
    chunk by chunk to k dimensions; its k x k kernel and the projector."""
    r, refusal = _rows(shape)
    if refusal and cfg.chunk is None and cfg.grad_bytes is None:
        return _refused(name, shape, refusal + " (or give TRAK grad_bytes= / chunk=)")
    if cfg.chunk is not None:
        chunk = cfg.chunk
    else:
        chunk = max(1, int(cfg.grad_bytes // shape.row)) if cfg.grad_bytes is not None else r
    k = shape.P if cfg.skip_projection and cfg.proj_dim >= shape.P else cfg.proj_dim
    item = shape.dtype.itemsize
    if k == shape.P and cfg.skip_projection:
        proj = 0
    else:
        size = shape.P * (8 + item) if cfg.proj_type == "sjlt" else shape.P * k * item
        proj = size if size <= cfg.cache_bytes else cfg.block_elems * item
    feats = (shape.n_left + shape.n_test) * k * 8
    peak = (CHUNK_COPIES * min(chunk, shape.n) * shape.row + proj + 3 * k * k * 8 + feats
            + chunk * k * 8 + _vmap_bytes(shape, chunk) + _scores_bytes(shape))
    n_rows = shape.n + shape.n_left + shape.n_test
    return Cost(name, peak, shape.memory, n_rows, 0, False, shape.n, shape.hvp_batch,
                min(chunk, max(shape.n, shape.n_left, shape.n_test)), 0)


def ekfac_cost(name: str, shape: Shape, cfg) -> Cost:
    """EK-FAC (:mod:`.ekfac`): two factor-fitting passes over the n training rows, then per
    block of test rows (a quarter of the budget: :func:`~fimoda.memory.kept_rows` of the
    factored layers' parameters) one pass over the block and one over the left-out rows, in
    batches of ``batch_size``; per-example layer gradients come from those batched passes, never
    as whole gradient rows, except lambda_G's loss gradients of the left-out rows (damping not
    given). Held: the factors (float64), the test block rotated, the examples of one layer of
    one batch rotated at once (:func:`~fimoda.memory.rotation_rows`, with their copies), the
    scores."""
    if not shape.layers:                # no layer to factor: EK-FAC refuses by itself
        return Cost(name, 0, shape.memory, 0, 0, False, shape.n, shape.hvp_batch, 0, 0)
    P_f = sum(o * i for o, i in shape.layers)
    try:
        step = kept_rows(shape.memory, P_f, shape.dtype, EKFAC_TEST_ROW)
    except MemoryBudgetError as e:
        return _refused(name, shape, str(e))
    T, nl, item = shape.n_test, shape.n_left, shape.dtype.itemsize
    factors = sum((o * o + i * i) * 2 + o * i * 2 for o, i in shape.layers) * 8
    batch = min(cfg.batch_size, max(shape.n, T, nl))
    work = min(step, T) * P_f * item + max(
        ROTATION_COPIES * min(batch, rotation_rows(shape.memory, o * i, shape.dtype)) * o * i
        * item
        for o, i in shape.layers)
    rows, lam = 0, 0
    if cfg.damping is None and cfg.damping_mode == "lambda_G" and "left" not in shape.cached:
        rows = nl                       # lambda_G: the left-out loss gradients, once
        if shape.keeps("left"):
            lam = nl * shape.row        # kept by the Attributor
        else:
            r, refusal = _rows(shape)
            if refusal:
                return _refused(name, shape, refusal)
            lam = CHUNK_COPIES * min(r, nl) * shape.row + _vmap_bytes(shape, r)
    elif "left" in shape.cached:
        lam = nl * shape.row
    peak = factors + work + lam + _scores_bytes(shape)
    captured = 2 * shape.n + T + nl * math.ceil(T / step)
    return Cost(name, peak, shape.memory, rows, 0, False, shape.n, shape.hvp_batch, 0, 0,
                captured_rows=captured, capture_batch=batch)


def side_rows_per_pass(memory: int, n_params: int, dtype) -> int:
    """DataInf: test and left-out gradient rows held together during one pass over the training
    set when they are streamed: half the budget (the other half is the training chunk's)."""
    return max(1, (memory // 2) // row_bytes(n_params, dtype))


def _grouped_passes(blocks: list, cap: int) -> int:
    """Passes of :func:`.datainf._side_blocks`' greedy grouping of ``blocks`` (row counts) into
    groups of at most ``cap`` rows (a block larger than ``cap`` alone)."""
    passes, held = 0, 0
    for b in blocks:
        if held and held + b > cap:
            passes, held = passes + 1, 0
        held += b
    return passes + (1 if held else 0)


def datainf_cost(name: str, shape: Shape, cfg) -> Cost:
    """DataInf: the training set (or its subsample of m rows) streamed once when both sides are
    kept, else once per group of side blocks that half the budget holds together
    (:func:`side_rows_per_pass`); then the test blocks against the left-out blocks, streamed
    again unless kept; inner products of every layer with every training row kept."""
    r, refusal = _rows(shape)
    if refusal:
        return _refused(name, shape, refusal)
    T, nl = shape.n_test, shape.n_left
    kt, kl = shape.keeps("test"), shape.keeps("left")
    m = shape.n if cfg.n_samples is None else min(cfg.n_samples, shape.n)
    chunk = cfg.chunk or r
    split = lambda k, kept: [k] if kept else [min(r, k - a) for a in range(0, k, r)]
    cap = side_rows_per_pass(shape.memory, shape.P, shape.dtype)
    passes = 1 if kt and kl else _grouped_passes(split(T, kt) + split(nl, kl), cap)
    test_blocks = len(split(T, kt))
    inner = (T + nl + 1) * m * shape.tensors * 8               # float64
    held = T + nl if kt and kl else min(T + nl, max(cap, r))
    peak = ((held + CHUNK_COPIES * min(chunk, m)) * shape.row + inner
            + _vmap_bytes(shape, chunk) + _scores_bytes(shape))
    new = (0 if "test" in shape.cached else T) + (0 if "left" in shape.cached else nl)
    again = (0 if kt else T) + (0 if kl else nl * test_blocks)   # the scores' pass over sides
    return Cost(name, peak, shape.memory, new + again + m * passes, 0, False, shape.n,
                shape.hvp_batch, min(chunk, m), 0)


def trajectory_cost(name: str, shape: Shape, cfg) -> Cost:
    """The trajectory-matched influence: both sides kept whatever the budget, the materialised
    Gauss-Newton matrix (or Krylov products, not estimated here)."""
    T, nl = shape.n_test, shape.n_left
    mat = gauss_newton_materialised(shape, cfg.hessian, cfg)
    peak = (2 * (T + nl) * shape.row + (_gn_bytes(shape) if mat else 0)
            + _vmap_bytes(shape, T + nl) + _scores_bytes(shape))
    new = (0 if "test" in shape.cached else T) + (0 if "left" in shape.cached else nl)
    return Cost(name, peak, shape.memory, new + (shape.n if mat else 0), 0 if mat else None,
                False, shape.n, shape.hvp_batch, 0, 0)
