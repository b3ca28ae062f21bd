"""uld_jax.ops.targets: RPN and ROI targets, ignore regions, mined positives, masks, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np

from uld_jax.core import Provenance
from uld_jax.ops import anchors as A
from uld_jax.ops import boxes as B
from uld_jax.ops import matching as M
from uld_jax.ops import targets as T

ANCHORS = A.grid_anchors((12, 12))  # a 48 x 48 image


def _gt():
    gt = np.array([[4, 4, 20, 20], [26, 30, 40, 46], [30, 2, 38, 10], [0, 0, 0, 0]], np.float32)
    valid = np.array([True, True, True, False])
    mined = np.array([False, True, False, False])
    ign = np.array([[2, 28, 14, 44], [0, 0, 0, 0]], np.float32)
    ign_valid = np.array([True, False])
    return gt, valid, mined, ign, ign_valid


def test_rpn_targets_semantics():
    gt, valid, mined, ign, iv = _gt()
    avalid = np.asarray(A.anchors_inside(ANCHORS, 48, 48, straddle=4))
    fn = jax.jit(lambda g, v, m, i, iv, av, k: T.rpn_targets(
        ANCHORS, g, v, k, gt_no_box_regression=m, ignore_boxes=i, ignore_valid=iv, anchor_valid=av))
    t = fn(gt, valid, mined, ign, iv, avalid, jax.random.key(0))
    labels = np.asarray(t.labels)
    ref = jax.jit(lambda: M.match_boxes(ANCHORS, gt, valid, positive_iou=0.7, negative_iou=0.3,
                                        allow_low_quality_matches=True, box_valid=avalid,
                                        ignore_boxes=ign, ignore_valid=iv))()
    np.testing.assert_array_equal(labels, ref.labels)
    w = np.asarray(t.cls_weight)
    n_pos = int((labels == 1).sum())
    assert w.sum() == 32 and (w * (labels == 1)).sum() == min(n_pos, 16)
    assert np.all(labels[w > 0] != M.IGNORE)
    # Anchors inside the ignore region or off the image are never sampled.
    ya = np.minimum(ANCHORS[:, 2], ign[0, 2]) - np.maximum(ANCHORS[:, 0], ign[0, 0])
    xa = np.minimum(ANCHORS[:, 3], ign[0, 3]) - np.maximum(ANCHORS[:, 1], ign[0, 1])
    area = (ANCHORS[:, 2] - ANCHORS[:, 0]) * (ANCHORS[:, 3] - ANCHORS[:, 1])
    in_ign = np.clip(ya, 0, None) * np.clip(xa, 0, None) / area > 0.5
    assert in_ign.any() and w[in_ign].sum() == 0 and w[~avalid].sum() == 0
    np.testing.assert_array_equal(np.asarray(t.objectness), (labels == 1).astype(np.float32))
    # Box weight: sampled positives not matched to the mined row; the mined row's anchors get none.
    bw = np.asarray(t.box_weight)
    mg = np.asarray(t.matched_gt)
    np.testing.assert_array_equal(bw > 0, (w > 0) & (labels == 1) & (mg != 1))
    # Every GT (padding aside) has a positive anchor thanks to low-quality matches.
    for g in range(3):
        assert np.any((labels == 1) & (mg == g))
    # Targets decode back to the matched GT.
    pos = labels == 1
    dec = np.asarray(B.decode_boxes(t.box_targets, ANCHORS))
    np.testing.assert_allclose(dec[pos], gt[mg[pos]], atol=1e-3)
    assert np.all(np.asarray(t.box_targets)[~pos] == 0)


def test_rpn_targets_without_lesions_are_finite():
    gt = np.zeros((3, 4), np.float32)
    t = jax.jit(lambda g, v, k: T.rpn_targets(ANCHORS, g, v, k))(gt, np.zeros(3, bool), jax.random.key(1))
    assert np.all(np.asarray(t.labels) == 0) and np.asarray(t.cls_weight).sum() == 32
    assert np.asarray(t.box_weight).sum() == 0 and np.all(np.isfinite(np.asarray(t.box_targets)))


def test_roi_targets_semantics_and_masks():
    gt, valid, mined, ign, iv = _gt()
    masks = np.zeros((4, 48, 48), np.uint8)
    for g in range(3):
        y1, x1, y2, x2 = gt[g].astype(int)
        masks[g, y1:y2, x1:x2] = 1
    mask_valid = np.array([True, True, False, False])
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 48, (40, 2))
    hw = rng.uniform(4, 20, (40, 2))
    props = np.concatenate([c - hw / 2, c + hw / 2], 1).astype(np.float32)
    props[:3] = gt[:3] + [1, -1, 1, 1]  # high-IoU proposals
    props[3] = [4, 30, 12, 40]  # inside the ignore region
    pvalid = np.ones(40, bool)
    pvalid[-5:] = False
    fn = jax.jit(lambda *a: T.roi_targets(*a[:5], gt_masks=a[5], gt_mask_valid=a[6],
                                          gt_no_box_regression=a[7], ignore_boxes=a[8],
                                          ignore_valid=a[9], mask_size=14))
    t = fn(props, pvalid, gt, valid, jax.random.key(2), masks, mask_valid, mined, ign, iv)
    ok = np.asarray(t.valid)
    lab = np.asarray(t.labels)
    n_pos = int(lab.sum())
    assert 3 <= n_pos <= 16 and lab[:n_pos].all() and not lab[n_pos:].any()  # positives first
    assert t.rois.shape == (64, 4) and t.mask_targets.shape == (64, 14, 14)
    # Every sampled ROI is a valid proposal or a GT box, never the ignore-region one.
    rois = np.asarray(t.rois)[ok]
    pool = np.concatenate([props[pvalid], gt[valid]])
    assert all(np.any(np.all(np.abs(pool - r) < 1e-5, axis=1)) for r in rois)
    assert not np.any(np.all(np.abs(rois - props[3]) < 1e-5, axis=1))
    iou = np.asarray(B.pairwise_iou(np.asarray(t.rois), gt, ok, valid))
    np.testing.assert_allclose(np.asarray(t.max_iou)[ok], iou.max(1)[ok], atol=1e-6)
    assert np.all((iou.max(1) >= 0.5)[ok] == (lab[ok] == 1))
    mg = np.asarray(t.matched_gt)
    bw = np.asarray(t.box_weight)
    np.testing.assert_array_equal(bw > 0, (lab == 1) & (mg != 1))
    dec = np.asarray(B.decode_boxes(t.box_targets, t.rois, B.ROI_BOX_WEIGHTS))
    np.testing.assert_allclose(dec[lab == 1], gt[mg[lab == 1]], atol=1e-3)
    mw = np.asarray(t.mask_weight)
    np.testing.assert_array_equal(mw > 0, (lab == 1) & (mg < 2))
    # A ROI equal to its GT box crops an all-ones rectangle mask.
    mt = np.asarray(t.mask_targets)
    for s in np.flatnonzero(mw > 0):
        if np.allclose(t.rois[s], gt[mg[s]]):
            assert mt[s].all()
    assert np.all(mt[mw == 0] == 0)
    assert np.asarray(t.cls_weight).sum() == ok.sum()


def test_gt_from_provenance():
    boxes = np.arange(16, dtype=np.float32).reshape(4, 4)
    valid = np.array([True, True, True, False])
    prov = np.array([Provenance.ORIGINAL, Provenance.MINED, Provenance.IGNORE, Provenance.IGNORE])
    gv, no_reg, ign, iv = T.gt_from_provenance(boxes, valid, prov, np.ones((1, 4)), np.array([True]))
    np.testing.assert_array_equal(gv, [True, True, False, False])
    np.testing.assert_array_equal(no_reg, [False, True, False, False])
    assert ign.shape == (5, 4)
    np.testing.assert_array_equal(iv, [True, False, False, True, False])


def test_batch_equals_loop_and_no_recompile():
    gt, valid, mined, ign, iv = _gt()
    rng = np.random.default_rng(3)
    bsz, p = 3, 24
    c = rng.uniform(0, 48, (bsz, p, 2))
    hw = rng.uniform(4, 20, (bsz, p, 2))
    props = np.concatenate([c - hw / 2, c + hw / 2], -1).astype(np.float32)
    gts = np.stack([gt] * bsz)
    counts = {"rpn": 0, "roi": 0}

    def rpn(g, v, key):
        counts["rpn"] += 1  # runs only while tracing
        return T.batch_rpn_targets(ANCHORS, g, v, key)

    def roi(pr, pv, g, v, m, key):
        counts["roi"] += 1
        return T.batch_roi_targets(pr, pv, g, v, key, gt_no_box_regression=m)

    jrpn, jroi = jax.jit(rpn), jax.jit(roi)
    key = jax.random.key(4)
    for n_valid in ([1, 2, 3], [0, 3, 1], [2, 2, 0]):
        v = np.arange(4)[None, :] < np.array(n_valid)[:, None]
        m = np.stack([mined] * bsz)
        out_rpn = jrpn(gts, v, key)
        out_roi = jroi(props, np.ones((bsz, p), bool), gts, v, m, key)
    assert counts == {"rpn": 1, "roi": 1}
    # The vmapped batch equals per-image calls with the folded keys (last n_valid setting).
    one_roi = jax.jit(lambda pr, g, vv, mm, k: T.roi_targets(pr, jnp.ones(p, bool), g, vv, k,
                                                               gt_no_box_regression=mm))
    one_rpn = jax.jit(lambda g, vv, k: T.rpn_targets(ANCHORS, g, vv, k))
    for b in range(bsz):
        k = jax.random.fold_in(key, b)
        r1 = one_rpn(gts[b], v[b], k)
        r2 = one_roi(props[b], gts[b], v[b], m[b], k)
        for f in r1._fields:
            np.testing.assert_array_equal(getattr(out_rpn, f)[b], getattr(r1, f))
        for f in r2._fields:
            np.testing.assert_array_equal(getattr(out_roi, f)[b], getattr(r2, f))


def test_zero_ground_truth_rows():
    anchors = A.grid_anchors((3, 3))
    empty, none = np.zeros((0, 4), np.float32), np.zeros(0, bool)
    t = jax.jit(lambda k: T.rpn_targets(anchors, empty, none, k, num_samples=8))(jax.random.key(0))
    assert float(t.cls_weight.sum()) == 8 and float(t.box_weight.sum()) == 0
    props = np.array([[0, 0, 5, 5], [4, 4, 9, 9]], np.float32)
    r = jax.jit(lambda k: T.roi_targets(props, np.ones(2, bool), empty, none, k,
                                        gt_masks=np.zeros((0, 8, 8), np.uint8), num_samples=4,
                                        mask_size=6))(jax.random.key(0))
    np.testing.assert_array_equal(r.valid, [True, True, False, False])
    assert not np.asarray(r.labels).any() and r.mask_targets.shape == (4, 6, 6)
