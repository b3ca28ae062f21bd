"""Box geometry on the internal box format.

Every box is ``[y1, x1, y2, x2]`` (float32) in continuous pixel coordinates (see ``uld_jax.core``):
pixel (r, c) covers ``[r, r+1) x [c, c+1)``, a box's height is ``y2 - y1`` and its centre is
``(y1 + y2) / 2`` -- no "+1" anywhere.

All functions are pure, jit-able and shape-static; they broadcast over leading dimensions unless
the docstring says otherwise, so they vmap over the batch. Padded boxes are handled through
explicit validity masks; a box is *degenerate* when its height or width is not positive (or not
finite), and degenerate or padded boxes give IoU/IoBB 0 against everything.

Box deltas follow the Faster R-CNN parameterisation in the same ``y, x`` order as the boxes:
``[dy, dx, dh, dw]`` with ``dy = wy * (cy - cy_a) / h_a``, ``dh = wh * log(h / h_a)``; see
:func:`encode_boxes` / :func:`decode_boxes`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

Array = jnp.ndarray

# dh/dw are clamped before exp() when decoding so that a wild regression output cannot produce
# inf boxes (Detectron's log(1000 / 16)).
BBOX_XFORM_CLIP: float = math.log(1000.0 / 16.0)
# Delta weights: RPN regresses plain deltas, the ROI box head scaled ones (Detectron defaults).
RPN_BOX_WEIGHTS: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
# Smallest height/width used when a degenerate box would otherwise be divided by or logged.
_EPS: float = 1e-6


def heights_widths(boxes: Array) -> tuple[Array, Array]:
    """Heights and widths in pixels (may be negative for degenerate boxes). [..., 4] -> 2x [...]."""
    boxes = jnp.asarray(boxes)
    return boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]


def area(boxes: Array) -> Array:
    """Area in square pixels, 0 for degenerate boxes. ``boxes`` [..., 4] -> [...]."""
    h, w = heights_widths(boxes)
    return jnp.maximum(h, 0.0) * jnp.maximum(w, 0.0)


def is_valid_box(boxes: Array, min_size: float = 0.0) -> Array:
    """True where the box is finite and both height and width exceed ``min_size`` pixels.

    ``boxes`` [..., 4] -> bool [...]. ``min_size`` 0 rejects only empty/inverted boxes.
    """
    boxes = jnp.asarray(boxes)
    h, w = heights_widths(boxes)
    finite = jnp.all(jnp.isfinite(boxes), axis=-1)
    return finite & (h > min_size) & (w > min_size)


def boxes_to_center_size(boxes: Array) -> Array:
    """``[y1, x1, y2, x2]`` -> ``[cy, cx, h, w]`` (pixels). [..., 4] -> [..., 4]."""
    boxes = jnp.asarray(boxes)
    h, w = heights_widths(boxes)
    cy = 0.5 * (boxes[..., 0] + boxes[..., 2])
    cx = 0.5 * (boxes[..., 1] + boxes[..., 3])
    return jnp.stack([cy, cx, h, w], axis=-1)


def center_size_to_boxes(cyxhw: Array) -> Array:
    """``[cy, cx, h, w]`` -> ``[y1, x1, y2, x2]`` (pixels). [..., 4] -> [..., 4]."""
    cyxhw = jnp.asarray(cyxhw)
    cy, cx, h, w = (cyxhw[..., i] for i in range(4))
    return jnp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def pairwise_intersection(boxes_a: Array, boxes_b: Array) -> Array:
    """Intersection areas of every pair. ``boxes_a`` [..., N, 4], ``boxes_b`` [..., M, 4] -> [..., N, M]."""
    a = jnp.asarray(boxes_a)[..., :, None, :]
    b = jnp.asarray(boxes_b)[..., None, :, :]
    ih = jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0])
    iw = jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1])
    return jnp.maximum(ih, 0.0) * jnp.maximum(iw, 0.0)


def _pair_mask(boxes_a: Array, boxes_b: Array, valid_a: Array | None, valid_b: Array | None) -> Array:
    """[..., N, M] bool: both boxes non-degenerate and (where given) valid."""
    va = is_valid_box(boxes_a)
    vb = is_valid_box(boxes_b)
    if valid_a is not None:
        va = va & jnp.asarray(valid_a, bool)
    if valid_b is not None:
        vb = vb & jnp.asarray(valid_b, bool)
    return va[..., :, None] & vb[..., None, :]


def pairwise_iou(
    boxes_a: Array,
    boxes_b: Array,
    valid_a: Array | None = None,
    valid_b: Array | None = None,
) -> Array:
    """Intersection over union of every pair.

    Args:
      boxes_a: [..., N, 4] pixels.
      boxes_b: [..., M, 4] pixels.
      valid_a: optional bool [..., N]; False rows (padding) give IoU 0.
      valid_b: optional bool [..., M]; likewise.

    Returns:
      [..., N, M] float32 in [0, 1]; 0 wherever either box is padded or degenerate.
    """
    inter = pairwise_intersection(boxes_a, boxes_b)
    union = area(boxes_a)[..., :, None] + area(boxes_b)[..., None, :] - inter
    ok = _pair_mask(boxes_a, boxes_b, valid_a, valid_b)
    return jnp.where(ok, inter / jnp.where(ok, union, 1.0), 0.0)


def pairwise_iobb(
    boxes_a: Array,
    boxes_b: Array,
    valid_a: Array | None = None,
    valid_b: Array | None = None,
) -> Array:
    """Intersection over the area of the *first* box (IoBB of a detection ``a`` w.r.t. ``b``).

    Args:
      boxes_a: [..., N, 4] pixels; the denominators (detections, anchors, ROIs).
      boxes_b: [..., M, 4] pixels (ground truth, ignore regions).
      valid_a, valid_b: optional bool masks [..., N] / [..., M].

    Returns:
      [..., N, M] float32 in [0, 1]; 0 wherever either box is padded or degenerate.
    """
    inter = pairwise_intersection(boxes_a, boxes_b)
    ok = _pair_mask(boxes_a, boxes_b, valid_a, valid_b)
    denom = area(boxes_a)[..., :, None]
    return jnp.where(ok, inter / jnp.where(ok, denom, 1.0), 0.0)


def clip_boxes(boxes: Array, height: Array | float, width: Array | float) -> Array:
    """Clip boxes to the image ``[0, height] x [0, width]`` (pixels).

    ``boxes`` [..., 4]; ``height``/``width`` scalars or arrays broadcastable to ``boxes[..., 0]``
    (e.g. [B, 1] for per-image sizes of a [B, N, 4] batch). A box entirely outside the image
    becomes degenerate (zero height or width).
    """
    boxes = jnp.asarray(boxes)
    height = jnp.asarray(height, boxes.dtype)
    width = jnp.asarray(width, boxes.dtype)
    y1 = jnp.clip(boxes[..., 0], 0.0, height)
    x1 = jnp.clip(boxes[..., 1], 0.0, width)
    y2 = jnp.clip(boxes[..., 2], 0.0, height)
    x2 = jnp.clip(boxes[..., 3], 0.0, width)
    return jnp.stack([y1, x1, y2, x2], axis=-1)


def encode_boxes(
    boxes: Array,
    anchors: Array,
    weights: Sequence[float] = RPN_BOX_WEIGHTS,
) -> Array:
    """Regression targets that turn ``anchors`` into ``boxes``.

    Args:
      boxes: [..., 4] target boxes (pixels).
      anchors: [..., 4] reference boxes (anchors or ROIs), broadcastable with ``boxes``.
      weights: ``(wy, wx, wh, ww)`` multipliers of the four deltas.

    Returns:
      [..., 4] deltas ``[dy, dx, dh, dw]``. Degenerate sizes are floored at 1e-6 pixels so the
      result is always finite; such rows should carry zero regression weight anyway.
    """
    t = boxes_to_center_size(boxes)
    a = boxes_to_center_size(anchors)
    wy, wx, wh, ww = (float(v) for v in weights)
    ah = jnp.maximum(a[..., 2], _EPS)
    aw = jnp.maximum(a[..., 3], _EPS)
    th = jnp.maximum(t[..., 2], _EPS)
    tw = jnp.maximum(t[..., 3], _EPS)
    dy = wy * (t[..., 0] - a[..., 0]) / ah
    dx = wx * (t[..., 1] - a[..., 1]) / aw
    dh = wh * jnp.log(th / ah)
    dw = ww * jnp.log(tw / aw)
    return jnp.stack([dy, dx, dh, dw], axis=-1)


def decode_boxes(
    deltas: Array,
    anchors: Array,
    weights: Sequence[float] = RPN_BOX_WEIGHTS,
    scale_clip: float = BBOX_XFORM_CLIP,
) -> Array:
    """Apply ``deltas`` to ``anchors`` (inverse of :func:`encode_boxes`).

    Args:
      deltas: [..., 4] ``[dy, dx, dh, dw]``.
      anchors: [..., 4] reference boxes (pixels), broadcastable with ``deltas``.
      weights: the same ``(wy, wx, wh, ww)`` used to encode.
      scale_clip: ``dh``/``dw`` (after dividing by the weights) are clamped to at most this before
        ``exp`` so a box grows at most ``exp(scale_clip)`` times.

    Returns:
      [..., 4] boxes (pixels), not clipped to the image.
    """
    deltas = jnp.asarray(deltas)
    a = boxes_to_center_size(anchors).astype(deltas.dtype)
    wy, wx, wh, ww = (float(v) for v in weights)
    dy = deltas[..., 0] / wy
    dx = deltas[..., 1] / wx
    dh = jnp.minimum(deltas[..., 2] / wh, scale_clip)
    dw = jnp.minimum(deltas[..., 3] / ww, scale_clip)
    cy = a[..., 0] + dy * a[..., 2]
    cx = a[..., 1] + dx * a[..., 3]
    h = a[..., 2] * jnp.exp(dh)
    w = a[..., 3] * jnp.exp(dw)
    return center_size_to_boxes(jnp.stack([cy, cx, h, w], axis=-1))
