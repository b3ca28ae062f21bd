"""The records that pass between the raw-format readers, preprocessing and the dataset builders.

Readers (``data_prep.readers.<dataset>``) turn raw files into :class:`Volume` + annotations;
preprocessing turns them into :class:`Case` objects (resampled int16 HU slices at 0.8 mm x 2 mm with
annotations in the internal box format of :mod:`uld_jax.core`); builders write Cases into the slice
store and the sample table. Nothing here knows whether files came from a real release or from the
synthetic world.

Coordinate conventions
----------------------
* numpy arrays are indexed ``[z, y, x]`` (slice, row, column).
* ``Volume.origin`` / ``Volume.direction`` / spacing are SimpleITK's (LPS world, index order x, y, z);
  :meth:`Volume.index_to_world` maps a continuous ``(z, y, x)`` array index to world mm ``(x, y, z)``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np

from uld_jax.core import Provenance


@dataclasses.dataclass
class Volume:
    """A CT scan in Hounsfield units as read from disk.

    Attributes:
      hu: [Z, Y, X] HU voxels (int16 or float32).
      spacing_zyx: voxel size in mm, (z, y, x).
      origin_xyz: world position (mm, LPS) of voxel index (0, 0, 0), SimpleITK order (x, y, z).
      direction: [3, 3] direction cosines, SimpleITK convention (column j = world direction of index
        axis j, axes in x, y, z order).
      source: the file or folder it was read from (for error messages and provenance).
    """

    hu: np.ndarray
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    source: str = ""

    def index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """[..., 3] continuous (z, y, x) voxel indices -> [..., 3] world mm (x, y, z)."""
        zyx = np.asarray(zyx, dtype=np.float64)
        ijk = zyx[..., ::-1] * np.asarray(self.spacing_zyx[::-1], dtype=np.float64)
        return ijk @ np.asarray(self.direction, dtype=np.float64).T + np.asarray(self.origin_xyz)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """[..., 3] world mm (x, y, z) -> [..., 3] continuous (z, y, x) voxel indices."""
        xyz = np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin_xyz)
        ijk = xyz @ np.linalg.inv(np.asarray(self.direction, dtype=np.float64)).T
        ijk = ijk / np.asarray(self.spacing_zyx[::-1], dtype=np.float64)
        return ijk[..., ::-1]


@dataclasses.dataclass
class Lesion2D:
    """One annotation on one preprocessed slice of a Case.

    Attributes:
      slice_index: index into ``Case.slices``.
      box: [4] internal box ``[y1, x1, y2, x2]`` in pixels of the preprocessed slice.
      mask: [H, W] bool mask on the preprocessed slice (weak: RECIST ellipse / sphere section), or
        None when only the box is known.
      provenance: :class:`uld_jax.core.Provenance`.
      lesion_type: DeepLesion coarse type code, -1 unknown.
      lesion_id: identity of the lesion across the patient's studies, -1 unknown.
      organ_target: [3] targets for gate weights w1..w3 (lung, liver, lymph node) in [0, 1].
      organ_valid: [3] bool, False where the target is unknown.
      recist: [4, 2] RECIST endpoints (long axis then short axis, (x, y)) in preprocessed pixels,
        or None.
    """

    slice_index: int
    box: np.ndarray
    mask: np.ndarray | None = None
    provenance: int = int(Provenance.ORIGINAL)
    lesion_type: int = -1
    lesion_id: int = -1
    organ_target: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3, np.float32))
    organ_valid: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3, bool))
    recist: np.ndarray | None = None


@dataclasses.dataclass
class Case:
    """One preprocessed volume (a DeepLesion sub-volume, a LUNA16/LiTS scan, an NIH-LN series).

    Attributes:
      dataset: one of uld_jax.core.DATASETS.
      case_id: unique within the dataset (DeepLesion ``PPPPPP_SS_RR``, LUNA16 seriesuid, ...).
      patient_id, study_id, series_id: identifiers for patient-level splits and MAM grouping.
      split: 'train', 'val' or 'test'.
      slices: [Z, H, W] int16 HU, resampled to ``pixel_mm`` in-plane and ``slice_mm`` apart, black
        borders clipped.
      z_mm: [Z] z position of each slice in mm (patient axis, increasing with the slice index).
      pixel_mm: in-plane pixel size of ``slices`` (mm).
      slice_mm: distance between consecutive slices (mm).
      lesions: annotations on the preprocessed slices.
      sample_slices: indices of the slices that are training/evaluation samples (key slices of
        DeepLesion; lesion slices and lesion-free candidates of single-type sets).
      key_slices: subset of ``sample_slices`` that are DeepLesion key slices.
      source_crop_yx: (y0, x0) of the crop in the source slice grid before resampling (provenance).
      source: where it came from (file/folder), for error messages and provenance.
    """

    dataset: str
    case_id: str
    patient_id: str
    study_id: str
    series_id: str
    split: str
    slices: np.ndarray
    z_mm: np.ndarray
    pixel_mm: float
    slice_mm: float
    lesions: list[Lesion2D]
    sample_slices: np.ndarray
    key_slices: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    source_crop_yx: tuple[int, int] = (0, 0)
    source: str = ""


class BadItem(Exception):
    """A raw input item that cannot be used. ``str()`` names the file/row and the problem."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class CaseReader(Protocol):
    """What each ``data_prep.readers.<dataset>`` module provides to the builders."""

    def iter_cases(self, raw_root: str, *, skip_bad: bool = False,
                   bad_items: list[BadItem] | None = None,
                   pixel_mm: float = 0.8, slice_mm: float = 2.0) -> Iterator[Case]:
        """Yields the dataset's preprocessed Cases. Raises BadItem, or with ``skip_bad`` appends
        it to ``bad_items`` and continues.

        ``pixel_mm`` / ``slice_mm``: the in-plane pixel size and slice distance (mm) the Cases are
        resampled to (``data_prep.build --pixel-mm/--slice-mm``; defaults: the paper's 0.8 / 2.0).
        The builder passes both by keyword and calls ``iter_cases`` once per build, so the order
        of the yielded Cases should be deterministic (sorted inputs) for a resumed build to skip
        the Cases it already wrote."""
        ...
