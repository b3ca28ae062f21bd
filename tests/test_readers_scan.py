"""Generic scan reading: the real CT scans (NIfTI, uncompressed and JPEG-2000 DICOM), files in each
format written here, canonical orientation, and bad inputs."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.readers import scan
from data_prep.readers.common import canonicalize, plan_for_volume
from data_prep import preprocess
from data_prep.types import BadItem


def test_real_nifti_geometry_and_canonical_orientation(real_data):
    path = real_data / "ct" / "example_ct.nii.gz"
    vol = scan.read_scan(path)
    ref = sitk.ReadImage(str(path))
    assert vol.hu.shape == (112, 101, 122) and vol.hu.dtype == np.int16
    assert vol.spacing_zyx == (3.0, 3.0, 3.0)
    np.testing.assert_allclose(vol.direction, np.diag([-1.0, -1.0, 1.0]))   # stored RAS-like
    np.testing.assert_allclose(vol.origin_xyz, ref.GetOrigin())
    # index_to_world agrees with SimpleITK for an arbitrary voxel
    np.testing.assert_allclose(vol.index_to_world(np.array([7.0, 11.0, 13.0])),
                               ref.TransformIndexToPhysicalPoint((13, 11, 7)))
    np.testing.assert_allclose(vol.world_to_index(np.array(ref.TransformIndexToPhysicalPoint((13, 11, 7)))),
                               [7, 11, 13], atol=1e-9)
    canon, _ = canonicalize(vol)
    np.testing.assert_allclose(canon.direction, np.eye(3))
    np.testing.assert_array_equal(canon.hu, vol.hu[:, ::-1, ::-1])
    np.testing.assert_allclose(canon.origin_xyz, ref.TransformIndexToPhysicalPoint((121, 100, 0)))
    assert vol.hu.min() <= -1000 and vol.hu.max() > 500


def test_real_chest_dicom(real_data):
    vol = scan.read_scan(real_data / "ct" / "chest_ct_dicom")
    assert vol.hu.shape == (99, 512, 512)
    np.testing.assert_allclose(vol.spacing_zyx, (3.0, 0.564453125, 0.564453125))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    np.testing.assert_allclose(vol.origin_xyz, (-143.2177734375, -287.2177734375, -288.0))
    assert (int(vol.hu.min()), int(vol.hu.max())) == (-1024, 3071)     # RescaleIntercept -1024 applied
    # lungs: a large share of the body's voxels is air-like (< -500 HU) on a mid slice
    mid = vol.hu[50, 100:400, 100:400]
    assert 0.2 < np.mean(mid < -500) < 0.8
    # full preprocessing: 99 slices 3 mm apart -> 2 mm slices over 294 mm; 0.8 mm pixels
    canon, _ = canonicalize(vol)
    plan = plan_for_volume(canon, pixel_mm=0.8, slice_mm=2.0, max_side=512)
    assert plan.out_z.size == 148 and plan.pixel_mm == pytest.approx(0.8)
    out = preprocess.resample_volume(canon.hu, plan)
    assert out.shape[0] == 148 and max(out.shape[1:]) <= 512
    assert out.shape[2] == pytest.approx(plan.crop_hw[1] * 0.564453125 / 0.8, abs=1)


def test_real_jpeg2000_dicom(real_data):
    vol, info = scan.read_dicom_series(real_data / "ct" / "example_ct_dicom")
    assert info["modality"] == "CT"
    assert vol.hu.shape == (20, 512, 512)
    np.testing.assert_allclose(vol.spacing_zyx, (2.0, 0.9765625, 0.9765625))
    np.testing.assert_allclose(vol.origin_xyz, (-249.51171875, -437.51171875, -804.5))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    assert int(vol.hu.min()) == -1024 and int(vol.hu.max()) > 1000


def _test_image(direction=(1, 0, 0, 0, -1, 0, 0, 0, -1)):
    rng = np.random.default_rng(3)
    arr = rng.integers(-1024, 1500, size=(6, 7, 8)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection(direction)
    return img, arr


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".mhd", ".mha", ".nrrd"])
def test_formats_round_trip(tmp_path, ext):
    img, arr = _test_image()
    p = tmp_path / f"scan{ext}"
    sitk.WriteImage(img, str(p))
    vol = scan.read_scan(p)
    np.testing.assert_array_equal(vol.hu, arr)
    np.testing.assert_allclose(vol.spacing_zyx, (2.5, 0.8, 0.7))
    np.testing.assert_allclose(vol.origin_xyz, (10.0, -20.0, 30.0), atol=1e-4)
    np.testing.assert_allclose(vol.direction, np.diag([1.0, -1.0, -1.0]), atol=1e-6)
    canon, _ = canonicalize(vol)
    np.testing.assert_array_equal(canon.hu, arr[::-1, ::-1, :])
    np.testing.assert_allclose(canon.origin_xyz, img.TransformIndexToPhysicalPoint((0, 6, 5)), atol=1e-4)


def test_not_ct_and_unsupported_inputs(tmp_path):
    lab = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    sitk.WriteImage(lab, str(tmp_path / "labels.nii.gz"))
    with pytest.raises(BadItem, match=r"labels.nii.gz: values 0..0 do not look like CT"):
        scan.read_scan(tmp_path / "labels.nii.gz")
    raw = sitk.GetImageFromArray(np.full((4, 5, 6), 1000, np.int16))
    raw[0, 0, 0] = 3000
    sitk.WriteImage(raw, str(tmp_path / "raw.nrrd"))
    with pytest.raises(BadItem, match=r"stored values without RescaleIntercept"):
        scan.read_scan(tmp_path / "raw.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(BadItem, match=r"flat.nrrd: expected a 3D volume, got 2D"):
        scan.read_scan(tmp_path / "flat.nrrd")
    vec = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.int16), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "rgb.mha"))
    with pytest.raises(BadItem, match=r"rgb.mha: expected a scalar"):
        scan.read_scan(tmp_path / "rgb.mha")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(BadItem, match=r"unsupported scan format"):
        scan.read_scan(tmp_path / "x.png")
    with pytest.raises(BadItem, match=r"no such file or folder"):
        scan.read_scan(tmp_path / "nothing.nii")
    (tmp_path / "garbage.nii").write_bytes(os.urandom(600))
    with pytest.raises(BadItem, match=r"garbage.nii: not a NIfTI file"):
        scan.read_scan(tmp_path / "garbage.nii")


def test_dicom_folder_problems(real_data, tmp_path):
    src = real_data / "ct" / "example_ct_dicom"
    files = sorted(src.iterdir())
    with pytest.raises(BadItem, match=r"a single DICOM file"):
        d1 = tmp_path / "one"
        d1.mkdir()
        shutil.copy(files[0], d1 / "a.dcm")
        scan.read_scan(d1 / "a.dcm")
    with pytest.raises(BadItem, match=r"has 1 slice"):
        scan.read_scan(d1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(BadItem, match=r"no readable DICOM series"):
        scan.read_scan(empty)
    # two series in one folder: refused, unless one is picked by its uid
    two = tmp_path / "two"
    two.mkdir()
    for f in files:
        os.symlink(f, two / f.name)
    chest = sorted((real_data / "ct" / "chest_ct_dicom").iterdir())
    for f in chest:
        os.symlink(f, two / f.name)
    with pytest.raises(BadItem, match=r"2 DICOM series in one folder"):
        scan.read_scan(two)
    uid = "1.3.6.1.4.1.14519.5.2.1.7085.2626.242193282649561899185427104083"
    vol, _ = scan.read_dicom_series(two, uid)
    assert vol.hu.shape == (99, 512, 512)


def test_preprocess_scan_and_world_round_trip(tmp_path):
    from data_prep.readers.common import output_to_world, preprocess_scan, world_to_output

    img, _ = _test_image(direction=(0, 1, 0, -1, 0, 0, 0, 0, -1))
    p = tmp_path / "s.nrrd"
    sitk.WriteImage(img, str(p))
    vol = scan.read_scan(p)
    cvol, plan, slices = preprocess_scan(vol)
    assert slices.shape[0] == plan.out_z.size and slices.dtype == np.int16
    rng = np.random.default_rng(0)
    for _ in range(5):
        # a world point inside the scan, from SimpleITK's mapping of a random continuous index
        w = np.array(img.TransformContinuousIndexToPhysicalPoint(tuple(rng.uniform(0, 5, size=3))))
        yx, z_mm = world_to_output(cvol, plan, w)
        k = (z_mm - plan.out_z[0]) / plan.slice_mm
        np.testing.assert_allclose(output_to_world(cvol, plan, k, yx), w, atol=1e-9)
    np.testing.assert_allclose(plan.unmap_boxes(plan.map_boxes([1.0, 2.0, 3.0, 4.0])), [1, 2, 3, 4])
