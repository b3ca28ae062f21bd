"""The few detection ops the model calls directly, as thin adapters over ``uld_jax.ops`` (owned by
the ops engineer); proposals, targets and detections come from ``uld_jax.ops`` unchanged."""

from __future__ import annotations

import numpy as np

from uld_jax.ops import anchors as _anchors
from uld_jax.ops import roi_align as _roi_align



def anchor_grid(feat_h: int, feat_w: int, stride: int, sizes, ratios) -> np.ndarray:
    """[feat_h * feat_w * A, 4] anchors (input pixels, a NumPy constant), in the RPN head's output
    order."""
    return _anchors.grid_anchors((feat_h, feat_w), stride, sizes, ratios)


def roi_align(features, boxes, out_size: int, stride: float, sampling_ratio: int = 2):
    """features [H, W, C], boxes [R, 4] (input pixels) -> [R, out, out, C]."""
    return _roi_align.roi_align(features, boxes, out_size, 1.0 / stride, sampling_ratio)
