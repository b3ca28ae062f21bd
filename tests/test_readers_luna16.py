"""LUNA16 reader: the real csvs, .mhd scans written here with a nodule at a known world position,
and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.readers import luna16
from data_prep.types import BadItem
from uld_jax.core import Provenance

UID = "1.2.826.0.1.3680043.8.498.1"
UID2 = "1.2.826.0.1.3680043.8.498.2"


def test_real_csvs(real_data):
    ann = luna16.parse_annotations(real_data / "luna16" / "annotations.csv")
    assert len(ann) == 601 and sum(len(v) for v in ann.values()) == 1186
    first = ann["1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"][0]
    assert first.row == 0
    np.testing.assert_allclose(first.centre_xyz, (-128.6994211, -175.3192718, -298.3875064))
    assert first.diameter_mm == pytest.approx(5.651470635)
    exc = luna16.parse_annotations(real_data / "luna16" / "annotations_excluded.csv", allow_unknown_diameter=True)
    assert sum(len(v) for v in exc.values()) == 35192
    assert any(n.diameter_mm == -1 for v in exc.values() for n in v)
    with pytest.raises(BadItem, match=r"annotations_excluded.csv row \d+ .*diameter_mm"):
        luna16.parse_annotations(real_data / "luna16" / "annotations_excluded.csv")
    uids = luna16.parse_seriesuids(real_data / "luna16" / "seriesuids.csv")
    assert len(uids) == 888 and len(set(uids)) == 888 and set(ann) <= set(uids)


def _scan(direction, centre_ijk=(20, 25, 8), spacing=(0.7, 0.7, 2.5), origin=(-100.0, 50.0, -300.0),
          size=(48, 52, 17), dtype=np.int16):
    """A scan with a 10 mm sphere of 300 HU centred at voxel index centre_ijk (x, y, z)."""
    k, j, i = np.mgrid[:size[2], :size[1], :size[0]]
    arr = np.full(size[::-1], -1024, np.float64)
    arr[:, 3:-3, 2:-2] = 40
    d2 = ((i - centre_ijk[0]) * spacing[0]) ** 2 + ((j - centre_ijk[1]) * spacing[1]) ** 2 + \
         ((k - centre_ijk[2]) * spacing[2]) ** 2
    arr[d2 <= 25.0] = 300
    img = sitk.GetImageFromArray(arr.astype(dtype))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    return img


def _write(root, img, uid=UID, centre_xyz=None, diameter=10.0, excluded=None):
    d = root / "LUNA16"
    (d / "subset0").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(d / "subset0" / f"{uid}.mhd"))
    lines = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    if centre_xyz is not None:
        lines.append(f"{uid},{centre_xyz[0]},{centre_xyz[1]},{centre_xyz[2]},{diameter}")
    (d / "annotations.csv").write_text("\n".join(lines) + "\n")
    if excluded is not None:
        (d / "annotations_excluded.csv").write_text(
            "seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(f"{uid},{x},{y},{z},{dd}\n" for x, y, z, dd in excluded))
    return d


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.diag([1.0, -1.0, -1.0]),
                                       np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, -1.0]])])
def test_nodule_lands_on_its_voxels(tmp_path, direction):
    img = _scan(direction)
    # world centre from SimpleITK's own index -> physical mapping (independent of the reader)
    centre = img.TransformContinuousIndexToPhysicalPoint((20.0, 25.0, 8.0))
    _write(tmp_path, img, centre_xyz=centre)
    (case,) = list(luna16.iter_cases(tmp_path))
    assert case.case_id == case.patient_id == UID and case.dataset == "luna16"
    assert case.split in ("train", "test") and list(case.sample_slices) == list(range(case.slices.shape[0]))
    assert np.all(np.diff(case.z_mm) == pytest.approx(2.0))
    les = [l for l in case.lesions if l.provenance == Provenance.ORIGINAL]
    assert les and all(l.lesion_id == 0 for l in les)
    np.testing.assert_allclose(les[0].organ_target, [1, 0, 0])
    # the largest section is on the slice nearest to the centre's world z (canonical z = world z)
    big = max(les, key=lambda l: l.box[2] - l.box[0])
    assert abs(case.z_mm[big.slice_index] - centre[2]) <= 1.0
    bright = case.slices[big.slice_index] > 170
    ys, xs = np.nonzero(bright)
    np.testing.assert_allclose([(big.box[0] + big.box[2]) / 2, (big.box[1] + big.box[3]) / 2],
                               [ys.mean() + 0.5, xs.mean() + 0.5], atol=0.75)
    inter = (big.mask & bright).sum()
    assert inter / (big.mask | bright).sum() > 0.7
    # every section's slice is within the sphere's z extent
    assert all(abs(case.z_mm[l.slice_index] - centre[2]) < 5.0 for l in les)


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, -1.0]),
                                       np.array([[0, 1.0, 0], [-1.0, 0, 0], [0, 0, 1.0]])])
def test_canonical_orientation_is_lps(tmp_path, direction):
    # A marker at the scan's corner of largest world x, y, z (patient left, posterior, superior)
    # must land at the last column, last row and last slice of the Case, however it is stored.
    img = _scan(direction)
    size = img.GetSize()
    corners = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    world = [img.TransformIndexToPhysicalPoint(c) for c in corners]
    ci = corners[int(np.argmax([w[0] + w[1] + w[2] for w in world]))]
    arr = sitk.GetArrayFromImage(img)
    sl = [slice(max(0, c - 3), c + 4) for c in ci[::-1]]
    arr[tuple(sl)] = 2000
    img2 = sitk.GetImageFromArray(arr)
    img2.CopyInformation(img)
    _write(tmp_path, img2)
    (case,) = list(luna16.iter_cases(tmp_path))
    z, y, x = np.nonzero(case.slices > 1500)
    assert z.max() == case.slices.shape[0] - 1 and y.max() == case.slices.shape[1] - 1
    assert x.max() == case.slices.shape[2] - 1
    assert z.min() > 0 and y.min() > 0 and x.min() > 0
    assert case.z_mm[-1] <= max(w[2] for w in world) + 1e-6


def test_excluded_findings_become_ignore_regions(tmp_path):
    img = _scan(np.eye(3))
    centre = img.TransformContinuousIndexToPhysicalPoint((20.0, 25.0, 8.0))
    other = img.TransformContinuousIndexToPhysicalPoint((35.0, 30.0, 4.0))
    _write(tmp_path, img, centre_xyz=centre, excluded=[(*other, -1)])
    (case,) = list(luna16.iter_cases(tmp_path))
    ign = [l for l in case.lesions if l.provenance == Provenance.IGNORE]
    # unknown diameter -> 10 mm sphere: 5 slices (|dz| < 5 mm at 2 mm spacing) around z
    assert 4 <= len(ign) <= 5 and all(l.mask is None for l in ign)
    assert max(l.box[2] - l.box[0] for l in ign) == pytest.approx(10.0 / case.pixel_mm, abs=0.01)


def test_truncated_raw(tmp_path):
    d = _write(tmp_path, _scan(np.eye(3)))
    raw = d / "subset0" / f"{UID}.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(BadItem, match=rf"{UID}.raw: voxel data file truncated: 1000 of 84864 bytes"):
        list(luna16.iter_cases(tmp_path))


def test_missing_raw(tmp_path):
    d = _write(tmp_path, _scan(np.eye(3)))
    (d / "subset0" / f"{UID}.raw").unlink()
    with pytest.raises(BadItem, match=rf"{UID}.raw: voxel data file missing"):
        list(luna16.iter_cases(tmp_path))


def test_nan_voxels(tmp_path):
    img = _scan(np.eye(3), dtype=np.float32)
    arr = sitk.GetArrayFromImage(img)
    arr[3, 10, 10] = np.nan
    img2 = sitk.GetImageFromArray(arr)
    img2.CopyInformation(img)
    _write(tmp_path, img2)
    with pytest.raises(BadItem, match=r"1 NaN/inf voxels \(first in slice 3\)"):
        list(luna16.iter_cases(tmp_path))


def test_centre_outside_scan_and_malformed_row(tmp_path):
    img = _scan(np.eye(3))
    d = _write(tmp_path, img, centre_xyz=(500.0, 0.0, 0.0))
    with pytest.raises(BadItem, match=r"annotations.csv row 0 .*outside scan"):
        list(luna16.iter_cases(tmp_path))
    (d / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                       f"{UID},1,2\n{UID},1,2,x,5\n{UID},1,2,3,0\n")
    bad: list[BadItem] = []
    ann = luna16.parse_annotations(d / "annotations.csv", skip_bad=True, bad_items=bad)
    assert ann == {}
    assert [str(b).split(": ", 1)[1] for b in bad] == [
        "wrong number of fields", "column coordZ: not a number: 'x'", "column diameter_mm: 0.0 (must be > 0)"]
    assert "annotations.csv row 1 (line 3)" in str(bad[1])


def test_skip_bad_and_check(tmp_path):
    img = _scan(np.eye(3))
    d = _write(tmp_path, img, centre_xyz=img.TransformContinuousIndexToPhysicalPoint((20.0, 25.0, 8.0)))
    sitk.WriteImage(img, str(d / "subset0" / f"{UID2}.mhd"))
    raw = d / "subset0" / f"{UID2}.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    bad: list[BadItem] = []
    cases = list(luna16.iter_cases(tmp_path, skip_bad=True, bad_items=bad))
    assert [c.case_id for c in cases] == [UID] and len(bad) == 1 and UID2 in str(bad[0])
    problems = luna16.check(tmp_path, show_progress=False)
    assert [str(p) for p in problems] == [str(bad[0])]


def test_element_data_file_escaping_folder(tmp_path):
    d = _write(tmp_path, _scan(np.eye(3)))
    mhd = d / "subset0" / f"{UID}.mhd"
    text = mhd.read_text(encoding="utf-8").replace(f"ElementDataFile = {UID}.raw", "ElementDataFile = ../../secret.raw")
    assert "secret" in text
    mhd.write_text(text)
    with pytest.raises(BadItem, match=r"ElementDataFile '../../secret.raw' would escape the scan's folder"):
        list(luna16.iter_cases(tmp_path))
