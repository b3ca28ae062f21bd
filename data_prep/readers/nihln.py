"""NIH-LN (TCIA "CT Lymph Nodes") reader (docs/formats.md, NIH-LN section).

Layout under ``<raw>/NIH-LN/``:
``<ID>/<study>/<series>/NNNNNN.dcm`` (one CT series per ID),
``MED_ABD_LYMPH_ANNOTATIONS/<ID>/<ID>_lymphnodes_{indices,physicalPoints,sizes}.txt`` and
``MED_ABD_LYMPH_MASKS/<ID>/<ID>_mask.nii.gz`` (label k = node on line k).

Nodes are placed by their physical points (world mm, LPS) through the series' geometry; the voxel
indices (0-based, SimpleITK order) are cross-checked against them, so a list that disagrees with
its series is reported instead of silently mislabelling. Where the mask has a node's label the
lesion slices, masks and boxes come from the mask; otherwise from a sphere of the node's
equal-area diameter ``sqrt(short * long)``.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Iterator

import numpy as np

from data_prep import preprocess
from data_prep.readers import scan
from data_prep.readers.common import (canonicalize, label_volume_sections, make_case, organ_target, plan_for_volume, progress,
                                      report_bad, world_to_output)
from data_prep.readers.lits import same_geometry
from data_prep.types import BadItem, Case, Lesion2D, Volume
from uld_jax.core import MAX_IMAGE_SIDE, Provenance, TARGET_PIXEL_MM, TARGET_SLICE_MM

FOLDER = "NIH-LN"
ANNOTATIONS = "MED_ABD_LYMPH_ANNOTATIONS"
MASKS = "MED_ABD_LYMPH_MASKS"
_ID_RE = re.compile(r"^(ABD|MED)_LYMPH_\d{3}$")


@dataclasses.dataclass(frozen=True)
class Node:
    """One annotated lymph node: 1-based ``number`` (line; label in the mask), ``index_ijk`` voxel
    indices (x, y, z), ``point_xyz`` world mm, ``short_mm``/``long_mm`` axes."""

    number: int
    index_ijk: tuple[float, float, float]
    point_xyz: tuple[float, float, float]
    short_mm: float
    long_mm: float


def _dataset_dir(raw_root) -> pathlib.Path:
    root = pathlib.Path(raw_root)
    return root / FOLDER if (root / FOLDER).is_dir() else root


def find_patients(raw_root) -> list[str]:
    """Patient IDs (``ABD_LYMPH_NNN``/``MED_LYMPH_NNN``) that have an image folder, sorted."""
    d = _dataset_dir(raw_root)
    return sorted(p.name for p in d.iterdir() if p.is_dir() and _ID_RE.match(p.name)) if d.is_dir() else []


def series_folder(raw_root, pid: str) -> pathlib.Path:
    """The one folder under ``<ID>/`` holding DICOM files (BadItem when none or several)."""
    base = _dataset_dir(raw_root) / pid
    folders = sorted({p.parent for p in base.rglob("*.dcm")})
    if not folders:
        raise BadItem(str(base), "no DICOM (.dcm) files found")
    if len(folders) > 1:
        raise BadItem(str(base), f"{len(folders)} DICOM series folders ({', '.join(str(f) for f in folders[:3])}); "
                                 "expected one")
    return folders[0]


def _read_numbers(path: pathlib.Path, n: int) -> list[tuple[float, ...]]:
    if not path.is_file():
        raise BadItem(str(path), "node list missing")
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.replace(",", " ").split()
            try:
                vals = tuple(float(v) for v in parts)
            except ValueError:
                raise BadItem(f"{path} line {line_no}", f"not numbers: {text!r}") from None
            if len(vals) != n or not all(math.isfinite(v) for v in vals):
                raise BadItem(f"{path} line {line_no}", f"expected {n} finite numbers, got {text!r}")
            rows.append(vals)
    return rows


def read_nodes(raw_root, pid: str) -> list[Node]:
    """The three node lists of a patient, checked for equal length and positive sizes."""
    d = _dataset_dir(raw_root) / ANNOTATIONS / pid
    idx = _read_numbers(d / f"{pid}_lymphnodes_indices.txt", 3)
    pts = _read_numbers(d / f"{pid}_lymphnodes_physicalPoints.txt", 3)
    sizes = _read_numbers(d / f"{pid}_lymphnodes_sizes.txt", 2)
    if not (len(idx) == len(pts) == len(sizes)):
        raise BadItem(str(d), f"node lists of {pid} differ in length: {len(idx)} indices, {len(pts)} physical "
                              f"points, {len(sizes)} sizes")
    nodes = []
    for k, (i, p, s) in enumerate(zip(idx, pts, sizes), start=1):
        if min(s) <= 0:
            raise BadItem(f"{d / f'{pid}_lymphnodes_sizes.txt'} line {k}", f"non-positive node size {s}")
        nodes.append(Node(k, i, p, min(s), max(s)))
    return nodes


def read_mask(raw_root, pid: str, vol: Volume) -> np.ndarray | None:
    """The patient's node label mask [Z, Y, X] on the series' grid (as read), or None if absent."""
    d = _dataset_dir(raw_root) / MASKS / pid
    cands = sorted(d.glob(f"{pid}_mask.nii*")) if d.is_dir() else []
    if not cands:
        return None
    m = scan.sitk_to_volume(scan.read_image_file(cands[0]), str(cands[0]), labels=True)
    diff = same_geometry(vol, m, atol_mm=0.05)
    if diff:
        raise BadItem(str(cands[0]), f"mask geometry does not match the series {vol.source}: {diff}")
    if m.hu.min() < 0:
        raise BadItem(str(cands[0]), "negative labels in the node mask")
    return m.hu.astype(np.int32)


def check_nodes(vol: Volume, nodes: list[Node], pid: str, where: str, check_indices: bool = True) -> None:
    """Checks that every node's physical point is inside the scan and (``check_indices``) that its
    voxel index maps to the same place."""
    tol = 0.5 * float(np.linalg.norm(vol.spacing_zyx)) + 0.5
    for n in nodes:
        zyx = vol.world_to_index(np.asarray(n.point_xyz))
        if not all(-0.5 <= zyx[a] <= vol.hu.shape[a] - 0.5 for a in range(3)):
            raise BadItem(f"{where} node {n.number}", f"physical point {n.point_xyz} mm is outside the series of {pid}")
        if not check_indices:
            continue
        from_idx = vol.index_to_world(np.asarray(n.index_ijk[::-1]))
        err = float(np.linalg.norm(from_idx - np.asarray(n.point_xyz)))
        if err > tol:
            raise BadItem(f"{where} node {n.number}",
                          f"voxel index {n.index_ijk} lies {err:.1f} mm from the physical point {n.point_xyz} "
                          f"(tolerance {tol:.1f} mm): index and point lists disagree (check_indices=False "
                          "trusts the physical points)")


def case_from_series(vol: Volume, info: dict[str, str], nodes: list[Node], mask: np.ndarray | None, pid: str, *,
                     pixel_mm: float, slice_mm: float, max_side: int | None, with_masks: bool = True) -> Case:
    """An NIH-LN series (as read) + nodes (+ mask) -> Case.

    Lesions: per node and output slice, from the mask label of the node where present, else from its
    sphere; lesion_id = node number - 1; organ target lymph node. ``sample_slices`` = every slice.
    """
    labels = [mask] if mask is not None else []
    cvol, clabels = canonicalize(vol, *labels)
    plan = plan_for_volume(cvol, pixel_mm=pixel_mm, slice_mm=slice_mm, max_side=max_side)
    slices = preprocess.resample_volume(cvol.hu, plan)
    target, valid = organ_target("lymph_node")
    lesions: list[Lesion2D] = []
    in_mask: set[int] = set()
    if clabels:
        present = set(int(v) for v in np.unique(clabels[0]) if v > 0)
        numbers = {n.number for n in nodes}
        in_mask = present & numbers
        for label, z, box, m in label_volume_sections(cvol, clabels[0], plan, with_masks=with_masks):
            if label in in_mask:
                lesions.append(Lesion2D(slice_index=z, box=box.astype(np.float32), mask=m,
                                        provenance=int(Provenance.ORIGINAL), lesion_id=label - 1,
                                        organ_target=target, organ_valid=valid))
    for n in nodes:
        if n.number in in_mask:
            continue
        yx, z_mm = world_to_output(cvol, plan, n.point_xyz)
        d = math.sqrt(n.short_mm * n.long_mm)
        for k, box, m in preprocess.sphere_sections(yx, z_mm, d, plan, with_masks=with_masks):
            lesions.append(Lesion2D(slice_index=k, box=box.astype(np.float32), mask=m,
                                    provenance=int(Provenance.ORIGINAL), lesion_id=n.number - 1,
                                    organ_target=target, organ_valid=valid))
    lesions.sort(key=lambda l: (l.lesion_id, l.slice_index))
    return make_case(dataset="nihln", case_id=pid, patient_id=pid, study_id=info.get("study_uid") or pid,
                     series_id=info.get("series_uid") or pid, split=preprocess.patient_split(f"nihln:{pid}"),
                     slices=slices, plan=plan, lesions=lesions, sample_slices=range(slices.shape[0]),
                     source=vol.source)


def load_patient(raw_root, pid: str, check_indices: bool = True):
    """Reads and checks one patient: (Volume, DICOM info, nodes, mask or None)."""
    folder = series_folder(raw_root, pid)
    vol, info = scan.read_dicom_series(folder)
    scan.check_ct_values(vol)
    nodes = read_nodes(raw_root, pid)
    check_nodes(vol, nodes, pid, str(_dataset_dir(raw_root) / ANNOTATIONS / pid), check_indices)
    mask = read_mask(raw_root, pid, vol)
    return vol, info, nodes, mask


def iter_cases(raw_root, *, skip_bad: bool = False, bad_items: list[BadItem] | None = None,
               pixel_mm: float = TARGET_PIXEL_MM, slice_mm: float = TARGET_SLICE_MM,
               max_side: int | None = MAX_IMAGE_SIDE, check_indices: bool = True,
               show_progress: bool | None = None) -> Iterator[Case]:
    """Yields one Case per NIH-LN patient (see :func:`case_from_series`).

    ``check_indices=False`` skips the cross-check of the voxel-index list against the physical
    points (nodes are always placed by their physical points)."""
    for pid in progress(find_patients(raw_root), "NIH-LN series", enable=show_progress):
        try:
            vol, info, nodes, mask = load_patient(raw_root, pid, check_indices)
            yield case_from_series(vol, info, nodes, mask, pid, pixel_mm=pixel_mm, slice_mm=slice_mm,
                                   max_side=max_side)
        except BadItem as e:
            report_bad(e, skip_bad, bad_items)


def check(raw_root, *, show_progress: bool | None = None) -> list[BadItem]:
    """Every problem of a raw NIH-LN folder (series, node lists, masks)."""
    bad: list[BadItem] = []
    pids = find_patients(raw_root)
    if not pids:
        bad.append(BadItem(str(_dataset_dir(raw_root)), "no ABD_LYMPH_NNN / MED_LYMPH_NNN series folders found"))
    for pid in progress(pids, "NIH-LN series", enable=show_progress):
        try:
            vol, _, _, _ = load_patient(raw_root, pid)
            canonicalize(vol)
        except BadItem as e:
            bad.append(e)
    return bad
