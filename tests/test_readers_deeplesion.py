"""DeepLesion reader: the real DL_info CSVs, PNG sub-volumes written here, and every bad input."""

from __future__ import annotations

import csv
import pathlib

import numpy as np
import pytest
from PIL import Image

from data_prep.readers import deeplesion as dl
from data_prep.types import BadItem
from uld_jax.core import Provenance

HEADER = list(dl.COLUMNS)


# --------------------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------------------
def test_real_sample_csv_parses_completely(real_data):
    rows = dl.parse_dl_info(real_data / "deeplesion" / "DL_info_sample.csv")
    assert len(rows) == 158
    r = rows[0]
    assert (r.file_name, r.patient, r.study, r.series, r.key_slice) == ("000089_01_01_037.png", 89, 1, 1, 37)
    np.testing.assert_allclose(r.recist, [[154.273, 176.808], [143.903, 209.029], [160.939, 200.511],
                                          [137.977, 191.252]])
    np.testing.assert_allclose(r.box, [132.977, 171.808, 165.939, 214.029])
    assert r.diameters_px == (33.8477, 24.7578)
    assert r.slice_range == (31, 43) and r.spacing_mm == (0.859375, 0.859375, 5.0)
    assert r.image_size == (512, 512) and r.dicom_window == (-175.0, 275.0)
    assert (r.coarse_type, r.possibly_noisy, r.gender, r.age, r.split) == (-1, False, "F", 71.0, "train")
    assert r.case_id == "000089_01_01_031-043"
    # RECIST long axis length equals the listed long diameter
    assert np.linalg.norm(r.recist[0] - r.recist[1]) == pytest.approx(33.8477, abs=1e-3)
    # the box is the RECIST extent +- 5 px: in continuous coordinates, 5.5 px around pixel centres
    rc = r.recist_continuous
    np.testing.assert_allclose(r.box_internal, [rc[:, 1].min() - 5.5, rc[:, 0].min() - 5.5,
                                                rc[:, 1].max() + 5.5, rc[:, 0].max() + 5.5], atol=1e-3)
    splits = [x.split for x in rows]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (105, 18, 35)
    assert len(dl.group_subvolumes(rows)) == 96


def test_real_test_split_csv_parses_completely(real_data):
    rows = dl.parse_dl_info(real_data / "deeplesion" / "DL_info_test_split.csv")
    assert len(rows) == 4927
    assert all(r.split == "test" for r in rows)
    assert rows[0].nifti_ct_name == "000001_01_01_103-115.nii.gz"
    # Nifti_ct_name is the sub-volume name used as case_id
    assert all(r.nifti_ct_name == r.case_id + ".nii.gz" for r in rows)
    assert {r.coarse_type for r in rows} == set(range(1, 9))
    assert sum(r.possibly_noisy for r in rows) == 15
    assert {r.image_size for r in rows} == {(512, 512), (768, 768)}
    assert len(dl.group_subvolumes(rows)) == 3016


# --------------------------------------------------------------------------------------------------
# A small DeepLesion folder written here
# --------------------------------------------------------------------------------------------------
def _row(fname, key, recist, box, srange, spacing="0.8, 0.8, 2", size="64, 64", split=1, ctype=-1):
    p, s, r, _ = fname[:-4].split("_")
    return {"File_name": fname, "Patient_index": str(int(p)), "Study_index": str(int(s)), "Series_ID": str(int(r)),
            "Key_slice_index": str(key), "Measurement_coordinates": ", ".join(map(str, recist)),
            "Bounding_boxes": ", ".join(map(str, box)), "Lesion_diameters_Pixel_": "12, 12",
            "Normalized_lesion_location": "0.5, 0.5, 0.5", "Coarse_lesion_type": str(ctype), "Possibly_noisy": "0",
            "Slice_range": f"{srange[0]}, {srange[1]}", "Spacing_mm_px_": spacing, "Image_size": size,
            "DICOM_windows": "-175, 275", "Patient_gender": "M", "Patient_age": "60", "Train_Val_Test": str(split)}


def _write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _volume(n, h=64, w=64, lesion_slices=(), centre=(25, 30), radius=6):
    """[n, h, w] HU: -1024 background, a 40 HU body, a 200 HU disk lesion (0-based centre y, x)."""
    yy, xx = np.mgrid[:h, :w]
    vol = np.full((n, h, w), -1024, np.int16)
    vol[:, 6:58, 4:60] = 40
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    for k in lesion_slices:
        vol[k][disk] = 200
    return vol


def _write_pngs(folder: pathlib.Path, vol, first):
    folder.mkdir(parents=True, exist_ok=True)
    for i, sl in enumerate(vol):
        Image.fromarray((sl.astype(np.int32) + 32768).astype(np.uint16)).save(folder / f"{first + i:03d}.png")


# lesion centred at 0-based (y=25, x=30): 1-based x=31, y=26
RECIST = [25, 26, 37, 26, 31, 20, 31, 32]
BOX = [20, 15, 42, 37]


@pytest.fixture
def dl_root(tmp_path):
    d = tmp_path / "DeepLesion"
    vol = _volume(11, lesion_slices=(4, 5, 6))            # slices 10..20, lesion on 14..16
    _write_pngs(d / "Images_png" / "000007_01_02", vol, 10)
    vol2 = _volume(7, lesion_slices=(3,), centre=(40, 20), radius=4)
    _write_pngs(d / "Images_png" / "000008_02_01", vol2, 1)
    rows = [_row("000007_01_02_015.png", 15, RECIST, BOX, (10, 20), split=3, ctype=5),
            _row("000008_02_01_004.png", 4, [17, 41, 25, 41, 21, 37, 21, 45], [12, 32, 30, 50], (1, 7),
                 spacing="0.6, 0.6, 5", split=1)]
    _write_csv(d / dl.INFO_CSV, rows)
    return tmp_path, vol, vol2


def test_case_content(dl_root):
    root, vol, _ = dl_root
    cases = list(dl.iter_cases(root))
    assert [c.case_id for c in cases] == ["000007_01_02_010-020", "000008_02_01_001-007"]
    c = cases[0]
    assert (c.dataset, c.patient_id, c.study_id, c.series_id, c.split) == (
        "deeplesion", "000007", "000007_01", "000007_01_02", "test")
    # 2 mm source slices at 0.8 mm pixels: the grid is the source grid (cropped), values exact
    np.testing.assert_allclose(c.z_mm, (np.arange(10, 21) - 1) * 2.0)
    assert c.pixel_mm == pytest.approx(0.8) and c.slice_mm == 2.0
    y0, x0 = c.source_crop_yx
    assert (y0, x0) == (4, 2)                              # body 6..57 x 4..59, margin 2
    np.testing.assert_array_equal(c.slices, vol[:, y0:y0 + c.slices.shape[1], x0:x0 + c.slices.shape[2]])
    assert c.slices.dtype == np.int16 and c.slices.min() == -1024 and c.slices.max() == 200
    assert list(c.key_slices) == [5] and list(c.sample_slices) == [5]
    (les,) = c.lesions
    assert les.slice_index == 5 and les.provenance == int(Provenance.ORIGINAL) and les.lesion_type == 5
    np.testing.assert_allclose(les.box, [15 - 1 - y0, 20 - 1 - x0, 37 - y0, 42 - x0])
    np.testing.assert_allclose(les.organ_target, [1, 0, 0]) and les.organ_valid.all()
    # RECIST in preprocessed pixels: 1-based -> pixel centres -> crop; the ellipse sits on the lesion
    np.testing.assert_allclose(les.recist[0], [25 - 0.5 - x0, 26 - 0.5 - y0])
    lesion_px = c.slices[5] == 200
    assert (les.mask & lesion_px).sum() / lesion_px.sum() > 0.9
    assert np.abs(np.argwhere(les.mask).mean(0) - np.argwhere(lesion_px).mean(0)).max() < 0.5


def test_resampled_case_box_on_lesion(dl_root):
    root, _, vol2 = dl_root
    c = list(dl.iter_cases(root))[1]
    # 0.6 mm pixels -> 0.8 mm, 5 mm slices -> 2 mm; slice 4 (key) at z = 15 mm lies on the grid
    assert c.pixel_mm == pytest.approx(0.8) and c.split == "train"
    np.testing.assert_allclose(c.z_mm, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29])
    (les,) = c.lesions
    assert c.z_mm[les.slice_index] == 15.0
    bright = c.slices[les.slice_index] > 120
    ys, xs = np.nonzero(bright)
    # the lesion disk (radius 4 px at 0.6 mm = 3 px at 0.8 mm) lies inside the box, which is its
    # RECIST extent +- 5 source px (3.75 px)
    b = les.box
    assert b[0] <= ys.min() and ys.max() + 1 <= b[2] and b[1] <= xs.min() and xs.max() + 1 <= b[3]
    np.testing.assert_allclose([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2], [ys.mean() + 0.5, xs.mean() + 0.5], atol=0.6)
    assert np.all(c.slices[les.slice_index + 2] < 120)  # 4 mm away: between source slices 4 and 5


def test_organ_scores_side_file(dl_root):
    root, _, _ = dl_root
    d = root / "DeepLesion"
    (d / dl.ORGAN_SCORES_CSV).write_text("row,File_name,lung,liver,lymph_node\n"
                                         "1,000008_02_01_004.png,0.1,0.7,0.25\n")
    c = list(dl.iter_cases(root))[1]
    np.testing.assert_allclose(c.lesions[0].organ_target, [0.1, 0.7, 0.25], rtol=1e-6)
    assert c.lesions[0].organ_valid.all()
    (d / dl.ORGAN_SCORES_CSV).write_text("row,File_name,lung,liver,lymph_node\n"
                                         "1,000007_01_02_015.png,0.1,0.7,0.25\n")
    with pytest.raises(BadItem, match=r"lesion_organ_scores.csv row 0 .*File_name"):
        list(dl.iter_cases(root))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _folder(root):
    return root / "DeepLesion" / "Images_png" / "000007_01_02"


def test_missing_slice_inside_range(dl_root):
    root, _, _ = dl_root
    (_folder(root) / "012.png").unlink()
    with pytest.raises(BadItem, match=r"012.png: missing slice 12 inside Slice_range 10-20"):
        list(dl.iter_cases(root))


def test_truncated_png(dl_root):
    root, _, _ = dl_root
    p = _folder(root) / "013.png"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(BadItem, match=r"013.png: corrupt or truncated PNG"):
        list(dl.iter_cases(root))


def test_corrupt_png_bytes(dl_root):
    root, _, _ = dl_root
    p = _folder(root) / "013.png"
    b = bytearray(p.read_bytes())
    b[60:200] = bytes(140)
    p.write_bytes(bytes(b))
    with pytest.raises(BadItem, match=r"013.png: corrupt or truncated PNG"):
        list(dl.iter_cases(root))


def test_8bit_png_refused(dl_root):
    root, _, _ = dl_root
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(_folder(root) / "013.png")
    with pytest.raises(BadItem, match=r"013.png: not a 16-bit grayscale PNG"):
        list(dl.iter_cases(root))


def test_inconsistent_slice_size(dl_root):
    root, _, _ = dl_root
    Image.fromarray(np.full((60, 64), 32768, np.uint16)).save(_folder(root) / "011.png")
    with pytest.raises(BadItem, match=r"011.png: image is 64x60"):
        list(dl.iter_cases(root))


def test_malformed_row_named(dl_root):
    root, _, _ = dl_root
    d = root / "DeepLesion"
    rows = [_row("000007_01_02_015.png", 15, RECIST, BOX, (10, 20), spacing="0.8, abc, 2")]
    _write_csv(d / dl.INFO_CSV, rows)
    with pytest.raises(BadItem, match=r"DL_info.csv row 0 \(line 2\): column Spacing_mm_px_: not a number"):
        list(dl.iter_cases(root))
    rows = [_row("000007_01_02_015.png", 15, RECIST[:6], BOX, (10, 20))]
    _write_csv(d / dl.INFO_CSV, rows)
    with pytest.raises(BadItem, match=r"row 0 .*Measurement_coordinates: expected 8"):
        dl.parse_dl_info(d / dl.INFO_CSV)
    rows = [_row("000007_01_02_015.png", 25, RECIST, BOX, (10, 20))]
    _write_csv(d / dl.INFO_CSV, rows)
    with pytest.raises(BadItem, match=r"Key_slice_index: 25 disagrees with File_name"):
        dl.parse_dl_info(d / dl.INFO_CSV)
    (d / dl.INFO_CSV).write_text(",".join(HEADER[:-1]) + "\n1,2\n")
    with pytest.raises(BadItem, match=r"header lacks column\(s\) Train_Val_Test"):
        dl.parse_dl_info(d / dl.INFO_CSV)


def test_key_slice_outside_range(dl_root):
    root, _, _ = dl_root
    rows = [_row("000007_01_02_015.png", 15, RECIST, BOX, (16, 20))]
    _write_csv(root / "DeepLesion" / dl.INFO_CSV, rows)
    with pytest.raises(BadItem, match=r"Slice_range: \(16, 20\) does not contain the key slice 15"):
        dl.parse_dl_info(root / "DeepLesion" / dl.INFO_CSV)


def test_file_name_escaping_root(dl_root):
    root, _, _ = dl_root
    r = _row("000007_01_02_015.png", 15, RECIST, BOX, (10, 20))
    r["File_name"] = "../../../etc/000007_01_02_015.png"
    _write_csv(root / "DeepLesion" / dl.INFO_CSV, [r])
    with pytest.raises(BadItem, match=r"row 0 .*would escape the data root"):
        list(dl.iter_cases(root))


def test_inconsistent_spacing_within_subvolume(dl_root):
    root, _, _ = dl_root
    rows = [_row("000007_01_02_015.png", 15, RECIST, BOX, (10, 20)),
            _row("000007_01_02_016.png", 16, RECIST, BOX, (10, 20), spacing="0.7, 0.7, 2")]
    _write_csv(root / "DeepLesion" / dl.INFO_CSV, rows)
    with pytest.raises(BadItem, match=r"row 1 .*inconsistent spacing .*000007_01_02_010-020"):
        list(dl.iter_cases(root))


def test_skip_bad_collects_and_continues(dl_root):
    root, _, _ = dl_root
    (_folder(root) / "012.png").unlink()
    d = root / "DeepLesion"
    rows = list(csv.DictReader(open(d / dl.INFO_CSV, encoding="utf-8")))
    rows.append(_row("000009_01_01_003.png", 3, RECIST, BOX, (1, 5), spacing="x"))
    _write_csv(d / dl.INFO_CSV, rows)
    bad: list[BadItem] = []
    cases = list(dl.iter_cases(root, skip_bad=True, bad_items=bad))
    assert [c.case_id for c in cases] == ["000008_02_01_001-007"]
    msgs = sorted(str(b) for b in bad)
    assert len(msgs) == 2
    assert any("row 2 (line 4): column Spacing_mm_px_" in m for m in msgs)
    assert any("missing slice 12" in m for m in msgs)
    # check() lists the same problems without preprocessing
    assert sorted(str(b) for b in dl.check(root, show_progress=False)) == msgs


def test_multiple_key_slices_share_one_grid(dl_root):
    root, _, _ = dl_root
    rows = [_row("000007_01_02_015.png", 15, RECIST, BOX, (10, 20)),
            _row("000007_01_02_018.png", 18, RECIST, BOX, (10, 20))]
    _write_csv(root / "DeepLesion" / dl.INFO_CSV, rows)
    (c,) = list(dl.iter_cases(root))
    assert [l.slice_index for l in c.lesions] == [5, 8]
    assert list(c.key_slices) == [5, 8]


def test_case_ids_match_released_volumetric_test_set(real_data):
    from uld_jax.io.safe_pickle import safe_load

    rows = dl.parse_dl_info(real_data / "deeplesion" / "DL_info_test_split.csv")
    released = safe_load(real_data / "deeplesion" / "DeepLesion_manual_1K_test_release.pkl")
    keys = set(released["val"]) | set(released["test"])
    assert len(keys) == 1000 and keys <= {r.case_id for r in rows}


def test_missing_series_folder_is_one_problem(dl_root):
    import shutil

    root, _, _ = dl_root
    shutil.rmtree(_folder(root))
    problems = dl.check(root, show_progress=False)
    assert len(problems) == 1
    assert "000007_01_02: series folder missing (sub-volume 000007_01_02_010-020, DL_info row(s) 0)" in str(problems[0])
