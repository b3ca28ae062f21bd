"""LiTS reader: ``volume-N.nii`` + ``segmentation-N.nii`` (docs/formats.md, LiTS section).

Labels: 0 background, 1 liver, 2 tumour. Orientation is normalised from each file's own
affine (SimpleITK's LPS direction): the volume and its segmentation are permuted/flipped to the
canonical axial orientation (columns right->left, rows anterior->posterior, slices
inferior->superior), never by a fixed flip. Tumours are the 3D connected components (26-connected)
of label 2; after resampling each component gives one Lesion2D per slice it appears on (its exact
mask on that slice and the box around it; a component too small to survive the resampling is kept
on its nearest slice with its mapped box and no mask).
"""

from __future__ import annotations

import pathlib
import re
from typing import Iterator

import numpy as np
from scipy import ndimage

from data_prep import preprocess
from data_prep.readers import scan
from data_prep.readers.common import (canonicalize, label_volume_sections, make_case, organ_target, plan_for_volume,
                                      progress, report_bad)
from data_prep.types import BadItem, Case, Lesion2D, Volume
from uld_jax.core import MAX_IMAGE_SIDE, Provenance, TARGET_PIXEL_MM, TARGET_SLICE_MM

FOLDER = "LiTS"
TUMOUR_LABEL = 2
_VOL_RE = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")


def _dataset_dir(raw_root) -> pathlib.Path:
    root = pathlib.Path(raw_root)
    return root / FOLDER if (root / FOLDER).is_dir() else root


def find_pairs(raw_root) -> list[tuple[int, pathlib.Path, pathlib.Path]]:
    """[(N, volume path, segmentation path)] sorted by N; the segmentation path may not exist."""
    d = _dataset_dir(raw_root)
    out = []
    for p in d.rglob("volume-*.nii*"):
        m = _VOL_RE.match(p.name)
        if not m:
            continue
        n = int(m.group(1))
        seg = p.parent / f"segmentation-{m.group(1)}.nii{m.group(2) or ''}"
        if not seg.exists():  # the segmentations may sit in another folder of the download
            cands = sorted(d.rglob(f"segmentation-{m.group(1)}.nii*"))
            seg = cands[0] if cands else seg
        out.append((n, p, seg))
    return sorted(out, key=lambda t: t[0])


def same_geometry(a: Volume, b: Volume, *, atol_mm: float = 1e-2) -> str | None:
    """None when two volumes share size, spacing, origin and direction; else a description."""
    if a.hu.shape != b.hu.shape:
        return f"size {b.hu.shape[::-1]} differs from {a.hu.shape[::-1]} (x, y, z)"
    if not np.allclose(a.spacing_zyx, b.spacing_zyx, atol=1e-3 * max(a.spacing_zyx)):
        return f"spacing {b.spacing_zyx[::-1]} differs from {a.spacing_zyx[::-1]} mm (x, y, z)"
    if not np.allclose(a.origin_xyz, b.origin_xyz, atol=max(atol_mm, 0.01 * max(a.spacing_zyx))):
        return f"origin {b.origin_xyz} differs from {a.origin_xyz} mm"
    if not np.allclose(a.direction, b.direction, atol=1e-3):
        return f"direction {np.round(b.direction, 3).tolist()} differs from {np.round(a.direction, 3).tolist()}"
    return None


def read_pair(vol_path, seg_path) -> tuple[Volume, np.ndarray]:
    """Reads a LiTS volume and its segmentation; checks geometry and labels. Returns (Volume, seg
    [Z, Y, X] uint8) on the volume's grid as stored (not yet reoriented)."""
    vol = scan.sitk_to_volume(scan.read_image_file(vol_path), str(vol_path))
    scan.check_ct_values(vol)
    if not pathlib.Path(seg_path).exists():
        raise BadItem(str(seg_path), f"segmentation of {vol_path} missing")
    seg = scan.sitk_to_volume(scan.read_image_file(seg_path), str(seg_path), labels=True)
    diff = same_geometry(vol, seg)
    if diff:
        raise BadItem(str(seg_path), f"geometry does not match the volume {vol_path}: {diff}")
    labels = np.unique(seg.hu)
    if labels.min() < 0 or labels.max() > TUMOUR_LABEL:
        raise BadItem(str(seg_path), f"labels {labels.tolist()[:10]} outside 0 (background), 1 (liver), 2 (tumour)")
    return vol, seg.hu.astype(np.uint8)


def tumour_components(seg: np.ndarray) -> tuple[np.ndarray, int]:
    """[Z, Y, X] segmentation -> (int32 component labels 1..n of the tumour voxels, n), 26-connected."""
    return ndimage.label(seg == TUMOUR_LABEL, structure=np.ones((3, 3, 3), bool))


def case_from_pair(vol: Volume, seg: np.ndarray, case_num: int, *, pixel_mm: float, slice_mm: float,
                   max_side: int | None, with_masks: bool = True) -> Case:
    """A LiTS volume + segmentation (as read) -> Case.

    Lesions: one per (tumour component, output slice) with the component's exact mask on that slice
    and its box; lesion_id = component index (0-based, components numbered in scan order of the
    canonical volume); organ target liver. ``sample_slices`` = every slice.
    """
    # Components of the canonical segmentation: numbered in canonical scan order, so lesion ids do
    # not depend on how the file was oriented (connectivity is symmetric under flips/permutations).
    cvol, (cseg,) = canonicalize(vol, seg)
    ccomps, _ = tumour_components(cseg)
    plan = plan_for_volume(cvol, pixel_mm=pixel_mm, slice_mm=slice_mm, max_side=max_side)
    slices = preprocess.resample_volume(cvol.hu, plan)
    target, valid = organ_target("liver")
    lesions = [Lesion2D(slice_index=z, box=box.astype(np.float32), mask=mask, provenance=int(Provenance.ORIGINAL),
                        lesion_id=label - 1, organ_target=target, organ_valid=valid)
               for label, z, box, mask in label_volume_sections(cvol, ccomps, plan, with_masks=with_masks)]
    pid = str(case_num)
    return make_case(dataset="lits", case_id=f"volume-{case_num}", patient_id=pid, study_id=pid, series_id=pid,
                     split=preprocess.patient_split(f"lits:{pid}"), slices=slices, plan=plan, lesions=lesions,
                     sample_slices=range(slices.shape[0]), source=vol.source)


def iter_cases(raw_root, *, skip_bad: bool = False, bad_items: list[BadItem] | None = None,
               pixel_mm: float = TARGET_PIXEL_MM, slice_mm: float = TARGET_SLICE_MM,
               max_side: int | None = MAX_IMAGE_SIDE, show_progress: bool | None = None) -> Iterator[Case]:
    """Yields one Case per LiTS volume (see :func:`case_from_pair`)."""
    pairs = find_pairs(raw_root)
    for n, vp, sp in progress(pairs, "LiTS volumes", enable=show_progress):
        try:
            vol, seg = read_pair(vp, sp)
            yield case_from_pair(vol, seg, n, pixel_mm=pixel_mm, slice_mm=slice_mm, max_side=max_side)
        except BadItem as e:
            report_bad(e, skip_bad, bad_items)


def check(raw_root, *, show_progress: bool | None = None) -> list[BadItem]:
    """Every problem of a raw LiTS folder: unreadable files, missing segmentations, geometry or label
    mismatches, NaN voxels, orientations that cannot be made axial."""
    bad: list[BadItem] = []
    pairs = find_pairs(raw_root)
    if not pairs:
        bad.append(BadItem(str(_dataset_dir(raw_root)), "no volume-N.nii files found"))
    for n, vp, sp in progress(pairs, "LiTS volumes", enable=show_progress):
        try:
            vol, seg = read_pair(vp, sp)
            canonicalize(vol)
        except BadItem as e:
            bad.append(e)
    return bad
