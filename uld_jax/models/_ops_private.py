"""PRIVATE STAND-INS for detection ops that `uld_jax.ops` did not provide when the model was written.

*** Not the project's ops. *** `uld_jax/ops/` (owned by the ops engineer) is the reference
implementation; this module only exists so that the model, the losses and their tests run before
(or without) it. Each function is a minimal, static-shape, jit-able version with a documented
contract; `uld_jax.models.detops` picks the `uld_jax.ops` version when it exists and these
otherwise. Box format everywhere: ``[y1, x1, y2, x2]`` in continuous pixels (``uld_jax.core``).

Matching labels: 1 positive, 0 negative, -1 ignored (neither sampled as positive nor negative).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

POS, NEG, IGNORE = 1, 0, -1
_BBOX_CLIP = math.log(1000.0 / 16.0)


# --------------------------------------------------------------------------------------------------
# Boxes.
# --------------------------------------------------------------------------------------------------
def box_area(b: jax.Array) -> jax.Array:
    """[..., 4] -> [...] area in pixels^2 (0 for degenerate boxes)."""
    return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of every pair: a [N, 4], b [M, 4] -> [N, M] (0 where a union is empty)."""
    tl = jnp.maximum(a[:, None, :2], b[None, :, :2])
    br = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = jnp.prod(jnp.maximum(br - tl, 0.0), axis=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1e-9), 0.0)


def encode(boxes: jax.Array, anchors: jax.Array, weights) -> jax.Array:
    """Faster R-CNN deltas ``(dy, dx, dh, dw) * weights`` of ``boxes`` w.r.t. ``anchors`` ([..., 4])."""
    wy, wx, wh, ww = weights
    ah = jnp.maximum(anchors[..., 2] - anchors[..., 0], 1e-3)
    aw = jnp.maximum(anchors[..., 3] - anchors[..., 1], 1e-3)
    ay = anchors[..., 0] + 0.5 * ah
    ax = anchors[..., 1] + 0.5 * aw
    bh = jnp.maximum(boxes[..., 2] - boxes[..., 0], 1e-3)
    bw = jnp.maximum(boxes[..., 3] - boxes[..., 1], 1e-3)
    by = boxes[..., 0] + 0.5 * bh
    bx = boxes[..., 1] + 0.5 * bw
    return jnp.stack(
        [wy * (by - ay) / ah, wx * (bx - ax) / aw, wh * jnp.log(bh / ah), ww * jnp.log(bw / aw)], -1
    )


def decode(deltas: jax.Array, anchors: jax.Array, weights) -> jax.Array:
    """Inverse of :func:`encode`; dh, dw clipped at log(1000/16) as in Detectron."""
    wy, wx, wh, ww = weights
    ah = anchors[..., 2] - anchors[..., 0]
    aw = anchors[..., 3] - anchors[..., 1]
    ay = anchors[..., 0] + 0.5 * ah
    ax = anchors[..., 1] + 0.5 * aw
    dy, dx = deltas[..., 0] / wy, deltas[..., 1] / wx
    dh = jnp.minimum(deltas[..., 2] / wh, _BBOX_CLIP)
    dw = jnp.minimum(deltas[..., 3] / ww, _BBOX_CLIP)
    cy, cx = ay + dy * ah, ax + dx * aw
    h, w = ah * jnp.exp(dh), aw * jnp.exp(dw)
    return jnp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], -1)


def clip_boxes(b: jax.Array, height: float, width: float) -> jax.Array:
    """Clip [..., 4] boxes to the image ``[0, height] x [0, width]``."""
    return jnp.stack(
        [jnp.clip(b[..., 0], 0, height), jnp.clip(b[..., 1], 0, width),
         jnp.clip(b[..., 2], 0, height), jnp.clip(b[..., 3], 0, width)], -1)


# --------------------------------------------------------------------------------------------------
# Anchors.
# --------------------------------------------------------------------------------------------------
def anchor_grid(feat_h: int, feat_w: int, stride: int, sizes, ratios) -> jax.Array:
    """Anchors of one feature level: [feat_h * feat_w * A, 4], A = len(sizes) * len(ratios).

    Order: row-major over (y, x), then sizes, then ratios (matching an ``[h, w, A]`` head output).
    Anchor centres sit at pixel-centre ``(i + 0.5) * stride``; ratio = height / width, area = size^2.
    """
    shapes = []
    for s in sizes:
        for r in ratios:
            shapes.append((s * math.sqrt(r), s / math.sqrt(r)))
    hw = jnp.asarray(shapes, jnp.float32)  # [A, 2] (h, w)
    cy = (jnp.arange(feat_h, dtype=jnp.float32) + 0.5) * stride
    cx = (jnp.arange(feat_w, dtype=jnp.float32) + 0.5) * stride
    cy, cx = jnp.meshgrid(cy, cx, indexing="ij")
    c = jnp.stack([cy, cx], -1)[:, :, None, :]  # [h, w, 1, 2]
    half = 0.5 * hw[None, None]
    return jnp.concatenate([c - half, c + half], -1).reshape(-1, 4)


# --------------------------------------------------------------------------------------------------
# ROIAlign.
# --------------------------------------------------------------------------------------------------
def _interp_matrix(lo: jax.Array, hi: jax.Array, out: int, sampling: int, size: int) -> jax.Array:
    """Bilinear weights [R, out, size] of ``out`` bins between ``lo`` and ``hi`` (feature units).

    Each bin averages ``sampling`` regularly spaced points; a point at continuous coordinate ``p``
    interpolates the feature cells whose centres (``i + 0.5``) surround it; points outside
    ``[-1, size]`` contribute zero (Detectron2 ``aligned=True`` semantics), points just outside are
    clamped to the border cell.
    """
    r = lo.shape[0]
    bin_sz = (hi - lo) / out  # [R]
    frac = (jnp.arange(out * sampling, dtype=jnp.float32) + 0.5) / sampling  # in bins
    p = lo[:, None] + frac[None, :] * bin_sz[:, None]  # [R, out*S] continuous coords
    inside = (p >= -1.0) & (p <= size)
    q = jnp.clip(p - 0.5, 0.0, size - 1.0)  # index space of cell centres
    grid = jnp.arange(size, dtype=jnp.float32)
    w = jnp.maximum(1.0 - jnp.abs(q[..., None] - grid), 0.0) * inside[..., None]
    return w.reshape(r, out, sampling, size).mean(axis=2)


def roi_align(features: jax.Array, boxes: jax.Array, out_size: int, stride: float,
              sampling_ratio: int = 2) -> jax.Array:
    """ROIAlign of one image: features [H, W, C], boxes [R, 4] (image pixels) -> [R, out, out, C].

    Separable: a box's bins are a product of a row- and a column-interpolation matrix, applied as
    two einsums (static shapes, no gathers).
    """
    h, w, _ = features.shape
    b = boxes.astype(jnp.float32) / stride
    wy = _interp_matrix(b[:, 0], b[:, 2], out_size, sampling_ratio, h).astype(features.dtype)
    wx = _interp_matrix(b[:, 1], b[:, 3], out_size, sampling_ratio, w).astype(features.dtype)
    t = jnp.einsum("ryh,hwc->rywc", wy, features)
    return jnp.einsum("rxw,rywc->ryxc", wx, t)


# --------------------------------------------------------------------------------------------------
# NMS (fixed size).
# --------------------------------------------------------------------------------------------------
def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float,
        max_output: int):
    """Greedy NMS of one image with a fixed-size output.

    boxes [N, 4], scores [N], valid [N] bool -> (indices [K], keep_valid [K]) with K = max_output,
    kept boxes in descending score order, padded rows ``valid=False`` (index 0). Suppression row by
    row (O(N) memory), one sequential step per candidate.
    """
    n = boxes.shape[0]
    s = jnp.where(valid, scores, -jnp.inf)
    order = jnp.argsort(-s)
    b = boxes[order]
    v = valid[order]

    def body(i, keep):
        row = pairwise_iou(b[i][None], b)[0]
        alive = keep[i]
        sup = alive & (row > iou_threshold) & (jnp.arange(n) > i)
        return keep & ~sup

    keep = lax_fori(n, body, v)
    rank = jnp.where(keep, jnp.arange(n), n + jnp.arange(n))
    k = min(max_output, n)
    _, pos = jax.lax.top_k(-rank, k)
    idx = order[pos]
    kv = keep[pos]
    if k < max_output:
        idx = jnp.pad(idx, (0, max_output - k))
        kv = jnp.pad(kv, (0, max_output - k))
    return jnp.where(kv, idx, 0), kv


def lax_fori(n, body, init):
    return jax.lax.fori_loop(0, n, body, init)


# --------------------------------------------------------------------------------------------------
# Matching and sampling.
# --------------------------------------------------------------------------------------------------
def match(anchors: jax.Array, gt: jax.Array, gt_valid: jax.Array, ignore: jax.Array,
          ignore_valid: jax.Array, fg_iou: float, bg_iou: float, allow_low_quality: bool,
          ignore_iou: float):
    """IoU matching of one image.

    anchors [N, 4], gt [G, 4] / gt_valid [G], ignore [R, 4] / ignore_valid [R] ->
    (labels [N] int32 in {1, 0, -1}, matched gt index [N] int32, max IoU [N]).
    Positive: IoU >= fg_iou (or the best anchor of a GT when ``allow_low_quality``); negative:
    IoU < bg_iou; in between ignored. Anchors overlapping an ignore region with IoU >= ignore_iou
    are ignored unless positive for a real GT.
    """
    iou = jnp.where(gt_valid[None, :], pairwise_iou(anchors, gt), -1.0)  # [N, G]
    best = jnp.max(iou, axis=1)
    idx = jnp.argmax(iou, axis=1).astype(jnp.int32)
    labels = jnp.where(best >= fg_iou, POS, jnp.where(best < bg_iou, NEG, IGNORE))
    if allow_low_quality:
        gt_best = jnp.max(iou, axis=0)  # [G]
        is_best = (iou == gt_best[None, :]) & gt_valid[None, :] & (gt_best[None, :] > 0)
        labels = jnp.where(jnp.any(is_best, axis=1), POS, labels)
    ign = jnp.where(ignore_valid[None, :], pairwise_iou(anchors, ignore), 0.0)
    in_ignore = jnp.max(ign, axis=1, initial=0.0) >= ignore_iou
    labels = jnp.where(in_ignore & (labels != POS), IGNORE, labels)
    labels = jnp.where(jnp.any(gt_valid), labels, jnp.where(in_ignore, IGNORE, NEG))
    return labels.astype(jnp.int32), idx, best


def sample(rng: jax.Array, labels: jax.Array, num: int, positive_fraction: float):
    """Fixed-count balanced sampling of one image, positives first.

    labels [N] in {1, 0, -1} -> (indices [num] int32, sampled_labels [num] in {1, 0, -1}); at most
    ``round(num * positive_fraction)`` random positives, negatives fill the rest; rows without a
    candidate get label -1 (padding).
    """
    n = labels.shape[0]
    num_pos = int(round(num * positive_fraction))
    u = jax.random.uniform(rng, (n,))
    pos_key = jnp.where(labels == POS, u, -1.0)
    k = min(num, n)
    pos_val, pos_idx = jax.lax.top_k(pos_key, min(num_pos, n))
    n_pos = jnp.sum(pos_val >= 0)
    neg_key = jnp.where(labels == NEG, u, -1.0)
    neg_val, neg_idx = jax.lax.top_k(neg_key, k)
    # Slot j < n_pos takes positive j; slot j >= n_pos takes negative j - n_pos.
    j = jnp.arange(num)
    pos_part = jnp.pad(pos_idx, (0, num - pos_idx.shape[0]))
    neg_src = jnp.clip(j - n_pos, 0, k - 1)
    idx = jnp.where(j < n_pos, pos_part[jnp.clip(j, 0, num - 1)], neg_idx[neg_src])
    neg_ok = (j - n_pos < k) & (neg_val[neg_src] >= 0)
    lab = jnp.where(j < n_pos, POS, jnp.where(neg_ok, NEG, IGNORE))
    return idx.astype(jnp.int32), lab.astype(jnp.int32)
