"""ROIAlign as separable interpolation matrices + einsum (no per-sample-point gathers).

Semantics (Detectron2 ``ROIAlign(aligned=True)``)
--------------------------------------------------
A box ``[y1, x1, y2, x2]`` in input pixels maps to feature coordinates by ``y * spatial_scale``.
Feature value ``f[h]`` is the value at the *centre* of feature cell h, i.e. at continuous feature
coordinate ``h + 0.5``; with ``aligned=True`` the box is therefore shifted by -0.5 before
sampling, so that bilinear interpolation on a linear ramp ``f[h] = h + 0.5`` returns exactly the
continuous coordinate it was sampled at. Each of the ``out x out`` bins is averaged over
``sampling_ratio x sampling_ratio`` regularly spaced points (bin sub-centres). A point farther than
one cell outside the map (``y < -1`` or ``y > L``) contributes 0; points in ``[-1, 0]`` or
``[L-1, L]`` use the border value (Detectron2's boundary rule). ``aligned=False`` is the legacy
Mask R-CNN rule (no half-pixel shift, ROI sides at least one feature cell).

Why separable: bilinear weights factor as ``w(y, x) = wy(y) * wx(x)``, and the per-bin average over
a regular ``S x S`` grid factors too, so the whole ROI crop is ``Ay @ F @ Ax^T`` with ``Ay`` [out, H]
and ``Ax`` [out, W] -- dense matmuls that run well on GPU/TPU under static shapes. The adaptive
sampling ratio (``ceil(roi_size / out)``) is data dependent and therefore not offered; pass a fixed
``sampling_ratio``.

Cost: the dense form does ``K * out * H * W * C`` multiply-adds where a gather does
``K * out^2 * S^2 * 4 * C``; it wins where matmuls are cheap and gathers are not (TPU, and GPU
tensor cores), not on a CPU -- ``benchmarks/bench_ops.py`` prints both side by side (on this
project's 2-core CPU the gather reference was 1.4-4x faster).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def interpolation_matrix(
    start: Array,
    end: Array,
    length: int,
    output_size: int,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> Array:
    """Per-ROI averaged bilinear weights along one axis.

    Args:
      start, end: [K] ROI extent along the axis, in *feature* coordinates (already scaled; no
        half-pixel shift applied yet).
      length: static size L of the feature axis.
      output_size: static number of output bins P.
      sampling_ratio: static number of sample points per bin along this axis.
      aligned: apply the half-pixel shift (see module docstring).

    Returns:
      [K, P, L] float32; row (k, p) holds the weights whose dot product with a feature column gives
      bin p of ROI k averaged over its sample points (rows sum to the fraction of in-range points).
    """
    start = jnp.asarray(start, jnp.float32)
    end = jnp.asarray(end, jnp.float32)
    offset = 0.5 if aligned else 0.0
    start = start - offset
    size = end - offset - start
    if not aligned:
        size = jnp.maximum(size, 1.0)
    bin_size = size / output_size  # [K]
    p = jnp.arange(output_size, dtype=jnp.float32)
    t = (jnp.arange(sampling_ratio, dtype=jnp.float32) + 0.5) / sampling_ratio
    # Sample coordinates [K, P, S] in the "value at integer index" frame.
    y = start[:, None, None] + (p[None, :, None] + t[None, None, :]) * bin_size[:, None, None]
    inside = (y >= -1.0) & (y <= float(length))
    yc = jnp.clip(y, 0.0, float(length - 1))
    h = jnp.arange(length, dtype=jnp.float32)
    # The bilinear ("tent") kernel around the clamped point: weight 1 - |h - y| on the two
    # neighbouring cells, 0 elsewhere.
    w = jnp.maximum(0.0, 1.0 - jnp.abs(h[None, None, None, :] - yc[..., None]))  # [K, P, S, L]
    w = jnp.where(inside[..., None], w, 0.0)
    return jnp.mean(w, axis=2)


def roi_align(
    features: Array,
    boxes: Array,
    output_size: int = 7,
    spatial_scale: float = 0.25,
    sampling_ratio: int = 2,
    aligned: bool = True,
    precision: jax.lax.PrecisionLike = None,
    roi_chunk: int | None = None,
) -> Array:
    """ROIAlign on one image.

    Args:
      features: [H, W, C] feature map (any float dtype).
      boxes: [K, 4] ROIs ``[y1, x1, y2, x2]`` in input pixels (padded rows are fine: their crops are
        simply meaningless and must be masked by the caller).
      output_size: static side of the output grid (7 for the box head, 14 for the mask head).
      spatial_scale: feature cells per input pixel (0.25 for stride 4).
      sampling_ratio: static number of sample points per bin and axis.
      aligned: Detectron2 ``aligned=True`` half-pixel convention (the right one).
      precision: passed to the einsums (e.g. ``jax.lax.Precision.HIGHEST`` on TPU for exact f32).
      roi_chunk: optional static chunk of ROIs processed at a time (``lax.map``). The einsum's
        intermediate is [K, out, W, C]; chunking bounds it to [roi_chunk, out, W, C] (e.g. 300 test
        ROIs x 7 x 128 x 512 floats is 0.55 GB unchunked).

    Returns:
      [K, output_size, output_size, C] in the features' dtype.
    """
    features = jnp.asarray(features)
    boxes = jnp.asarray(boxes, jnp.float32)
    k = boxes.shape[0]
    if roi_chunk is not None and 0 < roi_chunk < k:
        n_chunks = -(-k // roi_chunk)
        padded = jnp.pad(boxes, ((0, n_chunks * roi_chunk - k), (0, 0)))
        fn = lambda b: roi_align(features, b, output_size, spatial_scale, sampling_ratio, aligned,
                                 precision)
        out = jax.lax.map(fn, padded.reshape(n_chunks, roi_chunk, 4))
        return out.reshape((n_chunks * roi_chunk,) + out.shape[2:])[:k]
    boxes = boxes * spatial_scale
    h, w, _ = features.shape
    ay = interpolation_matrix(boxes[:, 0], boxes[:, 2], h, output_size, sampling_ratio, aligned)
    ax = interpolation_matrix(boxes[:, 1], boxes[:, 3], w, output_size, sampling_ratio, aligned)
    ay = ay.astype(features.dtype)
    ax = ax.astype(features.dtype)
    rows = jnp.einsum("kih,hwc->kiwc", ay, features, precision=precision)
    return jnp.einsum("kjw,kiwc->kijc", ax, rows, precision=precision)


def batch_roi_align(
    features: Array,
    boxes: Array,
    output_size: int = 7,
    spatial_scale: float = 0.25,
    sampling_ratio: int = 2,
    aligned: bool = True,
    precision: jax.lax.PrecisionLike = None,
    roi_chunk: int | None = None,
) -> Array:
    """:func:`roi_align` vmapped over the batch: [B, H, W, C], [B, K, 4] -> [B, K, out, out, C]."""
    fn = lambda f, b: roi_align(f, b, output_size, spatial_scale, sampling_ratio, aligned, precision,
                                roi_chunk)
    return jax.vmap(fn)(features, boxes)


def crop_masks(
    masks: Array,
    boxes: Array,
    mask_index: Array,
    output_size: int = 28,
    sampling_ratio: int = 2,
    aligned: bool = True,
    precision: jax.lax.PrecisionLike = None,
) -> Array:
    """Crop-and-resize each ROI's ground-truth mask (Mask R-CNN mask targets).

    Args:
      masks: [G, H, W] masks at input resolution (uint8/bool/float; values in [0, 1]).
      boxes: [K, 4] ROIs in input pixels.
      mask_index: [K] int, which of the G masks each ROI crops (its matched ground truth).
      output_size: static side of the target (28).
      sampling_ratio, aligned, precision: as in :func:`roi_align` (scale 1: the masks are at input
        resolution).

    Returns:
      [K, output_size, output_size] float32 soft masks in [0, 1]; threshold at 0.5 for binary
      targets.
    """
    masks = jnp.asarray(masks)
    boxes = jnp.asarray(boxes, jnp.float32)
    g, h, w = masks.shape
    if g == 0:
        return jnp.zeros((boxes.shape[0], output_size, output_size), jnp.float32)
    idx = jnp.clip(jnp.asarray(mask_index, jnp.int32), 0, masks.shape[0] - 1)
    # Gather whole masks (K slabs), not sample points; keep the narrow dtype until the matmul.
    picked = jnp.take(masks, idx, axis=0)
    if picked.dtype == jnp.bool_:
        picked = picked.astype(jnp.uint8)
    ay = interpolation_matrix(boxes[:, 0], boxes[:, 2], h, output_size, sampling_ratio, aligned)
    ax = interpolation_matrix(boxes[:, 1], boxes[:, 3], w, output_size, sampling_ratio, aligned)
    rows = jnp.einsum("kih,khw->kiw", ay, picked.astype(jnp.float32), precision=precision)
    return jnp.einsum("kjw,kiw->kij", ax, rows, precision=precision)


def crop_box_masks(
    masks: Array,
    mask_boxes: Array,
    boxes: Array,
    mask_index: Array,
    output_size: int = 28,
    sampling_ratio: int = 2,
    precision: jax.lax.PrecisionLike = None,
) -> Array:
    """:func:`crop_masks` for masks stored as per-lesion crops (the input pipeline's layout).

    Mask g is an ``[M, M]`` grid laid over the input-pixel box ``mask_boxes[g]`` (cell j of a side
    covers ``[lo + j * side / M, lo + (j + 1) * side / M]``); the lesion is 0 outside that box. The
    grid is framed by a ring of zero cells and each ROI is expressed in the framed grid's cells, so
    sample points just outside the box read 0 rather than the crop's border (the box's outside is
    background, not "unknown"), and points farther out read 0 by the ROIAlign boundary rule.

    Args:
      masks: [G, M, M] crops (uint8/bool/float; values in [0, 1]).
      mask_boxes: [G, 4] input-pixel box each crop covers (may reach beyond the image).
      boxes, mask_index, output_size, sampling_ratio, precision: as in :func:`crop_masks`.

    Returns:
      [K, output_size, output_size] float32 soft masks in [0, 1].
    """
    masks = jnp.asarray(masks)
    boxes = jnp.asarray(boxes, jnp.float32)
    g, mh, mw = masks.shape
    if g == 0:
        return jnp.zeros((boxes.shape[0], output_size, output_size), jnp.float32)
    idx = jnp.clip(jnp.asarray(mask_index, jnp.int32), 0, g - 1)
    mb = jnp.take(jnp.asarray(mask_boxes, jnp.float32), idx, axis=0)          # [K, 4]
    # cells per input pixel; a degenerate box (a row without a mask) maps every ROI far outside
    cy = mh / jnp.maximum(mb[:, 2] - mb[:, 0], 1e-3)
    cx = mw / jnp.maximum(mb[:, 3] - mb[:, 1], 1e-3)
    framed = jnp.stack([(boxes[:, 0] - mb[:, 0]) * cy, (boxes[:, 1] - mb[:, 1]) * cx,
                        (boxes[:, 2] - mb[:, 0]) * cy, (boxes[:, 3] - mb[:, 1]) * cx], axis=-1) + 1.0
    ringed = jnp.pad(masks, ((0, 0), (1, 1), (1, 1)))
    return crop_masks(ringed, framed, idx, output_size, sampling_ratio, True, precision)


def paste_masks(
    masks: Array,
    boxes: Array,
    height: int,
    width: int,
    precision: jax.lax.PrecisionLike = None,
) -> Array:
    """Resample per-box mask predictions back onto the image (inverse of :func:`crop_masks`).

    Image pixel (y, x) (centre ``y + 0.5``) reads the mask at cell coordinate
    ``((y + 0.5 - y1) / (y2 - y1)) * M - 0.5`` (and likewise in x) with bilinear weights and zero
    padding outside the M x M grid -- the ``grid_sample(align_corners=False)`` rule Detectron2 uses.

    Args:
      masks: [K, M, M] soft masks (probabilities) in box coordinates.
      boxes: [K, 4] boxes in input pixels.
      height, width: static image size in pixels.
      precision: passed to the einsums.

    Returns:
      [K, height, width] float32; threshold at 0.5 for binary masks.
    """
    masks = jnp.asarray(masks, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    m = masks.shape[-1]

    def weights(lo, hi, n):
        size = jnp.maximum(hi - lo, 1e-6)
        centre = jnp.arange(n, dtype=jnp.float32) + 0.5
        coord = (centre[None, :] - lo[:, None]) / size[:, None] * m - 0.5  # [K, n]
        cells = jnp.arange(m, dtype=jnp.float32)
        return jnp.maximum(0.0, 1.0 - jnp.abs(coord[..., None] - cells))  # [K, n, M]

    wy = weights(boxes[:, 0], boxes[:, 2], height)
    wx = weights(boxes[:, 1], boxes[:, 3], width)
    rows = jnp.einsum("kym,kmn->kyn", wy, masks, precision=precision)
    return jnp.einsum("kxn,kyn->kyx", wx, rows, precision=precision)
