"""uld_jax.ops.nms against a plain greedy NumPy loop, with ties, padding and tiling."""

import jax
import numpy as np
import pytest

from uld_jax.ops import nms as N


def _np_nms(boxes, scores, valid, thr, max_out):
    cand = [i for i in range(len(boxes)) if valid[i] and np.isfinite(scores[i])
            and boxes[i, 2] > boxes[i, 0] and boxes[i, 3] > boxes[i, 1]]
    cand.sort(key=lambda i: (-scores[i], i))
    b = boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    kept = []
    for i in cand:
        if kept:  # IoU of box i with every kept box, vectorised over the kept ones
            k = np.asarray(kept)
            ih = np.maximum(0.0, np.minimum(b[k, 2], b[i, 2]) - np.maximum(b[k, 0], b[i, 0]))
            iw = np.maximum(0.0, np.minimum(b[k, 3], b[i, 3]) - np.maximum(b[k, 1], b[i, 1]))
            inter = ih * iw
            if np.any(inter / (area[k] + area[i] - inter) > thr):
                continue
        kept.append(i)
        if len(kept) == max_out:
            break
    return kept


def _clustered_boxes(rng, n):
    centres = rng.uniform(0, 100, (6, 2))
    c = centres[rng.integers(0, 6, n)] + rng.normal(0, 4, (n, 2))
    hw = rng.uniform(5, 20, (n, 2))
    return np.concatenate([c - hw / 2, c + hw / 2], 1).astype(np.float32)


# One compilation per (shape, max_output, tile); the threshold is traced.
_NMS = jax.jit(N.nms, static_argnums=(3,), static_argnames=("tile_size",))


def _check(boxes, scores, valid, thr, max_out, tile):
    idx, ok = _NMS(boxes, scores, thr, max_out, valid, tile_size=tile)
    got = [int(i) for i, v in zip(np.asarray(idx), np.asarray(ok)) if v]
    assert not np.any(np.asarray(ok)[len(got):]), "valid slots must come first"
    assert np.all(np.asarray(idx)[~np.asarray(ok)] == 0)
    want = _np_nms(boxes, scores, valid, thr, max_out)
    assert got == want


@pytest.mark.parametrize("tile,max_outs", [(1, (80,)), (16, (5, 80)), (1000, (80,))])
def test_matches_greedy_reference(tile, max_outs):
    rng = np.random.default_rng(tile)
    boxes = _clustered_boxes(rng, 60)
    scores = rng.random(60).astype(np.float32)
    scores[10:20] = scores[0]  # ties
    valid = rng.random(60) > 0.15
    boxes[5] = [3, 3, 3, 8]  # degenerate, valid flag set
    valid[5] = True
    for max_out in max_outs:
        for thr in (0.3, 0.7):
            _check(boxes, scores, valid, thr, max_out, tile)


def test_ties_lower_index_first_and_identical_boxes():
    boxes = np.array([[0, 0, 10, 10]] * 4 + [[50, 50, 60, 60]], np.float32)
    scores = np.array([0.5, 0.9, 0.9, 0.9, 0.9], np.float32)
    idx, ok = _NMS(boxes, scores, 0.5, 4, tile_size=2)
    np.testing.assert_array_equal(idx, [1, 4, 0, 0])
    np.testing.assert_array_equal(ok, [True, True, False, False])
    eager = N.nms(boxes, scores, 0.5, 4, tile_size=2)  # jit equals eager
    np.testing.assert_array_equal(eager[0], idx)
    np.testing.assert_array_equal(eager[1], ok)
    # Signed zeros are equal scores: the lower index wins.
    far = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    idx, ok = _NMS(far, np.array([-0.0, 0.0], np.float32), 0.5, 2)
    np.testing.assert_array_equal(idx, [0, 0])
    np.testing.assert_array_equal(ok, [True, False])
    # IoU exactly at the threshold does not suppress (strictly greater rule).
    b2 = np.array([[0, 0, 10, 10], [0, 5, 10, 15]], np.float32)  # IoU 1/3
    idx, ok = _NMS(b2, np.array([1.0, 0.5], np.float32), 1 / 3 + 1e-7, 2)
    assert np.asarray(ok).all()
    idx, ok = _NMS(b2, np.array([1.0, 0.5], np.float32), 0.3, 2)
    np.testing.assert_array_equal(ok, [True, False])


def test_all_padded_and_nan_scores():
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (5, 1))
    idx, ok = _NMS(boxes, np.ones(5, np.float32), 0.5, 3, np.zeros(5, bool))
    assert not np.asarray(ok).any() and np.all(np.asarray(idx) == 0)
    scores = np.array([np.nan, 0.1, 0.2, np.inf, 0.3], np.float32)
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(5)], np.float32)
    idx, ok = _NMS(boxes, scores, 0.5, 5)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], [4, 2, 1])


def test_batched_equals_per_image():
    rng = np.random.default_rng(7)
    boxes = np.stack([_clustered_boxes(rng, 40) for _ in range(3)])
    scores = rng.random((3, 40)).astype(np.float32)
    valid = rng.random((3, 40)) > 0.2
    fn = jax.jit(lambda b, s, v: N.batched_nms(b, s, 0.5, 12, v, tile_size=8))
    bi, bo = fn(boxes, scores, valid)
    for b in range(3):
        ei, eo = _NMS(boxes[b], scores[b], 0.5, 12, valid[b], tile_size=8)
        np.testing.assert_array_equal(bi[b], ei)
        np.testing.assert_array_equal(bo[b], eo)
        _check(boxes[b], scores[b], valid[b], 0.5, 12, 8)


def test_large_input_tiled():
    rng = np.random.default_rng(3)
    boxes = _clustered_boxes(rng, 2000)
    scores = rng.random(2000).astype(np.float32)
    idx, ok = jax.jit(lambda b, s: N.nms(b, s, 0.7, 300, tile_size=256))(boxes, scores)
    want = _np_nms(boxes, scores, np.ones(2000, bool), 0.7, 300)
    assert [int(i) for i in np.asarray(idx)[np.asarray(ok)]] == want


def test_top_k_by_score():
    scores = np.array([0.1, 0.5, np.nan, 0.5, 0.9], np.float32)
    valid = np.array([True, True, True, True, False])
    idx, ok = N.top_k_by_score(scores, 3, valid)
    np.testing.assert_array_equal(idx, [1, 3, 0])
    np.testing.assert_array_equal(ok, [True, True, True])
    idx, ok = N.top_k_by_score(scores, 7, valid)
    np.testing.assert_array_equal(ok, [True] * 3 + [False] * 4)
    np.testing.assert_array_equal(idx[3:], 0)
