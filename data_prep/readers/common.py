"""Helpers shared by the dataset readers: bad-item handling, safe paths, volume checks, Case assembly."""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Iterable, Iterator, TypeVar

import numpy as np
from scipy import ndimage

from data_prep import preprocess
from data_prep.types import BadItem, Case, Lesion2D, Volume

T = TypeVar("T")


def report_bad(bad: BadItem, skip_bad: bool, bad_items: list[BadItem] | None) -> None:
    """Raises ``bad`` unless ``skip_bad``; with ``skip_bad`` appends it to ``bad_items``."""
    if not skip_bad:
        raise bad
    if bad_items is not None:
        bad_items.append(bad)


def progress(items: Iterable[T], desc: str, total: int | None = None, enable: bool | None = None) -> Iterator[T]:
    """A tqdm progress bar on stderr (disabled when stderr is not a terminal unless ``enable``)."""
    from tqdm import tqdm

    if enable is None:
        enable = sys.stderr.isatty()
    return iter(tqdm(items, desc=desc, total=total, disable=not enable, unit="item", file=sys.stderr))


def safe_join(root: str | os.PathLike, rel: str, where: str) -> pathlib.Path:
    """``root / rel`` after checking that ``rel`` (from a CSV) stays inside ``root``.

    Absolute paths, ``..`` components, drive letters and backslashes are refused with a BadItem
    naming ``where`` (file and row). Symlinks inside the root are allowed (data on another disk).
    """
    if not rel or rel.strip() != rel:
        raise BadItem(where, f"empty or padded file name {rel!r}")
    if "\\" in rel or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":") or "\x00" in rel:
        raise BadItem(where, f"file name {rel!r} would escape the data root")
    parts = pathlib.PurePosixPath(rel).parts
    if any(p in ("..", ".") for p in parts):
        raise BadItem(where, f"file name {rel!r} would escape the data root")
    root_abs = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(root_abs, rel))
    if os.path.commonpath([root_abs, full]) != root_abs:
        raise BadItem(where, f"file name {rel!r} would escape the data root")
    return pathlib.Path(full)


def check_hu_array(hu: np.ndarray, source: str) -> None:
    """Raises BadItem for NaN/inf voxels or values that cannot be CT Hounsfield units."""
    if np.issubdtype(hu.dtype, np.floating):
        bad = ~np.isfinite(hu)
        if bad.any():
            z = int(np.argwhere(bad)[0][0])
            raise BadItem(source, f"{int(bad.sum())} NaN/inf voxels (first in slice {z})")
    if hu.size == 0:
        raise BadItem(source, "empty image")


def as_hu_dtype(hu: np.ndarray) -> np.ndarray:
    """int16 when the values fit exactly, else float32."""
    if hu.dtype == np.int16:
        return hu
    if np.issubdtype(hu.dtype, np.integer) or np.all(np.mod(hu, 1) == 0):
        lo, hi = hu.min(), hu.max()
        if lo >= -32768 and hi <= 32767:
            return hu.astype(np.int16)
    return hu.astype(np.float32)


def check_volume_geometry(vol: Volume) -> None:
    """Raises BadItem for non-positive/non-finite spacing or a degenerate direction matrix."""
    sp = np.asarray(vol.spacing_zyx, np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise BadItem(vol.source, f"invalid voxel spacing {tuple(sp.tolist())} mm")
    d = np.asarray(vol.direction, np.float64)
    if d.shape != (3, 3) or not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise BadItem(vol.source, f"direction matrix is not orthonormal: {d.tolist()}")


def canonicalize(vol: Volume, *labels: np.ndarray) -> tuple[Volume, list[np.ndarray]]:
    """Reorients a volume (and label arrays on its grid) to the canonical axial orientation.

    Canonical: index axes follow world x, y, z of LPS positively (columns from the patient's right
    to left, rows from anterior to posterior, slices from inferior to superior), decided from the
    volume's own direction matrix (no fixed flips). Raises BadItem for oblique geometry.
    """
    try:
        src_axis, flip = preprocess.canonical_axes(vol.direction)
        shape, sp, origin, direction = preprocess.canonical_geometry(
            vol.hu.shape, vol.spacing_zyx, vol.origin_xyz, vol.direction)
    except ValueError as e:
        raise BadItem(vol.source, str(e)) from None
    out = Volume(hu=preprocess.reorient_array(vol.hu, src_axis, flip), spacing_zyx=sp, origin_xyz=origin,
                 direction=direction, source=vol.source)
    assert out.hu.shape == tuple(shape)
    return out, [preprocess.reorient_array(l, src_axis, flip) for l in labels]


def plan_for_volume(vol: Volume, *, pixel_mm: float, slice_mm: float, max_side: int | None,
                    crop: tuple[int, int, int, int] | None = None) -> preprocess.Resampling:
    """Plan for a canonical volume: body crop, ``pixel_mm`` pixels, ``slice_mm`` slices.

    Slice positions are ``origin_z + k * spacing_z`` (mm): world z (LPS) of an axis-aligned scan.
    """
    zs = vol.origin_xyz[2] + vol.spacing_zyx[0] * np.arange(vol.hu.shape[0], dtype=np.float64)
    if crop is None:
        crop = preprocess.body_crop(vol.hu)
    return preprocess.plan_resampling(vol.hu.shape[1:], vol.spacing_zyx[1:], zs, crop, pixel_mm=pixel_mm,
                                      slice_mm=slice_mm, max_side=max_side)


def label_volume_sections(vol: Volume, labels: np.ndarray, plan: preprocess.Resampling, *,
                          with_masks: bool = True):
    """Per-slice boxes/masks of every label of a canonical label volume after resampling.

    ``labels``: [Z, Y, X] int labels on ``vol``'s (canonical) grid. Returns the list of
    :func:`preprocess.label_sections` (label, slice_index, box, mask). A label too small to survive
    the nearest-neighbour resampling (thinner than the output slice distance or pixel) is not
    dropped silently: it is placed on the output slice nearest to its centre with the box of its
    source extent mapped through the plan and no mask.
    """
    out = preprocess.label_sections(preprocess.resample_labels(labels, plan), with_masks=with_masks)
    present = {s[0] for s in out}
    for label, o in enumerate(ndimage.find_objects(labels), start=1):
        if o is None or label in present:
            continue
        zc = 0.5 * (o[0].start + o[0].stop - 1)
        k = plan.nearest_slice(slice_z_of_index(vol, zc))
        box = plan.clip_box(plan.map_boxes([o[1].start, o[2].start, o[1].stop, o[2].stop]))
        if box[2] > box[0] and box[3] > box[1]:
            out.append((label, k, box, None))
    out.sort(key=lambda t: (t[0], t[1]))
    return out


def slice_z_of_index(vol: Volume, zi: float) -> float:
    """Position (mm, as in :func:`plan_for_volume`) of continuous slice index ``zi``."""
    return vol.origin_xyz[2] + vol.spacing_zyx[0] * zi


def world_to_output(vol: Volume, plan: preprocess.Resampling, xyz_mm) -> tuple[np.ndarray, float]:
    """World point (x, y, z) mm -> (output continuous (y, x) pixels, slice position mm).

    Uses the canonical volume's full geometry (origin, spacing, direction).
    """
    zyx = vol.world_to_index(np.asarray(xyz_mm, np.float64))
    yx_src = zyx[1:] + 0.5  # voxel index (centre = integer) -> continuous pixel coordinate
    return plan.map_points_yx(yx_src), slice_z_of_index(vol, float(zyx[0]))


def output_to_world(vol: Volume, plan: preprocess.Resampling, slice_index, yx) -> np.ndarray:
    """Inverse of :func:`world_to_output`: a point on a preprocessed slice -> world mm (x, y, z).

    ``vol``: the canonical volume the plan was made for; ``slice_index``: [...] (may be fractional,
    in output slices); ``yx``: [..., 2] output continuous pixels. Returns [..., 3] world mm (LPS).
    """
    k = np.asarray(slice_index, np.float64)
    z_mm = plan.out_z[0] + k * plan.slice_mm
    zi = (z_mm - vol.origin_xyz[2]) / vol.spacing_zyx[0]
    src = plan.unmap_points_yx(yx) - 0.5   # continuous pixel coordinate -> voxel index
    zyx = np.concatenate([zi[..., None], src], axis=-1)
    return vol.index_to_world(zyx)


def preprocess_scan(vol: Volume, *, pixel_mm: float = 0.8, slice_mm: float = 2.0,
                    max_side: int | None = 512) -> tuple[Volume, preprocess.Resampling, np.ndarray]:
    """A scan as read (e.g. :func:`data_prep.readers.scan.read_scan`) -> (canonical volume, plan,
    [Z, H, W] int16 preprocessed slices), the same preprocessing the dataset readers apply; use
    :func:`output_to_world` to map detections back to world mm."""
    cvol, _ = canonicalize(vol)
    plan = plan_for_volume(cvol, pixel_mm=pixel_mm, slice_mm=slice_mm, max_side=max_side)
    return cvol, plan, preprocess.resample_volume(cvol.hu, plan)


def organ_target(dataset_organ: str) -> tuple[np.ndarray, np.ndarray]:
    """Hard organ target of a single-type dataset's lesion: one-hot over (lung, liver, lymph node),
    all valid (a lung nodule is known not to be a liver tumour or a lymph node)."""
    order = ("lung", "liver", "lymph_node")
    t = np.array([1.0 if o == dataset_organ else 0.0 for o in order], np.float32)
    return t, np.ones(3, bool)


def make_case(*, dataset: str, case_id: str, patient_id: str, study_id: str, series_id: str, split: str,
              slices: np.ndarray, plan: preprocess.Resampling, lesions: list[Lesion2D],
              sample_slices, key_slices=(), source: str = "") -> Case:
    """Assembles a Case from preprocessed slices and a plan."""
    return Case(dataset=dataset, case_id=case_id, patient_id=patient_id, study_id=study_id,
                series_id=series_id, split=split, slices=slices, z_mm=np.asarray(plan.out_z, np.float64),
                pixel_mm=float(plan.pixel_mm), slice_mm=float(plan.slice_mm), lesions=lesions,
                sample_slices=np.asarray(sorted(set(int(s) for s in sample_slices)), np.int64),
                key_slices=np.asarray(sorted(set(int(s) for s in key_slices)), np.int64),
                source_crop_yx=(int(plan.crop_yx[0]), int(plan.crop_yx[1])), source=source)
