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

    Returns:
      [K, output_size, output_size, C] in the features' dtype.
    """
    features = jnp.asarray(features)
    boxes = jnp.asarray(boxes, jnp.float32) * spatial_scale
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
) -> Array:
    """:func:`roi_align` vmapped over the batch: [B, H, W, C], [B, K, 4] -> [B, K, out, out, C]."""
    fn = lambda f, b: roi_align(f, b, output_size, spatial_scale, sampling_ratio, aligned, precision)
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
    _, h, w = masks.shape
    idx = jnp.clip(jnp.asarray(mask_index, jnp.int32), 0, masks.shape[0] - 1)
    # Gather whole masks (K slabs), not sample points; keep the narrow dtype until the matmul.
    picked = jnp.take(masks, idx, axis=0)
    if picked.dtype == jnp.bool_:
        picked = picked.astype(jnp.uint8)
    ay = interpolation_matrix(boxes[:, 0], boxes[:, 2], h, output_size, sampling_ratio, aligned)
    ax = interpolation_matrix(boxes[:, 1], boxes[:, 3], w, output_size, sampling_ratio, aligned)
    rows = jnp.einsum("kih,khw->kiw", ay, picked.astype(jnp.float32), precision=precision)
    return jnp.einsum("kjw,kiw->kij", ax, rows, precision=precision)
