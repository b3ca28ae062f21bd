"""Mining quality against the synthetic world's truth (every lesion, marked or not).

The paper checked 100 mined lesions by hand (90% were true lesions) and swept theta and sigma (its
Fig. 5). With the synthetic world the complete truth is known, so the same questions get exact
answers:

* mined positives: how many, their *precision* (fraction on a real lesion), how many land on an
  unmarked lesion, and the *recall of unmarked lesions* (fraction of the unmarked lesions the run
  could see that got at least one mined box);
* suspicious regions (NRM): how many, and the fraction that are real lesions (the rest are the
  false positives that finetuning will ignore rather than learn as background).

Truth is given in the frame of the mined rows: per Case (sub-volume) id, 3D boxes
``[z1, y1, x1, z2, y2, x2]`` in preprocessed slice indices and pixels (internal convention of
:mod:`uld_jax.core`: continuous coordinates, slice i covers ``[i, i + 1)``). :func:`truth_from_volumetric`
converts the released 1K-test-set layout (inclusive ``[x1, y1, z1, x2, y2, z2]`` in source pixels and
1-based slice numbers; docs/formats.md, "Volumetric truth") through a :class:`CaseFrame`.

Hit rule (one rule for every count here): a 2D box on slice ``i`` of a Case hits a truth lesion of
that Case when the slice centre ``i + 0.5`` lies within the lesion's ``[z1, z2]`` and the box's IoBB
(intersection over the mined box's own area) with the lesion's in-plane extent is >= ``min_iobb``
(default 0.3, the threshold of the authors' released volumetric evaluation). The in-plane extent is
the lesion's largest cross-section, so IoU would punish correct boxes near a lesion's poles; IoBB
asks only that the mined box lie mostly on the lesion.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from uld_jax.mine import mam, nrm, overlap, run, table

DEFAULT_MIN_IOBB: float = 0.3


@dataclasses.dataclass
class LesionTruth:
    """Every lesion visible in each Case, in the Case frame.

    Attributes:
      case_id: [L] str Case (sub-volume) id.
      box3d: [L, 6] float ``[z1, y1, x1, z2, y2, x2]``, slice indices and pixels of the Case.
      lesion_id: [L] int64 identity of the lesion (persists across the patient's studies).
      marked: [L] bool, True when the lesion is marked (DL_info) in this Case.
    """

    case_id: np.ndarray
    box3d: np.ndarray
    lesion_id: np.ndarray
    marked: np.ndarray

    def __len__(self) -> int:
        return int(np.asarray(self.case_id).shape[0])


@dataclasses.dataclass(frozen=True)
class CaseFrame:
    """Maps a sub-volume's source voxel grid onto its preprocessed Case (resampled slices).

    In-plane, a source continuous coordinate ``u`` (pixels) maps to ``(u - crop) * scale`` (the
    convention of ``data_prep.preprocess.Resampling``). Along z, source slice number ``n`` (1-based,
    as in the released truth) is a slab centred at ``src_z1_mm + (n - 1) * src_slice_mm`` of
    thickness ``src_slice_mm``; Case slice ``i`` is the point sample at
    ``out_z0_mm + i * case_slice_mm`` and covers ``[i, i + 1)`` in Case coordinates, its centre
    ``i + 0.5`` being that position. So a lesion on source slices ``z1..z2`` is present on exactly the
    Case slices whose positions fall inside the slabs ``z1..z2`` (slice-centre rule).

    Attributes:
      case_id: the Case id the truth rows get.
      scale_yx: Case pixels per source pixel, (y, x) (source spacing / Case pixel size).
      crop_yx: (y0, x0) of the crop in source pixels (``Case.source_crop_yx``).
      src_slice_mm: source slice interval (mm); case_slice_mm: the Case's (2 mm by default).
      src_z1_mm: position (mm) of source slice number 1; out_z0_mm: position of Case slice 0, on
        the same axis.
    """

    case_id: str
    scale_yx: tuple[float, float]
    crop_yx: tuple[float, float] = (0.0, 0.0)
    src_slice_mm: float = 1.0
    case_slice_mm: float = 2.0
    src_z1_mm: float = 0.0
    out_z0_mm: float = 0.0

    @classmethod
    def from_resampling(cls, case_id: str, plan: Any, first_slice_number: int) -> "CaseFrame":
        """From a ``data_prep.preprocess.Resampling`` (duck-typed: ``crop_yx``, ``scale_yx``,
        ``src_z``, ``out_z``, ``slice_mm``) of a sub-volume whose first source slice has the 1-based
        number ``first_slice_number`` (``AAA`` of ``..._AAA-BBB``)."""
        src_z = np.asarray(plan.src_z, dtype=np.float64)
        dz = float(src_z[1] - src_z[0]) if src_z.size > 1 else float(plan.slice_mm)
        return cls(case_id=case_id, scale_yx=tuple(float(v) for v in plan.scale_yx),
                   crop_yx=tuple(float(v) for v in plan.crop_yx), src_slice_mm=dz,
                   case_slice_mm=float(plan.slice_mm),
                   src_z1_mm=float(src_z[0]) - (first_slice_number - 1) * dz,
                   out_z0_mm=float(np.asarray(plan.out_z)[0]))

    def to_case(self, boxes_xyzxyz: np.ndarray) -> np.ndarray:
        """Released inclusive ``[x1, y1, z1, x2, y2, z2]`` (z 1-based) [n, 6] -> Case ``[z1, y1, x1,
        z2, y2, x2]`` [n, 6] continuous coordinates."""
        b = np.asarray(boxes_xyzxyz, dtype=np.float64).reshape(-1, 6)
        sy, sx = self.scale_yx
        y0, x0 = self.crop_yx
        dz, s = self.src_slice_mm, self.case_slice_mm

        def z_case(pos_mm):
            return (pos_mm - self.out_z0_mm) / s + 0.5

        lo = self.src_z1_mm + (b[:, 2] - 1.0) * dz - dz / 2
        hi = self.src_z1_mm + (b[:, 5] - 1.0) * dz + dz / 2
        return np.stack([z_case(lo), (b[:, 1] - y0) * sy, (b[:, 0] - x0) * sx,
                         z_case(hi), (b[:, 4] + 1.0 - y0) * sy, (b[:, 3] + 1.0 - x0) * sx], axis=1)


_SUBVOLUME_RE = re.compile(r"^\d{6}_\d{2}_\d{2}_\d+-\d+$")


def load_volumetric_truth(path: str, split: str = "train") -> dict[str, np.ndarray]:
    """One split of ``deeplesion_volumetric_truth.pkl`` (docs/formats.md): sub-volume name -> [n, 6].

    Loaded with the restricted unpickler (numpy arrays and plain containers only). Raises
    ValueError naming the file and the offending key for a bad split, name or array.
    """
    from uld_jax.io.safe_pickle import safe_load

    data = safe_load(path)
    if not isinstance(data, dict) or split not in data or not isinstance(data[split], dict):
        raise ValueError(f"{path}: expected {{'train': {{...}}, 'val': ..., 'test': ...}} with a "
                         f"dict for split {split!r}")
    out = {}
    for name, boxes in data[split].items():
        if not isinstance(name, str) or not _SUBVOLUME_RE.match(name):
            raise ValueError(f"{path}: [{split!r}] key {name!r} is not PPPPPP_SS_RR_AAA-BBB")
        b = np.asarray(boxes, dtype=np.float64)
        if b.size == 0:
            b = b.reshape(0, 6)
        if b.ndim != 2 or b.shape[1] != 6 or not np.all(np.isfinite(b)):
            raise ValueError(f"{path}: [{split!r}][{name!r}] is not a finite n x 6 array "
                             f"(shape {b.shape})")
        if np.any(b[:, 3:] < b[:, :3]):
            raise ValueError(f"{path}: [{split!r}][{name!r}] has a box with x2 < x1, y2 < y1 or z2 < z1")
        out[name] = b
    return out


def format_quality(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> str:
    """A plain-text table of quality dicts (e.g. a sweep), one row each."""
    keys = list(keys or ["theta", "sigma", "n_mined", "precision", "recall_unmarked",
                         "n_suspicious", "suspicious_true_fraction"])
    keys = [k for k in keys if any(k in r for r in rows)]

    def cell(v):
        if isinstance(v, float):
            return "nan" if np.isnan(v) else f"{v:.3f}"
        return str(v)

    table_rows = [keys] + [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table_rows) for i in range(len(keys))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table_rows)


def truth_from_volumetric(
    boxes_by_subvolume: Mapping[str, np.ndarray],
    frames: Mapping[str, CaseFrame],
    *,
    lesion_ids: Mapping[str, np.ndarray] | None = None,
    marked: Mapping[str, np.ndarray] | None = None,
) -> LesionTruth:
    """Released-layout truth (sub-volume name -> [n, 6]) -> :class:`LesionTruth` in Case frames.

    ``lesion_ids`` / ``marked`` give per sub-volume [n] arrays (default: -1 / False). Every
    sub-volume needs a frame; a missing one raises KeyError naming it.
    """
    case, boxes, ids, mk = [], [], [], []
    for name in sorted(boxes_by_subvolume):
        b = np.asarray(boxes_by_subvolume[name], dtype=np.float64).reshape(-1, 6)
        if name not in frames:
            raise KeyError(f"no CaseFrame for sub-volume {name!r}")
        fr = frames[name]
        case += [fr.case_id] * len(b)
        boxes.append(fr.to_case(b))
        ids.append(np.asarray(lesion_ids[name]) if lesion_ids else np.full(len(b), -1))
        mk.append(np.asarray(marked[name], bool) if marked else np.zeros(len(b), bool))
    return LesionTruth(np.asarray(case, dtype=str),
                       np.concatenate(boxes) if boxes else np.zeros((0, 6)),
                       np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64),
                       np.concatenate(mk) if mk else np.zeros(0, bool))


def match_to_truth(
    truth: LesionTruth,
    case_id: np.ndarray,
    slice_index: np.ndarray,
    box: np.ndarray,
    *,
    min_iobb: float = DEFAULT_MIN_IOBB,
) -> np.ndarray:
    """For each 2D box, the truth row it hits (largest IoBB, first on ties), -1 for none.

    ``case_id`` [N] str, ``slice_index`` [N] int, ``box`` [N, 4] internal -> [N] int64.
    """
    case_id = np.asarray(case_id).reshape(-1)
    slice_index = np.asarray(slice_index).reshape(-1)
    box = np.asarray(box, dtype=np.float64).reshape(-1, 4)
    out = np.full(case_id.size, -1, dtype=np.int64)
    if case_id.size == 0 or len(truth) == 0:
        return out
    names, inv = np.unique(np.concatenate([case_id.astype(str), np.asarray(truth.case_id, str)]),
                           return_inverse=True)
    qi, rj = overlap.same_key_pairs(inv[: case_id.size], inv[case_id.size:])
    t3 = np.asarray(truth.box3d, dtype=np.float64)
    zc = slice_index[qi] + 0.5
    on_slice = (t3[rj, 0] <= zc) & (zc <= t3[rj, 3])
    qi, rj = qi[on_slice], rj[on_slice]
    iobb = overlap.paired_iobb(box[qi], t3[rj][:, [1, 2, 4, 5]])
    ok = iobb >= min_iobb
    qi, rj, iobb = qi[ok], rj[ok], iobb[ok]
    # Best per query: sort by (query, -iobb, truth row) and take the first of each query.
    order = np.lexsort((rj, -iobb, qi))
    qi, rj = qi[order], rj[order]
    first = np.r_[True, qi[1:] != qi[:-1]] if qi.size else np.zeros(0, bool)
    out[qi[first]] = rj[first]
    return out


def visible_truth(truth: LesionTruth, case_id: np.ndarray, slice_index: np.ndarray) -> np.ndarray:
    """[L] bool: lesions present (slice-centre rule) on at least one of the given slices."""
    case_id = np.asarray(case_id).reshape(-1).astype(str)
    slice_index = np.asarray(slice_index).reshape(-1)
    vis = np.zeros(len(truth), dtype=bool)
    if case_id.size == 0 or len(truth) == 0:
        return vis
    names, inv = np.unique(np.concatenate([np.asarray(truth.case_id, str), case_id]),
                           return_inverse=True)
    ti, sj = overlap.same_key_pairs(inv[: len(truth)], inv[len(truth):])
    t3 = np.asarray(truth.box3d, dtype=np.float64)
    zc = slice_index[sj] + 0.5
    hit = (t3[ti, 0] <= zc) & (zc <= t3[ti, 3])
    vis[ti[hit]] = True
    return vis


def _ratio(a: int, b: int) -> float:
    return float(a) / b if b else float("nan")


def mining_quality(
    truth: LesionTruth,
    overlay: table.Overlay,
    *,
    seen_case_id: np.ndarray | None = None,
    seen_slice_index: np.ndarray | None = None,
    min_iobb: float = DEFAULT_MIN_IOBB,
) -> dict[str, Any]:
    """Quality of a mined table against the truth.

    Args:
      truth: every lesion, in the Case frame of the table's rows.
      overlay: the mined table (kind 1 rows are mined positives, kind 2 suspicious regions).
      seen_case_id, seen_slice_index: [S] the slices the run looked at; the recall counts only the
        unmarked lesions present on at least one of them (default: the table's own rows, kinds 1-3).
      min_iobb: hit threshold (see the module docstring).

    Returns:
      dict with ``n_mined``, ``n_mined_true``, ``precision`` (nan when nothing was mined),
      ``n_mined_on_unmarked``, ``n_unmarked_visible``, ``n_unmarked_found``, ``recall_unmarked``,
      ``n_lesions_found`` (distinct truth rows hit by a mined box), ``n_suspicious``,
      ``n_suspicious_true``, ``suspicious_true_fraction``, ``n_suspicious_on_unmarked``.
    """
    a = overlay.arrays
    if seen_case_id is None:
        seen_case_id, seen_slice_index = a["case_id"], a["slice_index"]
    hit = match_to_truth(truth, a["case_id"], a["slice_index"], a["box"], min_iobb=min_iobb)
    marked = np.asarray(truth.marked, bool)
    mined = a["kind"] == table.KIND_MINED
    sus = a["kind"] == table.KIND_IGNORE
    h_m = hit[mined]
    h_s = hit[sus]
    visible = visible_truth(truth, seen_case_id, seen_slice_index) & ~marked
    found = np.zeros(len(truth), bool)
    found[h_m[h_m >= 0]] = True
    return {
        "n_mined": int(mined.sum()),
        "n_mined_true": int(np.sum(h_m >= 0)),
        "precision": _ratio(int(np.sum(h_m >= 0)), int(mined.sum())),
        "n_mined_on_unmarked": int(np.sum((h_m >= 0) & ~marked[np.maximum(h_m, 0)])),
        "n_lesions_found": int(found.sum()),
        "n_unmarked_visible": int(visible.sum()),
        "n_unmarked_found": int(np.sum(found & visible)),
        "recall_unmarked": _ratio(int(np.sum(found & visible)), int(visible.sum())),
        "n_suspicious": int(sus.sum()),
        "n_suspicious_true": int(np.sum(h_s >= 0)),
        "suspicious_true_fraction": _ratio(int(np.sum(h_s >= 0)), int(sus.sum())),
        "n_suspicious_on_unmarked": int(np.sum((h_s >= 0) & ~marked[np.maximum(h_s, 0)])),
    }


DEFAULT_SCORE_LEVELS = (0.05, 0.1, 0.3, 0.5, 0.7, 0.9)


def probability_less(a: np.ndarray, b: np.ndarray) -> float:
    """P(x < y) for x drawn from ``a`` and y from ``b`` (ties count one half): the area under the
    ROC curve of telling ``a`` from ``b`` by a low value; nan when either is empty."""
    a = np.sort(np.asarray(a, np.float64).reshape(-1))
    b = np.sort(np.asarray(b, np.float64).reshape(-1))
    if a.size == 0 or b.size == 0:
        return float("nan")
    below = np.searchsorted(b, a, side="left")      # b values < each a
    upto = np.searchsorted(b, a, side="right")      # b values <= each a
    greater = b.size - upto
    ties = upto - below
    return float((greater.sum() + 0.5 * ties.sum()) / (a.size * b.size))


def mining_inputs_check(
    truth: LesionTruth,
    slices: run.SliceTable,
    annotations: run.Annotations,
    proposals: run.Proposals,
    *,
    min_iobb: float = DEFAULT_MIN_IOBB,
    score_levels: Sequence[float] = DEFAULT_SCORE_LEVELS,
    options: run.MiningOptions = run.MiningOptions(),
) -> dict[str, Any]:
    """What MAM's two inputs are worth, against the truth: the universal expert's proposals and the
    lesion embedding. Independent of theta and sigma.

    * detector: for each score level, the universal proposals at or above it and the fraction of
      them on a real lesion (``by_score``: does a higher score mean a lesion more often?);
    * embedding: each proposal's L2 distance to the nearest annotated lesion of its patient
      (MAM's quantity). For proposals on an annotated lesion, also the distance to that lesion's own
      annotation. ``p_own_closer_than_background`` = P(own-annotation distance of a proposal on an
      annotated lesion < nearest-annotation distance of a proposal on no lesion): 0.5 is an
      embedding that tells nothing, 1.0 one that separates them completely. Distances and groups
      are MAM's own under ``options`` (:func:`run.mam_features`: with ``location_mm``, the
      embedding and the place in the volume, within a Case).
    """
    a_slice = np.asarray(annotations.slice)
    uni, a_truth, p_truth = _truth_of_inputs(truth, slices, annotations, proposals, min_iobb)
    p_score = np.asarray(proposals.score, np.float64)[uni]
    on_lesion = p_truth >= 0
    by_score = [{"score": float(t), "n": int(np.sum(p_score >= t)),
                 "on_lesion_fraction": _ratio(int(np.sum(on_lesion & (p_score >= t))),
                                              int(np.sum(p_score >= t)))}
                for t in score_levels]
    out: dict[str, Any] = {"n_universal": int(uni.size), "n_on_lesion": int(on_lesion.sum()),
                           "n_annotations": int(a_slice.size),
                           "n_annotations_on_truth": int(np.sum(a_truth >= 0)),
                           "by_score": by_score}
    if proposals.embedding is None or uni.size == 0 or a_slice.size == 0:
        return out
    out.update(_own_vs_background(slices, annotations, proposals, options, uni, a_truth, p_truth))
    return out


def _truth_of_inputs(truth: LesionTruth, slices: run.SliceTable, annotations: run.Annotations,
                     proposals: run.Proposals, min_iobb: float):
    """(universal rows [PU], a_truth [A], p_truth [PU]): the truth lesion each annotation and each
    universal proposal lies on (-1: none)."""
    cid, sidx = np.asarray(slices.case_id), np.asarray(slices.slice_index)
    a_slice = np.asarray(annotations.slice)
    a_truth = match_to_truth(truth, cid[a_slice], sidx[a_slice], annotations.box, min_iobb=min_iobb)
    uni = np.flatnonzero(np.asarray(proposals.expert) == run.UNIVERSAL_EXPERT)
    p_slice = np.asarray(proposals.slice)[uni]
    p_box = np.asarray(proposals.box, np.float64).reshape(-1, 4)[uni]
    return uni, a_truth, match_to_truth(truth, cid[p_slice], sidx[p_slice], p_box,
                                        min_iobb=min_iobb)


def _own_vs_background(slices, annotations, proposals, options, uni, a_truth, p_truth
                       ) -> dict[str, Any]:
    """The embedding half of :func:`mining_inputs_check`, in MAM's distance under ``options``."""
    a_group, a_emb, p_group, p_emb = run.mam_features(slices, annotations, proposals, options, uni)
    qi, rj = overlap.same_key_pairs(p_group, a_group)
    d = np.linalg.norm(p_emb[qi] - a_emb[rj], axis=1).astype(np.float64)
    nearest = np.full(uni.size, np.inf)
    np.minimum.at(nearest, qi, d)
    own = np.full(uni.size, np.inf)
    same = (p_truth[qi] >= 0) & (p_truth[qi] == a_truth[rj])
    np.minimum.at(own, qi[same], d[same])
    own_rows = np.isfinite(own)
    bg_rows = np.isfinite(nearest) & (p_truth < 0)

    def q(x):
        return [float(v) for v in np.percentile(x, [10, 50, 90])] if x.size else None

    return {
        "n_on_annotated_lesion": int(own_rows.sum()),
        "own_distance_p10_50_90": q(own[own_rows]),
        "background_nearest_p10_50_90": q(nearest[bg_rows]),
        "p_own_closer_than_background": probability_less(own[own_rows], nearest[bg_rows]),
    }


def sweep_theta(
    thetas: Sequence[float],
    truth: LesionTruth,
    slices: run.SliceTable,
    annotations: run.Annotations,
    proposals: run.Proposals,
    *,
    options: run.MiningOptions = run.MiningOptions(),
    min_iobb: float = DEFAULT_MIN_IOBB,
    devices=None,
) -> list[dict[str, Any]]:
    """Mining quality of the mined positives for each theta (paper Fig. 5, left).

    MAM distances are computed once; each theta re-thresholds them (same strict rule) and reruns
    the cheap host-side selection. Returns one :func:`mining_quality` dict per theta, with ``theta``.
    """
    uni, result, _ = run.mam_positives(slices, annotations, proposals, options, devices)
    p_slice = np.asarray(proposals.slice)[uni]
    p_box = np.asarray(proposals.box, np.float64).reshape(-1, 4)[uni]
    p_score = np.asarray(proposals.score)[uni]
    rows = []
    for theta in thetas:
        mined = mam.select_mined_positives(
            result, prop_slice=p_slice, prop_box=p_box,
            ann_slice=np.asarray(annotations.slice), ann_box=np.asarray(annotations.box),
            theta=theta, overlap_iou=options.overlap_iou, dedupe_iou=options.mam_dedupe_iou,
            prop_score=p_score, min_score=options.mam_min_score)
        q = _quality_of_rows(truth, slices, p_slice[mined], p_box[mined], table.KIND_MINED,
                             min_iobb)
        q["theta"] = float(theta)
        rows.append(q)
    return rows


def sweep_location(
    location_mms: Sequence[float],
    truth: LesionTruth,
    slices: run.SliceTable,
    annotations: run.Annotations,
    proposals: run.Proposals,
    *,
    options: run.MiningOptions = run.MiningOptions(),
    min_iobb: float = DEFAULT_MIN_IOBB,
    devices=None,
) -> list[dict[str, Any]]:
    """MAM's mined positives at ``options.theta`` for each location scale (``location_mm``; 0 is
    the paper's embedding-only rule): one :func:`mining_quality` dict per scale, with
    ``location_mm`` and the inputs check's ``p_own_closer_than_background`` under that rule. Empty
    when the slices have no pixel sizes (a store mined before they were kept)."""
    if slices.pixel_mm is None or slices.slice_mm is None:
        return []
    uni, a_truth, p_truth = _truth_of_inputs(truth, slices, annotations, proposals, min_iobb)
    p_slice = np.asarray(proposals.slice)[uni]
    p_box = np.asarray(proposals.box, np.float64).reshape(-1, 4)[uni]
    checkable = uni.size > 0 and a_truth.size > 0
    rows = []
    for loc in location_mms:
        o = dataclasses.replace(options, location_mm=float(loc))
        _, _, mined = run.mam_positives(slices, annotations, proposals, o, devices)
        q = _quality_of_rows(truth, slices, p_slice[mined], p_box[mined], table.KIND_MINED,
                             min_iobb)
        check = (_own_vs_background(slices, annotations, proposals, o, uni, a_truth, p_truth)
                 if checkable else {})
        q["location_mm"] = float(loc)
        q["p_own_closer_than_background"] = check.get("p_own_closer_than_background", float("nan"))
        rows.append(q)
    return rows


def sweep_sigma(
    sigmas: Sequence[float],
    truth: LesionTruth,
    slices: run.SliceTable,
    annotations: run.Annotations,
    proposals: run.Proposals,
    *,
    options: run.MiningOptions = run.MiningOptions(),
    min_iobb: float = DEFAULT_MIN_IOBB,
    devices=None,
) -> list[dict[str, Any]]:
    """Suspicious-region quality for each sigma (paper Fig. 5, right), MAM fixed at ``options``
    (one threshold for every expert, also when ``options`` was mined with per-expert ones)."""
    outcome = run.mine_overlay(slices, annotations, proposals, options=options,
                               checkpoint_step=-1, config_hash="sweep", devices=devices)
    mined_rows = outcome.universal_rows[outcome.mined]
    p_slice = np.asarray(proposals.slice)
    p_box = np.asarray(proposals.box, np.float64).reshape(-1, 4)
    single = outcome.single_rows
    rows = []
    for sigma in sigmas:
        res = nrm.nrm(p_slice[single], p_box[single], np.asarray(proposals.score)[single],
                      np.asarray(proposals.expert)[single],
                      existing_slice=np.asarray(annotations.slice),
                      existing_box=np.asarray(annotations.box),
                      mined_slice=p_slice[mined_rows], mined_box=p_box[mined_rows], sigma=sigma,
                      experts=options.nrm_experts, overlap_iou=options.overlap_iou,
                      dedupe_iou=options.nrm_dedupe_iou)
        s_rows = single[res.suspicious]
        q = _quality_of_rows(truth, slices, p_slice[s_rows], p_box[s_rows], table.KIND_IGNORE,
                             min_iobb)
        q["sigma"] = float(sigma)
        rows.append(q)
    return rows


def _quality_of_rows(truth, slices, row_slice, row_box, kind, min_iobb):
    """mining_quality of bare rows of one kind, with every slice of the run counted as seen."""
    n = row_slice.size
    arrays = {
        "case_id": np.asarray(slices.case_id)[row_slice].astype(str),
        "slice_index": np.asarray(slices.slice_index)[row_slice],
        "box": np.asarray(row_box, np.float32).reshape(-1, 4),
        "kind": np.full(n, kind, np.int8),
    }
    ov = table.Overlay(arrays, {})
    return mining_quality(truth, ov, seen_case_id=np.asarray(slices.case_id),
                          seen_slice_index=np.asarray(slices.slice_index), min_iobb=min_iobb)
