"""RPN outputs -> a fixed number of proposals per image.

Per image: class-agnostic top-``pre_nms_top_n`` by objectness, decode the deltas on their anchors,
clip to the image, drop tiny boxes (height or width not above ``min_size`` pixels), NMS at 0.7,
keep the best ``post_nms_top_n``. Everything is fixed-size with a validity mask; there is a
single feature level (stride 4), so there is no per-level step.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from uld_jax.ops import boxes as box_ops
from uld_jax.ops import nms as nms_ops

Array = jnp.ndarray

RPN_NMS_THRESHOLD: float = 0.7
TRAIN_PRE_NMS_TOP_N: int = 12000
TRAIN_POST_NMS_TOP_N: int = 2000
TEST_PRE_NMS_TOP_N: int = 6000
TEST_POST_NMS_TOP_N: int = 300


class Proposals(NamedTuple):
    """Fixed-size proposals of one image ([P, ...]) or a batch ([B, P, ...])."""

    boxes: Array   # [P, 4] float32, input pixels, clipped to the image
    scores: Array  # [P] the objectness values passed in (logits stay logits); 0 on invalid slots
    valid: Array   # [P] bool
    anchor_index: Array  # [P] int32, the anchor each proposal was decoded from (0 if invalid)


def generate_proposals(
    objectness: Array,
    deltas: Array,
    anchors: Array,
    image_size: Array | Sequence[float],
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_threshold: float = RPN_NMS_THRESHOLD,
    min_size: float = 0.0,
    weights: Sequence[float] = box_ops.RPN_BOX_WEIGHTS,
    anchor_valid: Array | None = None,
    tile_size: int = 256,
) -> Proposals:
    """Proposals of one image.

    Args:
      objectness: [N] scores (logits or probabilities; only their order matters).
      deltas: [N, 4] RPN regression outputs ``[dy, dx, dh, dw]``.
      anchors: [N, 4] anchors in input pixels (``uld_jax.ops.anchors.grid_anchors``).
      image_size: ``(height, width)`` of the un-padded image in pixels (may be traced).
      pre_nms_top_n, post_nms_top_n: static counts (12000/2000 train, 6000/300 test).
      nms_threshold: IoU above which a lower-scored proposal is suppressed.
      min_size: proposals whose clipped height or width is not above this are dropped.
      weights: delta weights used by the RPN targets.
      anchor_valid: optional bool [N] (e.g. anchors over image padding).
      tile_size: NMS tile length.

    Returns:
      :class:`Proposals` with P = ``post_nms_top_n`` rows, best first. ``boxes`` carry no gradient;
      ``scores`` keep theirs (gathered from ``objectness``).
    """
    objectness = jnp.asarray(objectness, jnp.float32)
    deltas = jnp.asarray(deltas, jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    image_size = jnp.asarray(image_size, jnp.float32)
    idx, ok = nms_ops.top_k_by_score(objectness, pre_nms_top_n, anchor_valid)
    boxes = box_ops.decode_boxes(deltas[idx], anchors[idx], weights)
    boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
    scores = objectness[idx]
    ok = ok & box_ops.is_valid_box(boxes, min_size)
    keep, keep_ok = nms_ops.nms(boxes, scores, nms_threshold, post_nms_top_n, ok, tile_size)
    out_boxes = jnp.where(keep_ok[:, None], boxes[keep], 0.0)
    out_scores = jnp.where(keep_ok, scores[keep], 0.0)
    out_anchor = jnp.where(keep_ok, idx[keep], 0).astype(jnp.int32)
    # Proposals are constants for the second stage (no gradient into the RPN through the boxes).
    return Proposals(lax.stop_gradient(out_boxes), out_scores, keep_ok, out_anchor)


def batch_generate_proposals(
    objectness: Array,
    deltas: Array,
    anchors: Array,
    image_sizes: Array,
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_threshold: float = RPN_NMS_THRESHOLD,
    min_size: float = 0.0,
    weights: Sequence[float] = box_ops.RPN_BOX_WEIGHTS,
    anchor_valid: Array | None = None,
    tile_size: int = 256,
) -> Proposals:
    """:func:`generate_proposals` over a batch.

    ``objectness`` [B, N], ``deltas`` [B, N, 4], ``anchors`` [N, 4] (shared), ``image_sizes`` [B, 2]
    (height, width), ``anchor_valid`` optional [B, N]. Returns :class:`Proposals` with [B, P] fields.
    """
    objectness = jnp.asarray(objectness)
    if anchor_valid is None:
        anchor_valid = jnp.ones(objectness.shape, bool)

    def one(o, d, size, av):
        return generate_proposals(
            o, d, anchors, size, pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n,
            nms_threshold=nms_threshold, min_size=min_size, weights=weights, anchor_valid=av,
            tile_size=tile_size)

    return jax.vmap(one)(objectness, deltas, jnp.asarray(image_sizes, jnp.float32), anchor_valid)


def append_gt_boxes(
    boxes: Array, valid: Array, gt_boxes: Array, gt_valid: Array
) -> tuple[Array, Array]:
    """Add the ground truth to the proposals (training): [..., P, 4] + [..., G, 4] -> [..., P + G, 4].

    Padded GT rows stay invalid. Returns ``(boxes, valid)``.
    """
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    gt_valid = jnp.asarray(gt_valid, bool)
    out = jnp.concatenate([jnp.asarray(boxes, jnp.float32), jnp.where(gt_valid[..., None], gt_boxes, 0.0)], axis=-2)
    return out, jnp.concatenate([jnp.asarray(valid, bool), gt_valid], axis=-1)
