"""python -m data_prep.check: clean folders exit 0, every problem listed with file/row, exit 1."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from data_prep import check
from data_prep.readers import deeplesion as dl

REPO = Path(__file__).resolve().parents[1]


def _deeplesion(root: Path):
    d = root / "DeepLesion"
    folder = d / "Images_png" / "000001_01_01"
    folder.mkdir(parents=True)
    for k in range(1, 6):
        a = np.full((32, 32), -1024 + 32768, np.uint16)
        a[4:28, 4:28] = 40 + 32768
        Image.fromarray(a).save(folder / f"{k:03d}.png")
    row = {"File_name": "000001_01_01_003.png", "Patient_index": "1", "Study_index": "1", "Series_ID": "1",
           "Key_slice_index": "3", "Measurement_coordinates": "10, 16, 20, 16, 15, 12, 15, 20",
           "Bounding_boxes": "5, 7, 25, 25", "Lesion_diameters_Pixel_": "10, 8",
           "Normalized_lesion_location": "0.5, 0.5, 0.5", "Coarse_lesion_type": "-1", "Possibly_noisy": "0",
           "Slice_range": "1, 5", "Spacing_mm_px_": "0.8, 0.8, 2", "Image_size": "32, 32",
           "DICOM_windows": "-175, 275", "Patient_gender": "F", "Patient_age": "50", "Train_Val_Test": "1"}
    with open(d / dl.INFO_CSV, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(dl.COLUMNS))
        w.writeheader()
        w.writerow(row)
        w.writerow({**row, "File_name": "../000001_01_01_004.png"})
        w.writerow({**row, "File_name": "000001_01_01_004.png", "Key_slice_index": "4"})
    return d


def _luna(root: Path):
    d = root / "LUNA16" / "subset0"
    d.mkdir(parents=True)
    arr = np.full((8, 20, 20), -1024, np.int16)
    arr[:, 2:18, 2:18] = 30
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(img, str(d / "1.2.3.mhd"))
    (root / "LUNA16" / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                                    "1.2.3,10,10,10,5\n")
    return root / "LUNA16"


def test_clean_folder_exit_0(tmp_path, capsys):
    _luna(tmp_path)
    assert check.main(["--raw", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "luna16: OK" in out and "0 problem(s) in 1 dataset(s)" in out


def test_problems_listed_exit_1(tmp_path, capsys):
    d = _deeplesion(tmp_path)
    _luna(tmp_path)
    (d / "Images_png" / "000001_01_01" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "LUNA16" / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                                        "1.2.3,10,10,10,5\n1.2.3,10,10,900,5\n")
    assert check.main(["--raw", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "deeplesion: 2 problem(s)" in out
    assert "DL_info.csv row 1 (line 3): column File_name: '../000001_01_01_004.png' would escape the data root" in out
    assert "002.png: corrupt or truncated PNG" in out
    assert "luna16: 1 problem(s)" in out and "annotations.csv row 1 " in out and "outside scan 1.2.3" in out
    assert "3 problem(s) in 2 dataset(s)" in out


def test_requested_dataset_missing_and_unknown(tmp_path, capsys):
    _luna(tmp_path)
    assert check.main(["--raw", str(tmp_path), "--datasets", "luna16,lits", "--no-progress"]) == 1
    assert "lits: 1 problem(s)" in capsys.readouterr().out
    assert check.main(["--raw", str(tmp_path), "--datasets", "luna17"]) == 1
    assert check.main(["--raw", str(tmp_path / "nope")]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check.main(["--raw", str(empty)]) == 1


def test_cli_subprocess(tmp_path):
    _luna(tmp_path)
    r = subprocess.run([sys.executable, "-m", "data_prep.check", "--raw", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "LUNA16" / "subset0" / "1.2.3.raw").write_bytes(b"\0" * 10)
    r = subprocess.run([sys.executable, "-m", "data_prep.check", "--raw", str(tmp_path), "--datasets", "luna16"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "1.2.3.raw: voxel data file truncated: 10 of 6400 bytes" in r.stdout
