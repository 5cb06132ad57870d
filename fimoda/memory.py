"""The memory budget of attribution: how many per-example gradient rows may be alive at once.

Per-example gradients of a model with P parameters take P floats each, so a method that held
them for the whole training set would need n x P floats (91 GB for 1,000 sentences on a
22.7 M-parameter encoder in float32). Every method instead streams them in chunks whose row
count is derived from one budget in bytes (``memory=``, default :data:`DEFAULT_FRACTION` of the
memory the device has free when the work is set up) and consumes each chunk at once. Half the
budget is for a streamed chunk (the gradient rows, the batched-gradient copy they are written
from, and one transformed copy such as normalised rows: :data:`CHUNK_COPIES` in all); the other
half is for what a method keeps, e.g. the test and left-out gradients when their count allows
(:func:`storable`, a quarter each). The damped-inverse methods solve for a block of gradient
rows at once (the right-hand sides): the columns of one block and the solver's copies of it
(:data:`SOLVE_COPIES`) take half the budget (:func:`solve_columns`), the other side's gradients
the other half, kept or streamed.
"""
from __future__ import annotations

import os

import torch

# share of the device's free memory a budget takes when none is given
DEFAULT_FRACTION = 0.5
# copies of a streamed chunk alive at once: the rows, vmap's batched gradients, one transform
CHUNK_COPIES = 3
# copies of a block of right-hand sides a solver holds at once: block CG's B, X, R, their copies
# for the columns still moving, search directions and their products, the orthonormalisation's
# copies and the temporaries of each update (LiSSA's recurrence holds fewer)
SOLVE_COPIES = 16


def available_bytes(device) -> int:
    """Free memory of ``device`` in bytes: the GPU's free memory for CUDA, the machine's
    available memory otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:          # Linux: MemAvailable, in kB
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resolve_budget(memory, device) -> int:
    """``memory`` (bytes, > 0) as an int, or :data:`DEFAULT_FRACTION` of
    :func:`available_bytes` when it is None. A non-positive budget is a ValueError."""
    if memory is None:
        return int(DEFAULT_FRACTION * available_bytes(device))
    if isinstance(memory, bool) or not memory > 0:
        raise ValueError(f"memory must be a positive number of bytes or None, got {memory!r}")
    return int(memory)


def row_bytes(n_params: int, dtype) -> int:
    """Bytes of one per-example gradient row of ``n_params`` parameters in ``dtype``."""
    return int(n_params) * torch.empty((), dtype=dtype).element_size()


def _fitting(memory: int, copies: int, row: int, too_big: str) -> int:
    """How many units of ``copies`` rows of ``row`` bytes fit in half of ``memory``; a
    :class:`fimoda.influence.errors.MemoryBudgetError` saying ``too_big`` when not even one."""
    k = (memory // 2) // (copies * row)
    if k < 1:
        from .influence.errors import MemoryBudgetError
        raise MemoryBudgetError(f"{too_big}, and {2 * copies} of them must fit in "
                                f"memory={memory:,} bytes: raise memory= or attribute fewer "
                                f"parameters (names=)")
    return int(k)


def chunk_rows(memory: int, n_params: int, dtype) -> int:
    """Gradient rows streamed at once within half of ``memory`` (:data:`CHUNK_COPIES` copies);
    a :class:`fimoda.influence.errors.MemoryBudgetError` naming the settings to change when not
    even one row fits."""
    row = row_bytes(n_params, dtype)
    return _fitting(memory, CHUNK_COPIES, row,
                    f"one per-example gradient of {n_params:,} parameters takes {row:,} bytes")


def solve_columns(memory: int, n_params: int, dtype) -> int:
    """Right-hand sides (gradient rows of ``n_params`` parameters) a solver takes at once within
    half of ``memory`` (:data:`SOLVE_COPIES` copies of the block); a
    :class:`fimoda.influence.errors.MemoryBudgetError` naming the settings to change when not
    even one fits."""
    row = row_bytes(n_params, dtype)
    return _fitting(memory, SOLVE_COPIES, row,
                    f"a solver holds {SOLVE_COPIES} vectors of {n_params:,} parameters ({row:,} "
                    f"bytes each) per right-hand side")


def kept_rows(memory: int, n_params: int, dtype, what: str = "one gradient row") -> int:
    """Rows of ``n_params`` floats kept together within a quarter of ``memory`` (one side's
    block, held while the other side streams past it); a
    :class:`fimoda.influence.errors.MemoryBudgetError` naming ``what`` when not even one fits."""
    row = row_bytes(n_params, dtype)
    return _fitting(memory, 2, row, f"{what} of {n_params:,} parameters takes {row:,} bytes")


# copies of a block of rotated layer gradients alive at once: an intermediate of the rotation,
# its result, and the result squared or divided by the eigenvalues
ROTATION_COPIES = 3


def rotation_rows(memory: int, n_params: int, dtype) -> int:
    """Examples whose layer gradients of ``n_params`` floats are transformed at once (EK-FAC's
    rotation into the eigenbasis): :data:`ROTATION_COPIES` copies within a quarter of
    ``memory``; at least one."""
    return max(1, (memory // 4) // (ROTATION_COPIES * row_bytes(n_params, dtype)))


def storable(memory: int, rows: int, n_params: int, dtype) -> bool:
    """Whether ``rows`` gradient rows may be kept whole: at most a quarter of ``memory``."""
    return rows * row_bytes(n_params, dtype) <= memory // 4


__all__ = ["DEFAULT_FRACTION", "CHUNK_COPIES", "SOLVE_COPIES", "ROTATION_COPIES",
           "available_bytes", "resolve_budget", "row_bytes", "chunk_rows", "kept_rows",
           "rotation_rows", "solve_columns", "storable"]
