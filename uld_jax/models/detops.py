"""The detection ops the model uses, as thin adapters over ``uld_jax.ops`` (owned by the ops
engineer). Only argument plumbing lives here; the geometry is in ``uld_jax.ops``.

Labels: 1 positive, 0 negative, -1 ignored / not sampled (``uld_jax.ops.matching``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uld_jax.ops import anchors as _anchors
from uld_jax.ops import boxes as _boxes
from uld_jax.ops import matching as _matching
from uld_jax.ops import nms as _nms
from uld_jax.ops import roi_align as _roi_align
from uld_jax.ops import sampling as _sampling

POS, NEG, IGNORE = _matching.POSITIVE, _matching.NEGATIVE, _matching.IGNORE
encode = _boxes.encode_boxes
decode = _boxes.decode_boxes
clip_boxes = _boxes.clip_boxes
anchors_inside = _anchors.anchors_inside


def anchor_grid(feat_h: int, feat_w: int, stride: int, sizes, ratios) -> jax.Array:
    """[feat_h * feat_w * A, 4] anchors (input pixels), in the RPN head's output order."""
    return jnp.asarray(_anchors.grid_anchors((feat_h, feat_w), stride, sizes, ratios))


def match(boxes, gt, gt_valid, ignore, ignore_valid, fg_iou, bg_iou, low_quality, ignore_iobb,
          box_valid=None):
    """One image -> (labels [N] in {1, 0, -1}, matched gt index [N]).

    Ignore regions veto negatives (IoBB > ignore_iobb) but never a positive of a real box.
    """
    m = _matching.match_boxes(boxes, gt, gt_valid, positive_iou=fg_iou, negative_iou=bg_iou,
                              allow_low_quality_matches=low_quality, box_valid=box_valid,
                              ignore_boxes=ignore, ignore_valid=ignore_valid,
                              ignore_iobb=ignore_iobb, ignore_overrides_positive=False)
    return m.labels, m.matched_gt


def sample(key, labels, num: int, positive_fraction: float):
    """One image -> (indices [num], sampled labels [num] with -1 on empty slots); positives first."""
    idx, ok = _sampling.sample_balanced(labels, key, num, positive_fraction)
    return idx, jnp.where(ok, labels[idx], IGNORE)


def nms(boxes, scores, valid, iou_threshold: float, max_output: int):
    """One image -> (indices [max_output], valid [max_output]), by descending score."""
    return _nms.nms(boxes, scores, iou_threshold, max_output, valid)


def top_k(scores, k: int, valid=None):
    return _nms.top_k_by_score(scores, k, valid)


def roi_align(features, boxes, out_size: int, stride: float, sampling_ratio: int = 2):
    """features [H, W, C], boxes [R, 4] (input pixels) -> [R, out, out, C]."""
    return _roi_align.roi_align(features, boxes, out_size, 1.0 / stride, sampling_ratio)


def crop_masks(masks, boxes, index, out_size: int):
    """masks [G, H, W], boxes [K, 4], index [K] -> soft targets [K, out, out] in [0, 1]."""
    return _roi_align.crop_masks(masks, boxes, index, out_size)
