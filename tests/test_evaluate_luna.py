"""LUNA16 FROC / CPM: predictions built from the real annotations.csv, and the script's rules."""

from __future__ import annotations

import numpy as np
import pytest

from uld_jax.evaluate.boxes import EvaluationInputError
from uld_jax.evaluate.luna import (
    PointTable,
    luna16_froc,
    luna16_froc_from_files,
    read_points_csv,
    read_seriesuids,
)


@pytest.fixture(scope="module")
def luna(real_data):
    d = real_data / "luna16"
    return (read_points_csv(d / "annotations.csv", "diameter_mm"),
            read_points_csv(d / "annotations_excluded.csv", "diameter_mm"),
            read_seriesuids(d / "seriesuids.csv"))


def test_real_files_load(luna):
    ann, exc, scans = luna
    assert (len(ann), len(scans)) == (1186, 888)
    assert len(set(ann.seriesuid)) == 601
    assert (exc.value == -1).any()


def test_every_nodule_found_without_fp(luna):
    ann, exc, scans = luna
    r = luna16_froc(PointTable(ann.seriesuid, ann.xyz, np.ones(len(ann))), ann, exc, scans)
    assert r.cpm == 1.0 and r.cpm_corner == 1.0
    assert r.sensitivity.tolist() == [1.0] * 7
    assert r.counts["tp"] == 1186 and r.counts["fp"] == 0


def _known_case(ann, scans):
    """100 nodules missed; 543 found at 0.9, 543 at 0.2; 444 FPs at 0.6 (one on each of the first
    444 scans) and 1776 at 0.1 (two on every scan), far from any finding."""
    uids, xyz, p = [], [], []
    for i in range(100, 1186):
        uids.append(ann.seriesuid[i]); xyz.append(ann.xyz[i]); p.append(0.9 if i < 643 else 0.2)
    far = np.array([5000.0, 5000.0, 5000.0])
    for j, s in enumerate(scans):
        if j < 444:
            uids.append(s); xyz.append(far); p.append(0.6)
        uids += [s, s]; xyz += [far + 100, far + 200]; p += [0.1, 0.1]
    return PointTable.from_rows(uids, xyz, p)


def test_known_misses_and_fps(luna):
    ann, exc, scans = luna
    r = luna16_froc(_known_case(ann, scans), ann, exc, scans)
    # curve (FPs/scan, found): (0,0) (0,543) (0.5,543) (0.5,1086) (2.5,1086); 1186 nodules.
    np.testing.assert_allclose(r.curve_fps, [0, 0, 0.5, 0.5, 2.5])
    np.testing.assert_allclose(r.curve_sens, np.array([0, 543, 543, 1086, 1086]) / 1186)
    a, b = 543 / 1186, 1086 / 1186
    np.testing.assert_allclose(r.sensitivity, [a, a, b, b, b, b, b])
    assert r.cpm == pytest.approx((2 * a + 5 * b) / 7)
    # the script's corner reading takes the corner at or above each rate: (0.5, 1086) for 1/8, 1/4
    np.testing.assert_allclose(r.sensitivity_corner, [b] * 7)
    assert (r.counts["tp"], r.counts["fn"], r.counts["fp"]) == (1086, 100, 2220)


def test_candidates_on_excluded_findings_are_ignored(luna):
    ann, exc, scans = luna
    base = _known_case(ann, scans)
    listed = np.isin(exc.seriesuid, np.array(scans, dtype=object))
    # excluded centres not inside any nodule of their scan: marks there are ignored, not FPs
    keep = []
    for i in np.flatnonzero(listed):
        same = ann.seriesuid == exc.seriesuid[i]
        d2 = ((ann.xyz[same] - exc.xyz[i]) ** 2).sum(1)
        if not (d2 < (ann.value[same] / 2) ** 2).any():
            keep.append(i)
        if len(keep) == 300:
            break
    ex_xyz, ex_uid = exc.xyz[keep], exc.seriesuid[keep]
    cands = PointTable(np.r_[base.seriesuid, ex_uid], np.r_[base.xyz, ex_xyz], np.r_[base.value, np.full(300, 0.95)])
    r0 = luna16_froc(base, ann, exc, scans)
    r = luna16_froc(cands, ann, exc, scans)
    assert r0.counts["ignored_on_excluded"] == 0 and r.counts["ignored_on_excluded"] == 300
    assert (r.counts["fp"], r.counts["tp"]) == (r0.counts["fp"], r0.counts["tp"])
    np.testing.assert_array_equal(r.sensitivity, r0.sensitivity)
    np.testing.assert_array_equal(r.sensitivity_corner, r0.sensitivity_corner)
    # without the excluded list the same marks are 300 FPs scored above everything else
    none = PointTable.from_rows([], np.zeros((0, 3)), [])
    r2 = luna16_froc(cands, ann, none, scans)
    assert r2.counts["fp"] == r0.counts["fp"] + 300 and r2.cpm < r0.cpm


def test_hit_radius_excluded_and_nodule_priority():
    ann = PointTable.from_rows(["a"], [[0, 0, 0]], [6.0])            # radius 3
    exc = PointTable.from_rows(["a"], [[2, 0, 0]], [-1.0])           # unknown size -> radius 5
    cands = PointTable.from_rows(
        ["a"] * 5,
        [[1, 0, 0],      # hits the nodule (and the excluded finding): a TP
         [2.9, 0, 0],    # also inside both: a double hit on the nodule, ignored
         [6, 0, 0],      # 4 mm from the excluded centre: ignored
         [7, 0, 0],      # exactly 5 mm from it: not < radius -> FP
         [3, 0, 0]],     # exactly 3 mm from the nodule -> not a nodule hit; 1 mm from excluded: ignored
        [0.5, 0.7, 0.9, 0.3, 0.8])
    r = luna16_froc(cands, ann, exc, ["a", "b"])
    c = r.counts
    assert (c["tp"], c["fp"], c["ignored_on_excluded"], c["ignored_double"]) == (1, 1, 2, 1)
    # found nodule scored 0.7 (its best hit), one FP at 0.3 on 2 scans: curve (0,0) (0,1) (0.5,1)
    np.testing.assert_allclose(r.curve_fps, [0, 0, 0.5])
    np.testing.assert_allclose(r.sensitivity, [1.0] * 7)


def test_hundred_marks_cap_strictly_above_101st():
    ann = PointTable.from_rows(["a"], [[0, 0, 0]], [10.0])
    far = [[100.0 + i, 0, 0] for i in range(101)]
    # 101 marks: the nodule's mark is the least probable -> cut away -> missed
    c = PointTable.from_rows(["a"] * 102, far + [[0, 0, 0]], list(np.linspace(0.9, 0.5, 101)) + [0.1])
    r = luna16_froc(c, ann, PointTable.from_rows([], np.zeros((0, 3)), []), ["a"])
    assert r.counts["dropped_by_cap"] == 2 and r.counts["tp"] == 0 and r.cpm == 0.0
    # ties at the cut: 99 marks at 0.9, 3 at 0.5 (ranks 100..102): only the 99 are kept
    c = PointTable.from_rows(["a"] * 102, far + [[0, 0, 0]], [0.9] * 99 + [0.5] * 3)
    r = luna16_froc(c, ann, PointTable.from_rows([], np.zeros((0, 3)), []), ["a"])
    assert r.counts["candidates"] == 99 and r.counts["tp"] == 0
    r = luna16_froc(c, ann, PointTable.from_rows([], np.zeros((0, 3)), []), ["a"], max_marks=-1)
    assert r.counts["candidates"] == 102 and r.counts["tp"] == 1


def test_csv_files_end_to_end_and_errors(tmp_path, real_data):
    d = real_data / "luna16"
    p = tmp_path / "cands.csv"
    p.write_text("seriesuid,coordX,coordY,coordZ,probability\n"
                 "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860,-128.6994211,-175.3192718,-298.3875064,0.9\n")
    r = luna16_froc_from_files(p, d / "annotations.csv", d / "annotations_excluded.csv", d / "seriesuids.csv")
    assert r.counts["tp"] == 1 and r.sensitivity[-1] == pytest.approx(1 / 1186)
    p.write_text("seriesuid,coordX,coordY,coordZ,probability\nx,1,2,oops,0.5\n")
    with pytest.raises(EvaluationInputError, match=r"cands.csv: line 2: column coordZ: 'oops'"):
        read_points_csv(p, "probability")
    p.write_text("seriesuid,coordX,coordY,probability\n")
    with pytest.raises(EvaluationInputError, match=r"lacks column\(s\) \['coordZ'\]"):
        read_points_csv(p, "probability")


def test_matches_loop_oracle_on_random_scans():
    from evaluate_oracles import luna_loop

    rng = np.random.default_rng(5)
    scans = [f"s{i}" for i in range(30)]
    nod, exc, cands = [], [], []
    for s in scans:
        for _ in range(rng.integers(0, 4)):
            c = rng.uniform(-100, 100, 3)
            nod.append((s, *c, float(rng.uniform(3, 20))))
            for _ in range(rng.integers(0, 3)):  # hits, near misses
                cands.append((s, *(c + rng.normal(0, 4, 3)), float(np.round(rng.uniform(), 2))))
        for _ in range(rng.integers(0, 5)):
            c = rng.uniform(-100, 100, 3)
            exc.append((s, *c, float(rng.choice([-1.0, rng.uniform(3, 10)]))))
            cands.append((s, *(c + rng.normal(0, 3, 3)), float(np.round(rng.uniform(), 2))))
        for _ in range(120 if s == "s3" else rng.integers(0, 20)):  # clutter; s3 exceeds the cap
            cands.append((s, *rng.uniform(-100, 100, 3), float(np.round(rng.uniform(), 2))))
    cands.append(("not_listed", 0.0, 0.0, 0.0, 1.0))

    def table(rows):
        return PointTable.from_rows([r[0] for r in rows], [r[1:4] for r in rows], [r[4] for r in rows])

    r = luna16_froc(table(cands), table(nod), table(exc), scans)
    sens, found, nfp = luna_loop(cands, nod, exc, scans)
    assert (r.counts["tp"], r.counts["fp"], r.counts["unlisted_scan"]) == (found, nfp, 1)
    assert r.counts["dropped_by_cap"] > 0
    np.testing.assert_allclose(r.sensitivity, sens, rtol=0, atol=1e-12)
