"""``python -m uld_jax.detect`` on real CT scans and on synthetic scans in every format, with the
reported coordinates checked against SimpleITK's own reading of each file's geometry."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import detect_helpers
from data_prep.readers.scan import read_scan
from uld_jax import detect, inference
from uld_jax import input_pipeline as ip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return detect_helpers.shared_workdir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def loaded(workdir):
    return inference.cached_model(os.path.abspath(workdir), None, None, None)


def _run(workdir, scan, out, *extra):
    rc = detect.main(["--workdir", workdir, "--input", str(scan), "--out", str(out), "--batch-size",
                      str(BATCH), "--no-progress", *extra])
    assert rc == 0
    doc = json.load(open(os.path.join(out, "detections.json"), encoding="utf-8"))
    with open(os.path.join(out, "detections.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["detections"]) == doc["num_detections"]
    assert list(rows[0].keys()) == list(detect.CSV_COLUMNS) if rows else True
    return doc, rows


def _sitk_image(path) -> sitk.Image:
    if os.path.isdir(path):
        r = sitk.ImageSeriesReader()
        r.SetFileNames(r.GetGDCMSeriesFileNames(str(path)))
        return r.Execute()
    return sitk.ReadImage(str(path))


def _check_geometry(doc, rows, img: sitk.Image):
    """Every reported box: inside the scan, centre index -> world through SimpleITK, CSV == JSON."""
    size = np.asarray(img.GetSize())
    sp = np.asarray(img.GetSpacing())
    for det, row in zip(doc["detections"], rows):
        vmin, vmax = np.asarray(det["voxel_min"]), np.asarray(det["voxel_max"])
        assert np.all(vmin >= 0) and np.all(vmax < size) and np.all(vmin <= vmax)
        c = det["center_voxel"]
        assert np.all(vmin - 1 <= np.asarray(c)) and np.all(np.asarray(c) <= vmax + 1)
        world = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
        np.testing.assert_allclose(det["center_world_mm"], world, atol=1e-3)
        back = img.TransformPhysicalPointToContinuousIndex(det["center_world_mm"])
        np.testing.assert_allclose(back, c, atol=1e-4)
        # the world extent is that of the voxel box's corners (+- half a voxel), by SimpleITK
        corners = np.array([img.TransformContinuousIndexToPhysicalPoint(
            [float(v) for v in np.where([(m >> a) & 1 for a in range(3)], vmax + 0.5, vmin - 0.5)])
            for m in range(8)])
        tol = sp.max() + 1e-3
        assert np.all(np.asarray(det["world_min_mm"]) >= corners.min(0) - tol)
        assert np.all(np.asarray(det["world_max_mm"]) <= corners.max(0) + tol)
        assert int(row["voxel_min_k"]) == vmin[2] and float(row["score"]) == pytest.approx(det["score"], abs=1e-6)
        assert set(det["expert_scores"]) == set(doc["experts"])
        w = det["organ_weights"]
        assert w["whole_body"] == 1.0 and all(0 <= v <= 1 for v in w.values())


# ------------------------------------------------------------------------------------------------
# Real scans.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["example_ct.nii.gz", "chest_ct_dicom", "example_ct_dicom"])
def test_detect_real_scans(real_data, workdir, tmp_path, name):
    scan = real_data / "ct" / name
    extra = ["--masks", "--score-threshold", "0.3"] if name == "example_ct.nii.gz" else []
    doc, rows = _run(workdir, scan, tmp_path, *extra)
    img = _sitk_image(scan)
    assert doc["scan"]["shape_ijk"] == list(img.GetSize())
    assert doc["num_detections"] > 0
    _check_geometry(doc, rows, img)
    pngs = sorted(os.listdir(tmp_path / "overlays"))
    assert len(pngs) == min(5, doc["num_detections"])
    with open(tmp_path / "overlays" / pngs[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if "--masks" in extra:
        m = sitk.ReadImage(str(tmp_path / "masks.nii.gz"))
        assert m.GetSize() == img.GetSize()
        np.testing.assert_allclose(m.GetOrigin(), img.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(m.GetDirection(), img.GetDirection(), atol=1e-6)
        lab = sitk.GetArrayFromImage(m)                      # [k, j, i]
        assert lab.max() <= doc["num_detections"] and lab.max() > 0
        for r in np.unique(lab[lab > 0])[:10]:
            det = doc["detections"][int(r) - 1]
            kk, jj, ii = np.nonzero(lab == r)
            lo = np.asarray(det["voxel_min"]) - 1
            hi = np.asarray(det["voxel_max"]) + 1
            assert ii.min() >= lo[0] and jj.min() >= lo[1] and kk.min() >= lo[2]
            assert ii.max() <= hi[0] and jj.max() <= hi[1] and kk.max() <= hi[2]


# ------------------------------------------------------------------------------------------------
# Synthetic scans: known geometry, a bright cube at known world position.
# ------------------------------------------------------------------------------------------------
SIZE_IJK = (40, 36, 24)
SPACING = (1.5, 1.25, 2.5)
CUBE_LO, CUBE_HI = (14, 10, 8), (26, 22, 16)          # index ranges [lo, hi) along i, j, k

GEOMETRIES = {
    ".nii.gz": (np.diag([-1.0, -1.0, 1.0]), (91.5, 120.25, -310.0)),
    ".mhd": (np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), (-40.0, 15.5, 70.0)),
    ".nrrd": (np.diag([1.0, -1.0, -1.0]), (-120.5, 80.25, 12.0)),
    "dicom": (np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]), (100.0, -150.0, -20.0)),
}


def _synthetic_image(direction, origin) -> sitk.Image:
    arr = np.full(SIZE_IJK[::-1], 30, np.int16)          # [k, j, i] soft tissue
    arr[:, :2, :] = -1000                                # air rows (cropped as black border)
    arr[:, :, -3:] = -1000
    (i0, j0, k0), (i1, j1, k1) = CUBE_LO, CUBE_HI
    arr[k0:k1, j0:j1, i0:i1] = 1200
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction).reshape(-1)))
    return img


def _write(img: sitk.Image, fmt: str, folder) -> str:
    if fmt != "dicom":
        path = os.path.join(folder, "scan" + fmt)
        sitk.WriteImage(img, path)
        return path
    path = os.path.join(folder, "dicom")
    os.makedirs(path)
    d = img.GetDirection()
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
                "0020|0013": str(k + 1), "0028|1052": "0", "0028|1053": "1", "0018|0050": str(SPACING[2]),
                "0020|0032": "\\".join(f"{v:.4f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0028|0030": f"{SPACING[1]}\\{SPACING[0]}"}
        for key, v in tags.items():
            sl.SetMetaData(key, v)
        w.SetFileName(os.path.join(path, f"{k:03d}.dcm"))
        w.Execute(sl)
    return path


def _cube_world(img: sitk.Image):
    lo, hi = np.asarray(CUBE_LO) - 0.5, np.asarray(CUBE_HI) - 0.5
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in np.where([(m >> a) & 1 for a in range(3)], hi, lo)]) for m in range(8)])
    return pts.min(0), pts.max(0)


@pytest.mark.parametrize("fmt", list(GEOMETRIES))
def test_detect_synthetic_formats(workdir, loaded, tmp_path, fmt):
    direction, origin = GEOMETRIES[fmt]
    path = _write(_synthetic_image(direction, origin), fmt, tmp_path)
    img = _sitk_image(path)                                # SimpleITK's reading of the file
    np.testing.assert_allclose(np.abs(np.asarray(img.GetDirection()).reshape(3, 3)),
                               np.abs(direction), atol=1e-6)

    # 1. The CLI: every reported box consistent with SimpleITK's geometry of the file.
    if fmt == ".nrrd":   # the checkpoint-folder form of the same model (same compiled function)
        ck = os.path.join(workdir, "checkpoints", "7")
        rc = detect.main(["--checkpoint", ck, "--input", path, "--out", str(tmp_path / "out"),
                          "--batch-size", str(BATCH), "--no-progress", "--score-threshold", "0"])
        assert rc == 0
        doc, rows = _run(workdir, path, tmp_path / "out2", "--score-threshold", "0")
        assert json.load(open(tmp_path / "out" / "detections.json", encoding="utf-8"))["detections"] == doc["detections"]
    else:
        doc, rows = _run(workdir, path, tmp_path / "out", "--score-threshold", "0")
    assert doc["num_detections"] > 0 and doc["step"] == 7
    _check_geometry(doc, rows, img)

    # 2. Model-free end to end: the cube as it appears on the model's canvas, taken as a
    # "detection" on each slice, must come back at the cube's world position (SimpleITK).
    vol = read_scan(path)
    scan = detect.prepare_scan(vol, loaded.data_config)
    zs, boxes = [], []
    for z in range(scan.num_slices):
        on = scan.canvas[:, :, z] > 0.5 * (ip.window(np.int16(30)) + ip.window(np.int16(1200)))
        if on.any():
            r, c = np.nonzero(on)
            zs.append(z)
            boxes.append([r.min(), c.min(), r.max() + 1, c.max() + 1])
    assert zs, "the cube is not on the canvas"
    n = len(zs)
    dets = detect.SliceDetections(
        slice_index=np.asarray(zs), boxes=detect.input_boxes_to_stored(np.asarray(boxes, np.float32), scan)[0],
        input_boxes=np.asarray(boxes, np.float32), scores=np.linspace(0.9, 0.8, n).astype(np.float32),
        organ_weights=np.ones((n, 4), np.float32), head_scores=np.ones((n, 4), np.float32),
        expert_scores=np.ones((n, 4), np.float32), masks=None)
    f = detect.stack_findings(dets, scan.mapping)
    assert len(f.scores) == 1                              # one track through consecutive slices
    wmin, wmax = _cube_world(img)
    canvas_mm = float(loaded.data_config.pixel_mm)
    tol = np.full(3, 1.5 * canvas_mm)                      # threshold on a 3 mm canvas
    z_axis = int(np.argmax(np.abs(np.asarray(img.GetDirection()).reshape(3, 3)[:, 2])))
    tol[z_axis] = 0.5 * 2.0 + SPACING[2]                   # 2 mm stored slabs vs 2.5 mm source slices
    np.testing.assert_array_less(np.abs(f.scan["world_min"][0] - wmin), tol)
    np.testing.assert_array_less(np.abs(f.scan["world_max"][0] - wmax), tol)
    centre_idx = img.TransformPhysicalPointToContinuousIndex(((wmin + wmax) / 2).tolist())
    np.testing.assert_array_less(np.abs(f.scan["center_voxel"][0] - centre_idx), tol / np.asarray(SPACING))
    want_lo, want_hi = np.asarray(CUBE_LO), np.asarray(CUBE_HI) - 1
    if fmt == "dicom":   # GDCM orders the slices along the normal: k may be reversed
        kk = img.TransformPhysicalPointToIndex(_synthetic_image(direction, origin)
                                               .TransformIndexToPhysicalPoint((0, 0, int(CUBE_LO[2]))))[2]
        kk2 = img.TransformPhysicalPointToIndex(_synthetic_image(direction, origin)
                                                .TransformIndexToPhysicalPoint((0, 0, int(CUBE_HI[2] - 1))))[2]
        want_lo[2], want_hi[2] = min(kk, kk2), max(kk, kk2)
    slack = np.ceil(tol / np.asarray(SPACING)).astype(int)
    assert np.all(np.abs(f.scan["voxel_min"][0] - want_lo) <= slack)
    assert np.all(np.abs(f.scan["voxel_max"][0] - want_hi) <= slack)


def test_preprocessing_equals_the_loader(loaded, real_data):
    """detect warps all slices at once; per sample, the loader warps its 9-slice context: same
    numbers (warping is per channel)."""
    scan = detect.prepare_scan(read_scan(real_data / "ct" / "example_ct.nii.gz"), loaded.data_config)
    size = tuple(loaded.data_config.image_size)
    for z in (0, 1, scan.num_slices // 2, scan.num_slices - 1):
        idx = scan.context_indices(z)
        assert idx[0] == max(0, z - 4) and idx[-1] == min(scan.num_slices - 1, z + 4)
        want, valid = ip.warp_image_antialiased(ip.window_lut(np.stack([scan.slices[i] for i in idx], -1)),
                                                scan.placement, size)
        got, gvalid = scan.images([z])
        np.testing.assert_allclose(got[0], want, atol=1e-4)
        np.testing.assert_array_equal(gvalid[0], valid)


def test_compiles_once_across_slices_batches_and_scans(loaded, real_data):
    pred = inference.cached_predictor(loaded, BATCH, "deeplesion", True)
    scans = [detect.prepare_scan(read_scan(real_data / "ct" / n), loaded.data_config)
             for n in ("example_ct_dicom", "example_ct.nii.gz")]
    assert any(s.num_slices % BATCH for s in scans)        # a padded last batch
    before = pred.num_traces
    for s in scans:
        d = detect.detect_slices(pred, s, 0.0, progress=False)
        assert d.slice_index.max() < s.num_slices and set(np.unique(d.slice_index)) <= set(range(s.num_slices))
    assert pred.num_traces == max(before, 1) == 1
    assert pred._fn._cache_size() == 1


def test_detections_wholly_in_the_padding_are_dropped(loaded, real_data):
    """A box above the stored slice (in the canvas's padding) clips to an empty box: dropped with
    every row of it (scores, weights, masks); the box on the slice is kept."""
    scan = detect.prepare_scan(read_scan(real_data / "ct" / "example_ct.nii.gz"), loaded.data_config)
    p = scan.placement
    h, w = scan.slices.shape[1:]
    nh = int(loaded.model_config.num_organ_heads)
    nd = len(loaded.expert_names)
    out_box = [-6.0, p.tx + 1, -2.0, p.tx + 5]         # above the slice (canvas row -6..-2)
    on_box = [p.ty + 2, p.tx + 2, p.ty + 6, p.tx + 6]

    class Fake:
        batch_size = BATCH

        def __init__(self):
            self.loaded = loaded

        def device_call(self, img, val, sv):
            n = img.shape[0]
            t = lambda a: np.tile(np.float32(a), (n,) + (1,) * np.ndim(a))  # noqa: E731
            return {"boxes": t([out_box, on_box]), "scores": t([0.9, 0.8]),
                    "valid": np.ones((n, 2), bool), "organ_weights": t(np.ones((2, nh))),
                    "head_scores": t(np.ones((2, nh))), "expert_scores": t(np.ones((2, nd))),
                    "masks": t(np.ones((2, 28, 28)))}

    d = detect.detect_slices(Fake(), scan, 0.0, progress=False)
    n = scan.num_slices
    np.testing.assert_array_equal(d.slice_index, np.arange(n))
    want = np.clip((np.float32(on_box) - [p.ty, p.tx, p.ty, p.tx]) / p.scale, 0, [h, w, h, w])
    np.testing.assert_allclose(d.boxes, np.tile(want, (n, 1)), rtol=1e-5)
    np.testing.assert_allclose(d.input_boxes, np.tile(on_box, (n, 1)))
    assert d.scores.shape == (n,) and np.all(d.scores == np.float32(0.8))
    assert d.organ_weights.shape == (n, nh) and d.masks.shape == (n, 28, 28)


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------
def test_non_ct_input_exits_2_with_one_line(workdir, tmp_path):
    labels = np.zeros((6, 20, 20), np.int16)
    labels[2:4, 5:9, 5:9] = 3
    p = tmp_path / "labels.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(p))
    r = subprocess.run([sys.executable, "-m", "uld_jax.detect", "--workdir", workdir, "--input", str(p),
                        "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(p) in err[0] and "Hounsfield" in err[0]
    assert not (tmp_path / "o").exists()


def test_unreadable_inputs(workdir, tmp_path, capsys, real_data):
    data = (real_data / "ct" / "example_ct.nii.gz").read_bytes()
    cut = tmp_path / "truncated.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    folder = tmp_path / "notdicom"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"nothing here")
    for path, words in ((cut, "truncated"), (png, "unsupported scan format"),
                        (folder, "no readable DICOM series"), (tmp_path / "missing.mhd", "no such file")):
        rc = detect.main(["--workdir", workdir, "--input", str(path), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (path, err)
        assert str(path) in err[0] and words in err[0], err[0]
    rc = detect.main(["--workdir", str(tmp_path / "no_run"), "--input",
                      str(real_data / "ct" / "example_ct.nii.gz"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no_run" in err and len(err.splitlines()) == 1
