"""Project-wide conventions: the one internal box format, feature keys, dataset and organ ids.

Every module imports its constants from here so that data_prep, the model, mining and evaluation
agree on one vocabulary.

Box format
----------
Inside the library a 2D box is ``[y1, x1, y2, x2]`` (float32) in *continuous pixel coordinates* of
the image it refers to: pixel (row r, column c) covers the square ``[r, r+1) x [c, c+1)``, so a box
that covers exactly the pixels ``r0..r1`` (inclusive) is ``[r0, c0, r1 + 1, c1 + 1]`` and its height
is ``y2 - y1``. A 3D box is ``[z1, y1, x1, z2, y2, x2]`` with the same convention, z in slice index.

External formats are converted only at the edges (readers, output writers, evaluation of released
files), with the helpers below:

* DeepLesion ``Bounding_boxes`` / ``Measurement_coordinates`` are 1-based; MULAN subtracts 1 and
  treats boxes as inclusive pixel indices ``x1, y1, x2, y2`` ("+1 pixel" size convention).
* The released 1K volumetric test set uses inclusive ``[x1, y1, z1, x2, y2, z2]`` boxes with the
  same +1 size convention: x/y are 0-based pixel indices, z is the 1-based slice number of the
  sub-volume name's range (``..._AAA-BBB`` -> z in AAA..BBB). The 3D helpers below convert the
  box layout only; shifting z to a 0-based index is the caller's job.
"""

from __future__ import annotations

import enum

import numpy as np

# --------------------------------------------------------------------------------------------------
# Datasets and heads (order matters: it is the index of dataset-indexed heads).
# --------------------------------------------------------------------------------------------------
DATASETS: tuple[str, ...] = ("deeplesion", "luna16", "lits", "nihln")
DATASET_ID: dict[str, int] = {name: i for i, name in enumerate(DATASETS)}
# Single-type datasets, used by NRM; each labels only one lesion type.
SINGLE_TYPE_DATASETS: tuple[str, ...] = ("luna16", "lits", "nihln")

# Organ-specialised classification heads. Head 0 (whole body) has a fixed gate weight w0 = 1; the
# gate predicts w1..w3 for the others.
ORGAN_HEADS: tuple[str, ...] = ("whole_body", "lung", "liver", "lymph_node")
GATED_ORGANS: tuple[str, ...] = ORGAN_HEADS[1:]
# The organ each single-type dataset labels (hard gating target).
DATASET_ORGAN: dict[str, str | None] = {
    "deeplesion": None,
    "luna16": "lung",
    "lits": "liver",
    "nihln": "lymph_node",
}

# DeepLesion Coarse_lesion_type codes (-1: unknown, every training row of the real file).
COARSE_LESION_TYPES: dict[int, str] = {
    1: "bone",
    2: "abdomen",
    3: "mediastinum",
    4: "liver",
    5: "lung",
    6: "kidney",
    7: "soft_tissue",
    8: "pelvis",
}
# Which gated organ a coarse type implies (hard gating target), None for "no gated organ".
COARSE_TYPE_ORGAN: dict[int, str | None] = {
    1: None, 2: None, 3: "lymph_node", 4: "liver", 5: "lung", 6: None, 7: None, 8: None,
}


class Provenance(enum.IntEnum):
    """Where an annotation row comes from."""

    ORIGINAL = 0   # marked in the source dataset
    MINED = 1      # MAM positive: trains classification only, never box regression
    IGNORE = 2     # NRM suspicious region: excluded from positive and negative sampling


# --------------------------------------------------------------------------------------------------
# Preprocessing constants (DESIGN.md section 3).
# --------------------------------------------------------------------------------------------------
HU_WINDOW: tuple[float, float] = (-1024.0, 3071.0)
PIXEL_MEAN: float = 50.0
# The input pipeline hands the image over as int16 fixed point: round(value * IMAGE_SCALE), value in
# window units ([0, 255] minus PIXEL_MEAN), so steps of 1/64 unit (0.25 HU) and half float32's bytes.
IMAGE_SCALE: int = 64
TARGET_PIXEL_MM: float = 0.8
TARGET_SLICE_MM: float = 2.0
NUM_CONTEXT_SLICES: int = 9     # 9 slices at 2 mm: +-8 mm around the central slice
MAX_IMAGE_SIDE: int = 512
DEEPLESION_HU_OFFSET: int = 32768  # DeepLesion 16-bit PNG value = HU + 32768


def decode_image(image):
    """A batch image (numpy or JAX) -> float32 window units: the pipeline's int16 fixed point divided
    by IMAGE_SCALE; a float image (detect, user batches) as it is, in float32."""
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) * np.float32(1.0 / IMAGE_SCALE)
    if image.dtype == np.float32:
        return image                  # no copy: detect's batches are float32 already
    return image.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Feature keys of a training/evaluation batch. Shapes use B (batch), H, W (image), G (max boxes),
# R (max ignore regions), M (mask side).
# --------------------------------------------------------------------------------------------------
class Keys:
    IMAGE = "image"                  # [B, H, W, 9] windowed to [0, 255] minus PIXEL_MEAN: int16
                                     # fixed point (pipeline; decode_image) or float32
    IMAGE_VALID = "image_valid"      # [B, H, W] bool, False on padding
    DATASET_ID = "dataset_id"        # [B] int32, index into DATASETS
    BOXES = "boxes"                  # [B, G, 4] float32, internal box format
    BOX_VALID = "box_valid"          # [B, G] bool
    MASKS = "masks"                  # [B, G, M, M] uint8 crops (weak or real masks), each laid
                                     # over its MASK_BOXES row; or [B, G, H, W] whole-image masks
    MASK_BOXES = "mask_boxes"        # [B, G, 4] float32, the image-pixel box each mask crop covers
    PROVENANCE = "provenance"        # [B, G] int32, Provenance
    LESION_TYPE = "lesion_type"      # [B, G] int32, coarse type code (-1 unknown)
    LESION_ID = "lesion_id"          # [B, G] int64, identity across studies (-1 unknown)
    ORGAN_TARGET = "organ_target"    # [B, G, 3] float32 in [0, 1], targets for w1..w3
    ORGAN_VALID = "organ_valid"      # [B, G, 3] bool, False where the target is unknown
    IGNORE_BOXES = "ignore_boxes"    # [B, R, 4] float32, NRM ignore regions
    IGNORE_VALID = "ignore_valid"    # [B, R] bool
    SAMPLE_ID = "sample_id"          # [B] int64, row of the sample table
    IS_KEY_SLICE = "is_key_slice"    # [B] bool
    PIXEL_MM = "pixel_mm"            # [B] float32, pixel size of the model input in mm


# --------------------------------------------------------------------------------------------------
# Box conversions at the edges.
# --------------------------------------------------------------------------------------------------
def inclusive_xyxy_to_internal(boxes: np.ndarray) -> np.ndarray:
    """Inclusive 0-based ``[x1, y1, x2, y2]`` pixel indices -> internal ``[y1, x1, y2, x2]``.

    ``boxes``: [..., 4]. The +1 converts the inclusive far edge to a continuous coordinate.
    """
    b = np.asarray(boxes, dtype=np.float64)
    return np.stack([b[..., 1], b[..., 0], b[..., 3] + 1.0, b[..., 2] + 1.0], axis=-1)


def internal_to_inclusive_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Internal ``[y1, x1, y2, x2]`` -> inclusive 0-based ``[x1, y1, x2, y2]`` (inverse of above)."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.stack([b[..., 1], b[..., 0], b[..., 3] - 1.0, b[..., 2] - 1.0], axis=-1)


def deeplesion_box_to_internal(boxes_1based_xyxy: np.ndarray) -> np.ndarray:
    """DeepLesion ``Bounding_boxes`` (1-based inclusive ``x1, y1, x2, y2``) -> internal format."""
    return inclusive_xyxy_to_internal(np.asarray(boxes_1based_xyxy, dtype=np.float64) - 1.0)


def internal_to_deeplesion_box(boxes: np.ndarray) -> np.ndarray:
    """Internal format -> DeepLesion ``Bounding_boxes`` (1-based inclusive ``x1, y1, x2, y2``)."""
    return internal_to_inclusive_xyxy(boxes) + 1.0


def volume_box_to_internal(boxes_xyzxyz: np.ndarray) -> np.ndarray:
    """Released 1K-set 3D box ``[x1, y1, z1, x2, y2, z2]`` (inclusive) -> ``[z1, y1, x1, z2, y2, x2]``."""
    b = np.asarray(boxes_xyzxyz, dtype=np.float64)
    return np.stack(
        [b[..., 2], b[..., 1], b[..., 0], b[..., 5] + 1.0, b[..., 4] + 1.0, b[..., 3] + 1.0], axis=-1
    )


def internal_to_volume_box(boxes_zyxzyx: np.ndarray) -> np.ndarray:
    """Internal 3D box ``[z1, y1, x1, z2, y2, x2]`` -> released ``[x1, y1, z1, x2, y2, z2]`` (inclusive)."""
    b = np.asarray(boxes_zyxzyx, dtype=np.float64)
    return np.stack(
        [b[..., 2], b[..., 1], b[..., 0], b[..., 5] - 1.0, b[..., 4] - 1.0, b[..., 3] - 1.0], axis=-1
    )
