"""MULAN anchors on the stride-4 feature map.

Layout
------
For a feature map of ``[Hf, Wf]`` and ``A = len(sizes) * len(ratios)`` anchors per cell,
:func:`grid_anchors` returns ``[Hf * Wf * A, 4]`` boxes whose flat index is

    n = (i * Wf + j) * A + a,     a = size_index * len(ratios) + ratio_index

i.e. row-major over the feature cell (i, j), then size-major over the anchor shapes. This is exactly
the order of a conv head's output ``[Hf, Wf, A * k]`` reshaped to ``[Hf * Wf * A, k]`` (NHWC, the
channels of one cell grouped as A consecutive blocks of k): objectness ``[Hf, Wf, A] -> [N]`` and
deltas ``[Hf, Wf, A * 4] -> [N, 4]`` line up with the anchors row for row.

Geometry
--------
Boxes are in input pixels, internal format (``[y1, x1, y2, x2]``, continuous coordinates). Feature
cell (i, j) at stride s covers input pixels ``[s*i, s*(i+1)) x [s*j, s*(j+1))``; its anchors are
centred on that square's centre ``(s*(i+0.5), s*(j+0.5))``. A shape (size S, ratio r) has height
``S * sqrt(r)`` and width ``S / sqrt(r)`` (ratio = height / width, area = S^2), unrounded.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

ANCHOR_STRIDE: int = 4
ANCHOR_SIZES: tuple[float, ...] = (16.0, 24.0, 32.0, 48.0, 96.0)
ANCHOR_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)


def num_anchors_per_cell(
    sizes: Sequence[float] = ANCHOR_SIZES, ratios: Sequence[float] = ANCHOR_RATIOS
) -> int:
    """A, the number of anchor shapes per feature cell (15 for MULAN)."""
    return len(sizes) * len(ratios)


def cell_anchors(
    sizes: Sequence[float] = ANCHOR_SIZES, ratios: Sequence[float] = ANCHOR_RATIOS
) -> np.ndarray:
    """The A anchor shapes centred on (0, 0): [A, 4] float32 ``[y1, x1, y2, x2]`` pixels, size-major."""
    out = []
    for s in sizes:
        for r in ratios:
            h = float(s) * np.sqrt(float(r))
            w = float(s) / np.sqrt(float(r))
            out.append([-0.5 * h, -0.5 * w, 0.5 * h, 0.5 * w])
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def grid_anchors(
    feature_shape: tuple[int, int],
    stride: int = ANCHOR_STRIDE,
    sizes: Sequence[float] = ANCHOR_SIZES,
    ratios: Sequence[float] = ANCHOR_RATIOS,
) -> np.ndarray:
    """All anchors of a feature map (see the module docstring for the order).

    Args:
      feature_shape: static ``(Hf, Wf)`` of the feature map.
      stride: input pixels per feature cell.
      sizes, ratios: anchor shapes (sqrt of area in pixels; height / width).

    Returns:
      [Hf * Wf * A, 4] float32 numpy array (a compile-time constant under jit), input pixels.
    """
    hf, wf = (int(v) for v in feature_shape)
    base = cell_anchors(sizes, ratios)  # [A, 4]
    cy = (np.arange(hf, dtype=np.float64) + 0.5) * stride
    cx = (np.arange(wf, dtype=np.float64) + 0.5) * stride
    cyy, cxx = np.meshgrid(cy, cx, indexing="ij")  # [Hf, Wf]
    shift = np.stack([cyy, cxx, cyy, cxx], axis=-1)  # [Hf, Wf, 4]
    anchors = shift[:, :, None, :] + base[None, None, :, :].astype(np.float64)
    return anchors.reshape(-1, 4).astype(np.float32)


def anchors_inside(
    anchors: Array, height: Array | float, width: Array | float, straddle: float = 0.0
) -> Array:
    """True for anchors lying inside the image up to ``straddle`` pixels (maskrcnn-benchmark's
    ``STRADDLE_THRESH``); a negative ``straddle`` keeps every anchor.

    ``anchors`` [..., N, 4]; ``height``/``width`` scalars or [..., 1] (per-image sizes, pixels).
    Returns bool [..., N].
    """
    anchors = jnp.asarray(anchors)
    if straddle < 0:
        return jnp.ones(anchors.shape[:-1], bool)
    h = jnp.asarray(height, anchors.dtype)
    w = jnp.asarray(width, anchors.dtype)
    return (
        (anchors[..., 0] >= -straddle)
        & (anchors[..., 1] >= -straddle)
        & (anchors[..., 2] <= h + straddle)
        & (anchors[..., 3] <= w + straddle)
    )
