"""uld_jax.ops.detections against a NumPy decode / clip / threshold / greedy-NMS pipeline."""

import jax
import numpy as np

from uld_jax.ops import detections as D


def _iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    i = ih * iw
    return i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)


def _np_detect(rois, deltas, scores, valid, hw, thr, nms_thr, max_det):
    d = deltas / np.array([10, 10, 5, 5], np.float32)
    h, w = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    cy, cx = rois[:, 0] + h / 2 + d[:, 0] * h, rois[:, 1] + w / 2 + d[:, 1] * w
    nh, nw = h * np.exp(d[:, 2]), w * np.exp(d[:, 3])
    b = np.stack([cy - nh / 2, cx - nw / 2, cy + nh / 2, cx + nw / 2], 1)
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, hw[0])
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, hw[1])
    cand = [i for i in range(len(rois)) if valid[i] and scores[i] > thr
            and b[i, 2] > b[i, 0] and b[i, 3] > b[i, 1]]
    cand.sort(key=lambda i: (-scores[i], i))
    kept = []
    for i in cand:
        if all(_iou(b[i], b[j]) <= nms_thr for j in kept):
            kept.append(i)
        if len(kept) == max_det:
            break
    return b[kept], kept


def test_matches_numpy_and_batch():
    rng = np.random.default_rng(0)
    bsz, k = 2, 50
    c = rng.uniform(0, 64, (bsz, k, 2))
    hw = rng.uniform(6, 30, (bsz, k, 2))
    rois = np.concatenate([c - hw / 2, c + hw / 2], -1).astype(np.float32)
    deltas = (rng.normal(size=(bsz, k, 4)) * 0.5).astype(np.float32)
    scores = rng.random((bsz, k)).astype(np.float32)
    valid = rng.random((bsz, k)) > 0.1
    sizes = np.array([[64, 64], [48, 60]], np.float32)
    out = jax.jit(lambda *a: D.batch_postprocess_detections(
        *a[:4], roi_valid=a[4], score_threshold=0.2, nms_threshold=0.5, max_detections=10))(
        rois, deltas, scores, sizes, valid)
    assert out.boxes.shape == (2, 10, 4)
    for b in range(bsz):
        want_boxes, want_idx = _np_detect(rois[b], deltas[b], scores[b], valid[b], sizes[b], 0.2, 0.5, 10)
        ok = np.asarray(out.valid[b])
        assert ok.sum() == len(want_idx) and ok[: ok.sum()].all()
        np.testing.assert_array_equal(np.asarray(out.roi_index[b])[ok], want_idx)
        np.testing.assert_allclose(np.asarray(out.boxes[b])[ok], want_boxes, atol=1e-4)
        np.testing.assert_allclose(np.asarray(out.scores[b])[ok], scores[b][want_idx])
