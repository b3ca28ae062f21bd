"""uld_jax.ops.matching and uld_jax.ops.sampling against NumPy loops and golden cases."""

import collections

import jax
import numpy as np

from uld_jax.ops import matching as M
from uld_jax.ops import sampling as S


def _iou(a, b):
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    i = ih * iw
    return i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)


def _iobb(a, b):
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ih * iw / ((a[2] - a[0]) * (a[3] - a[1]))


_MATCH = jax.jit(M.match_boxes, static_argnames=(
    "positive_iou", "negative_iou", "allow_low_quality_matches", "ignore_iobb",
    "ignore_overrides_positive"))


def _np_match(boxes, gt, gv, pos_t, neg_t, low_q, bv, ign, iv, ign_t, flags):
    n, g = len(boxes), len(gt)
    iou = np.array([[_iou(boxes[i], gt[j]) if gv[j] and bv[i] else 0.0 for j in range(g)]
                    for i in range(n)]).reshape(n, g)
    labels, matched, best = [], [], []
    for i in range(n):
        m = int(np.argmax(iou[i])) if g else 0
        v = iou[i, m] if g else 0.0
        matched.append(m)
        best.append(v)
        labels.append(1 if (v >= pos_t and v > 0) else (0 if v < neg_t else -1))
    if low_q:
        for j in range(g):
            if not gv[j]:
                continue
            top = iou[:, j].max()
            for i in range(n):
                if top > 0 and iou[i, j] == top:
                    labels[i] = 1
    for i in range(n):
        if not bv[i] or any(iv[r] and _iobb(boxes[i], ign[r]) > ign_t for r in range(len(ign))):
            labels[i] = -1
    mflags = [flags[matched[i]] if labels[i] == 1 else False for i in range(n)]
    return np.array(matched), np.array(labels), np.array(best), np.array(mflags)


def _boxes(rng, n, lo=0, hi=64, smin=4, smax=24):
    c = rng.uniform(lo, hi, (n, 2))
    hw = rng.uniform(smin, smax, (n, 2))
    return np.concatenate([c - hw / 2, c + hw / 2], 1).astype(np.float32)


def test_golden_rpn_low_quality_and_padding():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 12, 12], [40, 40, 50, 50], [20, 20, 30, 30]], np.float32)
    gt = np.array([[0, 0, 10, 10], [41, 41, 61, 61], [0, 0, 10, 10]], np.float32)
    gv = np.array([True, True, False])  # the third row is padding (identical to the first)
    m = _MATCH(anchors, gt, gv, positive_iou=0.7, negative_iou=0.3)
    # anchor 1: IoU 100/144 = 0.694 -> between thresholds -> IGNORE; anchor 2 vs gt 1: 81/419 -> NEG.
    np.testing.assert_array_equal(m.labels, [1, -1, 0, 0])
    np.testing.assert_array_equal(m.matched_gt[:2], [0, 0])
    m = _MATCH(anchors, gt, gv, positive_iou=0.7, negative_iou=0.3,
                      allow_low_quality_matches=True)
    # Anchor 2 is gt 1's best anchor, so it becomes positive although IoU < 0.3.
    np.testing.assert_array_equal(m.labels, [1, -1, 1, 0])
    np.testing.assert_array_equal(m.matched_gt[2], 1)
    # No valid GT at all: everything negative, padded GT never matched.
    m = _MATCH(anchors, gt, np.zeros(3, bool), positive_iou=0.7, negative_iou=0.3,
                      allow_low_quality_matches=True)
    np.testing.assert_array_equal(m.labels, [0, 0, 0, 0])
    np.testing.assert_array_equal(m.max_iou, 0)


def test_golden_ignore_regions_and_flags():
    rois = np.array([[0, 0, 10, 10], [30, 30, 40, 40], [30, 30, 50, 50], [60, 60, 70, 70]], np.float32)
    gt = np.array([[0, 0, 10, 10], [60, 60, 70, 72]], np.float32)
    flags = np.array([False, True])  # gt 1 is a mined positive
    ign = np.array([[28, 28, 40, 40], [0, 0, 0, 0]], np.float32)
    iv = np.array([True, False])
    m = _MATCH(rois, gt, np.ones(2, bool), positive_iou=0.5, negative_iou=0.5,
                      ignore_boxes=ign, ignore_valid=iv, gt_flags=flags)
    # roi 1 lies inside the ignore box (IoBB 1): IGNORE; roi 2 IoBB 0.25: stays negative.
    np.testing.assert_array_equal(m.labels, [1, -1, 0, 1])
    np.testing.assert_array_equal(m.in_ignore, [False, True, False, False])
    np.testing.assert_array_equal(m.matched_flags, [False, False, False, True])
    # An ignore box over a positive vetoes it unless told otherwise.
    ign2 = np.array([[0, 0, 10, 10]], np.float32)
    m = _MATCH(rois, gt, np.ones(2, bool), positive_iou=0.5, negative_iou=0.5, ignore_boxes=ign2)
    assert int(m.labels[0]) == M.IGNORE
    m = _MATCH(rois, gt, np.ones(2, bool), positive_iou=0.5, negative_iou=0.5, ignore_boxes=ign2,
                      ignore_overrides_positive=False)
    assert int(m.labels[0]) == M.POSITIVE
    # Invalid boxes (e.g. anchors outside the image) are IGNORE.
    m = _MATCH(rois, gt, np.ones(2, bool), positive_iou=0.5, negative_iou=0.5,
                      box_valid=np.array([False, True, True, True]))
    assert int(m.labels[0]) == M.IGNORE


def test_random_against_reference():
    rng = np.random.default_rng(0)
    fn = _MATCH
    for trial in range(4):
        boxes = _boxes(rng, 40)
        boxes[3] = [5, 5, 5, 9]
        gt = _boxes(rng, 5)
        gt[1] = boxes[7]  # an exact match
        gv = rng.random(5) > 0.3
        bv = rng.random(40) > 0.1
        ign = _boxes(rng, 3)
        iv = rng.random(3) > 0.4
        flags = rng.random(5) > 0.5
        for pos_t, neg_t, low_q in ((0.7, 0.3, True), (0.5, 0.5, False)):
            m = fn(boxes, gt, gv, positive_iou=pos_t, negative_iou=neg_t,
                   allow_low_quality_matches=low_q, box_valid=bv, ignore_boxes=ign,
                   ignore_valid=iv, ignore_iobb=0.5, gt_flags=flags)
            want = _np_match(boxes, gt, gv, pos_t, neg_t, low_q, bv, ign, iv, 0.5, flags)
            np.testing.assert_array_equal(m.labels, want[1])
            pos = want[1] == 1
            np.testing.assert_array_equal(np.asarray(m.matched_gt)[pos], want[0][pos])
            np.testing.assert_allclose(m.max_iou, want[2], atol=1e-6)
            np.testing.assert_array_equal(m.matched_flags, want[3])
        if trial == 0:  # jit equals eager
            e = M.match_boxes(boxes, gt, gv, positive_iou=0.5, negative_iou=0.5, box_valid=bv,
                              ignore_boxes=ign, ignore_valid=iv, gt_flags=flags)
            for f in e._fields:
                np.testing.assert_array_equal(getattr(e, f), getattr(m, f))


def test_sampling_counts_fraction_and_determinism():
    rng = np.random.default_rng(1)
    labels = rng.choice([-1, 0, 1], size=500, p=[0.3, 0.65, 0.05]).astype(np.int32)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    fn = jax.jit(S.sample_balanced, static_argnums=(2, 3))
    key = jax.random.key(0)
    idx, ok = fn(labels, key, 64, 0.25)
    idx, ok = np.asarray(idx), np.asarray(ok)
    assert ok.all()
    chosen = labels[idx]
    assert (chosen == 1).sum() == min(n_pos, 16) and (chosen == 0).sum() == 64 - min(n_pos, 16)
    # Foreground first, no repeats, never an IGNORE row.
    k = min(n_pos, 16)
    assert (chosen[:k] == 1).all() and (chosen[k:] == 0).all()
    assert len(set(idx.tolist())) == 64
    i2, o2 = fn(labels, key, 64, 0.25)
    np.testing.assert_array_equal(i2, idx)
    i3, _ = fn(labels, jax.random.key(1), 64, 0.25)
    assert not np.array_equal(np.sort(i3), np.sort(idx))
    # Few rows: fewer negatives than slots -> the rest invalid.
    small = np.array([1, 1, 1, 0, -1, -1], np.int32)
    idx, ok = fn(small, key, 8, 0.5)
    assert np.asarray(ok).sum() == 4 and sorted(small[np.asarray(idx)[np.asarray(ok)]]) == [0, 1, 1, 1]
    np.testing.assert_array_equal(np.asarray(idx)[~np.asarray(ok)], 0)
    # More positives than the cap: exactly 16 positives among 32, rest negatives.
    many = np.array([1] * 40 + [0] * 40, np.int32)
    idx, ok = fn(many, key, 32, 0.5)
    assert np.asarray(ok).all() and many[np.asarray(idx)].sum() == 16


def test_sampling_is_uniform_over_positives_and_batch():
    labels = np.array([1] * 6 + [0] * 10, np.int32)
    fn = jax.jit(S.sample_balanced_batch, static_argnums=(2, 3))
    counts = collections.Counter()
    lab = np.tile(labels, (200, 1))
    idx, ok = fn(lab, jax.random.key(3), 4, 0.5)
    idx = np.asarray(idx)
    for row in idx:
        counts.update(row[:2].tolist())
    assert set(counts) == set(range(6))
    assert min(counts.values()) > 40  # 400 draws over 6 positives: ~67 each
    # Images get different draws, and a vmapped batch equals the per-image calls.
    assert len({tuple(r) for r in idx}) > 1
    one = S.sample_balanced(labels, jax.random.fold_in(jax.random.key(3), 5), 4, 0.5)
    np.testing.assert_array_equal(idx[5], one[0])


def test_empty_ground_truth_and_ignore_arrays():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    m = _MATCH(boxes, np.zeros((0, 4), np.float32), np.zeros(0, bool), positive_iou=0.7,
               negative_iou=0.3, allow_low_quality_matches=True,
               ignore_boxes=np.array([[0, 0, 10, 10]], np.float32), gt_flags=np.zeros(0, bool))
    np.testing.assert_array_equal(m.labels, [M.IGNORE, M.NEGATIVE])
    np.testing.assert_array_equal(m.matched_flags, [False, False])
    m = _MATCH(boxes, np.zeros((0, 4), np.float32), np.zeros(0, bool), positive_iou=0.5,
               negative_iou=0.5, ignore_boxes=np.zeros((0, 4), np.float32))
    np.testing.assert_array_equal(m.labels, [M.NEGATIVE, M.NEGATIVE])
