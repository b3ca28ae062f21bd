"""The offline CLI `python -m uld_jax.evaluate` end to end on small files, and the Python entry point."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from uld_jax.evaluate.__main__ import main
from uld_jax.evaluate.report import evaluate_predictions
from uld_jax.io.safe_pickle import atomic_dump, safe_load

TRUTH = {
    "000001_01_01_001-010": np.array([[10, 10, 2, 29, 29, 4], [100, 100, 5, 119, 119, 8]], float),
    "000002_01_01_020-030": np.array([[50, 50, 22, 69, 69, 25]], float),
    "000003_01_01_001-005": np.zeros((0, 6)),
}


def _pred():
    return {
        "000001_01_01_001-010": np.array([[10, 10, 2, 29, 29, 4, 0.9], [300, 300, 1, 320, 320, 3, 0.8]]),
        "000002_01_01_020-030": np.array([[52, 52, 22, 69, 69, 25, 0.7]]),
        "000003_01_01_001-005": np.array([[5, 5, 1, 15, 15, 2, 0.6]]),
    }


def test_cli_pkl_end_to_end(tmp_path, capsys):
    atomic_dump({"test": TRUTH}, tmp_path / "truth.pkl")
    atomic_dump({"test": _pred()}, tmp_path / "pred.pkl")
    out = tmp_path / "out"
    rc = main(["--pred", str(tmp_path / "pred.pkl"), "--truth", str(tmp_path / "truth.pkl"), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # ranking .9 TP, .8 FP, .7 TP, .6 FP; 3 volumes, 3 truths: curve fps 0 1/3 1/3 2/3, found 1 1 2 2
    sens = res["tables"]["released"]["sensitivity"]
    np.testing.assert_allclose(sens, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert res["tables"]["paper"]["sensitivity"] == sens
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| released protocol (3D IoBB >= 0.3, +1 px) | 0.3333 | 0.3333 | 0.6667" in md
    assert (out / "froc_volumetric.png").read_bytes()[:4] == b"\x89PNG"
    assert "0.6667" in capsys.readouterr().out


def test_cli_json_npz_2d_and_labels(tmp_path):
    truth = {k: v.tolist() for k, v in TRUTH.items()}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    # per-slice 2D detections of the first lesion on slices 2..4 and one FP slice
    sd = {"000001_01_01_001-010": np.array([[2, 10, 10, 29, 29, 0.5], [3, 10, 10, 29, 29, 0.9],
                                            [4, 11, 11, 29, 29, 0.4], [7, 300, 300, 310, 310, 0.3]])}
    np.savez(tmp_path / "pred2d.npz", **sd)
    labels = {"000001_01_01_001-010": ["liver", "lung"], "000002_01_01_020-030": ["lymph_node"],
              "000003_01_01_001-005": []}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    out = tmp_path / "o"
    rc = main(["--pred", str(tmp_path / "pred2d.npz"), "--pred-2d", "--truth", str(tmp_path / "truth.json"),
               "--labels", str(tmp_path / "labels.json"), "--out", str(out), "--no-plot"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # two 3D boxes: the lesion (score .9) and the FP (.3); 1 of 3 truths found, then an FP at 1/3
    np.testing.assert_allclose(res["tables"]["released"]["sensitivity"], [1 / 3] * 7)
    assert res["strata"]["liver"]["released"] == 1.0 and res["strata"]["lung"]["released"] == 0.0
    assert res["strata"]["overall"]["num_truths"] == 3
    assert not (out / "froc_volumetric.png").exists()


def test_cli_errors_name_file_and_key(tmp_path, capsys):
    atomic_dump({"test": TRUTH}, tmp_path / "truth.pkl")
    bad = _pred()
    bad["000002_01_01_020-030"] = np.array([[52, 52, 22, 69, 69, 25]])  # no score column
    atomic_dump({"test": bad}, tmp_path / "pred.pkl")
    rc = main(["--pred", str(tmp_path / "pred.pkl"), "--truth", str(tmp_path / "truth.pkl")])
    err = capsys.readouterr().err
    assert rc == 2 and "pred.pkl: key '000002_01_01_020-030': array of shape (1, 6)" in err
    rc = main(["--pred", str(tmp_path / "pred.pkl"), "--truth", str(tmp_path / "truth.pkl"), "--split", "val"])
    assert rc == 2 and "no split 'val'" in capsys.readouterr().err
    (tmp_path / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    rc = main(["--pred", str(tmp_path / "evil.pkl"), "--truth", str(tmp_path / "truth.pkl")])
    assert rc == 2 and "refused to load global os.system" in capsys.readouterr().err


def test_cli_luna16_subprocess_with_clu(tmp_path, real_data):
    d = real_data / "luna16"
    lines = (d / "annotations.csv").read_text(encoding="utf-8").splitlines()[1:]
    cands = ["seriesuid,coordX,coordY,coordZ,probability"] + [",".join(l.split(",")[:4]) + ",0.9" for l in lines]
    (tmp_path / "cands.csv").write_text("\n".join(cands) + "\n")
    out, tb = tmp_path / "out", tmp_path / "tb"
    proc = subprocess.run([sys.executable, "-m", "uld_jax.evaluate", "--pred", str(tmp_path / "cands.csv"),
                           "--truth", str(d / "annotations.csv"), "--out", str(out), "--tb", str(tb)],
                          capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["tables"]["linear"]["mean"] == 1.0 and res["protocol"] == "luna16"
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())


def test_real_1k_through_the_entry_point(real_data):
    truth = safe_load(real_data / "deeplesion" / "DeepLesion_manual_1K_test_release.pkl")["test"]
    pred = {k: np.hstack([v, np.ones((len(v), 1))]) for k, v in truth.items()}
    rep = evaluate_predictions(truth, pred)
    for rule in ("released", "paper"):
        assert rep.tables[rule].sensitivity == [1.0] * 7
    sc = rep.scalars()
    assert sc["volumetric/released/mean"] == 1.0 and sc["volumetric/paper/sens@0.125"] == 1.0
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_predictions(truth)


def test_cli_keyslice_and_z_range_warning(tmp_path, capsys):
    truth = {"000001_01_01_010.png": [[0, 0, 9, 9]], "000001_01_01_011.png": [[20, 20, 29, 29]]}
    pred = {"000001_01_01_010.png": [[0, 0, 9, 4, 0.7]], "000001_01_01_011.png": [[60, 60, 70, 70, 0.8]]}
    (tmp_path / "t.json").write_text(json.dumps(truth))
    (tmp_path / "p.json").write_text(json.dumps(pred))
    assert main(["--protocol", "keyslice", "--pred", str(tmp_path / "p.json"), "--truth", str(tmp_path / "t.json"),
                 "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text(encoding="utf-8"))
    # ranking .8 FP, .7 TP (IoU exactly 0.5): curve fps .5 .5, sens 0 .5
    np.testing.assert_allclose(res["tables"]["keyslice"]["sensitivity"], [0.5] * 6)
    # 0-based z instead of the release's slice numbers: flagged in the notes
    pred0 = {k: v.copy() for k, v in _pred().items()}
    pred0["000002_01_01_020-030"][:, [2, 5]] -= 20
    rep = evaluate_predictions(TRUTH, pred0)
    assert any("outside their sub-volume's slice range" in n for n in rep.info["notes"])


def test_internal_boxes_to_release_rows():
    from uld_jax.evaluate.inputs import parse_subvolume_name, slice_detections_from_internal

    assert parse_subvolume_name("000001_01_01_103-115.nii.gz") == ("000001_01_01", 103, 115)
    assert parse_subvolume_name("not_a_name") is None
    # internal [y1, x1, y2, x2] continuous covering pixels rows 10..29, cols 10..29, on the
    # sub-volume's slices 0..2 -> release z 2..4 and inclusive [10, 10, 29, 29]
    rows = slice_detections_from_internal("000001_01_01_002-010", [0, 1, 2], [[10, 10, 30, 30]] * 3, [0.5, 0.9, 0.4])
    np.testing.assert_array_equal(rows[1], [3, 10, 10, 29, 29, 0.9])
    rep = evaluate_predictions({"000001_01_01_002-010": TRUTH["000001_01_01_001-010"][:1]},
                               slice_detections={"000001_01_01_002-010": rows})
    assert rep.tables["released"].sensitivity == [1.0] * 7 and rep.tables["paper"].sensitivity == [1.0] * 7
