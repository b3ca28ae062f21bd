"""Stacking 2D detections into 3D boxes: golden cases and the per-detection oracle."""

from __future__ import annotations

import numpy as np
import pytest

from evaluate_oracles import stack_loop
from uld_jax.evaluate.boxes import EvaluationInputError
from uld_jax.evaluate.froc import volumetric_froc
from uld_jax.evaluate.stacking import stack_slices


def test_chain_lone_box_and_gap():
    z = [3, 4, 5, 7, 4]
    b = [[10, 10, 29, 29], [11, 11, 30, 30], [12, 10, 31, 29], [12, 10, 31, 29], [100, 100, 110, 110]]
    s = [0.5, 0.9, 0.4, 0.8, 0.3]
    r = stack_slices(z, b, s)
    # slices 3-4-5 link (IoUs 361/439 and 380/420); slice 7 is after a gap; the far box is alone.
    np.testing.assert_array_equal(r.boxes, [[10, 10, 3, 31, 30, 5], [100, 100, 4, 110, 110, 4],
                                            [12, 10, 7, 31, 29, 7]])
    np.testing.assert_array_equal(r.scores, [0.9, 0.3, 0.8])
    np.testing.assert_array_equal(r.num_slices, [3, 1, 1])
    np.testing.assert_array_equal(r.track, [0, 0, 0, 2, 1])
    np.testing.assert_allclose(stack_slices(z, b, s, score_mode="mean").scores, [0.6, 0.3, 0.8])


def test_iou_threshold_is_strict():
    # IoU exactly 50/100: no link; 60/100: link.
    assert stack_slices([0, 1], [[0, 0, 9, 9], [0, 0, 9, 4]], [1, 1]).num_slices.tolist() == [1, 1]
    assert stack_slices([0, 1], [[0, 0, 9, 9], [0, 0, 9, 5]], [1, 1]).num_slices.tolist() == [2]


def test_greedy_one_to_one_by_iou_not_score():
    # A on slice 0; B (IoU 1, low score) and C (IoU 0.8, high score) on slice 1: A-B link, C alone.
    r = stack_slices([0, 1, 1], [[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 9, 7]], [0.5, 0.1, 0.9])
    np.testing.assert_array_equal(r.track, [0, 0, 1])
    # Two boxes on slice 0 both overlapping one box on slice 1: it links to the better one only.
    r = stack_slices([0, 0, 1], [[0, 0, 9, 9], [0, 2, 9, 11], [0, 1, 9, 10]], [0.2, 0.9, 0.5])
    # IoUs 90/110 each: tie broken by the smaller input index on slice 0 (detection 0).
    assert r.track[0] == r.track[2] != r.track[1]


def test_volumes_never_link():
    r = stack_slices([0, 1], [[0, 0, 9, 9], [0, 0, 9, 9]], [1, 1], volume=[0, 1])
    assert len(r.scores) == 2 and r.volume.tolist() == [0, 1]


def test_bad_inputs():
    with pytest.raises(EvaluationInputError, match="detection 1 is non-finite or inverted"):
        stack_slices([0, 1], [[0, 0, 9, 9], [5, 0, 1, 9]], [1, 1])
    with pytest.raises(EvaluationInputError, match="shapes"):
        stack_slices([0, 1], [[0, 0, 9, 9]], [1, 1])
    r = stack_slices([], np.zeros((0, 4)), [])
    assert r.boxes.shape == (0, 6)


def test_matches_loop_oracle_on_random_tracks():
    rng = np.random.default_rng(3)
    z, b, s, v = [], [], [], []
    for vol in range(6):
        for _ in range(15):  # lesions: drifting boxes over a few slices, some detections dropped
            z0, n = rng.integers(0, 20), rng.integers(1, 7)
            c, w = rng.uniform(30, 400, 2), rng.uniform(8, 40, 2)
            for k in range(n):
                if rng.uniform() < 0.15:
                    continue
                cc = c + rng.normal(0, 2, 2)
                ww = w * rng.uniform(0.8, 1.2, 2)
                z.append(z0 + k); b.append(np.round(np.r_[cc - ww / 2, cc + ww / 2])); v.append(vol)
                s.append(np.round(rng.uniform(), 1))
        for _ in range(40):  # clutter
            c, w = rng.uniform(0, 480, 2), rng.uniform(5, 30, 2)
            z.append(rng.integers(0, 25)); b.append(np.round(np.r_[c, c + w])); v.append(vol)
            s.append(np.round(rng.uniform(), 1))
    z, b, s, v = np.array(z), np.array(b), np.array(s), np.array(v)
    for mode in ("max", "mean"):
        r = stack_slices(z, b, s, v, score_mode=mode)
        ob, os_, ov, ot = stack_loop(z, b, s, v, mode=mode)
        np.testing.assert_array_equal(r.track, ot)
        np.testing.assert_array_equal(r.boxes, ob)
        np.testing.assert_allclose(r.scores, os_, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(r.volume, ov)
    assert (r.num_slices > 1).sum() > 30


def test_stacked_output_feeds_the_paper_rule():
    # 2D boxes of one lesion over slices 10..12 plus a wide box on slice 9 linked into the track.
    z = np.array([9, 10, 11, 12])
    b = np.array([[0, 0, 39, 39], [8, 8, 31, 31], [8, 8, 31, 31], [9, 9, 31, 31]], float)
    s = np.array([0.4, 0.9, 0.8, 0.7])
    r = stack_slices(z, b, s)
    assert len(r.scores) == 2  # 576/1600 < 0.5: slice 9 does not link ...
    r = stack_slices(z, b, s, iou_threshold=0.3)  # ... unless the threshold is lowered
    assert len(r.scores) == 1
    pred, slices = r.to_volume_dicts(["vol"], z, b)
    assert pred["vol"].shape == (1, 7) and slices["vol"].shape == (4, 6)
    truth = {"vol": np.array([[10, 10, 10, 29, 29, 12]], float)}
    assert volumetric_froc(pred, truth, rule="paper").sensitivity[-1] == 0.0  # cuboid [0..39]^2
    assert volumetric_froc(pred, truth, rule="paper", slice_boxes=slices).sensitivity[-1] == 1.0


def test_prefilter_never_loses_borderline_pairs():
    # IoU just above / at / below 0.5 with fractional coordinates far from the origin: the float32
    # prefilter must keep every pair whose exact float64 IoU exceeds the threshold.
    rng = np.random.default_rng(7)
    base = 1e5
    z, b, s = [], [], []
    for i in range(300):
        w = rng.uniform(5, 50)
        x0 = base + rng.uniform(0, 1000)
        # second box shifted so that the IoU is close to 0.5: (w+1-d)/(w+1+d) = 0.5 -> d = (w+1)/3
        d = (w + 1) / 3 + rng.choice([-1e-6, 0.0, 1e-6, -1e-3, 1e-3])
        z += [2 * i, 2 * i + 1]
        b += [[x0, 10.25, x0 + w, 10.25 + w], [x0 + d, 10.25, x0 + w + d, 10.25 + w]]
        s += [0.5, 0.5]
    z, b, s = np.array(z), np.array(b), np.array(s)
    r = stack_slices(z, b, s)
    ob, _, _, ot = stack_loop(z, b, s, np.zeros(len(z), int))
    np.testing.assert_array_equal(r.track, ot)
    np.testing.assert_array_equal(r.boxes, ob)
    assert 50 < (r.num_slices == 2).sum() < 250


def test_uneven_slices_use_the_unpadded_path(monkeypatch):
    import uld_jax.evaluate.stacking as st_mod

    rng = np.random.default_rng(11)
    z, b, s = [], [], []
    for zz in range(400):  # 400 slices x max 3000 per slice > 8 x 4,200 detections + 2^20
        n = 3000 if zz == 5 else 3
        c = rng.uniform(0, 200, (n, 2))
        w = rng.uniform(5, 30, (n, 2))
        z += [zz] * n
        b.append(np.round(np.hstack([c, c + w])))
        s += list(np.round(rng.uniform(size=n), 2))
    z, b, s = np.array(z), np.vstack(b), np.array(s)
    called = []
    orig = st_mod._candidate_edges_sparse
    monkeypatch.setattr(st_mod, "_candidate_edges_sparse", lambda *a: called.append(1) or orig(*a))
    r = stack_slices(z, b, s)
    assert called
    ob, _, _, ot = stack_loop(z, b, s, np.zeros(len(z), int))
    np.testing.assert_array_equal(r.track, ot)
    np.testing.assert_array_equal(r.boxes, ob)
