"""Stacking 2D detections on consecutive slices into 3D boxes (the paper's volumetric inference).

Rule (the paper: "2D boxes on consecutive slices are stacked if their IoU > 0.5"; the details below
are this project's, documented because the paper leaves them open):

* Two 2D boxes can be linked when they are in the same volume, on slices z and z + 1 exactly
  (a slice without a linked box ends a track), and their IoU is strictly greater than
  ``iou_threshold`` (default 0.5). IoU uses the inclusive +1 pixel convention of the released
  evaluation, boxes ``[x1, y1, x2, y2]`` inclusive pixel indices.
* Each box links to at most one box on the next slice and at most one on the previous slice
  (tracks are chains, never trees). Between two consecutive slices the links are chosen greedily:
  candidate pairs in decreasing IoU order, ties broken by the smaller input index of the box on
  slice z, then of the box on slice z + 1; a pair is taken when neither box is linked yet on that
  side. (Computed for all slice pairs at once as the fixpoint of "take every pair that is the
  best remaining pair of both of its boxes", which selects exactly the greedy matching.)
* A track (chain) becomes one 3D box: x/y extent = the union (min / max) of its 2D boxes, z from
  its first to its last slice, all inclusive. Its score is the maximum of its 2D scores
  (``score_mode="max"``, default; a lesion is as certain as its most confident slice) or their
  mean (``"mean"``). A lone 2D box becomes a one-slice 3D box.
* Output order: tracks ordered by volume, first slice, then decreasing score of the track's first
  box, then input index (deterministic).

Vectorised over slices: detections are laid out per slice in padded arrays, every
consecutive-slice pair is a dense K x K broadcast (chunks of slice pairs, a float32 necessary-
condition prefilter, then the exact float64 IoU of the survivors), the matching runs as a few
whole-array rounds, and chains are resolved by pointer jumping. Results are identical to a
per-detection loop (tests/evaluate_oracles.py, benchmarks/bench_evaluate.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from uld_jax.evaluate.boxes import EvaluationInputError, group_pairs, pair_overlap

_CHUNK_PAIRS = 1 << 19  # K x K pairs per prefilter chunk (cache-sized float32 buffers)


@dataclasses.dataclass
class Stacked3D:
    """Result of :func:`stack_slices`.

    ``boxes``: [T, 6] float64 inclusive ``[x1, y1, z1, x2, y2, z2]`` (z in the input's slice
    numbering); ``scores``: [T]; ``volume``: [T] int, the volume id of each track;
    ``num_slices``: [T] int; ``track``: [N] int, the track of each input detection (input order).
    """

    boxes: np.ndarray
    scores: np.ndarray
    volume: np.ndarray
    num_slices: np.ndarray
    track: np.ndarray

    def to_volume_dicts(
        self, names: Sequence[str], slice_index: np.ndarray, boxes_2d: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The 1K set's structure for evaluation.

        ``names``: volume id -> sub-volume name. ``slice_index`` / ``boxes_2d``: the inputs given to
        :func:`stack_slices`. Returns ``(pred, slice_boxes)``: ``pred[name]`` = n x 7
        ``[x1,y1,z1,x2,y2,z2,score]``; ``slice_boxes[name]`` = m x 6 ``[det_index, z, x1, y1, x2,
        y2]`` (the member 2D boxes, ``det_index`` = row of ``pred[name]``) for the paper's hit rule.
        Every name gets an entry (possibly empty).
        """
        pred: dict[str, np.ndarray] = {}
        sb: dict[str, np.ndarray] = {}
        row_in_volume = np.zeros(len(self.scores), np.int64)
        for v in range(len(names)):
            sel = np.flatnonzero(self.volume == v)
            row_in_volume[sel] = np.arange(len(sel))
            pred[names[v]] = np.hstack([self.boxes[sel], self.scores[sel, None]])
        det_vol = self.volume[self.track] if len(self.track) else np.zeros(0, np.int64)
        rows = np.column_stack([row_in_volume[self.track], np.asarray(slice_index, np.float64),
                                np.asarray(boxes_2d, np.float64)]) if len(self.track) else np.zeros((0, 6))
        for v in range(len(names)):
            r = rows[det_vol == v]
            sb[names[v]] = r[np.lexsort((r[:, 1], r[:, 0]))] if len(r) else np.zeros((0, 6))
        return pred, sb


def _validate(slice_index, boxes, scores, volume):
    z = np.asarray(slice_index)
    b = np.asarray(boxes, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n = len(z)
    v = np.zeros(n, np.int64) if volume is None else np.asarray(volume)
    if b.shape != (n, 4) or s.shape != (n,) or v.shape != (n,):
        raise EvaluationInputError(
            f"stacking: shapes slice_index {z.shape}, boxes {b.shape}, scores {s.shape}, volume {v.shape}; "
            "expected [N], [N, 4], [N], [N]")
    if n and (z.astype(np.int64) != z).any():
        raise EvaluationInputError("stacking: slice_index must hold integers")
    if n and (v.astype(np.int64) != v).any():
        raise EvaluationInputError("stacking: volume must hold integers")
    bad = ~(np.isfinite(b).all(1) & np.isfinite(s))
    bad |= ((b[:, 2:] - b[:, :2] + 1.0) <= 0).any(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise EvaluationInputError(f"stacking: detection {i} is non-finite or inverted: box {b[i].tolist()}, score {s[i]}")
    return z.astype(np.int64), b, s, v.astype(np.int64)


def _prefilter(a: np.ndarray, c: np.ndarray, t: float, slack: float, bufs) -> np.ndarray:
    """Necessary condition for IoU > t on all pairs of ``a`` [4, S, K] x ``c`` [4, S, K] (float32,
    coordinate-major): returns a bool [S, K, K] mask.

    IoU > t implies inter > t * max(area_a, area_c); as the y overlap is at most either box's
    height, the x overlap (+1) exceeds t * max(wa, wc) (+1 widths), and likewise for y. With raw
    coordinates: ``overlap > t * max_extent + (t - 1)``. Tested with ``slack`` (well above
    float32 rounding) so no qualifying pair is lost; survivors get the exact float64 IoU.
    """
    f1, f2, m, m2 = bufs
    for lo, hi, out in ((0, 2, m), (1, 3, m2)):
        alo, ahi = a[lo][:, :, None], a[hi][:, :, None]
        clo, chi = c[lo][:, None, :], c[hi][:, None, :]
        np.minimum(ahi, chi, out=f1)
        np.maximum(alo, clo, out=f2)
        np.subtract(f1, f2, out=f1)                       # raw overlap
        np.maximum(ahi - alo, chi - clo, out=f2)          # raw max extent
        f2 *= np.float32(t)
        f2 += np.float32(t - 1.0 - slack)
        np.greater(f1, f2, out=out)
    m &= m2
    return m


def _candidate_edges(z, b, v, order, iou_threshold):
    """(prev, cur, iou) of all pairs on consecutive slices of one volume with IoU > threshold.

    Detections are laid out per slice ("group") in padded arrays (NaN padding never passes) so that
    each consecutive-slice pair is one dense K x K broadcast: a float32 prefilter (see
    :func:`_prefilter`) on chunks of slice pairs, then the exact float64 IoU on the survivors.
    """
    zs, vs = z[order], v[order]
    n = len(order)
    new_group = np.ones(n, bool)
    new_group[1:] = (zs[1:] != zs[:-1]) | (vs[1:] != vs[:-1])
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.append(starts, n))
    gz, gv = zs[starts], vs[starts]
    linked = (gz[1:] == gz[:-1] + 1) & (gv[1:] == gv[:-1])  # group j -> group j + 1
    js = np.flatnonzero(linked)
    if len(js) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    k = int(sizes.max())
    g = len(starts)
    if g * k > 8 * n + (1 << 20):  # very uneven slices: padding would waste memory; use pair lists
        return _candidate_edges_sparse(b, order, starts, sizes, js, iou_threshold)
    group_of = np.repeat(np.arange(g), sizes)
    slot = np.arange(n) - starts[group_of]
    padded = np.full((g, k, 4), np.nan)
    padded[group_of, slot] = b[order]
    det_at = np.full((g, k), -1, np.int64)
    det_at[group_of, slot] = order
    # float32, coordinate-major [4, G, K], recentred so float32 keeps ~1e-4 px precision
    shift = np.array([b[:, 0].min(), b[:, 1].min(), b[:, 0].min(), b[:, 1].min()])
    p32 = np.ascontiguousarray((padded - shift).transpose(2, 0, 1)).astype(np.float32)
    slack = 0.01 + 1e-6 * float(max(np.abs(b - shift).max(), 1.0))
    step = max(1, _CHUNK_PAIRS // (k * k))
    bufs_full = (np.empty((step, k, k), np.float32), np.empty((step, k, k), np.float32),
                 np.empty((step, k, k), bool), np.empty((step, k, k), bool))
    out_p, out_c, out_iou = [], [], []
    for lo in range(0, len(js), step):
        j = js[lo:lo + step]
        bufs = tuple(x[:len(j)] for x in bufs_full)
        m = _prefilter(p32[:, j], p32[:, j + 1], iou_threshold, slack, bufs)
        flat = np.flatnonzero(m)  # 1D nonzero + divmod: far faster than 3D np.nonzero
        jj, rest = np.divmod(flat, k * k)
        ka, kc = np.divmod(rest, k)
        iou = pair_overlap(padded[j[jj], ka], padded[j[jj] + 1, kc], None, None, "iou")
        keep = iou > iou_threshold
        jj, ka, kc = jj[keep], ka[keep], kc[keep]
        out_p.append(det_at[j[jj], ka])
        out_c.append(det_at[j[jj] + 1, kc])
        out_iou.append(iou[keep])
    return np.concatenate(out_p), np.concatenate(out_c), np.concatenate(out_iou)


def _candidate_edges_sparse(b, order, starts, sizes, js, iou_threshold):
    """As :func:`_candidate_edges` without padding: explicit (a, c) pair lists per chunk."""
    out_p, out_c, out_iou = [], [], []
    npairs = sizes[js] * sizes[js + 1]
    bounds = np.searchsorted(np.cumsum(npairs), np.arange(0, int(npairs.sum()), 1 << 22), side="right")
    bounds = np.unique(np.r_[bounds, len(js)])
    lo = 0
    for hi in bounds:
        if hi <= lo:
            continue
        j = js[lo:hi]
        ia, ic = group_pairs(sizes[j], sizes[j + 1])
        a_first = np.concatenate([[0], np.cumsum(sizes[j])[:-1]])
        c_first = np.concatenate([[0], np.cumsum(sizes[j + 1])[:-1]])
        grp = np.repeat(np.arange(len(j)), sizes[j] * sizes[j + 1])
        pa = order[starts[j][grp] + ia - a_first[grp]]
        pc = order[starts[j + 1][grp] + ic - c_first[grp]]
        iou = pair_overlap(b[pa], b[pc], None, None, "iou")
        keep = iou > iou_threshold
        out_p.append(pa[keep])
        out_c.append(pc[keep])
        out_iou.append(iou[keep])
        lo = hi
    return np.concatenate(out_p), np.concatenate(out_c), np.concatenate(out_iou)


def _greedy_matching(p, c, iou, n):
    """Greedy (IoU desc, then p, then c) one-to-one matching, as a fixpoint of mutual-best rounds."""
    if len(p) == 0:
        return p, c
    rank = np.empty(len(p), np.int64)
    rank[np.lexsort((c, p, -iou))] = np.arange(len(p))
    alive = np.arange(len(p))
    taken_p, taken_c = [], []
    used_p = np.zeros(n, bool)
    used_c = np.zeros(n, bool)
    big = np.iinfo(np.int64).max
    while len(alive):
        ap, ac, ar = p[alive], c[alive], rank[alive]
        best_p = np.full(n, big, np.int64)
        best_c = np.full(n, big, np.int64)
        np.minimum.at(best_p, ap, ar)
        np.minimum.at(best_c, ac, ar)
        win = (best_p[ap] == ar) & (best_c[ac] == ar)
        taken_p.append(ap[win])
        taken_c.append(ac[win])
        used_p[ap[win]] = True
        used_c[ac[win]] = True
        alive = alive[~(used_p[ap] | used_c[ac])]
    return np.concatenate(taken_p), np.concatenate(taken_c)


def stack_slices(
    slice_index: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    volume: np.ndarray | None = None,
    *,
    iou_threshold: float = 0.5,
    score_mode: str = "max",
) -> Stacked3D:
    """Stacks 2D detections into 3D boxes (see the module docstring for the exact rule).

    ``slice_index``: [N] int slice of each detection; ``boxes``: [N, 4] inclusive ``[x1, y1, x2,
    y2]`` pixel indices (convert internal ``[y1, x1, y2, x2]`` boxes with
    :func:`uld_jax.core.internal_to_inclusive_xyxy`); ``scores``: [N]; ``volume``: [N] int volume
    id (detections of different volumes never link; default: one volume). Returns
    :class:`Stacked3D`.
    """
    if score_mode not in ("max", "mean"):
        raise ValueError(f"score_mode must be 'max' or 'mean', got {score_mode!r}")
    z, b, s, v = _validate(slice_index, boxes, scores, volume)
    n = len(z)
    if n == 0:
        e = np.zeros(0, np.int64)
        return Stacked3D(np.zeros((0, 6)), np.zeros(0), e, e, e)
    # order = by volume, slice, decreasing score, input index (two stable sorts beat lexsort)
    by_score = np.argsort(-s, kind="stable")
    vz = (v - v.min()) * (int(z.max()) - int(z.min()) + 1) + (z - z.min())
    order = by_score[np.argsort(vz[by_score], kind="stable")]
    p, c, iou = _candidate_edges(z, b, v, order, iou_threshold)
    mp, mc = _greedy_matching(p, c, iou, n)
    prev = np.arange(n)
    prev[mc] = mp
    root = prev
    while True:  # pointer jumping: every detection -> the first detection of its chain
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    # tracks in the order of their root in `order` (no sort needed: filter `order` to roots)
    roots = order[root[order] == order]
    tid = np.empty(n, np.int64)
    tid[roots] = np.arange(len(roots))
    track = tid[root]
    t = len(roots)
    perm = order[np.argsort(track[order], kind="stable")]  # nearly sorted: timsort runs are long
    tstart = np.searchsorted(track[perm], np.arange(t))
    zf = z.astype(np.float64)
    out = np.empty((t, 6))
    out[:, 0] = np.minimum.reduceat(b[perm, 0], tstart)
    out[:, 1] = np.minimum.reduceat(b[perm, 1], tstart)
    out[:, 2] = np.minimum.reduceat(zf[perm], tstart)
    out[:, 3] = np.maximum.reduceat(b[perm, 2], tstart)
    out[:, 4] = np.maximum.reduceat(b[perm, 3], tstart)
    out[:, 5] = np.maximum.reduceat(zf[perm], tstart)
    count = np.bincount(track, minlength=t)
    if score_mode == "max":
        sc = np.maximum.reduceat(s[perm], tstart)
    else:
        sc = np.add.reduceat(s[perm], tstart) / count
    return Stacked3D(out, sc, v[roots], count, track)
