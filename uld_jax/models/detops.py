"""The detection ops the model uses, in one place.

Prefers ``uld_jax.ops`` (the project's ops, owned by the ops engineer); any op it does not provide
falls back to the clearly marked private stand-ins in ``uld_jax.models._ops_private``.
"""

from __future__ import annotations

from uld_jax.models._ops_private import (  # noqa: F401  (private stand-ins, see module docstring)
    IGNORE, NEG, POS, anchor_grid, clip_boxes, decode, encode, match, nms, pairwise_iou, roi_align,
    sample)
