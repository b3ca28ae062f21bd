"""LiTS reader: NIfTI volume + segmentation under several orientations give the same canonical
Case; tumour components; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.readers import lits
from data_prep.types import BadItem
from uld_jax.core import Provenance

SPACING = (0.9, 0.8, 2.5)     # x, y, z mm
ORIGIN = (-20.0, -10.0, 100.0)


def _canonical():
    """[z, y, x] volume and segmentation in LPS orientation (direction = identity)."""
    z, y, x = 14, 40, 44
    vol = np.full((z, y, x), -1024, np.int16)
    vol[:, 4:36, 3:41] = 30
    seg = np.zeros((z, y, x), np.uint8)
    seg[2:12, 8:32, 6:30] = 1                  # liver
    vol[seg == 1] = 60
    seg[4:7, 12:18, 10:20] = 2                 # tumour A: slices 4..6, rows 12..17, cols 10..19
    zz, yy, xx = np.mgrid[:z, :y, :x]
    b = ((zz - 8) * 2.5) ** 2 + ((yy - 25) * 0.8) ** 2 + ((xx - 22) * 0.9) ** 2 <= 16.0
    seg[b] = 2                                 # tumour B: a 8 mm sphere around (8, 25, 22)
    vol[seg == 2] = 10
    return vol, seg


def _image(arr, dtype=None):
    img = sitk.GetImageFromArray(arr if dtype is None else arr.astype(dtype))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


def _write(root, n, vol_img, seg_img, orient="LPS", gz=False):
    d = root / "LiTS"
    d.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if gz else ".nii"
    # DICOMOrient reorders the stored voxels keeping every voxel's physical position (an
    # independent implementation of the orientation change).
    sitk.WriteImage(sitk.DICOMOrient(vol_img, orient), str(d / f"volume-{n}{ext}"))
    sitk.WriteImage(sitk.DICOMOrient(seg_img, orient), str(d / f"segmentation-{n}{ext}"))
    return d


def test_canonical_case_content(tmp_path):
    vol, seg = _canonical()
    _write(tmp_path, 3, _image(vol), _image(seg))
    (case,) = list(lits.iter_cases(tmp_path))
    assert (case.dataset, case.case_id, case.patient_id) == ("lits", "volume-3", "3")
    assert case.split in ("train", "test")
    ids = sorted({l.lesion_id for l in case.lesions})
    assert ids == [0, 1]                         # A comes first in canonical scan order
    a = [l for l in case.lesions if l.lesion_id == 0]
    # tumour A: slices 4..6 at 110, 112.5, 115 mm, i.e. 108.75..116.25 mm; output slices every 2 mm
    # from 100 mm take the nearest source slice
    assert [case.z_mm[l.slice_index] for l in a] == [110.0, 112.0, 114.0, 116.0]
    # box: rows 12..17, cols 10..19 at 0.8 / 0.9 mm -> 0.8 mm pixels, after the body crop
    y0, x0 = case.source_crop_yx
    exp = np.array([(12 - y0) * 1.0, (10 - x0) * 0.9 / 0.8, (18 - y0) * 1.0, (20 - x0) * 0.9 / 0.8])
    for l in a:
        np.testing.assert_allclose(l.box, exp, atol=1.0)
        assert l.mask.sum() > 0 and l.provenance == Provenance.ORIGINAL
        np.testing.assert_allclose(l.organ_target, [0, 1, 0])
        # the mask marks the tumour's pixels (HU 10; edges blend linearly with the liver's 60) and
        # the box is exactly the mask's extent
        assert np.mean(case.slices[l.slice_index][l.mask] < 35) > 0.7
        ys, xs = np.nonzero(l.mask)
        np.testing.assert_allclose(l.box, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    assert list(case.sample_slices) == list(range(case.slices.shape[0]))


@pytest.mark.parametrize("orient", ["RAS", "RPI", "LAI", "ASL", "SRA", "ILP", "PIR"])
def test_orientations_give_the_same_case(tmp_path, orient):
    vol, seg = _canonical()
    _write(tmp_path / "ref", 1, _image(vol), _image(seg))
    _write(tmp_path / "o", 1, _image(vol), _image(seg), orient=orient, gz=True)
    (ref,) = list(lits.iter_cases(tmp_path / "ref"))
    (case,) = list(lits.iter_cases(tmp_path / "o"))
    np.testing.assert_array_equal(case.slices, ref.slices)
    np.testing.assert_allclose(case.z_mm, ref.z_mm)
    assert [(l.lesion_id, l.slice_index) for l in case.lesions] == [(l.lesion_id, l.slice_index) for l in ref.lesions]
    for l, r in zip(case.lesions, ref.lesions):
        np.testing.assert_allclose(l.box, r.box)
        np.testing.assert_array_equal(l.mask, r.mask)


def test_bad_segmentation_geometry_and_labels(tmp_path):
    vol, seg = _canonical()
    s = _image(seg)
    s.SetOrigin((0.0, 0.0, 0.0))
    _write(tmp_path, 1, _image(vol), s)
    with pytest.raises(BadItem, match=r"segmentation-1.nii: geometry does not match the volume .*origin"):
        list(lits.iter_cases(tmp_path))
    seg2 = seg.copy()
    seg2[0, 0, 0] = 3
    _write(tmp_path, 1, _image(vol), _image(seg2))
    with pytest.raises(BadItem, match=r"segmentation-1.nii: labels \[0, 1, 2, 3\] outside"):
        list(lits.iter_cases(tmp_path))


def test_missing_segmentation_nan_and_truncation(tmp_path):
    vol, seg = _canonical()
    d = _write(tmp_path, 1, _image(vol), _image(seg))
    (d / "segmentation-1.nii").unlink()
    with pytest.raises(BadItem, match=r"segmentation-1.nii: segmentation of .* missing"):
        list(lits.iter_cases(tmp_path))
    fv = vol.astype(np.float32)
    fv[5, 5, 5] = np.nan
    _write(tmp_path, 1, _image(fv), _image(seg))
    with pytest.raises(BadItem, match=r"volume-1.nii: 1 NaN/inf voxels"):
        list(lits.iter_cases(tmp_path))
    d = _write(tmp_path, 1, _image(vol), _image(seg))
    p = d / "volume-1.nii"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(BadItem, match=r"volume-1.nii: truncated NIfTI"):
        list(lits.iter_cases(tmp_path))


def test_truncated_gzip_and_skip_bad(tmp_path):
    vol, seg = _canonical()
    d = _write(tmp_path, 1, _image(vol), _image(seg), gz=True)
    _write(tmp_path, 2, _image(vol), _image(seg), gz=True)
    p = d / "segmentation-1.nii.gz"
    p.write_bytes(p.read_bytes()[:-8])       # the gzip trailer (CRC, size) cut off
    with pytest.raises(BadItem, match=r"segmentation-1.nii.gz: corrupt or truncated gzip"):
        list(lits.iter_cases(tmp_path))
    bad: list[BadItem] = []
    cases = list(lits.iter_cases(tmp_path, skip_bad=True, bad_items=bad))
    assert [c.case_id for c in cases] == ["volume-2"] and len(bad) == 1
    assert [str(b) for b in lits.check(tmp_path, show_progress=False)] == [str(bad[0])]
    # gzip content corrupted in the middle: zlib / CRC error
    good = (d / "volume-2.nii.gz").read_bytes()
    bad_bytes = bytearray(good)
    bad_bytes[len(good) // 2: len(good) // 2 + 50] = bytes(50)
    (d / "volume-2.nii.gz").write_bytes(bytes(bad_bytes))
    problems = [str(b) for b in lits.check(tmp_path, show_progress=False)]
    assert len(problems) == 2 and "volume-2.nii.gz: corrupt or truncated gzip stream" in problems[1]


def test_label_map_is_not_ct(tmp_path):
    vol, seg = _canonical()
    _write(tmp_path, 1, _image(seg.astype(np.int16)), _image(seg))
    with pytest.raises(BadItem, match=r"volume-1.nii: values 0..2 do not look like CT"):
        list(lits.iter_cases(tmp_path))


def test_thin_tumour_kept_on_nearest_slice(tmp_path):
    # 0.5 mm slices: a tumour one slice thick (slice 3, z = 1.5 mm) falls between the 2 mm output
    # slices (0, 2, 4 mm); it must still be annotated, on the nearest slice (2 mm), without a mask.
    vol = np.full((9, 30, 30), -1024, np.int16)
    vol[:, 3:27, 3:27] = 50
    seg = np.zeros(vol.shape, np.uint8)
    seg[:, 5:25, 5:25] = 1
    seg[3, 10:14, 12:18] = 2
    vi = sitk.GetImageFromArray(vol)
    vi.SetSpacing((0.8, 0.8, 0.5))
    si = sitk.GetImageFromArray(seg)
    si.CopyInformation(vi)
    d = tmp_path / "LiTS"
    d.mkdir()
    sitk.WriteImage(vi, str(d / "volume-0.nii"))
    sitk.WriteImage(si, str(d / "segmentation-0.nii"))
    (case,) = list(lits.iter_cases(tmp_path))
    np.testing.assert_allclose(case.z_mm, [0, 2, 4])
    (les,) = case.lesions
    assert les.slice_index == 1 and les.mask is None and les.lesion_id == 0
    y0, x0 = case.source_crop_yx
    np.testing.assert_allclose(les.box, [10 - y0, 12 - x0, 14 - y0, 18 - x0])
