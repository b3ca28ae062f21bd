"""Mining quality on hand-built truth; theta and sigma sweeps; the released-layout converter."""

from __future__ import annotations

import dataclasses

import math

import numpy as np
import pytest

from uld_jax.mine import quality, run, table


def _truth():
    return quality.LesionTruth(
        case_id=np.array(["A", "A", "A", "B"]),
        box3d=np.array([
            [2, 10, 10, 6, 30, 30],       # 0: marked, slices 2..5 (slice-centre rule)
            [0, 50, 50, 3, 60, 60],       # 1: unmarked, slices 0..2
            [8, 70, 70, 10, 90, 90],      # 2: unmarked, slices 8..9
            [0, 0, 0, 4, 20, 20],         # 3: unmarked, case B slices 0..3
        ], np.float64),
        lesion_id=np.array([1, 2, 3, 1]),
        marked=np.array([True, False, False, False]),
    )


def _overlay():
    rows = [
        # case, slice, kind, box
        ("A", 3, 1, [12, 12, 28, 28]),    # on lesion 0 (marked)
        ("A", 1, 1, [50, 50, 60, 60]),    # on lesion 1 (unmarked)
        ("A", 1, 1, [52, 52, 58, 58]),    # on lesion 1 again
        ("A", 6, 1, [10, 10, 30, 30]),    # slice 6: centre 6.5 is past lesion 0's z2 = 6 -> false
        ("A", 4, 1, [0, 0, 40, 40]),      # IoBB 400 / 1600 = 0.25 < 0.3 -> false
        ("B", 2, 1, [0, 0, 10, 10]),      # on lesion 3 (unmarked)
        ("A", 9, 2, [70, 70, 90, 90]),    # suspicious region on lesion 2
        ("A", 9, 2, [0, 0, 5, 5]),        # suspicious region on nothing
        ("A", 1, 3, [0, 0, 0, 0]), ("A", 3, 3, [0, 0, 0, 0]), ("A", 6, 3, [0, 0, 0, 0]),
        ("A", 9, 3, [0, 0, 0, 0]), ("B", 2, 3, [0, 0, 0, 0]),
    ]
    n = len(rows)
    meta = table.make_meta(checkpoint_step=1, config_hash="h", theta=0.15, sigma=0.5)
    return table.build_overlay(
        dataset=np.array(["deeplesion"] * n), case_id=np.array([r[0] for r in rows]),
        slice_index=np.array([r[1] for r in rows]), kind=np.array([r[2] for r in rows]),
        box=np.array([r[3] for r in rows], np.float32), score=np.full(n, 0.9, np.float32),
        expert=np.zeros(n, int), lesion_id=np.full(n, -1), meta=meta)


def test_quality_on_hand_built_truth():
    q = quality.mining_quality(_truth(), _overlay())
    assert q["n_mined"] == 6 and q["n_mined_true"] == 4
    assert q["precision"] == pytest.approx(4 / 6)
    assert q["n_mined_on_unmarked"] == 3 and q["n_lesions_found"] == 3
    assert q["n_unmarked_visible"] == 3 and q["n_unmarked_found"] == 2
    assert q["recall_unmarked"] == pytest.approx(2 / 3)
    assert q["n_suspicious"] == 2 and q["n_suspicious_true"] == 1
    assert q["suspicious_true_fraction"] == 0.5 and q["n_suspicious_on_unmarked"] == 1
    # Seen slices restrict the recall's denominator: without case B, lesion 3 is not visible.
    q2 = quality.mining_quality(_truth(), _overlay(), seen_case_id=np.array(["A", "A"]),
                                seen_slice_index=np.array([1, 9]))
    assert q2["n_unmarked_visible"] == 2 and q2["n_unmarked_found"] == 1
    # The hit threshold is applied as ">=": at min_iobb above 1 nothing can hit.
    q3 = quality.mining_quality(_truth(), _overlay(), min_iobb=1.01)
    assert q3["n_mined_true"] == 0 and math.isnan(quality._ratio(0, 0))


def test_match_to_truth_picks_largest_iobb_and_respects_case():
    t = _truth()
    hit = quality.match_to_truth(t, np.array(["A", "B", "C", "A"]), np.array([2, 2, 2, 2]),
                                 np.array([[15, 15, 55, 55],   # IoBB 225/1600 (lesion 0), 25/1600 (1): none
                                           [0, 0, 20, 20],
                                           [0, 0, 20, 20],     # case C has no truth
                                           [11, 11, 29, 29]], np.float32))
    np.testing.assert_array_equal(hit, [-1, 3, -1, 0])
    hit = quality.match_to_truth(t, np.array(["A"]), np.array([2]),
                                 np.array([[20, 20, 56, 56]], np.float32), min_iobb=0.0)
    # IoBB with lesion 0: 100 / 1296; with lesion 1: 36 / 1296 -> lesion 0.
    np.testing.assert_array_equal(hit, [0])


def test_case_frame_conversion():
    # Source: 0.8 mm pixels, 5 mm slices, slice number 1 at 0 mm; Case: 0.8 mm, 2 mm, slice 0 at 0.
    fr = quality.CaseFrame("c", scale_yx=(1.0, 1.0), src_slice_mm=5.0)
    got = fr.to_case(np.array([[10, 20, 3, 19, 29, 4]]))
    # Slices 3..4 are slabs centred at 10 and 15 mm: [7.5, 17.5] mm -> Case [4.25, 9.25].
    np.testing.assert_allclose(got, [[4.25, 20, 10, 9.25, 30, 20]])
    t = quality.LesionTruth(np.array(["c"]), got, np.array([1]), np.array([False]))
    present = [i for i in range(12) if quality.visible_truth(t, ["c"], [i])[0]]
    assert present == [4, 5, 6, 7, 8]            # Case slices at 8..16 mm lie inside the slabs
    fr = quality.CaseFrame("c", scale_yx=(0.5, 0.25), crop_yx=(5, 2), src_slice_mm=2.0,
                           src_z1_mm=-4.0, out_z0_mm=1.0)
    got = fr.to_case(np.array([[10, 20, 3, 19, 29, 4]]))
    # z: slabs 3..4 centred at 0 and 2 mm -> [-1, 3] mm -> Case (-1 - 1) / 2 + 0.5 = -0.5 .. 1.5.
    np.testing.assert_allclose(got, [[-0.5, 7.5, 2, 1.5, 12.5, 4.5]])
    t = quality.truth_from_volumetric({"s2": np.zeros((0, 6)), "s1": np.array([[10, 20, 3, 19, 29, 4]])},
                                      {"s1": fr, "s2": fr}, marked={"s1": [True], "s2": []})
    assert t.case_id.tolist() == ["c"] and t.marked.tolist() == [True]
    with pytest.raises(KeyError, match="s3"):
        quality.truth_from_volumetric({"s3": np.zeros((1, 6))}, {})


def test_case_frame_from_a_resampling_plan():
    """Duck-typed data_prep.preprocess.Resampling of sub-volume ..._011-040 (5 mm, 0.7 mm px)."""
    import types

    dz = 5.0
    src_z = (np.arange(11, 41) - 1.0) * dz                    # the reader's positions
    out_z = np.arange(src_z[0], src_z[-1] + 1e-9, 2.0)
    plan = types.SimpleNamespace(crop_yx=(30, 12), scale_yx=(0.875, 0.875), src_z=src_z,
                                 out_z=out_z, slice_mm=2.0)
    fr = quality.CaseFrame.from_resampling("000001_01_01", plan, first_slice_number=11)
    assert fr.src_z1_mm == 0.0 and fr.out_z0_mm == 50.0 and fr.src_slice_mm == 5.0
    # A lesion on source slice 11 only (slab [47.5, 52.5] mm): Case slices at 50 and 52 mm.
    got = fr.to_case(np.array([[100, 200, 11, 119, 239, 11]]))
    t = quality.LesionTruth(np.array(["000001_01_01"]), got, np.array([1]), np.array([False]))
    present = [i for i in range(out_z.size)
               if quality.visible_truth(t, ["000001_01_01"], [i])[0]]
    assert present == [0, 1]
    np.testing.assert_allclose(got[0, [1, 2, 4, 5]],
                               [(200 - 30) * 0.875, (100 - 12) * 0.875, (240 - 30) * 0.875,
                                (120 - 12) * 0.875])


def _two_study_world(seed=0, dim=8):
    """Per patient: study 1 (key slice marked) and study 2 (same lesion, unmarked), 6 slices each;
    plus an unmarked liver lesion in study 2 that the LiTS expert proposes."""
    rng = np.random.default_rng(seed)
    n_pat, per = 5, 6
    case, sl, pat = [], [], []
    for p in range(n_pat):
        for study in (1, 2):
            for s in range(per):
                case.append(f"{p:06d}_{study:02d}_01")
                sl.append(s)
                pat.append(p)
    slices = run.SliceTable(np.array(["deeplesion"] * len(case)), np.array(case), np.array(sl),
                            np.array(pat))
    emb = rng.standard_normal((n_pat, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    key = np.array([p * 2 * per + 3 for p in range(n_pat)])
    ann = run.Annotations(key, np.tile([[20, 20, 40, 40]], (n_pat, 1)), np.arange(n_pat), emb)
    rows = []
    for k in range(len(case)):
        p = pat[k]
        d = emb[p] + 0.03 * rng.standard_normal(dim).astype(np.float32)
        f = rng.standard_normal(dim).astype(np.float32)
        rows.append((k, [20, 20, 40, 40], 0.9, 0, d))
        rows.append((k, [60, 60, 70, 70], 0.6, 0, f / np.linalg.norm(f)))
        rows.append((k, [80, 10, 90, 20], 0.3 + 0.1 * (k % 7), 2, f))     # LiTS expert
    props = run.Proposals(np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.float32),
                          np.array([r[2] for r in rows], np.float32), np.array([r[3] for r in rows]),
                          np.stack([r[4] for r in rows]))
    tc, tb, tid, tm = [], [], [], []
    for p in range(n_pat):
        for study in (1, 2):
            tc.append(f"{p:06d}_{study:02d}_01")
            tb.append([0, 20, 20, per, 40, 40])
            tid.append(p)
            tm.append(study == 1)
        tc.append(f"{p:06d}_02_01")
        tb.append([0, 80, 10, per, 90, 20])
        tid.append(100 + p)
        tm.append(False)
    truth = quality.LesionTruth(np.array(tc), np.array(tb, np.float64), np.array(tid), np.array(tm))
    return truth, slices, ann, props


def test_sweeps_on_a_known_world():
    truth, slices, ann, props = _two_study_world()
    rows = quality.sweep_theta([0.0, 0.01, 0.15, 2.0], truth, slices, ann, props)
    n = [r["n_mined"] for r in rows]
    assert n == sorted(n) and n[0] == 0
    r15 = rows[2]
    # theta 0.15: the lesion on every non-key slice of both studies (5 * 11), all true; every
    # unmarked lesion (the study-2 twins) found; the liver lesions were never proposed by MAM.
    assert r15["n_mined"] == 55 and r15["precision"] == 1.0
    assert r15["n_unmarked_visible"] == 10 and r15["n_unmarked_found"] == 5
    # theta 2.0 also mines the random far boxes (not lesions): precision drops.
    assert rows[3]["n_mined"] > 55 and rows[3]["precision"] < 1.0
    srows = quality.sweep_sigma([0.0, 0.5, 0.8, 1.0], truth, slices, ann, props)
    ns = [r["n_suspicious"] for r in srows]
    assert ns == sorted(ns, reverse=True) and ns[-1] == 0
    # Suspicious regions are on the unmarked liver lesion in study 2 only.
    for r in srows[:-1]:
        study2 = r["n_suspicious_true"]
        assert 0 < study2 < r["n_suspicious"]
        assert r["n_suspicious_on_unmarked"] == study2


def test_location_sweep_on_a_known_world():
    truth, slices, ann, props = _two_study_world()
    assert quality.sweep_location([0.0, 64.0], truth, slices, ann, props) == []  # no pixel sizes
    n = len(slices)
    slices = dataclasses.replace(slices, pixel_mm=np.full(n, 1.0), slice_mm=np.full(n, 2.0))
    rows = quality.sweep_location([0.0, 64.0, 1e6], truth, slices, ann, props)
    assert [r["location_mm"] for r in rows] == [0.0, 64.0, 1e6]
    # 0 is the paper's rule: the theta sweep's row at the same theta
    paper = quality.sweep_theta([0.15], truth, slices, ann, props)[0]
    assert rows[0]["n_mined"] == paper["n_mined"] == 55 and rows[0]["precision"] == 1.0
    # 64 mm: compared within a Case, so only study 1's neighbours of each key slice (within the
    # lesion, 2-6 mm away) can match; the study-2 twins are out of reach
    assert 0 < rows[1]["n_mined"] <= 5 * 5 and rows[1]["precision"] == 1.0
    assert rows[1]["n_unmarked_found"] == 0
    # a huge scale makes the place negligible: within each Case, the embedding decides again
    assert rows[2]["n_mined"] == 5 * 5
    for r in rows:
        assert 0.0 <= r["p_own_closer_than_background"] <= 1.0


def test_load_volumetric_truth_and_format(tmp_path):
    import pickle

    p = tmp_path / "truth.pkl"
    good = {"train": {"000001_01_01_010-040": np.array([[10, 20, 12, 19, 29, 14]], np.float64),
                      "000002_01_01_001-009": np.zeros((0, 6))},
            "val": {}, "test": {}}
    p.write_bytes(pickle.dumps(good))
    t = quality.load_volumetric_truth(str(p))
    assert set(t) == {"000001_01_01_010-040", "000002_01_01_001-009"}
    assert t["000002_01_01_001-009"].shape == (0, 6)
    bad = {"train": {"000001_01_01_010-040": np.array([[10, 20, 12, 9, 29, 14]])}}
    p.write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="x2 < x1"):
        quality.load_volumetric_truth(str(p))
    bad = {"train": {"case7": np.zeros((1, 6))}}
    p.write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="case7"):
        quality.load_volumetric_truth(str(p))
    text = quality.format_quality([{"theta": 0.1, "n_mined": 3, "precision": 1.0},
                                   {"theta": 0.2, "n_mined": 5, "precision": float("nan")}])
    lines = text.splitlines()
    assert lines[0].split() == ["theta", "n_mined", "precision"]
    assert lines[2].split() == ["0.200", "5", "nan"]


def test_probability_less_against_pairs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = np.round(rng.uniform(0, 1, rng.integers(1, 12)), 1)
        b = np.round(rng.uniform(0, 1, rng.integers(1, 12)), 1)
        ref = np.mean((a[:, None] < b[None, :]) + 0.5 * (a[:, None] == b[None, :]))
        assert quality.probability_less(a, b) == pytest.approx(ref)
    assert np.isnan(quality.probability_less([], [1.0]))


def test_mining_inputs_check_hand_worked():
    # one patient, case "c": lesion 0 (annotated on slice 0) and lesion 1 (unmarked), slices 0-2
    truth = quality.LesionTruth(np.asarray(["c", "c"]),
                                np.asarray([[0, 10, 10, 2, 20, 20], [0, 30, 30, 2, 40, 40]], float),
                                np.asarray([7, 8]), np.asarray([True, False]))
    slices = run.SliceTable(np.asarray(["deeplesion"] * 2), np.asarray(["c", "c"]),
                            np.asarray([0, 1]), np.asarray([5, 5]))
    ann = run.Annotations(np.asarray([0]), np.asarray([[10, 10, 20, 20]], float), np.asarray([7]),
                          np.asarray([[1.0, 0.0]], np.float32))
    boxes = np.asarray([[10, 10, 20, 20], [30, 30, 40, 40], [50, 50, 60, 60], [60, 60, 70, 70],
                        [10, 10, 20, 20]], float)
    props = run.Proposals(
        slice=np.asarray([1, 1, 1, 0, 1]), box=boxes, score=np.asarray([0.9, 0.6, 0.2, 0.05, 0.99]),
        expert=np.asarray([0, 0, 0, 0, 1]),              # the last: a single-type expert, not MAM's
        embedding=np.asarray([[1, 0], [0, 1], [0, 1], [0.6, 0.8], [0, 1]], np.float32))
    c = quality.mining_inputs_check(truth, slices, ann, props, score_levels=(0.05, 0.5, 0.95))
    assert c["n_universal"] == 4 and c["n_on_lesion"] == 2
    assert c["n_annotations"] == 1 and c["n_annotations_on_truth"] == 1
    assert [(r["n"], r["on_lesion_fraction"]) for r in c["by_score"]][:2] == [(4, 0.5), (2, 1.0)]
    assert c["by_score"][2]["n"] == 0 and np.isnan(c["by_score"][2]["on_lesion_fraction"])
    # proposal 0 is on lesion 0 at distance 0 from its annotation; the background proposals (2, 3)
    # are sqrt(2) and 0.894 from it; proposal 1 (lesion 1, unannotated) is neither
    assert c["n_on_annotated_lesion"] == 1 and c["own_distance_p10_50_90"] == [0.0] * 3
    assert c["background_nearest_p10_50_90"][1] == pytest.approx((np.sqrt(2) + np.sqrt(0.8)) / 2)
    assert c["p_own_closer_than_background"] == 1.0
    from uld_jax.mine import report
    text = "\n".join(report.inputs_check_lines(c))
    assert "P(own < background) = 1.000" in text and "| 0.500 | 2 | 1.000 |" in text
