"""Preprocessed :class:`data_prep.types.Case` objects with known content, for tests and benchmarks.

The voxels make every check independent of the pipeline: slice ``z`` of case ``k`` has background
HU ``slice_hu(k, z)`` (so a loaded context channel reveals which slice it came from) and every lesion
is a rectangle of HU ``LESION_HU`` exactly covering its box (so a loaded box can be checked
against the loaded pixels). Optional noise makes compression ratios realistic for benchmarks.
"""

from __future__ import annotations

import numpy as np

from data_prep.types import Case, Lesion2D
from uld_jax.core import DATASET_ORGAN, GATED_ORGANS, Provenance

LESION_HU = 1500


def slice_hu(case_number: int, z: int) -> int:
    """Background HU of slice ``z`` of the ``case_number``-th case (distinct per slice)."""
    return -900 + 25 * z + 7 * case_number


def make_case(dataset: str, case_number: int, *, num_slices: int = 12, height: int = 48,
              width: int = 40, split: str = "train", lesion_slices=(5,), boxes=None,
              negatives=(1,), key_slices=None, pixel_mm: float = 0.8, slice_mm: float = 2.0,
              noise_hu: float = 0.0, patient: str | None = None, ignore_boxes=(),
              seed: int = 0) -> Case:
    """A Case of ``num_slices`` [height, width] slices with rectangular lesions.

    ``boxes``: one internal box ``[y1, x1, y2, x2]`` (integers: exactly the lesion's pixels) per entry
    of ``lesion_slices``; default: a box derived from the case number. ``negatives``: lesion-free
    sample slices. ``ignore_boxes``: (slice, box) pairs stored with Provenance.IGNORE.
    """
    rng = np.random.default_rng(seed * 1000 + case_number)
    hu = np.empty((num_slices, height, width), np.int16)
    for z in range(num_slices):
        hu[z] = slice_hu(case_number, z)
    if noise_hu:
        hu += np.clip(rng.normal(0, noise_hu, hu.shape), -3 * noise_hu, 3 * noise_hu).astype(np.int16)
    lesions = []
    organ = DATASET_ORGAN.get(dataset)
    for i, z in enumerate(lesion_slices):
        if boxes is not None:
            box = np.asarray(boxes[i], np.float32)
        else:
            y1 = 4 + (3 * case_number + 5 * i) % max(1, height // 2)
            x1 = 3 + (2 * case_number + 7 * i) % max(1, width // 2)
            box = np.asarray([y1, x1, min(height, y1 + 6 + i), min(width, x1 + 8)], np.float32)
        y1, x1, y2, x2 = (int(v) for v in box)
        hu[z, y1:y2, x1:x2] = LESION_HU
        mask = np.zeros((height, width), bool)
        mask[y1:y2, x1:x2] = True
        target = np.zeros(3, np.float32)
        valid = np.zeros(3, bool)
        if organ is not None:
            target[GATED_ORGANS.index(organ)] = 1.0
            valid[:] = True
        lesions.append(Lesion2D(slice_index=int(z), box=box, mask=mask, lesion_type=-1,
                                lesion_id=case_number * 100 + i, organ_target=target, organ_valid=valid))
    for z, box in ignore_boxes:
        lesions.append(Lesion2D(slice_index=int(z), box=np.asarray(box, np.float32),
                                provenance=int(Provenance.IGNORE)))
    samples = sorted(set(int(z) for z in lesion_slices) | set(int(z) for z in negatives)
                     | set(int(z) for z, _ in ignore_boxes))
    if key_slices is None:
        key_slices = list(lesion_slices) if dataset == "deeplesion" else []
    return Case(
        dataset=dataset, case_id=f"{dataset}_case{case_number:04d}",
        patient_id=patient or f"p{case_number // 2:04d}", study_id=f"s{case_number:04d}",
        series_id=f"r{case_number:04d}", split=split, slices=hu,
        z_mm=(np.arange(num_slices) * slice_mm + 100.0).astype(np.float64), pixel_mm=pixel_mm,
        slice_mm=slice_mm, lesions=lesions, sample_slices=np.asarray(samples, np.int64),
        key_slices=np.asarray(sorted(key_slices), np.int64), source=f"synthetic://{dataset}/{case_number}")


class ListReader:
    """A reader over a fixed list of Cases / BadItems (the ``iter_cases`` contract of the readers)."""

    def __init__(self, items):
        self.items = list(items)

    def iter_cases(self, raw_root, *, skip_bad=False, bad_items=None, pixel_mm=0.8, slice_mm=2.0):
        from data_prep.types import BadItem  # pylint: disable=g-import-not-at-top
        for it in self.items:
            if isinstance(it, BadItem):
                if not skip_bad:
                    raise it
                if bad_items is not None:
                    bad_items.append(it)
                continue
            yield it
