"""Volumetric and key-slice FROC: hand-worked cases, edge rules, the real 1K set, oracle checks."""

from __future__ import annotations

import numpy as np
import pytest

from evaluate_oracles import froc_loop, read_loop
from uld_jax.evaluate.boxes import EvaluationInputError
from uld_jax.evaluate.froc import (
    keyslice_froc,
    sensitivity_at_fp,
    stratified_froc,
    volumetric_froc,
)
from uld_jax.io.safe_pickle import safe_load

RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)


def _case_a():
    """Hand-worked case: multi-hit, a duplicate that is neither TP nor FP, empty volumes."""
    truth = {
        "v1": np.array([[0, 0, 0, 9, 9, 9], [5, 5, 5, 14, 14, 14]], float),
        "v2": np.array([[100, 100, 10, 109, 109, 11]], float),
        "v3": np.zeros((0, 6)),
        "v4": np.zeros((0, 6)),
    }
    pred = {
        "v1": np.array([
            [2, 2, 2, 12, 12, 12, 0.9],     # D1: IoBB 512/1331 with T1 and with T2: hits both
            [0, 0, 0, 9, 9, 9, 0.8],        # D2: hits T1 only, already hit: neither TP nor FP
            [50, 50, 50, 59, 59, 59, 0.7],  # D3: FP
        ]),
        "v2": np.array([
            [100, 100, 10, 109, 109, 11, 0.6],  # D4: hits T3
            [200, 200, 0, 210, 210, 5, 0.5],    # D6: FP
        ]),
        "v3": np.array([[0, 0, 0, 5, 5, 5, 0.95]]),  # D5: FP in a volume without truth
        "v4": np.zeros((0, 7)),
    }
    return pred, truth


def test_released_rule_hand_worked():
    pred, truth = _case_a()
    r = volumetric_froc(pred, truth, rule="released")
    # ranking D5 D1 D2 D3 D4 D6 -> FPs 1 1 1 2 2 3, hits 0 2 2 2 3 3; 4 volumes, 3 truths.
    np.testing.assert_allclose(r.curve_fps, [0.25, 0.25, 0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(r.curve_sens, [0, 2 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(r.sensitivity, [0, 2 / 3, 1, 1, 1, 1, 1])
    assert r.mean_sensitivity == pytest.approx((2 / 3 + 5) / 7)
    assert (r.num_fp, r.num_hit, r.num_truths, r.num_volumes) == (3, 3, 3, 4)


def test_paper_rule_hand_worked():
    pred, truth = _case_a()
    r = volumetric_froc(pred, truth, rule="paper")
    # D1's xy IoU with T1 / T2 is 64/157 < 0.5: an FP under the paper's rule.
    np.testing.assert_allclose(r.curve_fps, [0.25, 0.5, 0.5, 0.75, 0.75, 1.0])
    np.testing.assert_allclose(r.curve_sens, [0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r.sensitivity, [0, 0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert r.mean_sensitivity == pytest.approx(3 / 7)


def test_thresholds_are_inclusive_for_released_and_strict_for_paper():
    truth = {"v": np.array([[0, 0, 0, 9, 9, 2]], float)}
    det = {"v": np.array([[0, 0, 0, 9, 9, 9, 1.0]])}  # IoBB exactly 300/1000 = 0.3
    assert volumetric_froc(det, truth).sensitivity[-1] == 1.0
    truth = {"v": np.array([[0, 0, 3, 9, 9, 3]], float)}
    det = {"v": np.array([[0, 0, 3, 9, 4, 3, 1.0]])}  # xy IoU exactly 50/100 = 0.5: not > 0.5
    assert volumetric_froc(det, truth, rule="paper").sensitivity[-1] == 0.0
    det = {"v": np.array([[0, 0, 3, 9, 5, 3, 1.0]])}  # 60/100
    assert volumetric_froc(det, truth, rule="paper").sensitivity[-1] == 1.0
    # Paper rule needs a shared slice: same rectangle one slice off is a miss.
    det = {"v": np.array([[0, 0, 4, 9, 9, 8, 1.0]])}
    assert volumetric_froc(det, truth, rule="paper").sensitivity[-1] == 0.0


def test_paper_rule_with_per_slice_boxes():
    truth = {"v": np.array([[10, 10, 5, 29, 29, 7]], float)}
    # A stacked detection over slices 3..8 whose 3D box (union) is too big on the truth's slices,
    # but whose own 2D box on slice 6 matches the truth: a hit only with its per-slice boxes.
    det = {"v": np.array([[0, 0, 3, 49, 49, 8, 0.9]])}
    slices = {"v": np.array([[0, 3, 0, 0, 49, 49], [0, 6, 10, 10, 29, 29], [0, 8, 0, 0, 49, 49]], float)}
    assert volumetric_froc(det, truth, rule="paper").sensitivity[-1] == 0.0
    assert volumetric_froc(det, truth, rule="paper", slice_boxes=slices).sensitivity[-1] == 1.0
    # The matching 2D box on a slice outside the truth's z range does not count.
    slices = {"v": np.array([[0, 8, 10, 10, 29, 29]], float)}
    assert volumetric_froc(det, truth, rule="paper", slice_boxes=slices).sensitivity[-1] == 0.0
    # Many detections: det_index (40) larger than the coordinates is fine; volumes absent from
    # slice_boxes use their cuboids.
    many = {"v": np.vstack([np.tile([300, 300, 0, 310, 310, 1, 0.1], (40, 1)), det["v"]]),
            "w": np.array([[10, 10, 5, 29, 29, 7, 0.5]])}
    truth2 = {"v": truth["v"], "w": np.array([[10, 10, 5, 29, 29, 7]], float)}
    slices = {"v": np.array([[40, 6, 10, 10, 29, 29]], float)}
    r = volumetric_froc(many, truth2, rule="paper", slice_boxes=slices)
    assert r.num_hit == 2 and r.num_fp == 40
    with pytest.raises(EvaluationInputError, match="det_index must be integers in 0..40"):
        volumetric_froc(many, truth2, rule="paper", slice_boxes={"v": np.array([[41, 6, 10, 10, 29, 29]], float)})
    with pytest.raises(EvaluationInputError, match="row 0 is an empty/inverted box"):
        volumetric_froc(many, truth2, rule="paper", slice_boxes={"v": np.array([[3, 6, 10, 10, 2, 29]], float)})


def test_edge_rules_left_zero_right_last():
    # First detection is an FP: rates left of the first curve point read 0 although np.interp
    # alone would return the first value.
    np.testing.assert_allclose(sensitivity_at_fp([0.5, 0.5, 1.0], [0.0, 0.5, 0.5], [0.25, 0.5, 0.75, 2]),
                               [0.0, 0.5, 0.5, 0.5])
    assert sensitivity_at_fp([], [], [1, 2]).tolist() == [0, 0]
    # Single detection: left 0, at and right of it its value.
    np.testing.assert_allclose(sensitivity_at_fp([0.0], [1.0], [0.125, 8]), [1.0, 1.0])


def test_ties_follow_released_ordering():
    truth = {"a": np.array([[0, 0, 0, 9, 9, 9]], float), "b": np.zeros((0, 6))}
    # Same score on a TP (concatenated first) and an FP (second): the released ranking
    # np.argsort(scores)[::-1] puts the FP first, so at 1/4 FP per volume nothing is found yet.
    pred = {"a": np.array([[0, 0, 0, 9, 9, 9, 0.5]]), "b": np.array([[0, 0, 0, 9, 9, 9, 0.5]])}
    r = volumetric_froc(pred, truth, fp_rates=(0.25, 0.5, 1.0))
    s, f = froc_loop([pred["a"], pred["b"]], [truth["a"], truth["b"]], 3, "iobb", 0.3)
    np.testing.assert_array_equal(r.curve_sens, s)
    np.testing.assert_array_equal(r.sensitivity, read_loop(s, f, [0.25, 0.5, 1.0]))
    np.testing.assert_allclose(r.sensitivity, [0.0, 1.0, 1.0])


def test_no_truth_anywhere_and_missing_keys():
    truth = {"a": np.zeros((0, 6))}
    r = volumetric_froc({"a": np.array([[0, 0, 0, 1, 1, 1, 0.3]])}, truth)
    assert np.isnan(r.sensitivity).all() and r.num_fp == 1
    with pytest.raises(EvaluationInputError, match="no entry for 1 volume"):
        volumetric_froc({}, {"a": np.zeros((0, 6))}, pred_source="p.pkl")
    r = volumetric_froc({}, {"a": np.array([[0, 0, 0, 1, 1, 1]], float)}, missing_as_empty=True)
    assert r.sensitivity.tolist() == [0.0] * 7


def test_malformed_inputs_name_key_and_row():
    truth = {"a": np.array([[0, 0, 0, 1, 1, 1]], float)}
    with pytest.raises(EvaluationInputError, match=r"p.pkl: key 'a': array of shape \(1, 6\)"):
        volumetric_froc({"a": np.array([[0, 0, 0, 1, 1, 1]])}, truth, pred_source="p.pkl")
    with pytest.raises(EvaluationInputError, match="row 1 has a non-finite"):
        volumetric_froc({"a": np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, np.nan, 1, 1]])}, truth)
    with pytest.raises(EvaluationInputError, match="row 0 is an empty/inverted box"):
        volumetric_froc({"a": np.array([[5, 0, 0, 1, 1, 1, 1.0]])}, truth)


@pytest.mark.parametrize("rule", ["released", "paper"])
def test_matches_per_detection_oracle_on_random_volumes(rule):
    rng = np.random.default_rng(1)
    truth, pred = {}, {}
    for v in range(40):
        g = rng.integers(0, 4)
        c = rng.uniform(20, 200, (g, 3))
        s = rng.uniform(3, 20, (g, 3))
        truth[f"v{v}"] = np.round(np.hstack([c - s, c + s]))
        nd = rng.integers(0, 12)
        src = truth[f"v{v}"][rng.integers(0, max(g, 1), nd)] if g else rng.uniform(20, 200, (nd, 6))
        jit = rng.normal(0, 4, (nd, 6))
        d = np.sort(np.round(src + jit).reshape(nd, 2, 3), axis=1).reshape(nd, 6) if nd else np.zeros((0, 6))
        sc = np.round(rng.uniform(0, 1, (nd, 1)), 1)  # coarse scores: many ties, across volumes too
        pred[f"v{v}"] = np.hstack([d, sc])
    keys = list(truth)
    r = volumetric_froc(pred, truth, rule=rule, fp_rates=[2 ** p for p in range(-3, 4)])
    s, f = froc_loop([pred[k] for k in keys], [truth[k] for k in keys], 3, "iobb",
                     0.3 if rule == "released" else 0.5, strict=rule == "paper", paper=rule == "paper")
    np.testing.assert_array_equal(r.curve_sens, s)
    np.testing.assert_array_equal(r.curve_fps, f)
    np.testing.assert_array_equal(r.sensitivity, read_loop(s, f, [2 ** p for p in range(-3, 4)]))


def test_real_1k_as_perfect_prediction(real_data):
    gts = safe_load(real_data / "deeplesion" / "DeepLesion_manual_1K_test_release.pkl")
    for split, n_vol, n_box in (("val", 200, 1292), ("test", 800, 4155)):
        truth = gts[split]
        assert len(truth) == n_vol and sum(len(v) for v in truth.values()) == n_box
        pred = {k: np.hstack([v, np.ones((len(v), 1))]) for k, v in truth.items()}
        for rule in ("released", "paper"):
            r = volumetric_froc(pred, truth, rule=rule)
            assert r.sensitivity.tolist() == [1.0] * 7 and r.num_fp == 0


def test_real_1k_dropping_every_other_box_matches_oracle(real_data):
    truth = safe_load(real_data / "deeplesion" / "DeepLesion_manual_1K_test_release.pkl")["val"]
    rng = np.random.default_rng(0)
    pred = {}
    for k, v in truth.items():
        keep = v[::2] + rng.integers(-3, 4, v[::2].shape)
        keep = np.sort(keep.reshape(-1, 2, 3), axis=1).reshape(-1, 6)
        fp = keep.copy()
        fp[:, [0, 3]] += 60
        pred[k] = np.vstack([np.hstack([keep, rng.uniform(0.3, 1, (len(keep), 1))]),
                             np.hstack([fp, rng.uniform(0, 0.7, (len(fp), 1))])])
    keys = list(truth)
    r = volumetric_froc(pred, truth)
    s, f = froc_loop([pred[k] for k in keys], [truth[k] for k in keys], 3, "iobb", 0.3)
    np.testing.assert_array_equal(r.sensitivity, read_loop(s, f, list(RATES)))
    assert 0.3 < r.sensitivity[-1] < 0.7


def test_keyslice_mulan_iou_inclusive():
    truth = {"img2": np.array([[0, 0, 9, 9]], float), "img1": np.array([[20, 20, 29, 29]], float)}
    pred = {
        "img1": np.array([[20, 20, 29, 29, 0.9], [60, 60, 70, 70, 0.8]]),
        "img2": np.array([[0, 0, 9, 4, 0.7]]),  # IoU exactly 0.5 -> hit under MULAN's >=
    }
    r = keyslice_froc(pred, truth)
    np.testing.assert_allclose(r.curve_fps, [0, 0.5, 0.5])
    np.testing.assert_allclose(r.curve_sens, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(r.sensitivity, [1.0] * 6)
    strict = keyslice_froc(pred, truth, threshold=0.5000001)
    np.testing.assert_allclose(strict.sensitivity, [0.5] * 6)
    # IoBB variant: [0,0,9,4] lies inside the truth: IoBB = 1.
    iobb = keyslice_froc({"img1": pred["img1"], "img2": np.array([[0, 0, 9, 1, 0.7]])}, truth, metric="iobb")
    assert iobb.sensitivity[-1] == 1.0
    assert r.mean_of_first(4) == 1.0


def test_organ_stratified():
    truth = {
        "a": np.array([[0, 0, 0, 9, 9, 9], [50, 50, 0, 59, 59, 9]], float),
        "b": np.array([[0, 0, 0, 9, 9, 9]], float),
    }
    labels = {"a": ["lung", "liver"], "b": ["liver"]}
    pred = {"a": np.array([[0, 0, 0, 9, 9, 9, 0.9]]), "b": np.array([[0, 0, 0, 9, 9, 9, 0.8]])}
    out = stratified_froc(pred, truth, labels, fp_rates=(0.5, 1.0))
    np.testing.assert_allclose(out["overall"].sensitivity, [2 / 3, 2 / 3])
    np.testing.assert_allclose(out["lung"].sensitivity, [1.0, 1.0])
    # liver: the lung hit (score .9) is an FP for the liver stratum: curve fps .5 .5, sens 0 .5.
    np.testing.assert_allclose(out["liver"].curve_sens, [0.0, 0.5])
    np.testing.assert_allclose(out["liver"].sensitivity, [0.5, 0.5])
    alt = stratified_froc(pred, truth, labels, fp_rates=(0.5, 1.0), fp_from_all_truths=True)
    # the lung hit is neither TP nor FP for the liver stratum: no FP at all on its curve
    np.testing.assert_allclose(alt["liver"].curve_fps, [0.0, 0.0])
    np.testing.assert_allclose(alt["liver"].sensitivity, [0.5, 0.5])
    assert alt["liver"].num_fp == 0 and out["liver"].num_fp == 1
    assert np.isnan(out["lymph_node"].sensitivity).all()
    with pytest.raises(EvaluationInputError, match="1 labels for 2 truth boxes"):
        stratified_froc(pred, truth, {"a": ["lung"], "b": ["liver"]})


def test_keyslice_strata():
    from uld_jax.evaluate.froc import stratified_keyslice_froc

    truth = {"i1": np.array([[0, 0, 9, 9], [50, 50, 59, 59]], float), "i2": np.array([[20, 20, 29, 29]], float)}
    labels = {"i1": ["lung", "liver"], "i2": ["lung"]}
    pred = {"i1": np.array([[50, 50, 59, 59, 0.9], [0, 0, 9, 9, 0.3]]), "i2": np.array([[20, 20, 29, 29, 0.6]])}
    out = stratified_keyslice_froc(pred, truth, labels, fp_rates=(0.5, 1.0))
    # lung stratum: the liver hit (.9) is an FP: curve (fps, sens) = (.5, 0) (.5, .5) (.5, 1)
    np.testing.assert_allclose(out["lung"].curve_fps, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out["lung"].sensitivity, [1.0, 1.0])
    np.testing.assert_allclose(out["lung"].fp_rates, [0.5, 1.0])
    r = stratified_keyslice_froc(pred, truth, labels, fp_rates=(0.25, 1.0))["lung"]
    np.testing.assert_allclose(r.sensitivity, [0.0, 1.0])  # 0.25 is left of the curve
    assert out["liver"].sensitivity.tolist() == [1.0, 1.0] and out["overall"].num_truths == 3
