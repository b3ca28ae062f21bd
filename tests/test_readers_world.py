"""Synthetic world (tiny) -> readers: every dataset checks clean and every annotated lesion of the
world's truth lands on a Case lesion at the right slice and pixels.

Skipped where the synthetic world (data_prep.synthesize) is not part of the checkout. The truth is
mapped independently of the readers: SimpleITK's own physical point -> index mapping on an image
reoriented with SimpleITK's DICOMOrient.
"""

from __future__ import annotations

import csv
import glob

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import check
from data_prep.readers import reader_module


@pytest.fixture(scope="module")
def world(request):
    pytest.importorskip("data_prep.synthesize", reason="synthetic world not in this checkout")
    return request.getfixturevalue("tiny_world")


@pytest.fixture(scope="module")
def cases(world):
    out = {}
    for d in ("deeplesion", "luna16", "lits", "nihln"):
        bad: list = []
        out[d] = {c.case_id: c for c in reader_module(d).iter_cases(world, skip_bad=True, bad_items=bad)}
        assert bad == [], bad
        assert out[d], f"no {d} cases"
    return out


def test_world_checks_clean(world):
    results = check.check_raw(world, show_progress=False)
    assert set(results) == {"deeplesion", "luna16", "lits", "nihln"}
    assert all(v == [] for v in results.values()), results


def _truth(world, name):
    with open(world / "truth" / name, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _series_image(world, ds, scan):
    if ds == "luna16":
        return sitk.ReadImage(glob.glob(str(world / "LUNA16" / "subset*" / f"{scan}.mhd"))[0])
    if ds == "lits":
        return sitk.ReadImage(glob.glob(str(world / "LiTS" / f"volume-{scan}.nii*"))[0])
    folder = sorted({p.rsplit("/", 1)[0] for p in glob.glob(str(world / "NIH-LN" / scan / "*" / "*" / "*.dcm"))})[0]
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(folder))
    return r.Execute()


@pytest.mark.parametrize("ds,case_key", [("luna16", lambda s: s), ("lits", lambda s: f"volume-{s}"),
                                         ("nihln", lambda s: s)])
def test_single_type_truth_lands_on_lesions(world, cases, ds, case_key):
    n_labeled = 0
    for r in _truth(world, f"{ds}_lesions.csv"):
        c = cases[ds][case_key(r["scan"])]
        img = sitk.DICOMOrient(_series_image(world, ds, r["scan"]), "LPS")
        w = (float(r["world_x"]), float(r["world_y"]), float(r["world_z"]))
        ci = img.TransformPhysicalPointToContinuousIndex(w)
        sp = img.GetSpacing()
        ey = (ci[1] + 0.5 - c.source_crop_yx[0]) * sp[1] / c.pixel_mm
        ex = (ci[0] + 0.5 - c.source_crop_yx[1]) * sp[0] / c.pixel_mm
        # slices within half a source slice of the centre (the label may sit on either neighbour)
        near = np.flatnonzero(np.abs(c.z_mm - w[2]) <= max(c.slice_mm, sp[2]) / 2 + 1e-6)
        hits = [l for l in c.lesions if l.provenance == 0 and l.slice_index in near
                and l.box[0] - 1 <= ey <= l.box[2] + 1 and l.box[1] - 1 <= ex <= l.box[3] + 1]
        if r["labeled"] == "1":
            n_labeled += 1
            assert hits, f"{ds} {r['scan']} lesion {r['lesion_id']} not annotated near its centre"
    assert n_labeled > 0


def test_deeplesion_marked_lesions(world, cases):
    from data_prep.readers import deeplesion as dl

    rows = {r.row: r for r in dl.parse_dl_info(world / "DeepLesion" / dl.INFO_CSV)}
    n = 0
    for t in _truth(world, "deeplesion_lesions.csv"):
        if t["marked"] != "1":
            continue
        n += 1
        row = rows[int(t["dl_row"])]
        c = cases["deeplesion"][t["subvolume"]]
        assert row.case_id == t["subvolume"]
        x1, y1, z1, x2, y2, z2 = (float(t[k]) for k in ("x1", "y1", "z1", "x2", "y2", "z2"))
        assert z1 <= row.key_slice <= z2
        k = int(np.argmin(np.abs(c.z_mm - (row.key_slice - 1) * row.spacing_mm[2])))
        # truth box centre (inclusive pixel indices) -> preprocessed pixels
        s_y, s_x = row.spacing_mm[1] / c.pixel_mm, row.spacing_mm[0] / c.pixel_mm
        ey = ((y1 + y2 + 1) / 2 - c.source_crop_yx[0]) * s_y
        ex = ((x1 + x2 + 1) / 2 - c.source_crop_yx[1]) * s_x
        d = [np.hypot((l.box[0] + l.box[2]) / 2 - ey, (l.box[1] + l.box[3]) / 2 - ex)
             for l in c.lesions if l.slice_index == k]
        assert d and min(d) < 3.0, (t, d)
        assert k in set(c.key_slices.tolist())
    assert n > 0
