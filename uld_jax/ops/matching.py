"""IoU matching of anchors/ROIs to ground truth with POSITIVE / NEGATIVE / IGNORE labels.

Label values (int32): ``NEGATIVE = 0``, ``POSITIVE = 1``, ``IGNORE = -1``. IGNORE rows are excluded
from both positive and negative sampling.

Rules, per box n (anchor or ROI) against the *valid* ground truth only:

* ``max_iou[n] < negative_iou``                      -> NEGATIVE
* ``negative_iou <= max_iou[n] < positive_iou``      -> IGNORE (the RPN's 0.3..0.7 band)
* ``max_iou[n] >= positive_iou`` (and > 0)           -> POSITIVE
* low-quality matches (RPN): for each valid GT, every valid box whose IoU equals that GT's best IoU
  (when > 0) becomes POSITIVE, so that each lesion, however small, has a positive anchor. The
  matched GT stays the box's own arg-max (Detectron's rule).
* boxes with ``box_valid`` False (padding, anchors straddling the image border) -> IGNORE.
* ignore regions (NRM): a box whose IoBB with any valid ignore box (intersection over the *box's*
  area) exceeds ``ignore_iobb`` becomes IGNORE -- also when it would have been positive, unless
  ``ignore_overrides_positive`` is False.

Padded GT rows are never matched; with no valid GT every valid box is NEGATIVE (or IGNORE through
an ignore region). ``matched_gt`` is the arg-max over valid GT (ties: lower index), 0 when there is
none; always gate its use by ``labels == POSITIVE``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from uld_jax.ops import boxes as box_ops

Array = jnp.ndarray

NEGATIVE: int = 0
POSITIVE: int = 1
IGNORE: int = -1

# Paper constants (DESIGN.md section 3).
RPN_POSITIVE_IOU: float = 0.7
RPN_NEGATIVE_IOU: float = 0.3
ROI_POSITIVE_IOU: float = 0.5
ROI_NEGATIVE_IOU: float = 0.5
IGNORE_IOBB: float = 0.5


class Match(NamedTuple):
    """Result of :func:`match_boxes`; every field is [N]."""

    matched_gt: Array     # int32 index into the G ground-truth rows
    labels: Array         # int32 NEGATIVE / POSITIVE / IGNORE
    max_iou: Array        # float32 IoU with matched_gt (0 without valid GT)
    matched_flags: Array  # gt_flags[matched_gt] (False/0 where labels != POSITIVE)
    in_ignore: Array      # bool, the box lies in an ignore region (IoBB > ignore_iobb)


def match_boxes(
    boxes: Array,
    gt_boxes: Array,
    gt_valid: Array,
    *,
    positive_iou: float,
    negative_iou: float,
    allow_low_quality_matches: bool = False,
    box_valid: Array | None = None,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    ignore_iobb: float = IGNORE_IOBB,
    ignore_overrides_positive: bool = True,
    gt_flags: Array | None = None,
) -> Match:
    """Match one image's boxes to its ground truth.

    Args:
      boxes: [N, 4] anchors or ROIs, pixels.
      gt_boxes: [G, 4] ground truth, pixels.
      gt_valid: bool [G]; False rows are padding and never matched.
      positive_iou, negative_iou: thresholds (0.7/0.3 RPN, 0.5/0.5 ROI).
      allow_low_quality_matches: make each GT's best box(es) positive (RPN).
      box_valid: optional bool [N]; False rows become IGNORE.
      ignore_boxes: optional [R, 4] ignore regions; ignore_valid: bool [R] (all valid if None).
      ignore_iobb: a box is in an ignore region when IoBB(box, region) > this.
      ignore_overrides_positive: whether ignore regions also veto positives.
      gt_flags: optional [G] per-GT attribute (bool or int, e.g. "mined positive") carried to the
        matched boxes as ``matched_flags``.

    Returns:
      :class:`Match` with [N] fields.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_valid = jnp.asarray(gt_valid, bool)
    n = boxes.shape[0]
    bvalid = jnp.ones((n,), bool) if box_valid is None else jnp.asarray(box_valid, bool)

    iou = box_ops.pairwise_iou(boxes, gt_boxes, bvalid, gt_valid)  # [N, G], 0 on padding
    if gt_boxes.shape[0] == 0:
        matched = jnp.zeros((n,), jnp.int32)
        max_iou = jnp.zeros((n,), jnp.float32)
    else:
        matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
        max_iou = jnp.max(iou, axis=1)

    labels = jnp.where(max_iou < negative_iou, NEGATIVE, IGNORE)
    labels = jnp.where((max_iou >= positive_iou) & (max_iou > 0), POSITIVE, labels)
    if allow_low_quality_matches and gt_boxes.shape[0] > 0:
        best_per_gt = jnp.max(iou, axis=0)  # [G]
        is_best = (iou == best_per_gt[None, :]) & (best_per_gt[None, :] > 0) & gt_valid[None, :]
        labels = jnp.where(jnp.any(is_best, axis=1), POSITIVE, labels)

    ign = None if ignore_boxes is None else jnp.asarray(ignore_boxes, jnp.float32).reshape(-1, 4)
    if ign is not None and ign.shape[0] > 0:
        iv = None if ignore_valid is None else jnp.asarray(ignore_valid, bool)
        in_ignore = jnp.any(box_ops.pairwise_iobb(boxes, ign, bvalid, iv) > ignore_iobb, axis=1)
    else:
        in_ignore = jnp.zeros((n,), bool)
    veto = in_ignore if ignore_overrides_positive else in_ignore & (labels != POSITIVE)
    labels = jnp.where(veto | ~bvalid, IGNORE, labels).astype(jnp.int32)

    if gt_flags is None:
        matched_flags = jnp.zeros((n,), bool)
    else:
        flags = jnp.asarray(gt_flags)
        picked = flags[matched] if flags.shape[0] > 0 else jnp.zeros((n,), flags.dtype)
        matched_flags = jnp.where(labels == POSITIVE, picked, jnp.zeros_like(picked))
    return Match(matched, labels, max_iou, matched_flags, in_ignore)
