"""``python -m uld_jax.evaluate --workdir``: inference of a checkpointed tiny MELD over a built TFDS
split, then the offline evaluation (key slices against the sample table; LUNA16 in world mm)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import detect_helpers
from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import core, inference, input_pipeline as ip
from uld_jax.core import Keys, decode_image
from uld_jax.evaluate import __main__ as ev_main
from uld_jax.evaluate import from_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return detect_helpers.shared_workdir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built_eval")
    return str(out), detect_helpers.build_deeplesion(str(out), ["test"] * 3)


def test_keyslice_from_workdir_cli(workdir, built, tmp_path, capsys):
    data, cases = built
    rc = ev_main.main(["--workdir", workdir, "--data", data, "--split", "test", "--out",
                       str(tmp_path / "ev"), "--batch-size", "4", "--no-plot"])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(tmp_path / "ev" / "results.json", encoding="utf-8"))
    assert res["protocol"] == "keyslice"
    n_keys = sum(len(c.key_slices) for c in cases)
    assert res["info"]["counts"]["images"] == n_keys
    assert res["info"]["counts"]["truths"] == sum(len(c.lesions) for c in cases)
    sens = res["tables"]["keyslice"]["sensitivity"]
    assert len(sens) == 6 and all(0.0 <= s <= 1.0 for s in sens)


def test_split_detections_are_the_predictors_in_stored_slice_pixels(workdir, built):
    """Independent check of the mapping: the same images through the Predictor directly, boxes mapped
    with the placement computed here from the case's stored size and the config."""
    data, cases = built
    loaded = inference.cached_model(os.path.abspath(workdir), None, None, None)
    sd = from_workdir.infer_split(loaded, data, "deeplesion", "test", batch_size=4, progress=False)
    t = sd.table
    assert len(sd.boxes) == len(t) == sum(len(c.sample_slices) for c in cases)
    cfg = from_workdir._eval_input_config(loaded, data, "deeplesion", "test", 4)
    loader = ip.SampleLoader([t], [ip.load_tables(cfg)[1][0]], cfg)
    pred = inference.cached_predictor(loaded, 4, "deeplesion", False)   # the same compiled function
    for row in range(len(t)):
        ex = loader.map(np.array([0, row, row]))
        imgs = np.repeat(ex[Keys.IMAGE][None], 4, axis=0)
        val = np.repeat(ex[Keys.IMAGE_VALID][None], 4, axis=0)
        out = pred(imgs, val)
        assert imgs.dtype == ip.IMAGE_DTYPE    # the batch's fixed point, decoded by the model
        same = pred(decode_image(imgs), val)   # the image in float, decoded independently here
        np.testing.assert_array_equal(out["boxes"], same["boxes"])
        np.testing.assert_array_equal(out["scores"], same["scores"])
        keep = out["valid"][0]
        h, w = t.case_hw[t.case_row[row]]
        size = cfg.image_size
        s = min(float(t.case_pixel_mm[t.case_row[row]]) / cfg.pixel_mm, size[0] / h, size[1] / w)
        ty, tx = np.floor((size[0] - h * s) / 2 + 1e-6), np.floor((size[1] - w * s) / 2 + 1e-6)
        want = (out["boxes"][0][keep] - [ty, tx, ty, tx]) / s
        want = np.clip(want, 0, [h, w, h, w])
        inside = (want[:, 2] > want[:, 0]) & (want[:, 3] > want[:, 1])
        np.testing.assert_allclose(sd.boxes[row], want[inside], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(sd.scores[row], out["scores"][0][keep][inside], rtol=1e-6)
    truth, predd = from_workdir.keyslice_dicts(sd)
    for c in cases:
        for les in c.lesions:
            name = f"{c.case_id}:{les.slice_index}"
            assert any(np.allclose(b, core.internal_to_inclusive_xyxy(les.box)) for b in truth[name])


def test_boxes_wholly_in_the_padding_are_dropped(workdir, built):
    """A detection lying in the canvas's padding, outside the stored slice, clips to an empty box;
    it is dropped (the key-slice evaluator rejects empty boxes, which once stopped a training run's
    periodic evaluation), the detection on the slice is kept."""
    data, _ = built
    loaded = inference.cached_model(os.path.abspath(workdir), None, None, None)
    si = from_workdir.load_split(loaded.data_config, data, "deeplesion", "test", 4)
    p = ip.unaugmented_placement(si.table, 0, si.config)
    assert p.ty >= 2                                  # the 40-row slices leave padding above them
    pad_box = [0.0, p.tx + 1, p.ty - 1, p.tx + 9]     # wholly above the slice
    on_box = [p.ty + 2, p.tx + 2, p.ty + 6, p.tx + 6]      # on the slice

    class Fake:
        batch_size, expert_name = 4, "deeplesion"

        def __call__(self, img, val, sample_valid):
            n = img.shape[0]
            return {"boxes": np.tile(np.float32([pad_box, on_box]), (n, 1, 1)),
                    "scores": np.tile(np.float32([0.9, 0.8]), (n, 1)),
                    "valid": np.ones((n, 2), bool)}

    sd = from_workdir.predict_split(Fake(), si, progress=False)
    want = (np.float32(on_box) - [p.ty, p.tx, p.ty, p.tx]) / p.scale
    for row in range(len(si.table)):
        np.testing.assert_allclose(sd.boxes[row], [want], rtol=1e-5)
        np.testing.assert_allclose(sd.scores[row], [0.8])
    rep = from_workdir.keyslice_report(sd, "fake predictor", "test table")
    assert rep.info["counts"]["detections"] == len(si.table)


def test_workdir_errors_are_one_line(built, tmp_path, capsys):
    data, _ = built
    rc = ev_main.main(["--workdir", str(tmp_path / "nope"), "--data", data])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "checkpoints" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# World coordinates from a built case's source scan (LUNA16 protocol, volumetric z numbering).
# ------------------------------------------------------------------------------------------------
CUBE_LO, CUBE_HI = (12, 9, 6), (22, 19, 14)          # index ranges [lo, hi) along i, j, k


@pytest.fixture(scope="module")
def built_luna(tmp_path_factory):
    """A LUNA16-style build whose case comes from a real .mhd file (flipped axes, non-zero origin)
    with a bright cube, annotated on the stored slices where the cube is."""
    import SimpleITK as sitk

    from data_prep.readers.common import make_case, preprocess_scan
    from data_prep.readers.scan import read_scan
    from data_prep.types import Lesion2D

    root = tmp_path_factory.mktemp("luna_eval")
    arr = np.full((20, 30, 34), 40, np.int16)
    arr[:, :2] = -1000
    (i0, j0, k0), (i1, j1, k1) = CUBE_LO, CUBE_HI
    arr[k0:k1, j0:j1, i0:i1] = 900
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.4, 1.6, 2.5))
    img.SetOrigin((55.0, -20.5, -140.0))
    img.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    path = str(root / "1.3.6.1.4.1.14519.5.2.1.6279.6001.100.mhd")
    sitk.WriteImage(img, path)
    vol = read_scan(path)
    _, plan, slices = preprocess_scan(vol, pixel_mm=0.8, slice_mm=2.0)
    lesions = []
    for z in range(slices.shape[0]):
        on = slices[z] > 470
        if on.any():
            r, c = np.nonzero(on)
            lesions.append(Lesion2D(slice_index=z, box=np.array([r.min(), c.min(), r.max() + 1, c.max() + 1],
                                                                 np.float32)))
    uid = os.path.basename(path)[:-4]
    case = make_case(dataset="luna16", case_id=uid, patient_id=uid, study_id=uid, series_id=uid,
                     split="test", slices=slices, plan=plan, lesions=lesions,
                     sample_slices=range(slices.shape[0]), source=path)
    data = root / "data"
    build_lib.build("/raw", str(data), ["luna16"], reader_lookup=lambda n: cf.ListReader([case]),
                    progress=False)
    lo = np.asarray(CUBE_LO) - 0.5
    hi = np.asarray(CUBE_HI) - 0.5
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in np.where([(m >> a) & 1 for a in range(3)], hi, lo)]) for m in range(8)])
    centre = corners.mean(0)
    ann = root / "annotations.csv"
    ann.write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{uid},{centre[0]},{centre[1]},"
                   f"{centre[2]},14.0\n")
    return str(data), uid, centre, str(ann)


def test_world_mapping_of_built_cases(built_luna):
    """Detections equal to the stored annotations map back to the cube's world centre (SimpleITK)
    and its voxels; as LUNA16 candidates they find the nodule without FPs."""
    from uld_jax import slice_data
    from uld_jax.evaluate.luna import PointTable, luna16_froc

    data, uid, centre, ann = built_luna
    t = slice_data.load_sample_table(data, "luna16", "test")
    boxes = [t.sample_lesions(r)["boxes"] for r in range(len(t))]
    sd = from_workdir.SplitDetections("luna16", "luna16", t, boxes,
                                      [np.full(len(b), 0.9, np.float32) for b in boxes])
    cand, scans = from_workdir.luna_candidates(sd, data)
    assert scans == [uid] and len(cand) == 1
    np.testing.assert_array_less(np.abs(cand.xyz[0] - centre), [1.5, 1.5, 2.5])
    empty = PointTable.from_rows([], np.zeros((0, 3)), [])
    from uld_jax.evaluate.luna import read_points_csv
    r = luna16_froc(cand, read_points_csv(ann, "diameter_mm"), empty, scans)
    assert r.cpm == pytest.approx(1.0)
    per_slice = from_workdir.volumetric_pred(sd, data, None)[uid]
    assert len(per_slice)
    i_lo, i_hi = per_slice[:, 1].min(), per_slice[:, 3].max()
    j_lo, j_hi = per_slice[:, 2].min(), per_slice[:, 4].max()
    assert abs(i_lo - CUBE_LO[0]) <= 1 and abs(i_hi - (CUBE_HI[0] - 1)) <= 1
    assert abs(j_lo - CUBE_LO[1]) <= 1 and abs(j_hi - (CUBE_HI[1] - 1)) <= 1
    assert abs(per_slice[:, 0].min() - CUBE_LO[2]) <= 1 and abs(per_slice[:, 0].max() - (CUBE_HI[2] - 1)) <= 1


def test_luna16_from_workdir_cli(workdir, built_luna, tmp_path, capsys):
    data, uid, _, ann = built_luna
    rc = ev_main.main(["--workdir", workdir, "--data", data, "--protocol", "luna16", "--truth", ann,
                       "--out", str(tmp_path / "ev"), "--no-plot"])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(tmp_path / "ev" / "results.json", encoding="utf-8"))
    assert res["protocol"] == "luna16" and res["info"]["counts"]["nodules"] == 1
    assert 0.0 <= res["tables"]["linear"]["mean"] <= 1.0


def test_volumetric_from_workdir_cli(workdir, built_luna, tmp_path, capsys):
    data, uid, _, _ = built_luna
    (i0, j0, k0), (i1, j1, k1) = CUBE_LO, CUBE_HI
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({uid: [[i0, j0, k0, i1 - 1, j1 - 1, k1 - 1]]}))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({uid: ["lung"]}))
    rc = ev_main.main(["--workdir", workdir, "--data", data, "--protocol", "volumetric", "--truth",
                       str(truth), "--datasets", "luna16", "--labels", str(labels),
                       "--out", str(tmp_path / "ev"), "--no-plot", "--save-pred", str(tmp_path / "p.npz")])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(tmp_path / "ev" / "results.json", encoding="utf-8"))
    assert res["protocol"] == "volumetric" and set(res["tables"]) == {"released", "paper"}
    # --save-pred: the detections that were evaluated, re-read offline, give the same tables
    rc = ev_main.main(["--pred", str(tmp_path / "p.npz"), "--pred-2d", "--truth", str(truth),
                       "--out", str(tmp_path / "ev2"), "--no-plot"])
    assert rc == 0, capsys.readouterr().err
    res2 = json.load(open(tmp_path / "ev2" / "results.json", encoding="utf-8"))
    assert res2["tables"] == res["tables"] and res2["info"]["counts"] == res["info"]["counts"]
    assert res["info"]["counts"]["detections"] > 0
    with np.load(tmp_path / "p.npz") as z:
        assert z.files == [uid] and z[uid].ndim == 2 and z[uid].shape[1] == 6
    # --save-pred without a run to infer, or for key slices, or not .npz: one-line errors
    rc = ev_main.main(["--pred", str(tmp_path / "p.npz"), "--pred-2d", "--truth", str(truth),
                       "--save-pred", str(tmp_path / "q.npz")])
    assert rc == 2 and "--save-pred needs --workdir" in capsys.readouterr().err
    rc = ev_main.main(["--workdir", workdir, "--data", data, "--save-pred", str(tmp_path / "q.npz")])
    assert rc == 2 and "not keyslice" in capsys.readouterr().err
    rc = ev_main.main(["--workdir", workdir, "--data", data, "--protocol", "volumetric", "--truth",
                       str(truth), "--datasets", "luna16", "--save-pred", str(tmp_path / "q.pkl")])
    assert rc == 2 and "q.pkl" in capsys.readouterr().err and not (tmp_path / "q.pkl").exists()
    assert res["info"]["counts"]["truths"] == 1 and res["info"]["counts"]["volumes"] == 1
    # organ strata from --labels: the one lesion is the lung stratum and the overall one
    assert res["strata"]["lung"]["num_truths"] == 1 and res["strata"]["liver"]["num_truths"] == 0
    for rule in ("released", "paper"):
        assert res["strata"]["lung"][rule] == res["strata"]["overall"][rule] == res["tables"][rule]["mean"]
    assert res["info"]["sources"]["labels"] == str(labels)
    # --labels is for the volumetric protocol only
    rc = ev_main.main(["--workdir", workdir, "--data", data, "--labels", str(labels), "--no-plot"])
    assert rc == 2 and "applies to the volumetric protocol" in capsys.readouterr().err
