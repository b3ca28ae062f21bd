"""Same-slice box overlap on the host (NumPy), for MAM and NRM post-processing.

Mining compares boxes only within one slice: a proposal on slice ``s`` can be explained only by an
annotation on slice ``s``. Slices are identified by an integer *slice key* (a row of the mining
run's slice table, see :mod:`uld_jax.mine.run`), so the comparison is a join on that key: the rows of
both sets are sorted by key and every pair that shares a key is formed without a Python loop. At
paper scale (1.43M proposals, a few annotations per slice) the number of pairs is about the number
of proposals.

Boxes are internal ``[y1, x1, y2, x2]`` in continuous pixel coordinates of the preprocessed slice
(see :mod:`uld_jax.core`): the area of a box is ``(y2 - y1) * (x2 - x1)``; boxes with non-positive
height or width (or non-finite coordinates) have area 0 and overlap nothing.

Overlap rule used by mining (one rule, stated once): two boxes on the same slice *overlap* when
their IoU is strictly greater than a threshold; with the default threshold 0.0 that means any
intersection of positive area (boxes that only touch along an edge or a corner do not overlap).
"""

from __future__ import annotations

import numpy as np


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas in square pixels, 0 for degenerate or non-finite boxes. ``boxes`` [N, 4] -> [N] float64."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h = b[:, 2] - b[:, 0]
    w = b[:, 3] - b[:, 1]
    ok = np.all(np.isfinite(b), axis=1) & (h > 0) & (w > 0)
    return np.where(ok, np.where(ok, h, 0.0) * np.where(ok, w, 0.0), 0.0)


def _paired_intersection(a: np.ndarray, b: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    """Intersection areas of row-aligned [N, 4] float64 pairs; 0 where either box has no area."""
    ih = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    iw = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    return np.where((ih > 0) & (iw > 0) & (area_a > 0) & (area_b > 0), ih * iw, 0.0)


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of row-aligned box pairs. ``a``, ``b``: [N, 4] -> [N] float64 in [0, 1]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = box_area(a)
    area_b = box_area(b)
    inter = _paired_intersection(a, b, area_a, area_b)
    union = area_a + area_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def paired_iobb(det: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Intersection over the area of ``det`` (IoBB) of row-aligned pairs. [N, 4], [N, 4] -> [N]."""
    det = np.asarray(det, dtype=np.float64).reshape(-1, 4)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1, 4)
    area_d = box_area(det)
    inter = _paired_intersection(det, ref, area_d, box_area(ref))
    return np.where(area_d > 0, inter / np.where(area_d > 0, area_d, 1.0), 0.0)


def same_key_pairs(q_key: np.ndarray, r_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs ``(i, j)`` with ``q_key[i] == r_key[j]``.

    ``q_key`` [N], ``r_key`` [M] integer keys -> (``qi`` [K], ``rj`` [K]) int64, ordered by ``qi``
    then by ``j``. Memory is O(K): K is the number of same-key pairs, not N * M.
    """
    q_key = np.asarray(q_key).reshape(-1)
    r_key = np.asarray(r_key).reshape(-1)
    order = np.argsort(r_key, kind="stable")
    r_sorted = r_key[order]
    lo = np.searchsorted(r_sorted, q_key, side="left")
    hi = np.searchsorted(r_sorted, q_key, side="right")
    counts = hi - lo
    total = int(counts.sum())
    qi = np.repeat(np.arange(q_key.size, dtype=np.int64), counts)
    seg_start = np.repeat(np.cumsum(counts) - counts, counts)
    rj = order[np.repeat(lo, counts) + (np.arange(total, dtype=np.int64) - seg_start)]
    return qi, rj.astype(np.int64)


def max_iou_same_key(
    q_key: np.ndarray, q_box: np.ndarray, r_key: np.ndarray, r_box: np.ndarray
) -> np.ndarray:
    """For each query box, its largest IoU with a reference box of the same key (0 if none).

    ``q_key`` [N] int, ``q_box`` [N, 4]; ``r_key`` [M] int, ``r_box`` [M, 4] -> [N] float64.
    """
    q_box = np.asarray(q_box, dtype=np.float64).reshape(-1, 4)
    r_box = np.asarray(r_box, dtype=np.float64).reshape(-1, 4)
    out = np.zeros(q_box.shape[0], dtype=np.float64)
    qi, rj = same_key_pairs(q_key, r_key)
    if qi.size:
        iou = paired_iou(q_box[qi], r_box[rj])
        np.maximum.at(out, qi, iou)
    return out


def overlaps_same_key(
    q_key: np.ndarray,
    q_box: np.ndarray,
    r_key: np.ndarray,
    r_box: np.ndarray,
    min_iou: float = 0.0,
) -> np.ndarray:
    """True where a query box overlaps (IoU > ``min_iou``) a reference box of the same key. -> [N] bool."""
    return max_iou_same_key(q_key, q_box, r_key, r_box) > float(min_iou)


def greedy_dedupe_same_key(
    key: np.ndarray, box: np.ndarray, rank: np.ndarray, max_iou: float
) -> np.ndarray:
    """Greedy non-maximum suppression within each key, best ``rank`` (smallest) first.

    A box is dropped when its IoU with an already kept box of the same key is > ``max_iou``.
    ``key`` [N] int, ``box`` [N, 4], ``rank`` [N] (ties broken by row order) -> keep [N] bool.
    """
    key = np.asarray(key).reshape(-1)
    box = np.asarray(box, dtype=np.float64).reshape(-1, 4)
    rank = np.asarray(rank).reshape(-1)
    n = key.size
    keep = np.ones(n, dtype=bool)
    if n == 0:
        return keep
    order = np.lexsort((np.arange(n), rank, key))
    k_sorted = key[order]
    starts = np.flatnonzero(np.r_[True, k_sorted[1:] != k_sorted[:-1]])
    ends = np.r_[starts[1:], n]
    for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        rows = order[s:e]
        kept: list[int] = []
        for r in rows:
            if kept:
                iou = paired_iou(np.repeat(box[r][None], len(kept), axis=0), box[kept])
                if np.any(iou > max_iou):
                    keep[r] = False
                    continue
            kept.append(int(r))
    return keep
