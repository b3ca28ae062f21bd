"""The synthetic world: files read back with SimpleITK / Pillow / csv match the generator's truth.

Most tests use the session ``tiny_world`` (preset tiny, seed 0). The generator is deterministic, so
tests re-create a patient or scan from (seed, preset, index) to know its exact lesions.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import os
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from data_prep import synthesize as SY
from data_prep.world import cohort as C
from data_prep.world import lesions as L
from data_prep.world import singles as SG
from data_prep.world import writers as W
from data_prep.world.presets import get_preset
from uld_jax.io.safe_pickle import safe_load

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")


# ------------------------------------------------------------------------------------------------
# One DL_info parser for the real and the synthetic files.
# ------------------------------------------------------------------------------------------------
_NUM = r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?"


def _nums(n):
    return r'"' + r", ".join([_NUM] * n) + r'"'


# The byte-level shape of a DL_info.csv data line (quoting, separators, number formats).
DL_LINE = re.compile(
    r"\d{6}_\d{2}_\d{2}_\d{3}\.png,\d+,\d+,\d+,\d+," + _nums(8) + "," + _nums(4) + "," + _nums(2) + ","
    + _nums(3) + r",-?\d,[01]," + _nums(2) + "," + _nums(3) + "," + _nums(2) + "," + _nums(2)
    + r",[MF],\d+(?:\.0)?,[123](?:,.*)?")


def parse_dl_info(path):
    """Rows of a DL_info.csv as dicts of numbers (the 18 real columns)."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            def fl(k):
                return [float(v) for v in r[k].split(",")]
            out.append(dict(
                file=r["File_name"], patient=int(r["Patient_index"]), study=int(r["Study_index"]),
                series=int(r["Series_ID"]), key=int(r["Key_slice_index"]),
                recist=np.array(fl("Measurement_coordinates")).reshape(4, 2),
                box=np.array(fl("Bounding_boxes")), diam=np.array(fl("Lesion_diameters_Pixel_")),
                loc=np.array(fl("Normalized_lesion_location")), coarse=int(r["Coarse_lesion_type"]),
                noisy=int(r["Possibly_noisy"]), srange=[int(v) for v in fl("Slice_range")],
                spacing=np.array(fl("Spacing_mm_px_")), size=[int(v) for v in fl("Image_size")],
                window=np.array(fl("DICOM_windows")), gender=r["Patient_gender"],
                age=int(float(r["Patient_age"])), split=int(r["Train_Val_Test"])))
    return out


def test_dl_info_same_columns_quoting_and_parser(tiny_world, real_data):
    gen = tiny_world / "DeepLesion" / "DL_info.csv"
    real = real_data / "deeplesion" / "DL_info_sample.csv"
    gen_lines = gen.read_bytes().split(b"\n")
    real_lines = real.read_bytes().split(b"\n")
    assert gen_lines[0] == real_lines[0], "header differs from the real DL_info.csv"
    assert b"\r" not in gen.read_bytes()
    for lines, name in ((real_lines, "real"), (gen_lines, "synthetic")):
        body = [ln.decode() for ln in lines[1:] if ln]
        assert body, name
        bad = [ln for ln in body if not DL_LINE.fullmatch(ln)]
        assert not bad, f"{name} DL_info line with unexpected shape: {bad[:1]}"
    rows = parse_dl_info(gen)
    assert rows and parse_dl_info(real) and parse_dl_info(real_data / "deeplesion" / "DL_info_test_split.csv")
    for r in rows:
        assert r["size"] == [TINY.matrix, TINY.matrix]
        assert 0.5 <= r["spacing"][0] <= 1.0 and r["spacing"][0] == r["spacing"][1]
        assert r["spacing"][2] in (1.0, 2.0, 5.0)
        assert 7 <= r["srange"][1] - r["srange"][0] + 1 <= 220
        assert r["srange"][0] <= r["key"] <= r["srange"][1]
        assert (r["coarse"] == -1) == (r["split"] == 1), r["file"]
        assert r["coarse"] == -1 or 1 <= r["coarse"] <= 8
        assert np.all((r["loc"] >= 0) & (r["loc"] <= 1))
        assert r["file"] == f"{r['patient']:06d}_{r['study']:02d}_{r['series']:02d}_{r['key']:03d}.png"


def test_recist_consistent_with_diameters_and_boxes(tiny_world):
    for r in parse_dl_info(tiny_world / "DeepLesion" / "DL_info.csv"):
        e = r["recist"]
        long_px = np.linalg.norm(e[0] - e[1])
        short_px = np.linalg.norm(e[2] - e[3])
        np.testing.assert_allclose(r["diam"], [long_px, short_px], rtol=2e-5, atol=2e-3, err_msg=r["file"])
        assert long_px >= short_px * 0.9
        want = [e[:, 0].min() - 5, e[:, 1].min() - 5, e[:, 0].max() + 5, e[:, 1].max() + 5]
        np.testing.assert_allclose(r["box"], want, atol=2e-3, err_msg=r["file"])
        # The two axes are (nearly) perpendicular and cross near their midpoints.
        u, v = e[1] - e[0], e[3] - e[2]
        assert abs(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v)) < 0.35, r["file"]


def test_png_slices_hu_and_lesion_centres(tiny_world):
    rows = parse_dl_info(tiny_world / "DeepLesion" / "DL_info.csv")
    plan = C.plan_deeplesion(0, TINY)
    checked = 0
    for r in rows:
        folder = tiny_world / "DeepLesion" / "Images_png" / r["file"][:12]
        names = sorted(os.listdir(folder))
        for k in range(r["srange"][0], r["srange"][1] + 1):
            assert f"{k:03d}.png" in names, f"{folder}: slice {k} missing"
        im = Image.open(folder / f"{r['key']:03d}.png")
        a = np.asarray(im)
        assert a.dtype == np.uint16 and a.shape == (TINY.matrix, TINY.matrix), im.mode
        hu = a.astype(np.int32) - 32768
        assert -1100 <= hu.min() and hu.max() <= 3071
        assert np.median(hu[:3, :]) < -900, "air above the body must be about -1000 HU"
        p = C.make_dl_patient(0, TINY, plan, r["patient"])
        m = next(m for m in p.marks if m.study == r["study"] and m.key == r["key"]
                 and np.allclose(m.recist, r["recist"], atol=1e-3))
        les, se = m.lesion, m.series
        x0, y0 = se.xy0(p.body)
        px = se.proto["px"]
        cs = L.cross_section(les.centre, les.semi_at(r["study"] - 1), les.angle, float(se.d_of(r["key"])))
        cx, cy, a_mm, b_mm = cs
        # Geometry: the RECIST centre is the lesion centre on this slice (pixel units, 1-based).
        np.testing.assert_allclose(r["recist"].mean(0) - 1, [(cx - x0) / px, (cy - y0) / px], atol=1.5)
        # HU: a disc well inside the lesion has the lesion's HU (noise and partial volume allowed).
        if b_mm >= 3.0 and les.semi_at(r["study"] - 1)[2] >= 2.0 * se.interval:
            yy, xx = np.mgrid[:TINY.matrix, :TINY.matrix]
            disc = (xx - (cx - x0) / px) ** 2 + (yy - (cy - y0) / px) ** 2 <= (0.4 * b_mm / px) ** 2
            want = les.hu[se.proto["phase"]]
            got = float(np.median(hu[disc]))
            assert abs(got - want) < 35 + 2 * se.proto["noise"] / max(disc.sum(), 1) ** 0.5 + 0.1 * abs(want), \
                (r["file"], got, want)
            checked += 1
    assert checked >= 1


def test_truth_pickle_matches_marks(tiny_world):
    truth = safe_load(tiny_world / "truth" / "deeplesion_volumetric_truth.pkl")
    assert set(truth) == {"train", "val", "test"}
    for split, d in truth.items():
        for name, boxes in d.items():
            assert re.fullmatch(r"\d{6}_\d{2}_\d{2}_\d{3}-\d{3}", name), name
            assert boxes.dtype == np.float64 and boxes.ndim == 2 and boxes.shape[1] == 6
            k0, k1 = (int(v) for v in name[13:].split("-"))
            assert np.all(boxes[:, 2] >= k0) and np.all(boxes[:, 5] <= k1), name
            assert np.all(boxes[:, :3] <= boxes[:, 3:])
    split_name = {1: "train", 2: "val", 3: "test"}
    lesion_rows = list(csv.DictReader(open(tiny_world / "truth" / "deeplesion_lesions.csv", newline="", encoding="utf-8")))
    rows = parse_dl_info(tiny_world / "DeepLesion" / "DL_info.csv")
    assert sum(r["marked"] == "1" for r in lesion_rows) == len(rows)
    for i, r in enumerate(rows):
        name = f"{r['file'][:12]}_{r['srange'][0]:03d}-{r['srange'][1]:03d}"
        boxes = truth[split_name[r["split"]]][name]
        e = r["recist"] - 1.0   # 0-based
        inside = ((boxes[:, 0] - 1.5 <= e[:, 0].min()) & (boxes[:, 3] + 1.5 >= e[:, 0].max())
                  & (boxes[:, 1] - 1.5 <= e[:, 1].min()) & (boxes[:, 4] + 1.5 >= e[:, 1].max())
                  & (boxes[:, 2] <= r["key"]) & (boxes[:, 5] >= r["key"]))
        assert inside.any(), f"{r['file']}: no truth box of {name} contains its RECIST marks"
        mine = [lr for lr in lesion_rows if lr["dl_row"] == str(i)]
        assert len(mine) == 1 and mine[0]["subvolume"] == name


def test_organ_scores_side_file(tiny_world):
    rows = parse_dl_info(tiny_world / "DeepLesion" / "DL_info.csv")
    sc = list(csv.DictReader(open(tiny_world / "DeepLesion" / "lesion_organ_scores.csv", newline="", encoding="utf-8")))
    assert list(sc[0]) == ["row", "File_name", "lung", "liver", "lymph_node"]
    assert len(sc) == len(rows)
    for i, (s, r) in enumerate(zip(sc, rows)):
        assert int(s["row"]) == i and s["File_name"] == r["file"]
        assert all(0.0 <= float(s[k]) <= 1.0 for k in ("lung", "liver", "lymph_node"))


def test_luna16_world_coordinates_land_on_nodules(tiny_world):
    root = tiny_world / "LUNA16"
    uids = [ln.strip() for ln in open(root / "seriesuids.csv", encoding="utf-8")]
    assert len(uids) == TINY.luna_scans and len(set(uids)) == len(uids)
    ann = list(csv.DictReader(open(root / "annotations.csv", newline="", encoding="utf-8")))
    assert ann, "tiny world should have at least one LUNA16 nodule"
    fields = ["ObjectType", "NDims", "BinaryData", "BinaryDataByteOrderMSB", "CompressedData",
              "TransformMatrix", "Offset", "CenterOfRotation", "AnatomicalOrientation", "ElementSpacing",
              "DimSize", "ElementType", "ElementDataFile"]
    for i, uid in enumerate(uids):
        mhd = root / f"subset{i % 10}" / f"{uid}.mhd"
        keys = [ln.split(" = ")[0] for ln in mhd.read_text(encoding="utf-8").splitlines()]
        assert keys == fields, mhd
        assert (mhd.parent / f"{uid}.raw").stat().st_size == 2 * np.prod(
            [int(v) for v in mhd.read_text(encoding="utf-8").split("DimSize = ")[1].split("\n")[0].split()])
    scans = {SG.make_luna(0, TINY, i).name: SG.make_luna(0, TINY, i) for i in range(TINY.luna_scans)}
    for a in ann:
        assert a["seriesuid"] in uids
        assert float(a["diameter_mm"]) >= 3.0
        img = sitk.ReadImage(str(next(root.glob(f"subset*/{a['seriesuid']}.mhd"))))
        arr = sitk.GetArrayFromImage(img)
        assert arr.dtype == np.int16
        w = [float(a[k]) for k in ("coordX", "coordY", "coordZ")]
        idx = np.array(img.TransformPhysicalPointToContinuousIndex(w))
        scan = scans[a["seriesuid"]]
        les = min((les for les, lab in zip(scan.lesions, scan.labeled) if lab),
                  key=lambda les: np.linalg.norm(scan.world(les.centre) - w))
        np.testing.assert_allclose(idx, scan.canonical_index(les.centre), atol=1e-4)
        i, j, k = np.rint(idx).astype(int)
        if les.semi[0] >= 2.5 and les.semi[2] >= 2 * img.GetSpacing()[2] and les.hu[0] > -100:
            assert arr[k, j, i] > -300, (a, arr[k, j, i])


def _lits_check(path_vol, path_seg, scan):
    vol = sitk.ReadImage(str(path_vol))
    seg = sitk.ReadImage(str(path_seg))
    assert vol.GetSize() == seg.GetSize()
    np.testing.assert_allclose(vol.GetDirection(), seg.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(vol.GetOrigin(), seg.GetOrigin(), atol=1e-3)
    s = sitk.GetArrayFromImage(seg)
    assert set(np.unique(s)) <= {0, 1, 2} and (s == 1).any()
    n = 0
    for les, lab in zip(scan.lesions, scan.labeled):
        w = scan.world(les.centre)
        i, j, k = seg.TransformPhysicalPointToIndex([float(v) for v in w])
        if lab:
            semi = les.semi_at(0)
            sp = vol.GetSpacing()
            if min(semi[:2]) > 1.5 * max(sp[:2]) and semi[2] > 0.75 * max(sp):
                assert s[k, j, i] == 2, (path_seg, les.lesion_id)
                n += 1
    return n


def test_lits_labels_under_every_affine(tmp_path):
    small = dataclasses.replace(TINY, matrix=128, cover_mm=60.0)
    dirs = set()
    n = 0
    for orient in range(len(SG.LITS_ORIENTATIONS)):
        name, _ = W.lits_unit(0, small, 0, str(tmp_path), False, orient=orient)
        scan = SG.make_lits(0, small, 0, orient)
        vol = tmp_path / "LiTS" / "volume-0.nii"
        seg = tmp_path / "LiTS" / "segmentation-0.nii"
        dirs.add(tuple(np.round(sitk.ReadImage(str(vol)).GetDirection(), 3)))
        n += _lits_check(vol, seg, scan)
        if orient == 0:
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(vol)))
        else:  # the same voxels, re-indexed: resampled onto the first geometry they agree
            img = sitk.ReadImage(str(vol))
            can = sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))
            if sitk.DICOMOrient(img, "LPS").GetDirection()[8] < 0:
                can = can[::-1]
            assert can.shape == ref.shape and np.array_equal(can, ref), orient
    assert len(dirs) == len(SG.LITS_ORIENTATIONS)
    assert n >= 1


def test_lits_tiny_world(tiny_world):
    for i in range(TINY.lits_volumes):
        _lits_check(tiny_world / "LiTS" / f"volume-{i}.nii", tiny_world / "LiTS" / f"segmentation-{i}.nii",
                    SG.make_lits(0, TINY, i))


def test_nihln_dicom_annotations_and_masks(tiny_world):
    root = tiny_world / "NIH-LN"
    ids = SG.nihln_ids(TINY)
    for i, ident in enumerate(ids):
        series_dirs = glob.glob(str(root / ident / "*" / "*"))
        assert len(series_dirs) == 1, ident
        files = sorted(glob.glob(os.path.join(series_dirs[0], "*.dcm")))
        assert files and all(re.fullmatch(r"\d{6}\.dcm", os.path.basename(f)) for f in files)
        r = sitk.ImageSeriesReader()
        r.SetFileNames(files)
        img = r.Execute()
        arr = sitk.GetArrayFromImage(img)
        one = sitk.ImageFileReader()
        one.SetFileName(files[0])
        one.LoadPrivateTagsOn()
        one.ReadImageInformation()
        assert one.GetMetaData("0028|1052").strip() == "-1024" and one.GetMetaData("0028|1053").strip() == "1"
        assert one.GetMetaData("0020|0037").strip() == "1\\0\\0\\0\\1\\0"
        # Stored values are HU + 1024 (rescale intercept -1024): read back as HU.
        raw = np.frombuffer(open(files[0], "rb").read()[-2 * arr.shape[1] * arr.shape[2]:], "<i2")
        np.testing.assert_array_equal(raw.reshape(arr.shape[1:]).astype(np.int32) - 1024, arr[0])
        assert arr.min() >= -1024 and np.median(arr[0, :3]) < -900
        mask = sitk.ReadImage(str(root / "MED_ABD_LYMPH_MASKS" / ident / f"{ident}_mask.nii.gz"))
        np.testing.assert_allclose(mask.GetOrigin(), img.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(mask.GetSpacing(), img.GetSpacing(), atol=1e-4)
        m = sitk.GetArrayFromImage(mask)
        ann = root / "MED_ABD_LYMPH_ANNOTATIONS" / ident
        idx = [list(map(int, ln.split())) for ln in open(ann / f"{ident}_lymphnodes_indices.txt", encoding="utf-8")]
        phys = [list(map(float, ln.split())) for ln in open(ann / f"{ident}_lymphnodes_physicalPoints.txt", encoding="utf-8")]
        sizes = [list(map(float, ln.split())) for ln in open(ann / f"{ident}_lymphnodes_sizes.txt", encoding="utf-8")]
        assert len(idx) == len(phys) == len(sizes) >= 1
        assert set(np.unique(m)) == set(range(len(idx) + 1))
        scan = SG.make_nihln(0, TINY, i)
        nodes = [les for les, lab in zip(scan.lesions, scan.labeled) if lab]
        for n, ((ii, jj, kk), p, (short, longd), les) in enumerate(zip(idx, phys, sizes, nodes), start=1):
            assert m[kk, jj, ii] == n, (ident, n)
            np.testing.assert_allclose(img.TransformPhysicalPointToContinuousIndex(p), [ii, jj, kk], atol=0.51)
            assert short <= longd
            if les.semi[1] >= 3.0 and les.semi[2] >= img.GetSpacing()[2]:
                assert abs(float(arr[kk, jj, ii]) - les.hu[scan.grid.phase]) < 80 + 3 * scan.grid.noise


def _digest(root: pathlib.Path, sub: str) -> dict:
    out = {}
    for p in sorted((root / sub).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_deterministic_and_tables_only_equal_tables(tiny_world, tmp_path):
    out = SY.synthesize("tiny", 0, tmp_path / "t", tables_only=True, workers=2, progress=False)
    for sub in ("DeepLesion", "truth", "LUNA16"):
        a = {k: v for k, v in _digest(tiny_world, sub).items() if not k.endswith((".png", ".mhd", ".raw"))}
        b = _digest(out, sub)
        assert a == b, sub
    # Images: one DeepLesion patient and one LUNA16 scan re-rendered give identical bytes.
    plan = C.plan_deeplesion(0, TINY)
    W.dl_patient_unit(0, TINY, plan, 1, str(tmp_path / "r"), False)
    W.luna_unit(0, TINY, 0, str(tmp_path / "r"), False)
    again = _digest(tmp_path / "r", "DeepLesion") | _digest(tmp_path / "r", "LUNA16")
    assert again
    first = _digest(tiny_world, "DeepLesion") | _digest(tiny_world, "LUNA16")
    for k, v in again.items():
        assert first[k] == v, k


def test_dl_split_evaluation_world(tmp_path):
    """--dl-split 0,1: every DeepLesion patient in the test split (the reproduction's held-out
    evaluation world); the patients' tables are otherwise those of the default split."""
    base = SY.synthesize("tiny", 3, tmp_path / "a", tables_only=True, workers=1, progress=False,
                         counts={"dl_patients": 6})
    ev = SY.synthesize("tiny", 3, tmp_path / "b", tables_only=True, workers=1, progress=False,
                       counts={"dl_patients": 6, "dl_val_fraction": 0.0, "dl_test_fraction": 1.0})

    def rows(w):
        with open(w / "truth" / "deeplesion_lesions.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    a, b = rows(base), rows(ev)
    assert {r["split"] for r in a} == {"train", "val", "test"}
    assert {r["split"] for r in b} == {"test"}
    drop = lambda rs: [{k: v for k, v in r.items() if k != "split"} for r in rs]  # noqa: E731
    assert drop(a) == drop(b)
    truth = safe_load(ev / "truth" / "deeplesion_volumetric_truth.pkl")
    assert not truth["train"] and not truth["val"]
    assert sorted(truth["test"]) == sorted({r["subvolume"] for r in b})


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "data_prep.synthesize", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--preset", "huge"], "unknown preset"),
    (["--preset", "tiny", "--dl-patients", "-3"], "non-negative"),
    (["--preset", "tiny", "--luna", "-1"], "non-negative"),
    (["--preset", "tiny", "--seed", "-1"], "seed"),
    (["--preset", "tiny", "--dl-split", "0.6,0.5"], "dl_val_fraction + dl_test_fraction = 1.1 > 1"),
    (["--preset", "tiny", "--dl-split", "1.5,0"], "dl_val_fraction = 1.5 is not in [0, 1]"),
    (["--preset", "tiny", "--dl-split", "0.1,-0.2"], "dl_test_fraction = -0.2 is negative"),
    (["--preset", "tiny", "--dl-split", "0.1"], "--dl-split '0.1': expected two fractions"),
])
def test_bad_input_exit_code_2_nothing_written(tmp_path, args, needle):
    out = tmp_path / "w"
    r = _cli(*args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_empty_and_unwritable_output(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _cli("--preset", "tiny", "--out", str(out), "--tables-only")
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("--preset", "tiny", "--out", str(blocker / "w"), "--tables-only")
    assert r.returncode == 2 and str(blocker) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "w"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(W, "luna_unit", boom)
    with pytest.raises(RuntimeError):
        SY.synthesize("tiny", 0, tmp_path / "w", tables_only=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "old.txt").write_text("old")
    SY.synthesize("tiny", 0, out, overwrite=True, tables_only=True, progress=False,
                  counts={"luna_scans": 1, "lits_volumes": 0, "nihln_med": 0, "nihln_abd": 0})
    assert not (out / "old.txt").exists() and (out / "DeepLesion" / "DL_info.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_tables_only_statistics_match_targets(tmp_path):
    """A moderately sized world's tables match the real distributions loosely."""
    from data_prep.world import stats as ST

    out = SY.synthesize("small", 3, tmp_path / "s", tables_only=True, progress=False, workers=2,
                        counts={"dl_patients": 160, "luna_scans": 120, "lits_volumes": 0,
                                "nihln_med": 0, "nihln_abd": 0})
    s = ST.dl_info_stats(out / "DeepLesion" / "DL_info.csv")
    p5, p50, p95 = np.percentile(s["long_mm"], [5, 50, 95])
    assert 3.5 <= p5 <= 9.0 and 14.0 <= p50 <= 25.0 and 42.0 <= p95 <= 90.0, (p5, p50, p95)
    assert 0.6 <= np.median(s["pixel_mm"]) <= 0.95
    assert s["marks_per_key_slice"][1] > 0.9 and max(s["marks_per_key_slice"]) <= 3
    rows = list(csv.DictReader(open(out / "truth" / "deeplesion_lesions.csv", newline="", encoding="utf-8")))
    coarse = np.array([int(r["coarse_type"]) for r in rows if r["marked"] == "1"])
    shares = np.bincount(coarse, minlength=9)[1:] / len(coarse)
    assert np.all(shares > 0) and shares.max() < 0.4, shares
    v = ST.volumetric_stats(out / "truth" / "deeplesion_volumetric_truth.pkl",
                            out / "truth" / "deeplesion_lesions.csv")
    assert 0.3 <= v["marked_fraction"] <= 0.62, v
    luna = ST.luna_stats(out / "LUNA16" / "annotations.csv")["diameter_mm"]
    assert 5.0 <= np.median(luna) <= 8.5 and luna.min() >= 3.0 and luna.max() <= 32.0
    # Lesion identity persists across studies, sizes change.
    by_id = {}
    for r in rows:
        by_id.setdefault(r["lesion_id"], set()).add((r["study"], r["long_diameter_mm"]))
    multi = [v for v in by_id.values() if len({s for s, _ in v}) > 1]
    assert multi and any(len({d for _, d in v}) > 1 for v in multi)
    text = ST.format_stats(out)
    assert "long diameter mm" in text and "LUNA16 nodule diameter" in text


def test_terminated_run_leaves_nothing(tmp_path):
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "data_prep.synthesize", "--preset", "tiny", "--workers", "1",
                          "--out", str(tmp_path / "w")], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.iterdir()):
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert list(tmp_path.iterdir()) == []


def test_unbiased_marks_world(tmp_path):
    """--unbiased-marks: the marks no longer favour large, conspicuous lesions. In the default world
    the marked lesions' log marking weight (1.3 log long diameter + log conspicuity, the
    radiologist's bias) is well above the unmarked lesions'; without the bias it is not."""
    def gap(world):
        with open(world / "truth" / "deeplesion_lesions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        w = np.array([1.3 * np.log(float(r["long_diameter_mm"]))
                      + np.log(L.LESION_TYPES[r["lesion_type"]].conspicuity) for r in rows])
        m = np.array([r["marked"] == "1" for r in rows])
        assert 0.2 < m.mean() < 0.7
        return w[m].mean() - w[~m].mean()
    biased = SY.synthesize("small", 0, tmp_path / "b", tables_only=True, progress=False, workers=2)
    assert SY.main(["--preset", "small", "--seed", "0", "--out", str(tmp_path / "u"),
                    "--tables-only", "--unbiased-marks"]) == 0
    unbiased = tmp_path / "u"
    with open(unbiased / "world.json", encoding="utf-8") as f:
        assert f.read().count('"dl_mark_bias": false') == 1
    g_b, g_u = gap(biased), gap(unbiased)
    assert g_b > 0.2 and g_u < 0.05 and g_b - g_u > 0.3, (g_b, g_u)
    with pytest.raises(SY.PresetError, match="mark_bias must be True or False"):
        SY.resolve_preset("tiny", None, mark_bias=0)
    assert not SY.resolve_preset("tiny", {"dl_patients": 5}, mark_bias=False).dl_mark_bias
    assert SY.resolve_preset("tiny", None).dl_mark_bias


def test_extra_lesions_world(tmp_path):
    """--extra-lesions M: more lesions per patient, the same marks, so more of them unmarked; the
    value is recorded in world.json and bad values are refused before anything is written."""
    def lesions(world):
        with open(world / "truth" / "deeplesion_lesions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return len(rows), sum(r["marked"] == "1" for r in rows)
    default = SY.synthesize("small", 0, tmp_path / "d", tables_only=True, progress=False,
                            counts={"dl_patients": 12})
    assert SY.main(["--preset", "small", "--seed", "0", "--out", str(tmp_path / "x"),
                    "--tables-only", "--dl-patients", "12", "--extra-lesions", "40"]) == 0
    dense = tmp_path / "x"
    with open(dense / "world.json", encoding="utf-8") as f:
        assert json.load(f)["preset_values"]["dl_extra_lesions"] == 40.0
    (n_d, m_d), (n_x, m_x) = lesions(default), lesions(dense)
    with open(dense / "DeepLesion" / "DL_info.csv", newline="", encoding="utf-8") as f1, \
            open(default / "DeepLesion" / "DL_info.csv", newline="", encoding="utf-8") as f2:
        assert len(list(csv.DictReader(f1))) == len(list(csv.DictReader(f2)))
    assert n_x > 2 * n_d and m_x / n_x < 0.6 * m_d / n_d, (n_d, m_d, n_x, m_x)
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(SY.PresetError, match="extra_lesions must be a finite number"):
            SY.resolve_preset("small", None, extra_lesions=bad)
    assert SY.resolve_preset("small", None).dl_extra_lesions == 10.0
    assert SY.main(["--preset", "small", "--out", str(tmp_path / "bad"), "--tables-only",
                    "--extra-lesions", "-2"]) == 2
    assert not (tmp_path / "bad").exists()
