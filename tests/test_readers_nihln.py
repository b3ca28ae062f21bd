"""NIH-LN reader: DICOM series written here (and the real JPEG-2000 series), node lists, masks, bad
inputs."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.readers import nihln
from data_prep.types import BadItem
from uld_jax.core import Provenance

PID = "ABD_LYMPH_001"
SP = (0.8, 0.8, 2.0)   # x, y, z mm


def _canonical():
    """[z, y, x] HU volume in LPS orientation and its node mask (labels 1, 2)."""
    z, y, x = 12, 40, 44
    vol = np.full((z, y, x), -1024, np.int16)
    vol[:, 3:37, 2:42] = 20
    mask = np.zeros((z, y, x), np.uint8)
    mask[4:7, 13:18, 18:23] = 1                                # node 1: slices 4..6, rows 13..17, cols 18..22
    zz, yy, xx = np.mgrid[:z, :y, :x]
    mask[((zz - 8) * 2.0) ** 2 + ((yy - 28) * 0.8) ** 2 + ((xx - 30) * 0.8) ** 2 <= 9.0] = 2
    vol[mask > 0] = 90
    return vol, mask


def write_series(folder: pathlib.Path, hu: np.ndarray, origin=(-30.0, -20.0, 50.0), flip_xy=False,
                 modality="CT", reverse_names=False):
    """One DICOM file per slice of a canonical [z, y, x] HU array (stored = HU, no rescale).

    With ``flip_xy`` the rows/columns are stored reversed under IOP (-1, 0, 0, 0, -1, 0), so that
    every voxel keeps its physical position."""
    folder.mkdir(parents=True, exist_ok=True)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    nz, ny, nx = hu.shape
    for k in range(nz):
        sl = hu[k]
        if flip_xy:
            sl = sl[::-1, ::-1]
            pos = (origin[0] + (nx - 1) * SP[0], origin[1] + (ny - 1) * SP[1], origin[2] + k * SP[2])
            iop = "-1\\0\\0\\0\\-1\\0"
        else:
            pos = (origin[0], origin[1], origin[2] + k * SP[2])
            iop = "1\\0\\0\\0\\1\\0"
        img = sitk.GetImageFromArray(np.ascontiguousarray(sl).astype(np.int16))
        img.SetSpacing(SP[:2])
        for tag, val in (("0008|0060", modality), ("0020|000d", "1.2.826.0.1.1"), ("0020|000e", "1.2.826.0.1.1.2"),
                         ("0020|0052", "1.2.826.0.1.1.3"), ("0020|0032", "\\".join(f"{v:g}" for v in pos)),
                         ("0020|0037", iop), ("0020|0013", str(k + 1)), ("0018|0050", "2"), ("0010|0020", PID),
                         ("0008|0016", "1.2.840.10008.5.1.4.1.1.2")):
            img.SetMetaData(tag, val)
        name = nz - 1 - k if reverse_names else k
        w.SetFileName(str(folder / f"{name:06d}.dcm"))
        w.Execute(img)


def _reference_image(hu, origin=(-30.0, -20.0, 50.0)):
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(SP)
    img.SetOrigin(origin)
    return img


def write_patient(root: pathlib.Path, hu, mask, nodes_ijk, sizes, *, flip_xy=False, write_mask=True,
                  reverse_names=False, points=None):
    d = root / "NIH-LN"
    write_series(d / PID / "1.000000-NA-1" / "1.000000-Lymph-2", hu, flip_xy=flip_xy, reverse_names=reverse_names)
    ref = _reference_image(hu)
    ann = d / nihln.ANNOTATIONS / PID
    ann.mkdir(parents=True, exist_ok=True)
    (ann / f"{PID}_lymphnodes_indices.txt").write_text("".join(f"{i} {j} {k}\n" for i, j, k in nodes_ijk))
    pts = points or [ref.TransformIndexToPhysicalPoint(tuple(int(v) for v in n)) for n in nodes_ijk]
    (ann / f"{PID}_lymphnodes_physicalPoints.txt").write_text("".join(f"{x:.4f} {y:.4f} {z:.4f}\n" for x, y, z in pts))
    (ann / f"{PID}_lymphnodes_sizes.txt").write_text("".join(f"{s} {l}\n" for s, l in sizes))
    if write_mask:
        m = sitk.GetImageFromArray(mask)
        m.CopyInformation(ref)
        (d / nihln.MASKS / PID).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(m, str(d / nihln.MASKS / PID / f"{PID}_mask.nii.gz"))
    return d


NODES = [(20, 15, 5), (30, 28, 8), (8, 30, 2)]          # i, j, k; node 3 is not in the mask
SIZES = [(4.0, 5.0), (6.0, 6.0), (5.0, 7.2)]


def test_case_from_mask_and_sizes(tmp_path):
    hu, mask = _canonical()
    write_patient(tmp_path, hu, mask, NODES, SIZES)
    (case,) = list(nihln.iter_cases(tmp_path))
    assert (case.dataset, case.case_id, case.patient_id) == ("nihln", PID, PID)
    assert (case.study_id, case.series_id) == ("1.2.826.0.1.1", "1.2.826.0.1.1.2")
    np.testing.assert_allclose(case.z_mm, 50.0 + 2.0 * np.arange(12))
    y0, x0 = case.source_crop_yx
    np.testing.assert_array_equal(case.slices, hu[:, y0:y0 + case.slices.shape[1], x0:x0 + case.slices.shape[2]])
    by_id = {}
    for l in case.lesions:
        by_id.setdefault(l.lesion_id, []).append(l)
        assert l.provenance == Provenance.ORIGINAL
        np.testing.assert_allclose(l.organ_target, [0, 0, 1])
    assert sorted(by_id) == [0, 1, 2]
    assert [l.slice_index for l in by_id[0]] == [4, 5, 6]
    for l in by_id[0]:
        np.testing.assert_allclose(l.box, [13 - y0, 18 - x0, 18 - y0, 23 - x0])
        assert np.all(case.slices[l.slice_index][l.mask] == 90)
    # node 3: no mask label -> sphere of diameter sqrt(5 * 7.2) = 6 mm around slice 2 (z = 54 mm)
    assert [l.slice_index for l in by_id[2]] == [1, 2, 3]
    mid = by_id[2][1]
    np.testing.assert_allclose(mid.box, [30.5 - y0 - 3.75, 8.5 - x0 - 3.75, 30.5 - y0 + 3.75, 8.5 - x0 + 3.75])
    assert list(case.sample_slices) == list(range(12))


def test_flipped_storage_and_file_order_give_same_case(tmp_path):
    hu, mask = _canonical()
    write_patient(tmp_path / "a", hu, mask, NODES, SIZES)
    write_patient(tmp_path / "b", hu, mask, NODES, SIZES, flip_xy=True, reverse_names=True, write_mask=False,
                  points=[_reference_image(hu).TransformIndexToPhysicalPoint(n) for n in NODES])
    # indices of the flipped series: SimpleITK order of that series
    fl = tmp_path / "b" / "NIH-LN" / nihln.ANNOTATIONS / PID / f"{PID}_lymphnodes_indices.txt"
    fl.write_text("".join(f"{43 - i} {39 - j} {k}\n" for i, j, k in NODES))
    # its mask on the stored (flipped) grid
    series = tmp_path / "b" / "NIH-LN" / PID / "1.000000-NA-1" / "1.000000-Lymph-2"
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(series)))
    stored = r.Execute()
    assert stored.GetDirection()[0] == -1.0
    m = sitk.GetImageFromArray(np.ascontiguousarray(mask[:, ::-1, ::-1]))
    m.CopyInformation(stored)
    (tmp_path / "b" / "NIH-LN" / nihln.MASKS / PID).mkdir(parents=True)
    sitk.WriteImage(m, str(tmp_path / "b" / "NIH-LN" / nihln.MASKS / PID / f"{PID}_mask.nii.gz"))
    (a,) = list(nihln.iter_cases(tmp_path / "a"))
    (b,) = list(nihln.iter_cases(tmp_path / "b"))
    np.testing.assert_array_equal(a.slices, b.slices)
    assert [(l.lesion_id, l.slice_index) for l in a.lesions] == [(l.lesion_id, l.slice_index) for l in b.lesions]
    for la, lb in zip(a.lesions, b.lesions):
        np.testing.assert_allclose(la.box, lb.box, atol=1e-6)


def test_missing_slice_is_inconsistent_spacing(tmp_path):
    hu, mask = _canonical()
    d = write_patient(tmp_path, hu, mask, NODES, SIZES)
    os.unlink(d / PID / "1.000000-NA-1" / "1.000000-Lymph-2" / "000005.dcm")
    with pytest.raises(BadItem, match=r"000004.dcm: inconsistent slice spacing: 4.000 mm .* 2.000 mm \(missing slice\?\)"):
        list(nihln.iter_cases(tmp_path))


@pytest.mark.parametrize("keep", [200, 2000, -1000])
def test_truncated_dicom(tmp_path, keep):
    hu, mask = _canonical()
    d = write_patient(tmp_path, hu, mask, NODES, SIZES)
    p = d / PID / "1.000000-NA-1" / "1.000000-Lymph-2" / "000003.dcm"
    p.write_bytes(p.read_bytes()[:keep])
    with pytest.raises(BadItem, match=r"000003.dcm: not part of the series \(unreadable or corrupt DICOM\?\)"):
        list(nihln.iter_cases(tmp_path))


def test_node_lists_checked(tmp_path):
    hu, mask = _canonical()
    d = write_patient(tmp_path, hu, mask, [(20, 15, 5), (30, 28, 8), (8, 30, 9)], SIZES,
                      points=None)
    # physical points written for the first list; now the index of node 3 disagrees
    ann = d / nihln.ANNOTATIONS / PID
    (ann / f"{PID}_lymphnodes_indices.txt").write_text("20 15 5\n30 28 8\n8 30 2\n")
    with pytest.raises(BadItem, match=r"node 3: voxel index .* lies 14.0 mm from the physical point"):
        list(nihln.iter_cases(tmp_path))
    (case,) = list(nihln.iter_cases(tmp_path, check_indices=False))   # placed by the physical points
    assert {l.lesion_id for l in case.lesions} == {0, 1, 2}
    (ann / f"{PID}_lymphnodes_sizes.txt").write_text("4 5\n6 6\n")
    with pytest.raises(BadItem, match=r"node lists of ABD_LYMPH_001 differ in length: 3 indices, 3 physical points, 2 sizes"):
        list(nihln.iter_cases(tmp_path))
    (ann / f"{PID}_lymphnodes_sizes.txt").write_text("4 5\n6 six\n1 2\n")
    with pytest.raises(BadItem, match=r"sizes.txt line 2: not numbers"):
        list(nihln.iter_cases(tmp_path))


def test_mask_geometry_and_modality(tmp_path):
    hu, mask = _canonical()
    d = write_patient(tmp_path, hu, mask, NODES, SIZES)
    m = sitk.GetImageFromArray(mask[:, :, :40])
    m.CopyInformation(_reference_image(hu[:, :, :40]))
    sitk.WriteImage(m, str(d / nihln.MASKS / PID / f"{PID}_mask.nii.gz"))
    with pytest.raises(BadItem, match=r"_mask.nii.gz: mask geometry does not match the series .*size"):
        list(nihln.iter_cases(tmp_path))
    mr = tmp_path / "mr"
    write_series(mr / "NIH-LN" / "MED_LYMPH_002" / "s" / "r", hu, modality="MR")
    bad: list[BadItem] = []
    assert list(nihln.iter_cases(mr, skip_bad=True, bad_items=bad)) == []
    assert "Modality is 'MR', not CT" in str(bad[0])


def test_real_jpeg2000_series_as_nihln(real_data, tmp_path):
    src = real_data / "ct" / "example_ct_dicom"
    series = tmp_path / "NIH-LN" / "MED_LYMPH_007" / "study" / "series"
    series.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        os.symlink(f, series / f"{i:06d}.dcm")
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(series)))
    ref = r.Execute()
    node = (256, 300, 10)
    pt = ref.TransformIndexToPhysicalPoint(node)
    ann = tmp_path / "NIH-LN" / nihln.ANNOTATIONS / "MED_LYMPH_007"
    ann.mkdir(parents=True)
    (ann / "MED_LYMPH_007_lymphnodes_indices.txt").write_text("256 300 10\n")
    (ann / "MED_LYMPH_007_lymphnodes_physicalPoints.txt").write_text(" ".join(map(str, pt)) + "\n")
    (ann / "MED_LYMPH_007_lymphnodes_sizes.txt").write_text("10 12\n")
    (case,) = list(nihln.iter_cases(tmp_path))
    assert case.slices.shape[0] == 20   # 20 slices at 2 mm: 38 mm -> 20 output slices
    np.testing.assert_allclose(case.z_mm, -804.5 + 2.0 * np.arange(20))
    secs = [l for l in case.lesions if l.lesion_id == 0]
    assert [l.slice_index for l in secs] == [8, 9, 10, 11, 12]
    # the body + table span ~485 mm: 0.8 mm pixels would exceed 512, so the pixel grows (MULAN's cap)
    assert max(case.slices.shape[1:]) == 512 and case.pixel_mm > 0.8
    h_mm = max(case.slices.shape[1:]) * case.pixel_mm
    assert 400 < h_mm < 500
