"""The ops composed as a two-stage detector uses them, under one jit: a perfect RPN head output
(written in conv layout [Hf, Wf, A * k]) must turn into proposals on the ground truth, ROI targets
must mark them positive, and zero box-head deltas must give the ground truth back as detections."""

import jax
import jax.numpy as jnp
import numpy as np

from uld_jax.ops import anchors as A
from uld_jax.ops import boxes as B
from uld_jax.ops import detections as D
from uld_jax.ops import proposals as P
from uld_jax.ops import roi_align as R
from uld_jax.ops import targets as T

HF = WF = 16  # 64 x 64 input
NA = A.num_anchors_per_cell()
ANCHORS = A.grid_anchors((HF, WF))


def _perfect_head(gt, gt_valid):
    """Conv-layout RPN outputs: high objectness and exact deltas on each GT's best anchor."""
    obj = np.full((HF * WF * NA,), -5.0, np.float32)
    deltas = np.zeros((HF * WF * NA, 4), np.float32)
    iou = np.asarray(B.pairwise_iou(ANCHORS, gt, None, gt_valid))
    for g in np.flatnonzero(gt_valid):
        n = int(np.argmax(iou[:, g]))
        obj[n] = 5.0 + g
        deltas[n] = np.asarray(B.encode_boxes(gt[g], ANCHORS[n]))
    return obj.reshape(HF, WF, NA), deltas.reshape(HF, WF, NA * 4)


def test_two_stage_pipeline_recovers_ground_truth():
    gt = np.array([[[6, 8, 22, 30], [40, 36, 58, 50], [0, 0, 0, 0]],
                   [[30, 2, 44, 18], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    gt_valid = np.array([[True, True, False], [True, False, False]])
    heads = [_perfect_head(gt[b], gt_valid[b]) for b in range(2)]
    obj = np.stack([h[0] for h in heads])
    deltas = np.stack([h[1] for h in heads])
    feats = np.random.default_rng(0).normal(size=(2, HF, WF, 8)).astype(np.float32)
    sizes = np.array([[64, 64], [64, 64]], np.float32)

    @jax.jit
    def step(obj, deltas, feats, gt, gt_valid, key):
        bsz = obj.shape[0]
        props = P.batch_generate_proposals(
            obj.reshape(bsz, -1), deltas.reshape(bsz, -1, 4), ANCHORS, sizes,
            pre_nms_top_n=500, post_nms_top_n=50)
        rpn = T.batch_rpn_targets(ANCHORS, gt, gt_valid, key)
        roi = T.batch_roi_targets(props.boxes, props.valid, gt, gt_valid, key, append_gt=False,
                                  num_samples=16)
        pooled = R.batch_roi_align(feats, roi.rois, output_size=7)
        scores = jnp.where(props.valid, jax.nn.sigmoid(props.scores), 0.0)
        dets = D.batch_postprocess_detections(
            props.boxes, jnp.zeros_like(props.boxes), scores, sizes, roi_valid=props.valid,
            max_detections=5)
        return props, rpn, roi, pooled, dets

    props, rpn, roi, pooled, dets = step(obj, deltas, feats, gt, gt_valid, jax.random.key(0))
    assert pooled.shape == (2, 16, 7, 7, 8) and np.all(np.isfinite(np.asarray(pooled)))
    for b in range(2):
        n_gt = int(gt_valid[b].sum())
        # The top proposals are the ground truth, highest objectness first.
        top = np.asarray(props.boxes[b, :n_gt])
        np.testing.assert_allclose(top, gt[b, :n_gt][::-1], atol=1e-3)
        # The ROI sampler finds them as positives matched to the right rows.
        lab = np.asarray(roi.labels[b])
        assert lab.sum() >= n_gt
        assert set(np.asarray(roi.matched_gt[b])[lab == 1].tolist()) == set(range(n_gt))
        # Each GT's best anchor is a positive RPN target.
        assert float((rpn.objectness[b] * rpn.cls_weight[b]).sum()) >= n_gt
        # Zero box-head deltas keep the proposals: the detections are the ground truth.
        ok = np.asarray(dets.valid[b])
        np.testing.assert_allclose(np.asarray(dets.boxes[b])[ok][:n_gt], gt[b, :n_gt][::-1], atol=1e-3)
