"""Training targets for the RPN and the ROI heads, as pure functions of the ground truth.

Conventions shared with the losses:

* Ground truth comes as ``gt_boxes`` [G, 4] + ``gt_valid`` [G]; per-GT ``gt_no_box_regression``
  [G] marks rows that train classification only (MAM's mined positives); NRM ignore regions come
  separately as ``ignore_boxes`` [R, 4] + ``ignore_valid`` [R]. :func:`gt_from_provenance` builds
  these from a batch's ``boxes`` / ``box_valid`` / ``provenance`` columns.
* Weights are 0/1 float32 masks; the losses choose their normaliser (e.g. the number of sampled
  rows, a static count).
* Targets carry no gradient (``stop_gradient``), the sampled ROIs included.
* RPN targets are dense over the anchors (so they line up with the head's reshaped output); ROI
  targets are per sampled ROI, positives first.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from uld_jax.core import Provenance
from uld_jax.ops import boxes as box_ops
from uld_jax.ops import matching
from uld_jax.ops import proposals as proposal_ops
from uld_jax.ops import roi_align
from uld_jax.ops import sampling

Array = jnp.ndarray


class RPNTargets(NamedTuple):
    """Dense per-anchor targets of one image ([N, ...]; [B, N, ...] batched)."""

    labels: Array       # [N] int32 match labels before sampling (POSITIVE / NEGATIVE / IGNORE)
    objectness: Array   # [N] float32 1 for positives, 0 otherwise (objectness target)
    cls_weight: Array   # [N] float32 1 for the sampled anchors (positive or negative)
    box_targets: Array  # [N, 4] float32 encoded deltas to the matched GT (0 for non-positives)
    box_weight: Array   # [N] float32 1 for sampled positives matched to a regressable GT
    matched_gt: Array   # [N] int32 matched GT index (meaningful where labels == POSITIVE)


class ROITargets(NamedTuple):
    """Per sampled ROI targets of one image ([S, ...]; [B, S, ...] batched), positives first."""

    rois: Array          # [S, 4] float32 sampled ROIs, input pixels (0 on invalid slots)
    valid: Array         # [S] bool sampled slot in use
    labels: Array        # [S] int32 class target: 1 lesion (positive), 0 background
    matched_gt: Array    # [S] int32 matched GT index (use where labels == 1)
    max_iou: Array       # [S] float32 IoU with the matched GT
    cls_weight: Array    # [S] float32 1 on valid slots
    box_targets: Array   # [S, 4] float32 encoded deltas (ROI weights 10, 10, 5, 5)
    box_weight: Array    # [S] float32 1 for positives whose GT is regressable (not mined)
    mask_targets: Array  # [S, M, M] float32 binary mask targets (0 where mask_weight is 0)
    mask_weight: Array   # [S] float32 1 for positives whose GT has a mask


def gt_from_provenance(
    boxes: Array,
    box_valid: Array,
    provenance: Array,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Split annotation rows by :class:`uld_jax.core.Provenance`.

    Args:
      boxes: [..., G, 4]; box_valid: [..., G] bool; provenance: [..., G] int.
      ignore_boxes, ignore_valid: optional separate ignore regions [..., R, 4] / [..., R].

    Returns:
      ``(gt_valid [..., G], no_box_regression [..., G], ignore_boxes [..., R + G, 4],
      ignore_valid [..., R + G])``: ORIGINAL and MINED rows are ground truth (MINED without box
      regression); IGNORE rows join the ignore regions.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    box_valid = jnp.asarray(box_valid, bool)
    provenance = jnp.asarray(provenance)
    is_ignore = box_valid & (provenance == int(Provenance.IGNORE))
    gt_valid = box_valid & ~is_ignore
    no_reg = gt_valid & (provenance == int(Provenance.MINED))
    if ignore_boxes is None:
        ign, ign_valid = boxes, is_ignore
    else:
        iv = (jnp.ones(jnp.shape(ignore_boxes)[:-1], bool) if ignore_valid is None
              else jnp.asarray(ignore_valid, bool))
        ign = jnp.concatenate([jnp.asarray(ignore_boxes, jnp.float32), boxes], axis=-2)
        ign_valid = jnp.concatenate([iv, is_ignore], axis=-1)
    return gt_valid, no_reg, ign, ign_valid


def _regressable(gt_valid: Array, gt_no_box_regression: Array | None) -> Array:
    if gt_no_box_regression is None:
        return gt_valid
    return gt_valid & ~jnp.asarray(gt_no_box_regression, bool)


def _match_and_sample(boxes, box_valid, gt_boxes, gt_valid, key, *, gt_no_box_regression,
                      ignore_boxes, ignore_valid, positive_iou, negative_iou,
                      allow_low_quality_matches, num_samples, positive_fraction, ignore_iobb,
                      ignore_overrides_positive):
    """The step both target builders share: match ``boxes`` (anchors or ROIs) to the ground truth
    (``gt_flags`` = regressable GT rows) and draw a balanced sample of the match labels.

    Returns ``(match, idx [num_samples], ok [num_samples])``."""
    m = matching.match_boxes(
        boxes, gt_boxes, gt_valid, positive_iou=positive_iou, negative_iou=negative_iou,
        allow_low_quality_matches=allow_low_quality_matches, box_valid=box_valid,
        ignore_boxes=ignore_boxes, ignore_valid=ignore_valid, ignore_iobb=ignore_iobb,
        ignore_overrides_positive=ignore_overrides_positive,
        gt_flags=_regressable(gt_valid, gt_no_box_regression))
    idx, ok = sampling.sample_balanced(m.labels, key, num_samples, positive_fraction)
    return m, idx, ok


def rpn_targets(
    anchors: Array,
    gt_boxes: Array,
    gt_valid: Array,
    key: Array,
    *,
    gt_no_box_regression: Array | None = None,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    anchor_valid: Array | None = None,
    positive_iou: float = matching.RPN_POSITIVE_IOU,
    negative_iou: float = matching.RPN_NEGATIVE_IOU,
    num_samples: int = sampling.RPN_SAMPLES_PER_IMAGE,
    positive_fraction: float = sampling.RPN_POSITIVE_FRACTION,
    ignore_iobb: float = matching.IGNORE_IOBB,
    ignore_overrides_positive: bool = True,
    weights: Sequence[float] = box_ops.RPN_BOX_WEIGHTS,
) -> RPNTargets:
    """RPN targets of one image.

    Args:
      anchors: [N, 4] anchors, input pixels.
      gt_boxes: [G, 4]; gt_valid: [G] bool.
      key: PRNG key for the sampling.
      gt_no_box_regression: optional [G] bool (mined positives): positives matched to these rows
        train objectness but not box regression.
      ignore_boxes / ignore_valid: optional [R, 4] / [R] ignore regions (excluded from sampling).
      anchor_valid: optional [N] bool (e.g. ``anchors_inside`` the image); invalid anchors are
        never sampled.
      positive_iou, negative_iou: 0.7 / 0.3, with low-quality matches.
      num_samples, positive_fraction: 32 per image, half positive.
      ignore_iobb: IoBB above which an anchor is in an ignore region.
      ignore_overrides_positive: ignore regions also veto anchors that match a GT (default).
      weights: delta weights (1, 1, 1, 1).

    Returns:
      :class:`RPNTargets` with [N] fields.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_valid = jnp.asarray(gt_valid, bool)
    m, idx, ok = _match_and_sample(
        anchors, anchor_valid, gt_boxes, gt_valid, key, gt_no_box_regression=gt_no_box_regression,
        ignore_boxes=ignore_boxes, ignore_valid=ignore_valid, positive_iou=positive_iou,
        negative_iou=negative_iou, allow_low_quality_matches=True, num_samples=num_samples,
        positive_fraction=positive_fraction, ignore_iobb=ignore_iobb,
        ignore_overrides_positive=ignore_overrides_positive)
    n = anchors.shape[0]
    sampled = jnp.zeros((n,), jnp.int32).at[idx].max(ok.astype(jnp.int32)) > 0
    pos = m.labels == matching.POSITIVE
    deltas = box_ops.encode_boxes(gt_boxes[m.matched_gt], anchors, weights) if gt_boxes.shape[0] else jnp.zeros((n, 4))
    reg = sampled & pos & m.matched_flags.astype(bool)
    return jax.tree_util.tree_map(lax.stop_gradient, RPNTargets(
        labels=m.labels,
        objectness=pos.astype(jnp.float32),
        cls_weight=sampled.astype(jnp.float32),
        box_targets=jnp.where(pos[:, None], deltas, 0.0),
        box_weight=reg.astype(jnp.float32),
        matched_gt=m.matched_gt,
    ))


def roi_targets(
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_valid: Array,
    key: Array,
    *,
    gt_masks: Array | None = None,
    gt_mask_valid: Array | None = None,
    gt_mask_boxes: Array | None = None,
    gt_no_box_regression: Array | None = None,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    append_gt: bool = True,
    positive_iou: float = matching.ROI_POSITIVE_IOU,
    negative_iou: float = matching.ROI_NEGATIVE_IOU,
    num_samples: int = sampling.ROI_SAMPLES_PER_IMAGE,
    positive_fraction: float = sampling.ROI_POSITIVE_FRACTION,
    ignore_iobb: float = matching.IGNORE_IOBB,
    ignore_overrides_positive: bool = True,
    weights: Sequence[float] = box_ops.ROI_BOX_WEIGHTS,
    mask_size: int = 28,
    mask_sampling_ratio: int = 2,
) -> ROITargets:
    """Sample ROIs from one image's proposals and build their targets.

    Args:
      proposals: [P, 4] input pixels; proposal_valid: [P] bool.
      gt_boxes: [G, 4]; gt_valid: [G] bool.
      key: PRNG key for the sampling.
      gt_masks: optional [G, H, W] masks at input resolution (weak or real; values in [0, 1]),
        or with ``gt_mask_boxes`` [G, M, M] crops (the input pipeline's layout).
      gt_mask_valid: optional [G] bool, rows whose mask is usable (all, if masks are given).
      gt_mask_boxes: optional [G, 4] input-pixel box each crop of ``gt_masks`` covers
        (:func:`roi_align.crop_box_masks`); None: ``gt_masks`` are whole-image masks.
      gt_no_box_regression: optional [G] bool (mined positives: classification only).
      ignore_boxes / ignore_valid: optional [R, 4] / [R] ignore regions.
      append_gt: add the valid GT boxes to the proposals first (standard Faster R-CNN training).
      positive_iou, negative_iou: 0.5 / 0.5, no low-quality matches.
      num_samples, positive_fraction: 64 per image, a quarter positive.
      ignore_iobb: IoBB above which a ROI is in an ignore region.
      ignore_overrides_positive: ignore regions also veto ROIs that match a GT (default).
      weights: delta weights (10, 10, 5, 5).
      mask_size: static side M of the mask targets (28).
      mask_sampling_ratio: ROIAlign sampling points per bin and axis for the mask crops.

    Returns:
      :class:`ROITargets` with S = ``num_samples`` rows.
    """
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_valid = jnp.asarray(gt_valid, bool)
    rois = jnp.asarray(proposals, jnp.float32)
    rvalid = jnp.asarray(proposal_valid, bool)
    if append_gt:
        rois, rvalid = proposal_ops.append_gt_boxes(rois, rvalid, gt_boxes, gt_valid)
    m, idx, ok = _match_and_sample(
        rois, rvalid, gt_boxes, gt_valid, key, gt_no_box_regression=gt_no_box_regression,
        ignore_boxes=ignore_boxes, ignore_valid=ignore_valid, positive_iou=positive_iou,
        negative_iou=negative_iou, allow_low_quality_matches=False, num_samples=num_samples,
        positive_fraction=positive_fraction, ignore_iobb=ignore_iobb,
        ignore_overrides_positive=ignore_overrides_positive)
    s_rois = jnp.where(ok[:, None], rois[idx], 0.0)
    s_gt = jnp.where(ok, m.matched_gt[idx], 0)
    pos = ok & (m.labels[idx] == matching.POSITIVE)
    if gt_boxes.shape[0]:
        deltas = box_ops.encode_boxes(gt_boxes[s_gt], s_rois, weights)
    else:
        deltas = jnp.zeros((num_samples, 4), jnp.float32)
    reg = pos & m.matched_flags[idx].astype(bool)

    if gt_masks is None or gt_boxes.shape[0] == 0:
        mask_targets = jnp.zeros((num_samples, mask_size, mask_size), jnp.float32)
        mask_weight = jnp.zeros((num_samples,), jnp.float32)
    else:
        has_mask = gt_valid if gt_mask_valid is None else gt_valid & jnp.asarray(gt_mask_valid, bool)
        if gt_mask_boxes is None:
            soft = roi_align.crop_masks(gt_masks, s_rois, s_gt, mask_size, mask_sampling_ratio)
        else:
            soft = roi_align.crop_box_masks(gt_masks, gt_mask_boxes, s_rois, s_gt, mask_size,
                                            mask_sampling_ratio)
        mask_ok = pos & has_mask[s_gt]
        mask_targets = jnp.where(mask_ok[:, None, None], (soft >= 0.5).astype(jnp.float32), 0.0)
        mask_weight = mask_ok.astype(jnp.float32)

    return jax.tree_util.tree_map(lax.stop_gradient, ROITargets(
        rois=s_rois,
        valid=ok,
        labels=pos.astype(jnp.int32),
        matched_gt=s_gt.astype(jnp.int32),
        max_iou=jnp.where(ok, m.max_iou[idx], 0.0),
        cls_weight=ok.astype(jnp.float32),
        box_targets=jnp.where(pos[:, None], deltas, 0.0),
        box_weight=reg.astype(jnp.float32),
        mask_targets=mask_targets,
        mask_weight=mask_weight,
    ))


def _vmap_images(fn, positional: dict, optional: dict):
    """``jax.vmap`` of ``fn`` over the leading (image) axis: ``positional`` values are passed in
    order as positional arguments, the ``optional`` ones that are not None as keywords."""
    names = list(positional)
    per = {**positional, **{k: v for k, v in optional.items() if v is not None}}

    def one(d):
        d = dict(d)
        return fn(*[d.pop(k) for k in names], **d)

    return jax.vmap(one)(per)


def batch_rpn_targets(
    anchors: Array,
    gt_boxes: Array,
    gt_valid: Array,
    key: Array,
    *,
    gt_no_box_regression: Array | None = None,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    anchor_valid: Array | None = None,
    **kwargs,
) -> RPNTargets:
    """:func:`rpn_targets` over a batch: anchors [N, 4] shared, per-image arrays with a leading B,
    ``anchor_valid`` [B, N]; image b uses ``jax.random.fold_in(key, b)``. Fields are [B, N, ...]."""
    gt_boxes = jnp.asarray(gt_boxes)
    return _vmap_images(
        lambda *a, **kw: rpn_targets(anchors, *a, **kw, **kwargs),
        {"gt_boxes": gt_boxes, "gt_valid": gt_valid,
         "key": sampling.per_image_keys(key, gt_boxes.shape[0])},
        {"gt_no_box_regression": gt_no_box_regression, "ignore_boxes": ignore_boxes,
         "ignore_valid": ignore_valid, "anchor_valid": anchor_valid})


def batch_roi_targets(
    proposals: Array,
    proposal_valid: Array,
    gt_boxes: Array,
    gt_valid: Array,
    key: Array,
    *,
    gt_masks: Array | None = None,
    gt_mask_valid: Array | None = None,
    gt_mask_boxes: Array | None = None,
    gt_no_box_regression: Array | None = None,
    ignore_boxes: Array | None = None,
    ignore_valid: Array | None = None,
    **kwargs,
) -> ROITargets:
    """:func:`roi_targets` over a batch (every array argument with a leading B); image b uses
    ``jax.random.fold_in(key, b)``. Fields are [B, S, ...]."""
    proposals = jnp.asarray(proposals)
    return _vmap_images(
        lambda *a, **kw: roi_targets(*a, **kw, **kwargs),
        {"proposals": proposals, "proposal_valid": proposal_valid, "gt_boxes": gt_boxes,
         "gt_valid": gt_valid, "key": sampling.per_image_keys(key, proposals.shape[0])},
        {"gt_masks": gt_masks, "gt_mask_valid": gt_mask_valid, "gt_mask_boxes": gt_mask_boxes,
         "gt_no_box_regression": gt_no_box_regression, "ignore_boxes": ignore_boxes,
         "ignore_valid": ignore_valid})
