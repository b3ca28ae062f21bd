"""Synthetic batches in the pipeline's shapes (``core.Keys``), for model tests and benchmarks.

Each slice shows a dim textured background and bright elliptical "lesions" whose 3D extent spans the
central slices; their boxes, masks, organ targets and ids are returned as ground truth.
"""

from __future__ import annotations

import numpy as np

from uld_jax.core import NUM_CONTEXT_SLICES, PIXEL_MEAN, Keys, Provenance
from uld_jax.input_pipeline import MASK_CROP, resize_mask


def synthetic_batch(batch_size: int, image_size: int, max_boxes: int = 4, num_ignore: int = 2,
                    num_datasets: int = 4, boxes_per_image=None, dataset_ids=None, seed: int = 0,
                    lesion_sizes=(12.0, 28.0), mask_crop: int = MASK_CROP) -> dict[str, np.ndarray]:
    """A batch dict (numpy) with every training key, masks as the pipeline's ``mask_crop`` x
    ``mask_crop`` crops over their boxes (the image stays float32; the model takes either).

    ``boxes_per_image``: [B] number of valid lesions per sample (default: random in 0..max_boxes,
    at least 1 for the first sample); ``dataset_ids``: [B] (default: ``i % num_datasets``).
    Lesion diameters are drawn uniformly from ``lesion_sizes`` (pixels).
    """
    rng = np.random.default_rng(seed)
    b, s, g = batch_size, image_size, max_boxes
    if boxes_per_image is None:
        boxes_per_image = rng.integers(0, max_boxes + 1, size=b)
        boxes_per_image[0] = max(boxes_per_image[0], 1)
    if dataset_ids is None:
        dataset_ids = np.arange(b) % num_datasets
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    image = rng.normal(0.0, 8.0, size=(b, s, s, NUM_CONTEXT_SLICES)).astype(np.float32) + 40.0
    boxes = np.zeros((b, g, 4), np.float32)
    valid = np.zeros((b, g), bool)
    masks = np.zeros((b, g, mask_crop, mask_crop), np.uint8)
    for i in range(b):
        for j in range(int(boxes_per_image[i])):
            d = rng.uniform(*lesion_sizes, size=2)
            cy, cx = rng.uniform(d.max() / 2 + 2, s - d.max() / 2 - 2, size=2)
            ell = ((yy - cy) / (d[0] / 2)) ** 2 + ((xx - cx) / (d[1] / 2)) ** 2 <= 1.0
            for z in range(NUM_CONTEXT_SLICES):
                # shrinking cross-sections away from the central slice (a 3D blob)
                f = 1.0 - abs(z - NUM_CONTEXT_SLICES // 2) / (NUM_CONTEXT_SLICES)
                ez = ((yy - cy) / (f * d[0] / 2)) ** 2 + ((xx - cx) / (f * d[1] / 2)) ** 2 <= 1.0
                image[i, ..., z] += 150.0 * ez
            rows, cols = np.nonzero(ell)
            boxes[i, j] = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
            masks[i, j] = resize_mask(ell[rows.min():rows.max() + 1, cols.min():cols.max() + 1],
                                      mask_crop)
            valid[i, j] = True
    image -= PIXEL_MEAN
    organ_t = rng.uniform(size=(b, g, 3)).astype(np.float32)
    organ_v = rng.uniform(size=(b, g, 3)) < 0.5
    ign = np.zeros((b, num_ignore, 4), np.float32)
    return {
        Keys.IMAGE: image,
        Keys.IMAGE_VALID: np.ones((b, s, s), bool),
        Keys.DATASET_ID: np.asarray(dataset_ids, np.int32),
        Keys.BOXES: boxes,
        Keys.BOX_VALID: valid,
        Keys.MASKS: masks,
        Keys.MASK_BOXES: boxes.copy(),
        Keys.PROVENANCE: np.full((b, g), int(Provenance.ORIGINAL), np.int32),
        Keys.LESION_TYPE: np.where(valid, rng.integers(1, 9, size=(b, g)), -1).astype(np.int32),
        Keys.LESION_ID: np.where(valid, rng.integers(0, 3, size=(b, g)), -1).astype(np.int32),
        Keys.ORGAN_TARGET: organ_t,
        Keys.ORGAN_VALID: organ_v & valid[..., None],
        Keys.IGNORE_BOXES: ign,
        Keys.IGNORE_VALID: np.zeros((b, num_ignore), bool),
        Keys.SAMPLE_ID: np.arange(b, dtype=np.int32),
        Keys.IS_KEY_SLICE: np.ones((b,), bool),
        Keys.PIXEL_MM: np.full((b,), 0.8, np.float32),
    }
