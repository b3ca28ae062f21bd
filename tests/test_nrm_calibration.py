"""NRM's sigma as a precision level (uld_jax.mine.calibrate): hand-worked thresholds, a brute-force
reference, per-expert thresholds in NRM, and the mining driver calibrating a real checkpoint's
single-type experts on their own built dataset."""

from __future__ import annotations

import collections
import math
import types

import numpy as np
import pytest

from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import inference
from uld_jax.core import DATASET_ID, Provenance
from uld_jax.mine import calibrate, driver, nrm, table

from test_mine_driver import save_checkpoints, tiny_config  # noqa: E402


# -- the threshold rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("precision, expected", [
    (0.5, np.nextafter(0.6, 0)),  # all four: 2 of 4 right; just below the lowest score
    (0.6, 0.65),     # top three: 2 of 3
    (0.7, 0.75),     # top two: 2 of 2
    (1.0, 0.75),
])
def test_threshold_golden(precision, expected):
    scores, right = [0.6, 0.9, 0.7, 0.8], [False, True, False, True]
    assert calibrate.precision_threshold(scores, right, precision) == pytest.approx(expected)


def test_threshold_ties_are_kept_or_dropped_together():
    # top two would be 2/2 but 0.8 is tied with a wrong one: 2/3 < 0.7, so only the 0.9 is kept
    t = calibrate.precision_threshold([0.9, 0.8, 0.8, 0.1], [True, True, False, False], 0.7)
    assert t == pytest.approx(0.85)
    assert calibrate.precision_threshold([0.5, 0.5], [True, False], 0.5) == np.nextafter(0.5, 0)


def test_threshold_when_nothing_reaches_the_level():
    assert calibrate.precision_threshold([0.9, 0.2], [False, False], 0.5) == math.inf
    assert calibrate.precision_threshold([], [], 0.5) == math.inf
    with pytest.raises(ValueError, match="precision"):
        calibrate.precision_threshold([0.5], [True], 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        calibrate.precision_threshold([0.5, 0.4], [True], 0.5)


def test_threshold_against_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(1, 30))
        scores = np.round(rng.uniform(0, 1, n), 1)          # coarse: many ties
        right = rng.uniform(0, 1, n) < rng.uniform(0.1, 0.9)
        p = float(rng.choice([0.3, 0.5, 0.8]))
        t = calibrate.precision_threshold(scores, right, p)
        # reference: every cut "score > c" with c just below a distinct score (or above all)
        best = 0
        for c in np.unique(scores):
            kept = scores >= c
            if right[kept].mean() >= p:
                best = max(best, int(kept.sum()))
        kept = scores > t
        assert int(kept.sum()) == best, (trial, scores, right, p, t)
        if best:
            assert right[kept].mean() >= p


# -- NRM with one threshold per expert ------------------------------------------------------------
def test_nrm_per_expert_thresholds():
    L, T, N = DATASET_ID["luna16"], DATASET_ID["lits"], DATASET_ID["nihln"]
    boxes = np.asarray([[0, 0, 5, 5], [10, 10, 15, 15], [20, 20, 25, 25], [30, 30, 35, 35]], float)
    kw = dict(existing_slice=np.zeros(0, int), existing_box=np.zeros((0, 4)))
    args = (np.zeros(4, int), boxes, np.asarray([0.3, 0.3, 0.3, 0.6]), np.asarray([L, T, N, N]))
    res = nrm.nrm(*args, sigma={"luna16": 0.2, "lits": math.inf, "nihln": 0.5}, **kw)
    np.testing.assert_array_equal(res.suspicious, [True, False, False, True])
    res = nrm.nrm(*args, sigma={"luna16": None, "lits": 0.1, "nihln": 0.1}, **kw)
    np.testing.assert_array_equal(res.suspicious, [False, True, True, True])
    # one float is the paper's rule for every expert
    np.testing.assert_array_equal(nrm.nrm(*args, sigma=0.25, **kw).suspicious, [True] * 4)
    with pytest.raises(ValueError, match=r"no threshold for \['nihln'\]"):
        nrm.nrm(*args, sigma={"luna16": 0.2, "lits": 0.2}, **kw)


def test_right_detections_by_iou_with_own_boxes():
    lesions = {0: np.asarray([[0, 0, 10, 10]], float), 1: np.zeros((0, 4)), 2: np.asarray(
        [[0, 0, 10, 10], [20, 20, 30, 30]], float)}

    class Table:
        def __len__(self):
            return 3

        def sample_lesions(self, r):
            b = lesions[r]
            prov = np.full(len(b), int(Provenance.ORIGINAL))
            if r == 2:
                prov[1] = int(Provenance.IGNORE)             # not an original box: never right
            return {"boxes": b, "provenance": prov}

    sd = types.SimpleNamespace(table=Table(), boxes=[
        np.asarray([[0, 0, 10, 8], [0, 0, 10, 4]], float),   # IoU 0.8 and 0.4
        np.asarray([[0, 0, 10, 10]], float),                 # lesion-free slice
        np.asarray([[20, 20, 30, 30], [1, 1, 10, 10]], float)],
        scores=[np.asarray([0.9, 0.8]), np.asarray([0.7]), np.asarray([0.6, 0.5])])
    scores, right = calibrate.right_detections(sd)
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7, 0.6, 0.5])
    np.testing.assert_array_equal(right, [True, False, False, False, True])


# -- the driver ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_with_luna(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    data = root / "data"
    dl = [cf.make_case("deeplesion", k, num_slices=12, height=40, width=40, lesion_slices=(5,),
                       negatives=(), patient=f"{k // 2:06d}") for k in range(4)]
    luna = [cf.make_case("luna16", 10 + k, num_slices=12, height=40, width=40,
                         lesion_slices=(4, 6), negatives=(1, 9)) for k in range(3)]
    build_lib.build("/raw", str(data), ["deeplesion", "luna16"], progress=False,
                    reader_lookup=lambda n: cf.ListReader(dl if n == "deeplesion" else luna))
    config = tiny_config(data)
    run_dir = root / "run"
    save_checkpoints(str(run_dir), config)
    return {"root": root, "data": data, "run": run_dir}


def test_driver_calibrates_each_expert_on_its_own_data(run_with_luna):
    r = run_with_luna
    opts = driver.DriverOptions(chunk_slices=8, progress=False, sigma_from="precision",
                                min_score=0.0,
                                mining=driver.run.MiningOptions(nrm_experts=("luna16",)))
    s = driver.mine(str(r["run"]), opts)
    ov = table.read_overlay(s["out"])
    cal = ov.meta["sigma_calibration"]["luna16"]
    assert ov.meta["options"]["sigma_by_expert"]["luna16"] == cal["sigma"]
    assert cal["split"] == "train" and cal["samples"] == 3 * 4 and cal["detections"] > 0
    # the same threshold from the same detections, computed here without the driver
    loaded = inference.load_model(str(r["run"]), step=4)
    ref = calibrate.expert_sigmas(loaded, str(r["data"]), ["luna16"], 0.5, min_score=0.0)["luna16"]
    assert ref["detections"] == cal["detections"] and ref["right"] == cal["right"]
    assert (ref["sigma"] if np.isfinite(ref["sigma"]) else None) == cal["sigma"]
    ign = ov.arrays["kind"] == table.KIND_IGNORE
    if cal["sigma"] is None:
        assert not ign.any()
    else:
        assert np.all(ov.arrays["score"][ign] > cal["sigma"])
    assert np.all(ov.arrays["expert"][ign] == DATASET_ID["luna16"])
    # the mining report names the thresholds
    from uld_jax.mine import report
    text = report.format_markdown({"provenance": {"checkpoint_step": 4, "config_hash": "h",
                                                  "theta": 0.15, "sigma": 0.5,
                                                  "sigma_calibration": ov.meta["sigma_calibration"]},
                                   "quality": collections.defaultdict(int),
                                   "truth": {"lesions": 0, "marked": 0, "cases": 0},
                                   "slices_mined": 1, "min_iobb": 0.3, "theta_sweep": [],
                                   "sigma_sweep": [], "counts": ov.counts()})
    assert "is a precision level" in text and "luna16" in text


def test_driver_refuses_a_precision_outside_0_1(run_with_luna, capsys):
    rc = driver.main(["--workdir", str(run_with_luna["run"]), "--sigma_from", "precision",
                      "--sigma", "1.5", "--progress", "off", "--nrm_experts", "luna16"])
    assert rc == 1 and "precision level in (0, 1]" in capsys.readouterr().err
