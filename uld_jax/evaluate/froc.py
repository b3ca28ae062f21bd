"""FROC analysis: volumetric (per sub-volume) and key-slice (per image), vectorised and exact.

Counting rules (shared by every rule below; they are those of the authors' released code,
``viggin/DeepLesion_manual_test_set: general_detection_evaluation.py`` for the volumetric 1K set and
``rsummers11/CADLab: MULAN_universal_lesion_analysis/.../DeepLesion/detection_eval.py`` for the key
slices, re-derived here, not copied):

1. Detections of all volumes are pooled and ranked by score, highest first. The ranking is exactly
   ``np.argsort(scores)[::-1]`` on the scores concatenated volume after volume in the truth's key
   order (volumetric) or sorted key order (key slices, as MULAN), so tied scores are ordered as
   the released code orders them on the same numpy.
2. Walking down the ranking, a detection that hits at least one truth of its volume marks every
   truth it hits (one detection may hit several truths); a truth counts once, at its first hit.
   A detection that hits no truth (or whose volume has no truth) is a false positive. A
   detection that hits only truths already hit is *neither* TP nor FP (it is not counted).
3. Point i of the curve: sensitivity = truths hit by detections 0..i / all truths; FPs per volume =
   false positives among 0..i / number of volumes (every volume of the truth, with or without
   truths or detections).
4. Sensitivity at a rate r: 0 if r is left of the curve's first point (r < fp[0]); the last
   sensitivity if r is right of its last point; otherwise linear interpolation of the per-
   detection curve as ``scipy.interpolate.interp1d`` (which delegates to ``np.interp``) evaluates
   it. Because the curve holds one point per detection, equal FP values repeat; ``np.interp``
   then returns the highest sensitivity reached at that FP count, so the reading equals "the most
   truths hit before the FP count exceeds r x volumes". Degenerate curves the released code
   cannot evaluate (0 or 1 detection) are read with the same edge rules (0 detections: all 0).

Hit rules:

* ``"released"`` (the authors' released volumetric protocol): 3D intersection over the *detected*
  box (IoBB) >= 0.3, boxes ``[x1,y1,z1,x2,y2,z2]`` inclusive with the +1 size convention.
* ``"paper"`` (the paper's text): a 3D detection hits a truth when, on some slice z that both
  occupy, the detection's 2D cross-section has IoU > 0.5 (strictly, +1 convention) with the
  truth's 2D cross-section. A released truth is a cuboid, so its cross-section on every slice
  z1..z2 is its ``[x1,y1,x2,y2]`` rectangle. A detection given as a cuboid has the same rectangle
  on each of its slices, so the rule reduces to "z ranges share a slice and xy IoU > 0.5". A
  detection stacked from 2D boxes may carry its per-slice boxes (``slice_boxes``); then its
  cross-section on slice z is the 2D box it was stacked from on that slice (and it has none on
  slices where no 2D box was linked).
* key slices (MULAN): 2D IoU >= 0.5 (+1 convention), or any other overlap metric / threshold,
  e.g. IoBB as in the released ``general_detection_evaluation.py`` 2D mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from uld_jax.evaluate.boxes import EvaluationInputError, as_box_array, box_rows, group_pairs, pair_overlap

VOLUMETRIC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
KEYSLICE_FP_RATES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
RULES: tuple[str, ...] = ("released", "paper")


@dataclasses.dataclass
class FrocResult:
    """One FROC evaluation.

    ``fp_rates``: [R] FPs per volume (or image) at which sensitivity is read; ``sensitivity``: [R];
    ``mean_sensitivity``: mean over ``fp_rates`` (the paper's headline for the 7 volumetric rates;
    MULAN averages the first 4 key-slice rates, see ``mean_of_first``); ``curve_fps`` /
    ``curve_sens``: [D] the per-detection curve; ``curve_scores``: [D] the score of each curve
    point; counts of truths, volumes, detections, truths hit and FPs at the end of the curve.
    """

    rule: str
    fp_rates: np.ndarray
    sensitivity: np.ndarray
    mean_sensitivity: float
    curve_fps: np.ndarray
    curve_sens: np.ndarray
    curve_scores: np.ndarray
    num_truths: int
    num_volumes: int
    num_detections: int
    num_hit: int
    num_fp: int
    notes: list[str] = dataclasses.field(default_factory=list)

    def mean_of_first(self, k: int) -> float:
        return float(np.mean(self.sensitivity[:k]))

    def to_dict(self, with_curve: bool = False) -> dict[str, Any]:
        out = {
            "rule": self.rule,
            "fp_rates": [float(r) for r in self.fp_rates],
            "sensitivity": [float(s) for s in self.sensitivity],
            "mean_sensitivity": float(self.mean_sensitivity),
            "num_truths": self.num_truths,
            "num_volumes": self.num_volumes,
            "num_detections": self.num_detections,
            "num_hit": self.num_hit,
            "num_fp": self.num_fp,
            "notes": list(self.notes),
        }
        if with_curve:
            out["curve_fps"] = self.curve_fps.tolist()
            out["curve_sens"] = self.curve_sens.tolist()
        return out


# --------------------------------------------------------------------------------------------------
# The engine: a curve from hit pairs.
# --------------------------------------------------------------------------------------------------
def curve_from_hits(
    scores: np.ndarray, hit_det: np.ndarray, hit_truth: np.ndarray, num_truths: int, num_volumes: int,
    ignore: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The per-detection FROC curve from the list of (detection, truth) hit pairs.

    ``scores``: [D] float, detections in concatenation order; ``hit_det``/``hit_truth``: [H] int,
    the pairs (detection hits truth); ``num_truths``: G (the denominator of sensitivity; may be 0,
    giving NaN sensitivities); ``num_volumes``: the denominator of FPs per volume.
    Returns ``(order, sens [D], fps_per_volume [D], is_fp [D] in concatenation order)``; ``order``
    [D] is the ranking (``np.argsort(scores)[::-1]``). ``ignore``: [D] bool, detections that are
    never FPs (neither TP nor FP when they hit nothing).
    """
    scores = np.asarray(scores, dtype=np.float64)
    d = len(scores)
    order = np.argsort(scores)[::-1]
    rank = np.empty(d, dtype=np.int64)
    rank[order] = np.arange(d)
    hits_any = np.zeros(d, dtype=bool)
    hits_any[hit_det] = True
    is_fp = ~hits_any
    if ignore is not None:
        is_fp &= ~ignore
    first = np.full(max(num_truths, 0), d, dtype=np.int64)
    if len(hit_det):
        np.minimum.at(first, hit_truth, rank[hit_det])
    tps = np.cumsum(np.bincount(first[first < d], minlength=d)[:d])
    fps = np.cumsum(is_fp[order])
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = tps.astype(np.float64) / num_truths
    fppv = fps.astype(np.float64) / num_volumes
    return order, sens, fppv, is_fp


def sensitivity_at_fp(curve_fps: np.ndarray, curve_sens: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """Reads sensitivities at ``rates`` off a curve with the released edge rules.

    ``curve_fps``: [D] non-decreasing FPs per volume; ``curve_sens``: [D]. Rates left of the
    curve (``r < curve_fps[0]``) give 0, rates right of it the last sensitivity, the rest linear
    interpolation as ``np.interp`` (= ``scipy.interpolate.interp1d(kind='linear')`` on float64).
    An empty curve gives zeros. Returns float64 [R].
    """
    r = np.asarray(rates, dtype=np.float64)
    x = np.asarray(curve_fps, dtype=np.float64)
    y = np.asarray(curve_sens, dtype=np.float64)
    if len(x) == 0:
        return np.zeros(len(r))
    out = np.interp(r, x, y)
    out[r < x[0]] = 0.0
    out[r > x[-1]] = y[-1]
    return out


# --------------------------------------------------------------------------------------------------
# Input handling.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Flat:
    keys: list[str]
    det: np.ndarray          # [D, c]
    det_sizes: np.ndarray    # [V]
    truth: np.ndarray        # [G, c']
    truth_sizes: np.ndarray  # [V]
    notes: list[str]


def _flatten(
    pred: Mapping[str, Any],
    truth: Mapping[str, Any],
    *,
    dim: int,
    keys: Sequence[str] | None,
    missing_as_empty: bool,
    pred_source: str,
    truth_source: str,
) -> _Flat:
    ndet, ntru = (7, 6) if dim == 3 else (5, 4)
    what_det = ("n x 7 [x1,y1,z1,x2,y2,z2,score]" if dim == 3 else "n x 5 [x1,y1,x2,y2,score]")
    what_tru = ("n x 6 [x1,y1,z1,x2,y2,z2]" if dim == 3 else "n x 4 [x1,y1,x2,y2]")
    keys = list(truth.keys()) if keys is None else list(keys)
    notes: list[str] = []
    missing = [k for k in keys if k not in pred]
    if missing and not missing_as_empty:
        raise EvaluationInputError(
            f"{pred_source}: no entry for {len(missing)} volume(s) of {truth_source}, e.g. {missing[0]!r} "
            "(pass missing_as_empty=True / --missing-as-empty to count them as volumes without detections)"
        )
    if missing:
        notes.append(f"{len(missing)} volume(s) without a prediction entry counted as having no detections")
    extra = [k for k in pred.keys() if k not in truth]
    if extra:
        notes.append(f"{len(extra)} predicted volume(s) not in the truth ignored, e.g. {extra[0]!r}")
    dets = [_as_rows(pred.get(k, []), ndet, pred_source, k, what_det) for k in keys]
    trs = [_as_rows(truth[k], ntru, truth_source, k, what_tru) for k in keys]
    det = np.concatenate(dets) if dets else np.zeros((0, ndet))
    tru = np.concatenate(trs) if trs else np.zeros((0, ntru))
    det_sizes = np.array([len(a) for a in dets], np.int64)
    tru_sizes = np.array([len(a) for a in trs], np.int64)
    # value checks on the concatenation; on failure re-check the offending volume for the message
    for arr, sizes, src, n, what in ((det, det_sizes, pred_source, ndet, what_det),
                                     (tru, tru_sizes, truth_source, ntru, what_tru)):
        d = 3 if n >= 6 else 2
        bad = ~np.isfinite(arr).all(axis=1) | ((arr[:, d:2 * d] - arr[:, :d] + 1.0) <= 0).any(axis=1)
        if bad.any():
            v = int(np.searchsorted(np.cumsum(sizes), int(np.flatnonzero(bad)[0]), side="right"))
            as_box_array(arr[sizes[:v].sum():sizes[:v + 1].sum()], n, source=src, key=keys[v], what=what)
    return _Flat(keys, det, det_sizes, tru, tru_sizes, notes)


def _as_rows(value: Any, ncols: int, source: str, key: str, what: str) -> np.ndarray:
    """Shape / dtype check of one volume's array (values are checked on the concatenation)."""
    if isinstance(value, np.ndarray) and value.dtype == np.float64 and value.ndim == 2 and value.shape[1] == ncols:
        return value
    return box_rows(value, ncols, source=source, key=key, what=what)


def _hits_threshold(det, tru, ia, ib, metric, threshold, strict):
    ov = pair_overlap(det, tru, ia, ib, metric)
    hit = ov > threshold if strict else ov >= threshold
    return ia[hit], ib[hit]


def _paper_hits_from_slices(flat: _Flat, slice_boxes: Mapping[str, Any], source: str, threshold: float):
    """Hit pairs of the paper's rule from per-slice 2D boxes of the stacked detections."""
    rows, row_sizes = [], []
    det_start = np.concatenate([[0], np.cumsum(flat.det_sizes)[:-1]])
    for v, k in enumerate(flat.keys):
        what = "m x 6 [det_index, z, x1, y1, x2, y2]"
        sb = _as_rows(slice_boxes.get(k, []), 6, source, k, what)
        if len(sb):
            as_box_array(sb[:, 2:6], 4, source=source, key=k, what=what + " (columns 2..5)")
            di, zz = sb[:, 0], sb[:, 1]
            if not (np.isfinite(di).all() and np.isfinite(zz).all()):
                raise EvaluationInputError(f"{source}: key {k!r}: non-finite det_index or z")
            if (di != np.round(di)).any() or di.min() < 0 or di.max() >= flat.det_sizes[v]:
                raise EvaluationInputError(
                    f"{source}: key {k!r}: det_index must be integers in 0..{flat.det_sizes[v] - 1} "
                    "(rows of the volume's 3D detections)")
            sb = sb.copy()
            sb[:, 0] += det_start[v]
        rows.append(sb)
        row_sizes.append(len(sb))
    sb = np.concatenate(rows) if rows else np.zeros((0, 6))
    ia, ib = group_pairs(np.array(row_sizes), flat.truth_sizes)
    if len(ia) == 0:
        return ia, ib
    z = sb[ia, 1]
    on_slice = (z >= flat.truth[ib, 2]) & (z <= flat.truth[ib, 5])
    ia, ib = ia[on_slice], ib[on_slice]
    boxes2d = sb[:, 2:6]
    tru2d = flat.truth[:, [0, 1, 3, 4]]
    ov = pair_overlap(boxes2d, tru2d, ia, ib, "iou")
    hit = ov > threshold
    pairs = np.unique(np.stack([sb[ia[hit], 0].astype(np.int64), ib[hit]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def volumetric_froc(
    pred: Mapping[str, Any],
    truth: Mapping[str, Any],
    *,
    rule: str = "released",
    fp_rates: Sequence[float] = VOLUMETRIC_FP_RATES,
    slice_boxes: Mapping[str, Any] | None = None,
    keys: Sequence[str] | None = None,
    missing_as_empty: bool = False,
    iobb_threshold: float = 0.3,
    iou_threshold: float = 0.5,
    pred_source: str = "<pred>",
    truth_source: str = "<truth>",
) -> FrocResult:
    """Volumetric FROC on sub-volumes (the 1K test set's protocol).

    ``truth``: {sub-volume name: n x 6 ``[x1,y1,z1,x2,y2,z2]``} (inclusive indices, z in the same
    slice numbering as the predictions; the real 1K file uses the 1-based numbering of the name's
    slice range). ``pred``: {name: n x 7 ``[..., score]``}. ``rule``: ``"released"`` (3D IoBB >=
    ``iobb_threshold``) or ``"paper"`` (2D cross-section IoU > ``iou_threshold``); see the module
    docstring. ``slice_boxes`` (paper rule only): {name: m x 6 ``[det_index, z, x1, y1, x2, y2]``},
    the per-slice 2D boxes of each stacked detection (``det_index`` = row of ``pred[name]``);
    detections of a volume absent from it are treated as cuboids. ``keys``: the volumes evaluated
    and their order (default: the truth's key order, as the released code). Volumes without a
    prediction entry raise unless ``missing_as_empty``.
    """
    flat, hd, ht = _volumetric_hits(pred, truth, rule=rule, slice_boxes=slice_boxes, keys=keys,
                                    missing_as_empty=missing_as_empty, iobb_threshold=iobb_threshold,
                                    iou_threshold=iou_threshold, pred_source=pred_source,
                                    truth_source=truth_source)
    return _finish(flat, hd, ht, rule, fp_rates)


def _volumetric_hits(pred, truth, *, rule, slice_boxes, keys, missing_as_empty, iobb_threshold,
                     iou_threshold, pred_source, truth_source):
    """Flattened inputs and the (detection, truth) hit pairs of a volumetric hit rule."""
    if rule not in RULES:
        raise ValueError(f"unknown hit rule {rule!r}; expected one of {RULES}")
    flat = _flatten(pred, truth, dim=3, keys=keys, missing_as_empty=missing_as_empty,
                    pred_source=pred_source, truth_source=truth_source)
    ia, ib = group_pairs(flat.det_sizes, flat.truth_sizes)
    if rule == "released":
        hd, ht = _hits_threshold(flat.det, flat.truth, ia, ib, "iobb", iobb_threshold, strict=False)
        return flat, hd, ht
    if slice_boxes is not None:
        covered = np.array([k in slice_boxes for k in flat.keys])
        per_det_cov = np.repeat(covered, flat.det_sizes)
        sd, st = _paper_hits_from_slices(flat, slice_boxes, pred_source, iou_threshold)
        keep = ~per_det_cov[ia]
        ia, ib = ia[keep], ib[keep]
    else:
        sd = st = np.zeros(0, np.int64)
    zov = (np.maximum(flat.det[ia, 2], flat.truth[ib, 2]) <= np.minimum(flat.det[ia, 5], flat.truth[ib, 5]))
    ia, ib = ia[zov], ib[zov]
    d2 = flat.det[:, [0, 1, 3, 4]]
    t2 = flat.truth[:, [0, 1, 3, 4]]
    cd, ct = _hits_threshold(d2, t2, ia, ib, "iou", iou_threshold, strict=True)
    return flat, np.concatenate([sd, cd]), np.concatenate([st, ct])


def _finish(flat: _Flat, hd, ht, rule: str, fp_rates, truth_sel: np.ndarray | None = None,
            ignore_fp: np.ndarray | None = None) -> FrocResult:
    """FROC from hit pairs; ``truth_sel`` [G] bool restricts the truths (a stratum), ``ignore_fp``
    [D] bool marks detections that may not count as FPs (they hit a truth outside the stratum)."""
    scores = flat.det[:, -1]
    nvol = len(flat.keys)
    if nvol == 0:
        raise EvaluationInputError("no volumes to evaluate (the truth is empty)")
    if truth_sel is not None:
        new_id = np.cumsum(truth_sel) - 1
        keep = truth_sel[ht]
        hd, ht = hd[keep], new_id[ht[keep]]
        ntru = int(truth_sel.sum())
    else:
        ntru = len(flat.truth)
    order, sens, fppv, is_fp = curve_from_hits(scores, hd, ht, ntru, nvol, ignore=ignore_fp)
    notes = list(flat.notes)
    if ntru == 0:
        notes.append("no truths: sensitivities are undefined (NaN)")
    if len(scores) < 2:
        notes.append(f"{len(scores)} detection(s): the released code cannot interpolate this curve; "
                     "read with the documented edge rules")
    sa = sensitivity_at_fp(fppv, sens, fp_rates) if ntru else np.full(len(fp_rates), np.nan)
    return FrocResult(
        rule=rule, fp_rates=np.asarray(fp_rates, np.float64), sensitivity=sa,
        mean_sensitivity=float(np.mean(sa)), curve_fps=fppv, curve_sens=sens,
        curve_scores=scores[order], num_truths=ntru, num_volumes=nvol, num_detections=len(scores),
        num_hit=int(len(np.unique(ht))), num_fp=int(is_fp.sum()), notes=notes,
    )


def keyslice_froc(
    pred: Mapping[str, Any],
    truth: Mapping[str, Any],
    *,
    fp_rates: Sequence[float] = KEYSLICE_FP_RATES,
    metric: str = "iou",
    threshold: float = 0.5,
    missing_as_empty: bool = False,
    pred_source: str = "<pred>",
    truth_source: str = "<truth>",
) -> FrocResult:
    """Key-slice FROC (MULAN's rules): sensitivity at ``fp_rates`` FPs per key slice.

    ``truth``: {image key: n x 4 ``[x1,y1,x2,y2]``} inclusive pixel indices (DeepLesion
    ``Bounding_boxes`` minus 1, as MULAN); ``pred``: {key: n x 5 ``[x1,y1,x2,y2,score]``}. A
    detection hits a box when ``metric`` (``"iou"`` default, or ``"iobb"``, ``"iogt"``,
    ``"iobbgt"``) >= ``threshold``; images are pooled in sorted key order as MULAN does. MULAN's
    headline is the mean of the first 4 rates (``result.mean_of_first(4)``).
    """
    flat, hd, ht = _keyslice_hits(pred, truth, metric, threshold, missing_as_empty, pred_source, truth_source)
    return _finish(flat, hd, ht, f"keyslice_{metric}>={threshold}", fp_rates)


def _keyslice_hits(pred, truth, metric, threshold, missing_as_empty, pred_source, truth_source):
    keys = sorted(truth.keys())
    flat = _flatten(pred, truth, dim=2, keys=keys, missing_as_empty=missing_as_empty,
                    pred_source=pred_source, truth_source=truth_source)
    ia, ib = group_pairs(flat.det_sizes, flat.truth_sizes)
    hd, ht = _hits_threshold(flat.det, flat.truth, ia, ib, metric, threshold, strict=False)
    return flat, hd, ht


def stratified_keyslice_froc(
    pred: Mapping[str, Any],
    truth: Mapping[str, Any],
    truth_labels: Mapping[str, Sequence[str]],
    *,
    strata: Sequence[str] = ("lung", "liver", "lymph_node"),
    fp_from_all_truths: bool = False,
    fp_rates: Sequence[float] = KEYSLICE_FP_RATES,
    metric: str = "iou",
    threshold: float = 0.5,
    missing_as_empty: bool = False,
    pred_source: str = "<pred>",
    truth_source: str = "<truth>",
) -> dict[str, FrocResult]:
    """Key-slice FROC per organ stratum (as MULAN's per-tag detection accuracy: the FROC with the
    stratum's boxes as the only truths) plus ``"overall"``; ``fp_from_all_truths`` as in
    :func:`stratified_froc`."""
    flat, hd, ht = _keyslice_hits(pred, truth, metric, threshold, missing_as_empty, pred_source, truth_source)
    rule = f"keyslice_{metric}>={threshold}"
    return _stratify(flat, hd, ht, truth_labels, strata, fp_from_all_truths, rule, fp_rates)


def _stratify(flat, hd, ht, truth_labels, strata, fp_from_all_truths, rule, fp_rates) -> dict[str, FrocResult]:
    labs = []
    for k, n in zip(flat.keys, flat.truth_sizes):
        lab = np.asarray(list(truth_labels.get(k, [])), dtype=object)
        if len(lab) != n:
            raise EvaluationInputError(f"truth labels: key {k!r}: {len(lab)} labels for {n} truth boxes")
        labs.append(lab)
    lab = np.concatenate(labs) if labs else np.zeros(0, dtype=object)
    out = {"overall": _finish(flat, hd, ht, rule, fp_rates)}
    for organ in strata:
        sel = lab == organ
        ignore = None
        if fp_from_all_truths:
            ignore = np.zeros(len(flat.det), bool)
            ignore[hd[~sel[ht]]] = True
        out[organ] = _finish(flat, hd, ht, rule, fp_rates, truth_sel=sel, ignore_fp=ignore)
    return out


# --------------------------------------------------------------------------------------------------
# Organ-stratified sensitivity.
# --------------------------------------------------------------------------------------------------
STRATA: tuple[str, ...] = ("lung", "liver", "lymph_node")


def stratified_froc(
    pred: Mapping[str, Any],
    truth: Mapping[str, Any],
    truth_labels: Mapping[str, Sequence[str]],
    *,
    strata: Sequence[str] = STRATA,
    fp_from_all_truths: bool = False,
    rule: str = "released",
    fp_rates: Sequence[float] = VOLUMETRIC_FP_RATES,
    slice_boxes: Mapping[str, Any] | None = None,
    keys: Sequence[str] | None = None,
    missing_as_empty: bool = False,
    iobb_threshold: float = 0.3,
    iou_threshold: float = 0.5,
    pred_source: str = "<pred>",
    truth_source: str = "<truth>",
) -> dict[str, FrocResult]:
    """Organ-stratified FROC: one FROC per organ label plus ``"overall"``.

    ``truth_labels``: {name: [n] organ label per truth row (e.g. ``"lung"``, ``"liver"``,
    ``"lymph_node"``, anything else)}. As the released code's docstring prescribes for stratified
    FROCs, the FROC of organ o is computed with only the truths labelled o: by default a detection
    hitting only lesions of other organs is then an FP (``fp_from_all_truths=False``, the released
    recipe); with ``fp_from_all_truths=True`` such a detection is neither TP nor FP. Other
    arguments as :func:`volumetric_froc`. The "average sensitivity" of a stratum is its
    ``mean_sensitivity``; a stratum without truths has NaN sensitivities.
    """
    flat, hd, ht = _volumetric_hits(pred, truth, rule=rule, slice_boxes=slice_boxes, keys=keys,
                                    missing_as_empty=missing_as_empty, iobb_threshold=iobb_threshold,
                                    iou_threshold=iou_threshold, pred_source=pred_source,
                                    truth_source=truth_source)
    return _stratify(flat, hd, ht, truth_labels, strata, fp_from_all_truths, rule, fp_rates)
