"""Box validation and vectorised pairwise overlaps in the released "+1 pixel" convention.

All boxes here are in the *external* inclusive formats of the released evaluation code:

* 2D: ``[x1, y1, x2, y2]`` inclusive pixel indices, size ``x2 - x1 + 1``.
* 3D: ``[x1, y1, z1, x2, y2, z2]`` inclusive pixel / slice indices, size ``x2 - x1 + 1`` etc.

(The library's internal continuous format is converted with :mod:`uld_jax.core` helpers at the
edges.) Overlaps are computed on *pairs*: two index arrays select the boxes to compare, so one call
evaluates every (detection, truth) pair of every volume at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class EvaluationInputError(ValueError):
    """A prediction or truth input is malformed; the message names the file, key and row."""


def box_rows(value: Any, ncols: int, *, source: str, key: str, what: str) -> np.ndarray:
    """The shape / dtype half of :func:`as_box_array`: ``value`` as float64 ``[n, ncols]`` (one row
    given flat is accepted, an empty value gives ``(0, ncols)``); values are not checked."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise EvaluationInputError(f"{source}: key {key!r}: not a numeric array ({e}); expected {what}") from e
    if arr.size == 0:
        return np.zeros((0, ncols), dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == ncols:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != ncols:
        raise EvaluationInputError(f"{source}: key {key!r}: array of shape {arr.shape}, expected {what}")
    return arr


def as_box_array(value: Any, ncols: int, *, source: str, key: str, what: str) -> np.ndarray:
    """Validates one volume's box array and returns it as float64 ``[n, ncols]``.

    Accepts an empty list / ``(0,)`` / ``(0, ncols)`` array for "no boxes". Rejects wrong column
    counts, non-finite values and boxes whose size in the +1 convention is not positive
    (``x2 - x1 + 1 <= 0``), naming ``source`` (file), ``key`` (sub-volume / image) and the row.
    ``what`` describes the expected layout for the message, e.g. ``"n x 7 [x1,y1,z1,x2,y2,z2,score]"``.
    """
    arr = box_rows(value, ncols, source=source, key=key, what=what)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise EvaluationInputError(
            f"{source}: key {key!r}: row {row} has a non-finite value {arr[row].tolist()}"
        )
    ndim = 3 if ncols >= 6 else 2
    lo, hi = arr[:, :ndim], arr[:, ndim:2 * ndim]
    inverted = ((hi - lo + 1.0) <= 0).any(axis=1)
    if inverted.any():
        row = int(np.flatnonzero(inverted)[0])
        raise EvaluationInputError(
            f"{source}: key {key!r}: row {row} is an empty/inverted box {arr[row].tolist()} "
            "(need x2 - x1 + 1 > 0 in every axis, inclusive +1 pixel convention)"
        )
    return arr


def pair_overlap(a: np.ndarray, b: np.ndarray, ia: np.ndarray | None, ib: np.ndarray | None,
                 metric: str) -> np.ndarray:
    """Overlap of box pairs ``a[ia[k]]`` vs ``b[ib[k]]`` in the +1 pixel convention.

    ``a``: [Na, 2d(+...)] boxes (2D ``[x1,y1,x2,y2]`` or 3D ``[x1,y1,z1,x2,y2,z2]``; extra trailing
    columns such as scores are ignored), ``b``: [Nb, 2d]; ``ia``, ``ib``: [K] int indices (``None``:
    all rows in order, i.e. row k of ``a`` against row k of ``b``).
    ``metric``: ``"iou"`` (intersection over union), ``"iobb"`` (intersection over the volume of
    the ``a`` box, the detected box), ``"iogt"`` (over the ``b`` box) or ``"iobbgt"`` (max of the
    last two). Returns float64 [K]. The operation order mirrors the released code so that values are
    bit-identical to it.
    """
    d = 3 if b.shape[1] == 6 else 2
    # column-wise gathers from contiguous columns (much faster than gathering strided rows)
    ac = np.ascontiguousarray(a[:, :2 * d].T)
    bc = np.ascontiguousarray(b[:, :2 * d].T)
    inter = size_a = size_b = None
    for k in range(d):
        a_lo, a_hi = (ac[k], ac[k + d]) if ia is None else (ac[k][ia], ac[k + d][ia])
        b_lo, b_hi = (bc[k], bc[k + d]) if ib is None else (bc[k][ib], bc[k + d][ib])
        w = np.maximum(np.minimum(b_hi, a_hi) - np.maximum(b_lo, a_lo) + 1.0, 0.0)
        wa = a_hi - a_lo + 1.0
        wb = b_hi - b_lo + 1.0
        # products accumulate left to right, as the released code's iw * ih * id
        inter = w if inter is None else inter * w
        size_a = wa if size_a is None else size_a * wa
        size_b = wb if size_b is None else size_b * wb
    if metric == "iou":
        return inter / (size_a + size_b - inter)
    if metric == "iobb":
        return inter / size_a
    if metric == "iogt":
        return inter / size_b
    if metric == "iobbgt":
        return np.maximum(inter / size_a, inter / size_b)
    raise ValueError(f"unknown overlap metric {metric!r} (iou, iobb, iogt, iobbgt)")


def open_csv(path: str):
    """``open(path, newline="")`` for reading; a file that cannot be opened raises
    :class:`EvaluationInputError` naming it."""
    try:
        return open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise EvaluationInputError(f"{path}: cannot open ({e})") from e


def group_pairs(a_group_sizes: np.ndarray, b_group_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (a, b) index pairs whose members belong to the same group.

    ``a`` items are laid out group after group (group g owns ``a_group_sizes[g]`` consecutive
    rows), likewise ``b``. Returns ``(ia, ib)``, int64 [sum_g na_g * nb_g], every pair of group g
    in row-major order (a-major). Vectorised: no Python loop over groups.
    """
    na = np.asarray(a_group_sizes, dtype=np.int64)
    nb = np.asarray(b_group_sizes, dtype=np.int64)
    a_start = np.concatenate([[0], np.cumsum(na)[:-1]]) if len(na) else na
    b_start = np.concatenate([[0], np.cumsum(nb)[:-1]]) if len(nb) else nb
    npairs = na * nb
    total = int(npairs.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    g = np.repeat(np.arange(len(na)), npairs)
    pair_start = np.concatenate([[0], np.cumsum(npairs)[:-1]])
    k = np.arange(total, dtype=np.int64) - pair_start[g]
    nbg = nb[g]
    ia = a_start[g] + k // nbg
    ib = b_start[g] + k % nbg
    return ia, ib
