"""uld_jax.mine.oracle: a lesion's cross-section on a slice (golden), the oracle's positives against
a plain loop over slices and lesions, and the reach counts of a hand-written truth table."""

from __future__ import annotations

import numpy as np
import pytest

from uld_jax.mine import oracle, quality


def test_cross_sections_golden():
    # lesion on slices [0, 10), in-plane y 10..30, x 20..60: centre (20, 40), half extents 10, 20
    b = np.array([[0, 10, 20, 10, 30, 60]] * 4, float)
    box, f = oracle.cross_sections(b, np.array([5.0, 8.0, 2.0, 11.0]))
    np.testing.assert_allclose(f, [1.0, 0.8, 0.8, 0.0])          # t = 0, 0.6, -0.6, outside
    np.testing.assert_allclose(box[0], [10, 20, 30, 60])
    np.testing.assert_allclose(box[1], [12, 24, 28, 56])         # half extents 8, 16
    np.testing.assert_allclose(box[2], box[1])
    np.testing.assert_allclose(box[3], [20, 40, 20, 40])         # collapsed to the centre


def _reference(truth, slice_case, slice_index, ann_slice, ann_box, min_extent, annotated_iou,
               unmarked_only):
    out = []
    for s, (c, z) in enumerate(zip(slice_case, slice_index)):
        for j in range(len(truth)):
            z1, y1, x1, z2, y2, x2 = truth.box3d[j]
            zc = z + 0.5
            if truth.case_id[j] != c or not z1 <= zc <= z2:
                continue
            if unmarked_only and truth.marked[j]:
                continue
            t = (zc - (z1 + z2) / 2) / ((z2 - z1) / 2)
            f = np.sqrt(max(0.0, 1 - t * t))
            if f < min_extent:
                continue
            cy, cx, hy, hx = (y1 + y2) / 2, (x1 + x2) / 2, (y2 - y1) / 2 * f, (x2 - x1) / 2 * f
            box = np.array([cy - hy, cx - hx, cy + hy, cx + hx])
            covered = False
            for a in np.flatnonzero(np.asarray(ann_slice) == s):
                ab = ann_box[a]
                ih = max(0.0, min(box[2], ab[2]) - max(box[0], ab[0]))
                iw = max(0.0, min(box[3], ab[3]) - max(box[1], ab[1]))
                inter = ih * iw
                union = (box[2] - box[0]) * (box[3] - box[1]) + (ab[2] - ab[0]) * (ab[3] - ab[1])
                covered |= inter / (union - inter) >= annotated_iou
            if not covered:
                out.append((s, j, *box))
    return out


@pytest.mark.parametrize("unmarked_only", [False, True])
@pytest.mark.parametrize("min_extent", [0.0, 0.5, 0.9])
def test_oracle_positives_match_a_plain_loop(min_extent, unmarked_only):
    g = np.random.default_rng(3)
    cases = np.array(["a", "b", "c"])
    n = 40
    z1 = g.integers(0, 30, n).astype(float)
    y1, x1 = g.uniform(0, 80, n), g.uniform(0, 80, n)
    truth = quality.LesionTruth(
        case_id=cases[g.integers(0, 3, n)],
        box3d=np.stack([z1, y1, x1, z1 + g.integers(1, 12, n), y1 + g.uniform(4, 30, n),
                        x1 + g.uniform(4, 30, n)], 1),
        lesion_id=np.arange(n, dtype=np.int64), marked=g.random(n) < 0.4)
    slice_case = np.repeat(cases, 12)
    slice_index = np.tile(np.arange(0, 36, 3), 3)
    # annotations: exact copies of some cross-sections (must be skipped) and random boxes
    ann_slice = g.integers(0, slice_case.size, 30)
    a0 = g.uniform(0, 80, (30, 2))
    ann_box = np.concatenate([a0, a0 + g.uniform(5, 30, (30, 2))], 1)
    full = oracle.oracle_positives(truth, slice_case, slice_index, [], [], min_extent=0.5)
    ann_slice = np.r_[ann_slice, full["slice"][:5]]
    ann_box = np.r_[ann_box, full["box"][:5]]
    got = oracle.oracle_positives(truth, slice_case, slice_index, ann_slice, ann_box,
                                  min_extent=min_extent, unmarked_only=unmarked_only)
    want = _reference(truth, slice_case, slice_index, ann_slice, ann_box, min_extent,
                      oracle.DEFAULT_ANNOTATED_IOU, unmarked_only)
    assert len(want) > 10
    assert got["slice"].tolist() == [w[0] for w in want]
    assert got["truth_row"].tolist() == [w[1] for w in want]
    np.testing.assert_allclose(got["box"], np.array([w[2:] for w in want]).reshape(-1, 4))
    copies = set(zip(full["slice"][:5].tolist(), full["truth_row"][:5].tolist()))
    assert not copies & set(zip(got["slice"].tolist(), got["truth_row"].tolist()))
    # every positive is a hit of the quality module's rule (IoBB >= 0.3 on a slice of the lesion)
    hit = quality.match_to_truth(truth, slice_case[got["slice"]], slice_index[got["slice"]],
                                 got["box"])
    assert (hit >= 0).all()


def test_oracle_positives_empty_inputs():
    t = quality.LesionTruth(np.zeros(0, str), np.zeros((0, 6)), np.zeros(0, np.int64),
                            np.zeros(0, bool))
    got = oracle.oracle_positives(t, ["a"], [0], [], [])
    assert got["slice"].shape == (0,) and got["box"].shape == (0, 4)


HEADER = ("subvolume,x1,y1,z1,x2,y2,z2,lesion_id,patient,study,series,split,lesion_type,"
          "coarse_type,organ,long_diameter_mm,marked,dl_row\n")


def test_unmarked_reach_hand_counted(tmp_path):
    rows = [
        # patient 1, study 1: liver tumour 10 marked; liver tumour 11 and lung nodule 12 unmarked
        "s1a,1,1,1,2,2,2,10,1,1,1,train,liver_tumour,4,liver,20,1,0",
        "s1a,1,1,1,2,2,2,11,1,1,1,train,liver_tumour,4,liver,15,0,-1",
        "s1a,1,1,1,2,2,2,12,1,1,1,train,lung_nodule,5,lung,6,0,-1",
        # patient 1, study 2: lung nodule 12 marked now, tumour 10 unmarked (marked in study 1)
        "s1b,1,1,1,2,2,2,12,1,2,1,train,lung_nodule,5,lung,7,1,1",
        "s1b,1,1,1,2,2,2,10,1,2,1,train,liver_tumour,4,liver,22,0,-1",
        # patient 2: a bone lesion unmarked, nothing like it marked
        "s2a,1,1,1,2,2,2,20,2,1,1,train,bone_lesion,1,bone,9,0,-1",
        "s2a,1,1,1,2,2,2,21,2,1,1,train,kidney_lesion,2,kidney,30,1,2",
        # the test split is not counted
        "s3a,1,1,1,2,2,2,30,3,1,1,test,lung_nodule,5,lung,6,0,-1",
    ]
    p = tmp_path / "deeplesion_lesions.csv"
    p.write_text(HEADER + "\n".join(rows) + "\n")
    r = oracle.unmarked_reach(str(p), "train")
    assert r == {"sub_volumes": 3, "lesions": 7, "marked": 3, "unmarked": 4,
                 # 12 in s1a (marked in s1b) and 10 in s1b (marked in s1a)
                 "unmarked_marked_elsewhere": 2,
                 # 11, 12 and 10 share a marked type in patient 1; 20 does not
                 "unmarked_same_type_marked": 3, "unmarked_no_marked_like": 1}
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER.replace("lesion_type", "kind") + rows[0] + "\n")
    with pytest.raises(ValueError, match=r"bad.csv: header lacks column\(s\) \['lesion_type'\]"):
        oracle.unmarked_reach(str(bad))
    worse = tmp_path / "worse.csv"
    worse.write_text(HEADER + rows[0].replace(",10,1,1,1,", ",ten,1,1,1,") + "\n")
    with pytest.raises(ValueError, match="worse.csv line 2"):
        oracle.unmarked_reach(str(worse))
