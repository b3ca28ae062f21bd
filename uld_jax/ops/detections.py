"""Second-stage post-processing: ROI box-head outputs -> a fixed number of detections per image.

Per image (and per dataset expert, by vmapping over the expert axis): decode the box deltas on
their ROIs with the ROI weights (10, 10, 5, 5), clip to the image, drop low scores and tiny boxes,
NMS, keep the best ``max_detections``. Class-agnostic: the detector has one foreground class
(lesion) per dataset expert.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from uld_jax.ops import boxes as box_ops
from uld_jax.ops import nms as nms_ops

Array = jnp.ndarray

DETECTION_NMS_THRESHOLD: float = 0.5
DETECTION_SCORE_THRESHOLD: float = 0.05
MAX_DETECTIONS: int = 100


class Detections(NamedTuple):
    """Fixed-size detections of one image ([D, ...]) or a batch ([B, D, ...])."""

    boxes: Array      # [D, 4] float32 input pixels (0 on invalid slots)
    scores: Array     # [D] float32 (0 on invalid slots)
    valid: Array      # [D] bool
    roi_index: Array  # [D] int32, the ROI each detection came from (gather other per-ROI outputs
                      # such as organ weights, masks or embeddings with it)


def postprocess_detections(
    rois: Array,
    deltas: Array,
    scores: Array,
    image_size: Array | Sequence[float],
    *,
    roi_valid: Array | None = None,
    weights: Sequence[float] = box_ops.ROI_BOX_WEIGHTS,
    score_threshold: float = DETECTION_SCORE_THRESHOLD,
    nms_threshold: float = DETECTION_NMS_THRESHOLD,
    max_detections: int = MAX_DETECTIONS,
    min_size: float = 0.0,
    tile_size: int = 256,
) -> Detections:
    """Detections of one image.

    Args:
      rois: [K, 4] ROIs (proposals) in input pixels.
      deltas: [K, 4] box-head regression ``[dy, dx, dh, dw]`` for the foreground class.
      scores: [K] foreground probabilities (e.g. eq. 1's fused score).
      image_size: ``(height, width)`` in pixels (may be traced).
      roi_valid: optional bool [K].
      weights: delta weights of the box head.
      score_threshold: detections must score strictly above this.
      nms_threshold: IoU above which a lower-scored detection is suppressed.
      max_detections: static number of output slots.
      min_size: boxes whose clipped height or width is not above this are dropped.
      tile_size: NMS tile length.

    Returns:
      :class:`Detections` with ``max_detections`` rows, best first.
    """
    rois = jnp.asarray(rois, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    image_size = jnp.asarray(image_size, jnp.float32)
    boxes = box_ops.decode_boxes(jnp.asarray(deltas, jnp.float32), rois, weights)
    boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
    ok = box_ops.is_valid_box(boxes, min_size) & (scores > score_threshold)
    if roi_valid is not None:
        ok = ok & jnp.asarray(roi_valid, bool)
    idx, keep = nms_ops.nms(boxes, scores, nms_threshold, max_detections, ok, tile_size)
    return Detections(
        boxes=jnp.where(keep[:, None], boxes[idx], 0.0),
        scores=jnp.where(keep, scores[idx], 0.0),
        valid=keep,
        roi_index=jnp.where(keep, idx, 0).astype(jnp.int32),
    )


def batch_postprocess_detections(
    rois: Array,
    deltas: Array,
    scores: Array,
    image_sizes: Array,
    *,
    roi_valid: Array | None = None,
    **kwargs,
) -> Detections:
    """:func:`postprocess_detections` over a batch: [B, K, 4], [B, K, 4], [B, K], [B, 2], [B, K].

    For per-dataset experts, vmap once more over the expert axis of ``deltas`` and ``scores``.
    """
    rois = jnp.asarray(rois)
    if roi_valid is None:
        roi_valid = jnp.ones(rois.shape[:2], bool)
    fn = lambda r, d, s, size, v: postprocess_detections(r, d, s, size, roi_valid=v, **kwargs)
    return jax.vmap(fn)(rois, deltas, scores, jnp.asarray(image_sizes, jnp.float32), roi_valid)
