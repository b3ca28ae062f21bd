"""uld_jax.ops.proposals against a NumPy pipeline (top-k, decode, clip, min size, greedy NMS)."""

import jax
import numpy as np

from uld_jax.ops import anchors as A
from uld_jax.ops import proposals as P


def _np_decode(d, a):
    ah, aw = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    acy, acx = a[:, 0] + ah / 2, a[:, 1] + aw / 2
    cy, cx = acy + d[:, 0] * ah, acx + d[:, 1] * aw
    h = ah * np.exp(np.minimum(d[:, 2], np.log(1000 / 16)))
    w = aw * np.exp(np.minimum(d[:, 3], np.log(1000 / 16)))
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], 1)


def _iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    i = ih * iw
    return i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)


def _np_proposals(obj, deltas, anchors, hw, pre, post, thr, min_size, avalid):
    order = sorted([i for i in range(len(obj)) if avalid[i]], key=lambda i: (-obj[i], i))[:pre]
    boxes = _np_decode(deltas[order], anchors[order])
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, hw[0])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, hw[1])
    kept = []
    for r in range(len(order)):  # already in score order (ties by index)
        b = boxes[r]
        if b[2] - b[0] <= min_size or b[3] - b[1] <= min_size:
            continue
        if all(_iou(b, boxes[k]) <= thr for k in kept):
            kept.append(r)
        if len(kept) == post:
            break
    return boxes[kept], [order[k] for k in kept]


def test_matches_numpy_pipeline():
    rng = np.random.default_rng(0)
    anchors = A.grid_anchors((6, 7))  # image 24 x 28
    n = anchors.shape[0]
    obj = rng.normal(size=n).astype(np.float32)
    obj[5:9] = obj[0]  # ties
    deltas = (rng.normal(size=(n, 4)) * 0.3).astype(np.float32)
    avalid = np.asarray(A.anchors_inside(anchors, 24, 28, straddle=8))
    fn = jax.jit(lambda o, d, s, v: P.generate_proposals(
        o, d, anchors, s, pre_nms_top_n=200, post_nms_top_n=40, nms_threshold=0.7, min_size=2.0,
        anchor_valid=v))
    out = fn(obj, deltas, np.array([24.0, 28.0]), avalid)
    want_boxes, want_anchor = _np_proposals(obj, deltas, anchors, (24, 28), 200, 40, 0.7, 2.0, avalid)
    ok = np.asarray(out.valid)
    assert ok.sum() == len(want_boxes) and ok[: ok.sum()].all()
    np.testing.assert_allclose(np.asarray(out.boxes)[ok], want_boxes, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.anchor_index)[ok], want_anchor)
    np.testing.assert_allclose(np.asarray(out.scores)[ok], obj[want_anchor])
    assert np.all(np.asarray(out.boxes)[~ok] == 0)
    b = np.asarray(out.boxes)[ok]
    assert b[:, [0, 2]].max() <= 24 and b[:, [1, 3]].max() <= 28 and b.min() >= 0


def test_batch_and_append_gt():
    rng = np.random.default_rng(1)
    anchors = A.grid_anchors((4, 4))
    n = anchors.shape[0]
    obj = rng.normal(size=(2, n)).astype(np.float32)
    deltas = (rng.normal(size=(2, n, 4)) * 0.2).astype(np.float32)
    sizes = np.array([[16.0, 16.0], [12.0, 16.0]], np.float32)
    out = jax.jit(lambda o, d, s: P.batch_generate_proposals(
        o, d, anchors, s, pre_nms_top_n=100, post_nms_top_n=20))(obj, deltas, sizes)
    for i in range(2):
        want_boxes, want_anchor = _np_proposals(obj[i], deltas[i], anchors, sizes[i], 100, 20, 0.7,
                                                0.0, np.ones(n, bool))
        ok = np.asarray(out.valid[i])
        assert ok.sum() == len(want_boxes)
        np.testing.assert_allclose(np.asarray(out.boxes[i])[ok], want_boxes, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(out.anchor_index[i])[ok], want_anchor)
    assert np.asarray(out.boxes)[1][..., [0, 2]].max() <= 12
    boxes, valid = P.append_gt_boxes(out.boxes, out.valid, np.ones((2, 3, 4), np.float32),
                                     np.array([[True, False, True], [False, False, False]]))
    assert boxes.shape == (2, 23, 4)
    np.testing.assert_array_equal(valid[:, 20:], [[True, False, True], [False, False, False]])
    np.testing.assert_array_equal(boxes[0, 21], 0)
