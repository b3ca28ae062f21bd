"""LUNA16 FROC and CPM in world coordinates, with the challenge script's rules (vectorised).

Reproduces ``noduleCADEvaluationLUNA16.py`` (the LUNA16 evaluation script; re-derived, not copied):

* Scans: exactly those of ``seriesuids.csv``; candidates and annotations of other scans are
  ignored. FPs per scan are divided by the number of listed scans (with or without candidates).
* At most ``max_marks`` (100) candidates per scan: if a scan has more, the probability of its
  (max_marks + 1)-th most probable candidate is the cut and only candidates *strictly above* it
  are kept (ties at the cut can leave fewer than 100).
* A candidate hits a finding when its squared distance to the finding's centre is strictly below
  the squared radius (diameter / 2)^2; a diameter < 0 (unknown, in annotations_excluded.csv) is
  taken as 10 mm.
* A nodule (annotations.csv) is found when at least one candidate hits it; its FROC score is the
  highest probability among those candidates; the other hits are ignored (neither TP nor FP).
  One candidate may find several nodules. A candidate that hits a nodule is never an FP and never
  an "irrelevant" mark, whatever excluded findings it also hits (nodules are matched first).
  A candidate that hits no nodule but an excluded finding is ignored. Every other kept
  candidate is an FP.
* The curve is the ROC of found nodules (positives, at their score) against FPs (negatives) as
  ``sklearn.metrics.roc_curve`` builds it (one point per distinct score, collinear intermediate
  points dropped, a (0, 0) point prepended), with FPs per scan = fpr x #FP / #scans and
  sensitivity = tpr x #found / #nodules (missed nodules only enter the denominator). Without any
  FP the FP axis is all zeros (the script's border case).
* Sensitivities at 1/8 ... 8 FPs per scan: exact linear interpolation of that curve
  (``np.interp``; beyond its end, the last value) -> ``sensitivity`` / ``cpm``; and the script's
  own printed reading: the curve corner with the smallest FP rate at or above each rate (the last
  such corner on ties) -> ``sensitivity_corner`` / ``cpm_corner``; where no corner reaches the
  rate (the script fails there) the last point is used.
* Conventions where the script yields NaN or fails: no found nodule -> sensitivity 0 everywhere;
  no nodules at all -> NaN.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from uld_jax.evaluate.boxes import EvaluationInputError, group_pairs, open_csv

LUNA_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclasses.dataclass
class PointTable:
    """Rows of a LUNA16 csv: ``seriesuid`` [N] str, ``xyz`` [N, 3] world mm, ``value`` [N]
    (``probability`` for candidates, ``diameter_mm`` for annotations)."""

    seriesuid: np.ndarray
    xyz: np.ndarray
    value: np.ndarray

    @classmethod
    def from_rows(cls, uids: Sequence[str], xyz: Any, value: Any) -> "PointTable":
        xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
        return cls(np.asarray(list(uids), dtype=object), xyz, np.asarray(value, np.float64).reshape(-1))

    def __len__(self) -> int:
        return len(self.seriesuid)


def read_points_csv(path: str | os.PathLike, value_column: str) -> PointTable:
    """Reads ``seriesuid,coordX,coordY,coordZ,<value_column>`` (header required, any column order).

    Errors name the file, the 1-based line and the column.
    """
    path = os.fspath(path)
    need = ("seriesuid", "coordX", "coordY", "coordZ", value_column)
    with open_csv(path) as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise EvaluationInputError(f"{path}: empty file (expected a header {','.join(need)})") from None
        missing = [c for c in need if c not in header]
        if missing:
            raise EvaluationInputError(f"{path}: line 1: header {header} lacks column(s) {missing}")
        idx = [header.index(c) for c in need]
        uids, vals = [], []
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise EvaluationInputError(f"{path}: line {line}: {len(row)} fields, header has {len(header)}")
            uids.append(row[idx[0]].strip())
            nums = []
            for c, i in zip(need[1:], idx[1:]):
                try:
                    x = float(row[i])
                except ValueError:
                    raise EvaluationInputError(f"{path}: line {line}: column {c}: {row[i]!r} is not a number") from None
                if not np.isfinite(x):
                    raise EvaluationInputError(f"{path}: line {line}: column {c}: {row[i]!r} is not finite")
                nums.append(x)
            vals.append(nums)
    v = np.asarray(vals, np.float64).reshape(-1, 4)
    return PointTable(np.asarray(uids, dtype=object), v[:, :3], v[:, 3])


def read_seriesuids(path: str | os.PathLike) -> list[str]:
    """Reads seriesuids.csv (one uid per line, no header; first column)."""
    path = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            out = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    except OSError as e:
        raise EvaluationInputError(f"{path}: cannot open ({e})") from e
    if out and out[0] == "seriesuid":
        out = out[1:]
    if not out:
        raise EvaluationInputError(f"{path}: no series uids")
    return out


@dataclasses.dataclass
class LunaResult:
    fp_rates: np.ndarray
    sensitivity: np.ndarray          # linear interpolation
    cpm: float
    sensitivity_corner: np.ndarray   # the script's nearest-corner reading
    cpm_corner: float
    curve_fps: np.ndarray
    curve_sens: np.ndarray
    curve_thresholds: np.ndarray
    counts: dict[str, int]
    notes: list[str]

    def to_dict(self, with_curve: bool = False) -> dict[str, Any]:
        out = {
            "fp_rates": self.fp_rates.tolist(),
            "sensitivity": self.sensitivity.tolist(),
            "cpm": self.cpm,
            "sensitivity_corner": self.sensitivity_corner.tolist(),
            "cpm_corner": self.cpm_corner,
            "counts": dict(self.counts),
            "notes": list(self.notes),
        }
        if with_curve:
            out["curve_fps"] = self.curve_fps.tolist()
            out["curve_sens"] = self.curve_sens.tolist()
        return out


def _roc_points(labels: np.ndarray, scores: np.ndarray):
    """sklearn.metrics.roc_curve's (fps, tps, thresholds) counts with drop_intermediate=True."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s = scores[order]
    y = labels[order]
    distinct = np.flatnonzero(np.diff(s))
    idx = np.r_[distinct, len(y) - 1]
    tps = np.cumsum(y)[idx].astype(np.float64)
    fps = 1.0 + idx - tps
    thr = s[idx]
    if len(fps) > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    return np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thr]


def corner_reading(curve_fps: np.ndarray, curve_sens: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """The script's reading: at each rate, the sensitivity of the last curve point among those with
    the smallest ``fps - rate >= 0``; the last point where no point reaches the rate."""
    out = []
    for r in rates:
        d = curve_fps - r
        ok = d >= 0
        if not ok.any():
            out.append(curve_sens[-1])
            continue
        m = d[ok].min()
        out.append(curve_sens[np.flatnonzero(d == m)[-1]])
    return np.asarray(out, np.float64)


def _scan_ids(uids: np.ndarray, scans: list[str]) -> np.ndarray:
    lookup = {u: i for i, u in enumerate(scans)}
    return np.fromiter((lookup.get(u, -1) for u in uids), dtype=np.int64, count=len(uids))


def luna16_froc(
    candidates: PointTable,
    annotations: PointTable,
    excluded: PointTable,
    seriesuids: Sequence[str],
    *,
    max_marks: int = 100,
    fp_rates: Sequence[float] = LUNA_FP_RATES,
) -> LunaResult:
    """LUNA16 FROC / CPM (see the module docstring for every rule).

    ``candidates.value``: probability; ``annotations.value`` / ``excluded.value``: diameter in mm.
    Coordinates are world mm. Returns :class:`LunaResult` with counts ``tp``, ``fp``, ``fn``,
    ``nodules``, ``scans``, ``candidates`` (kept), ``dropped_by_cap``, ``unlisted_scan``,
    ``ignored_on_excluded``, ``ignored_double``.
    """
    scans = list(dict.fromkeys(seriesuids))
    nscan = len(scans)
    if nscan == 0:
        raise EvaluationInputError("seriesuids: empty list of scans")
    notes: list[str] = []
    csid = _scan_ids(candidates.seriesuid, scans)
    unlisted = int((csid < 0).sum())
    if unlisted:
        notes.append(f"{unlisted} candidate(s) on scans not in seriesuids ignored")
    keep = csid >= 0
    cxyz, cp, csid = candidates.xyz[keep], candidates.value[keep], csid[keep]

    # --- the 100-marks cap, per scan: keep p > p of the (max_marks+1)-th highest
    dropped = 0
    if max_marks > 0 and len(cp):
        o = np.lexsort((-cp, csid))
        sid_o = csid[o]
        start = np.searchsorted(sid_o, sid_o, side="left")
        rank = np.arange(len(o)) - start
        counts = np.bincount(csid, minlength=nscan)
        cut = np.full(nscan, -np.inf)
        at = rank == max_marks
        cut[sid_o[at]] = cp[o][at]
        over = counts[csid] > max_marks
        kept = ~over | (cp > cut[csid])
        dropped = int((~kept).sum())
        cxyz, cp, csid = cxyz[kept], cp[kept], csid[kept]

    # --- findings: included nodules then excluded ones
    nsid = _scan_ids(annotations.seriesuid, scans)
    nsel = nsid >= 0
    nxyz, nd, nsid = annotations.xyz[nsel], annotations.value[nsel], nsid[nsel]
    esid = _scan_ids(excluded.seriesuid, scans)
    esel = esid >= 0
    exyz, ed, esid = excluded.xyz[esel], excluded.value[esel], esid[esel]
    nnod = len(nsid)

    def hits(fxyz, fd, fsid):
        """(candidate, finding) pairs in the same scan with squared distance < squared radius."""
        co = np.argsort(csid, kind="stable")
        fo = np.argsort(fsid, kind="stable")
        ia, ib = group_pairs(np.bincount(csid, minlength=nscan), np.bincount(fsid, minlength=nscan))
        ci, fi = co[ia], fo[ib]
        d = np.where(fd < 0.0, 10.0, fd)
        r2 = (d / 2.0) ** 2
        diff = fxyz[fi] - cxyz[ci]
        dist = diff[:, 0] ** 2 + diff[:, 1] ** 2 + diff[:, 2] ** 2
        h = dist < r2[fi]
        return ci[h], fi[h]

    hc, hn = hits(nxyz, nd, nsid)
    ec, _ = hits(exyz, ed, esid)
    on_nodule = np.zeros(len(cp), bool)
    on_nodule[hc] = True
    on_excl = np.zeros(len(cp), bool)
    on_excl[ec] = True
    is_fp = ~on_nodule & ~on_excl
    best = np.full(nnod, -np.inf)
    np.maximum.at(best, hn, cp[hc])
    nmatch = np.bincount(hn, minlength=nnod)
    found = nmatch > 0
    ndet = int(found.sum())

    labels = np.r_[np.ones(ndet), np.zeros(int(is_fp.sum()))]
    scores = np.r_[best[found], cp[is_fp]]
    nfp = int(is_fp.sum())
    counts = {
        "scans": nscan, "nodules": nnod, "tp": ndet, "fn": nnod - ndet, "fp": nfp,
        "candidates": int(len(cp)), "dropped_by_cap": dropped, "unlisted_scan": unlisted,
        "ignored_on_excluded": int((on_excl & ~on_nodule).sum()),
        "ignored_double": int(np.maximum(nmatch - 1, 0).sum()),
    }
    rates = np.asarray(fp_rates, np.float64)
    if nnod == 0:
        notes.append("no nodules in the listed scans: sensitivity undefined")
        nan = np.full(len(rates), np.nan)
        return LunaResult(rates, nan, float("nan"), nan.copy(), float("nan"), np.zeros(1), np.zeros(1),
                          np.full(1, np.inf), counts, notes)
    if ndet == 0:
        notes.append("no nodule found: sensitivity 0 (the script yields NaN)")
        z = np.zeros(len(rates))
        fps_c = np.array([0.0, nfp / nscan]) if nfp else np.zeros(1)
        return LunaResult(rates, z, 0.0, z.copy(), 0.0, fps_c, np.zeros(len(fps_c)),
                          np.full(len(fps_c), np.inf), counts, notes)
    fpc, tpc, thr = _roc_points(labels, scores)
    tpr = tpc / tpc[-1]
    if nfp == 0:
        notes.append("no false positives: the FP axis is all zeros (the script's border case)")
        curve_fps = np.zeros(len(fpc))
    else:
        fpr = fpc / fpc[-1]
        curve_fps = fpr * (len(labels) - ndet) / nscan
    curve_sens = (tpr * ndet) / nnod
    sens = np.interp(rates, curve_fps, curve_sens)
    corner = corner_reading(curve_fps, curve_sens, rates)
    return LunaResult(rates, sens, float(np.mean(sens)), corner, float(np.mean(corner)), curve_fps,
                      curve_sens, thr, counts, notes)


def luna16_froc_from_files(
    candidates_csv: str | os.PathLike,
    annotations_csv: str | os.PathLike,
    excluded_csv: str | os.PathLike,
    seriesuids_csv: str | os.PathLike,
    **kwargs: Any,
) -> LunaResult:
    """:func:`luna16_froc` on the four csv files of the challenge."""
    return luna16_froc(
        read_points_csv(candidates_csv, "probability"),
        read_points_csv(annotations_csv, "diameter_mm"),
        read_points_csv(excluded_csv, "diameter_mm"),
        read_seriesuids(seriesuids_csv),
        **kwargs,
    )
