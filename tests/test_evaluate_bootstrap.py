"""uld_jax.evaluate.bootstrap: the reweighted FROC against the protocol itself (every weight 1;
integer weights against the test set with volumes really copied) and a hand-worked case; the
patient-level draws; the paired differences; the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from uld_jax.evaluate import bootstrap as bs
from uld_jax.evaluate import evaluate_predictions, volumetric_froc

RATES = (0.5, 1.0)
BOX = [0, 0, 0, 9, 9, 4]


def _golden():
    """Two patients, one lesion each. Ranked: a (0.9, hits T1), c (0.8, FP), b (0.5, FP), d (0.3, hits T2)."""
    truth = {"000001_01_01_001-010": np.array([BOX], float), "000002_01_01_001-010": np.array([BOX], float)}
    pred = {"000001_01_01_001-010": np.array([BOX + [0.9], [20, 20, 0, 29, 29, 4, 0.5]], float),
            "000002_01_01_001-010": np.array([[20, 20, 0, 29, 29, 4, 0.8], BOX + [0.3]], float)}
    return truth, pred


def test_hand_worked_weights():
    truth, pred = _golden()
    parts = bs.curve_parts(truth, pred, rule="released")
    np.testing.assert_array_equal(parts.det_volume, [0, 1, 0, 1])
    np.testing.assert_array_equal(parts.new_truths, [1, 0, 0, 1])
    np.testing.assert_array_equal(parts.is_fp, [False, True, True, False])
    got = bs.weighted_mean_sensitivity(parts, np.array([[1, 1], [2, 0], [0, 2], [0, 0]]), RATES)
    # [1,1]: 0.5 at 0.5 FP (one FP of 2 volumes), 1.0 at 1 FP -> 0.75
    # [2,0]: patient 1 twice: both copies of T1 hit before any FP -> 1.0, 1.0
    # [0,2]: patient 2 twice: the first point is 1 FP per volume, right of 0.5 -> 0.0, then 1.0
    np.testing.assert_allclose(got[:3], [0.75, 1.0, 0.5])
    assert np.isnan(got[3])          # no truth drawn
    assert volumetric_froc(pred, truth, fp_rates=RATES).mean_sensitivity == pytest.approx(0.75)


def _random_world(rng, patients=6, vols_per=2, lesions=3, dets=8):
    truth, sdet = {}, {}
    for p in range(patients):
        for v in range(vols_per):
            name = f"{p + 1:06d}_01_{v + 1:02d}_001-020"
            t = []
            for _ in range(rng.integers(0, lesions + 1)):
                x, y, z = rng.integers(0, 40, 3)
                s, d = rng.integers(4, 12), rng.integers(1, 5)
                t.append([x, y, min(z, 15), x + s, y + s, min(z, 15) + d])
            truth[name] = np.array(t, float).reshape(-1, 6)
            rows = []
            for _ in range(rng.integers(0, dets + 1)):
                if len(t) and rng.random() < 0.5:      # near a lesion, on some of its slices
                    x1, y1, z1, x2, y2, z2 = t[rng.integers(len(t))]
                    j = rng.integers(-3, 4, 2)
                    for z in range(int(z1), int(z2) + 1):
                        rows.append([z, x1 + j[0], y1 + j[1], x2 + j[0], y2 + j[1], rng.random()])
                else:
                    x, y, z = rng.integers(0, 40, 3)
                    rows.append([z, x, y, x + 6, y + 6, rng.random()])
            sdet[name] = np.array(rows, float).reshape(-1, 6)
    return truth, sdet


@pytest.mark.parametrize("rule", ["released", "paper"])
def test_unit_weights_are_the_protocol(rule):
    truth, sdet = _random_world(np.random.default_rng(3))
    parts = bs.curve_parts(truth, slice_detections=sdet, rule=rule)
    rep = evaluate_predictions(truth, slice_detections=sdet, rules=(rule,))
    got = bs.weighted_mean_sensitivity(parts, np.ones((1, len(truth))))[0]
    assert got == pytest.approx(rep.tables[rule].mean, abs=1e-12)
    assert rep.tables[rule].mean > 0          # the case is not degenerate


@pytest.mark.parametrize("rule", ["released", "paper"])
def test_integer_weights_are_the_copied_test_set(rule):
    rng = np.random.default_rng(7)
    truth, sdet = _random_world(rng)
    parts = bs.curve_parts(truth, slice_detections=sdet, rule=rule)
    w = bs.resample_weights(list(truth), 5, seed=1)
    got = bs.weighted_mean_sensitivity(parts, w)
    for b in range(len(w)):
        t2, s2 = {}, {}
        for k, m in zip(truth, w[b]):
            for c in range(int(m)):
                t2[f"{k}#{c}"], s2[f"{k}#{c}"] = truth[k], sdet[k]
        ref = evaluate_predictions(t2, slice_detections=s2, rules=(rule,)).tables[rule].mean
        assert got[b] == pytest.approx(ref, abs=1e-12), b


def test_patient_draws():
    keys = ["000001_01_01_001-010", "000001_02_01_005-020", "000002_01_01_001-010", "other"]
    w = bs.resample_weights(keys, 200, seed=0)
    assert w.shape == (200, 4)
    np.testing.assert_array_equal(w[:, 0], w[:, 1])          # one patient, drawn together
    # three groups drawn three times each resample: the volumes' weights sum to 3 per group drawn
    np.testing.assert_array_equal(w[:, [0, 2, 3]].sum(axis=1), 3)
    assert (w[:, 0] != w[:, 2]).any()
    wv = bs.resample_weights(keys, 200, seed=0, by="volume")
    np.testing.assert_array_equal(wv.sum(axis=1), 4)
    assert (wv[:, 0] != wv[:, 1]).any()
    np.testing.assert_array_equal(bs.resample_weights(keys, 3, seed=5), bs.resample_weights(keys, 3, seed=5))
    with pytest.raises(ValueError, match="by must be"):
        bs.resample_weights(keys, 3, by="study")


def test_paired_differences():
    truth, sdet = _random_world(np.random.default_rng(11), patients=10)
    other = {k: v.copy() for k, v in sdet.items()}
    for v in other.values():                  # a second run: the same boxes, other scores
        if len(v):
            v[:, 5] = np.random.default_rng(len(v)).random(len(v))
    res = bs.paired_bootstrap(truth, {"A": sdet, "A again": sdet, "B": other}, samples=300, seed=2)
    assert res["groups"] == 10 and res["truths"] == sum(len(t) for t in truth.values())
    for rule in ("released", "paper"):
        r = res[rule]
        same = r["differences"]["A again - A"]
        assert same["sd"] == 0 and same["mean"] == 0 and same["share_not_positive"] == 1.0
        ref = evaluate_predictions(truth, slice_detections=sdet, rules=(rule,)).tables[rule].mean
        assert r["runs"]["A"]["observed"] == pytest.approx(100 * ref)
        d = r["differences"]["B - A"]
        assert d["observed"] == pytest.approx(r["runs"]["B"]["observed"] - r["runs"]["A"]["observed"])
        assert r["runs"]["A"]["sd"] > 0 and d["lo"] <= d["mean"] <= d["hi"]
    md = bs.to_markdown(res)
    assert "| B - A |" in md and "resamples of 10 patients" in md


def test_cli(tmp_path, capsys):
    truth, sdet = _random_world(np.random.default_rng(5))
    np.savez(tmp_path / "a.npz", **sdet)
    np.savez(tmp_path / "b.npz", **{k: v[: len(v) // 2] for k, v in sdet.items()})
    tp = tmp_path / "truth.json"
    tp.write_text(json.dumps({k: v.tolist() for k, v in truth.items()}))
    rc = bs.main(["--truth", str(tp), "--pred", f"A={tmp_path / 'a.npz'}", "--pred", f"B={tmp_path / 'b.npz'}",
                  "--pred-2d", "--samples", "50", "--out", str(tmp_path / "r" / "res.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "| B - A |" in out
    res = json.load(open(tmp_path / "r" / "res.json", encoding="utf-8"))
    assert res["samples"] == 50 and set(res["released"]["runs"]) == {"A", "B"}
    for argv, msg in ((["--pred", "A"], "expected NAME=FILE"),
                      (["--pred", f"A={tmp_path / 'nope.npz'}"], "nope.npz: no such file"),
                      (["--pred", f"A={tmp_path / 'a.npz'}", "--pred", f"A={tmp_path / 'a.npz'}"], "given twice"),
                      (["--pred", f"A={tmp_path / 'a.npz'}", "--samples", "1"], "at least 2")):
        rc = bs.main(["--truth", str(tp), "--pred-2d", *argv])
        assert rc == 2 and msg in capsys.readouterr().err, argv
