"""LUNA16 reader: ``subsetK/<seriesuid>.mhd/.raw`` + ``annotations.csv`` (docs/formats.md).

Nodules are spheres given in world mm (LPS) with a diameter. The world centre goes through the
scan's own origin, spacing and direction (not an identity assumption) into voxel indices, the
volume is reoriented to the canonical axial orientation, resampled, and each nodule becomes one
Lesion2D per output slice its sphere crosses (disk mask, box around the disk). Irrelevant findings
of ``annotations_excluded.csv`` become ignore regions (Provenance.IGNORE, no mask), diameter -1
(unknown) taken as 10 mm as in the challenge evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
import re
from typing import Iterator

import numpy as np

from data_prep import preprocess
from data_prep.readers import scan
from data_prep.readers.common import (canonicalize, make_case, organ_target, plan_for_volume, progress,
                                      report_bad, world_to_output)
from data_prep.types import BadItem, Case, Lesion2D, Volume
from uld_jax.core import MAX_IMAGE_SIDE, Provenance, TARGET_PIXEL_MM, TARGET_SLICE_MM

FOLDER = "LUNA16"
ANNOTATIONS = "annotations.csv"
EXCLUDED = "annotations_excluded.csv"
SERIESUIDS = "seriesuids.csv"
COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
UNKNOWN_DIAMETER_MM = 10.0
_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                  "MET_FLOAT": 4, "MET_DOUBLE": 8}
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclasses.dataclass(frozen=True)
class Nodule:
    """One row of annotations.csv / annotations_excluded.csv.

    ``row``: 0-based data row; ``centre_xyz``: world mm (LPS); ``diameter_mm``: -1 = unknown."""

    seriesuid: str
    row: int
    centre_xyz: tuple[float, float, float]
    diameter_mm: float


def parse_annotations(path: str | os.PathLike, *, allow_unknown_diameter: bool = False, skip_bad: bool = False,
                      bad_items: list[BadItem] | None = None) -> dict[str, list[Nodule]]:
    """Parses a LUNA16 annotation CSV -> {seriesuid: [Nodule, ...]} in file order.

    ``allow_unknown_diameter``: accept diameter -1 (annotations_excluded.csv).
    """
    path = str(path)
    out: dict[str, list[Nodule]] = {}
    if not os.path.isfile(path):
        report_bad(BadItem(path, "file not found"), skip_bad, bad_items)
        return out
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            report_bad(BadItem(path, f"header lacks column(s) {', '.join(missing)}"), skip_bad, bad_items)
            return out
        for i, rec in enumerate(reader):
            where = f"{path} row {i} (line {reader.line_num})"
            try:
                if None in rec or any(rec.get(c) is None for c in COLUMNS):
                    raise BadItem(where, "wrong number of fields")
                uid = rec["seriesuid"].strip()
                if not _UID_RE.match(uid):
                    raise BadItem(where, f"column seriesuid: {uid!r} is not a DICOM UID")
                vals = []
                for c in COLUMNS[1:]:
                    try:
                        v = float(rec[c])
                    except ValueError:
                        raise BadItem(where, f"column {c}: not a number: {rec[c]!r}") from None
                    if not math.isfinite(v):
                        raise BadItem(where, f"column {c}: non-finite value {rec[c]!r}")
                    vals.append(v)
                d = vals[3]
                if not (d > 0 or (allow_unknown_diameter and d == -1)):
                    raise BadItem(where, f"column diameter_mm: {d} (must be > 0"
                                         f"{' or -1' if allow_unknown_diameter else ''})")
                out.setdefault(uid, []).append(Nodule(uid, i, (vals[0], vals[1], vals[2]), d))
            except BadItem as e:
                report_bad(e, skip_bad, bad_items)
    return out


def parse_seriesuids(path: str | os.PathLike) -> list[str]:
    """seriesuids.csv (no header, one uid per line) -> list of uids. BadItem on a malformed line."""
    path = str(path)
    uids = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            uid = line.strip().strip(",")
            if not uid:
                continue
            if not _UID_RE.match(uid):
                raise BadItem(f"{path} line {n}", f"{uid!r} is not a DICOM UID")
            uids.append(uid)
    return uids


def _dataset_dir(raw_root) -> pathlib.Path:
    root = pathlib.Path(raw_root)
    return root / FOLDER if (root / FOLDER).is_dir() else root


def find_scans(raw_root, *, skip_bad: bool = False, bad_items: list[BadItem] | None = None) -> dict[str, pathlib.Path]:
    """{seriesuid: path of its .mhd} over ``subset*/`` folders (sorted by uid)."""
    d = _dataset_dir(raw_root)
    scans: dict[str, pathlib.Path] = {}
    for p in sorted(d.glob("subset*/*.mhd")):
        uid = p.stem
        if uid in scans:
            report_bad(BadItem(str(p), f"series {uid} also in {scans[uid]}"), skip_bad, bad_items)
            continue
        scans[uid] = p
    return dict(sorted(scans.items()))


def read_mhd(path: str | os.PathLike) -> Volume:
    """Reads a LUNA16 .mhd/.raw scan -> Volume (HU), checking the data file and the HU range."""
    path = pathlib.Path(path)
    # ITK reports a missing/short data file with a long message; name it plainly first.
    header: dict[str, str] = {}
    try:
        with open(path, encoding="latin-1") as f:
            for line in f:
                if "=" in line:
                    key, val = line.split("=", 1)
                    header[key.strip()] = val.strip()
    except OSError as e:
        raise BadItem(str(path), f"unreadable header ({e})") from None
    data_file = header.get("ElementDataFile")
    if data_file is None:
        raise BadItem(str(path), "MetaImage header has no ElementDataFile")
    if data_file not in ("LOCAL", "LIST") and not data_file.startswith("LIST"):
        if "/" in data_file or "\\" in data_file or data_file in ("..", "."):
            raise BadItem(str(path), f"ElementDataFile {data_file!r} would escape the scan's folder")
        raw = path.parent / data_file
        if not raw.is_file():
            raise BadItem(str(raw), "voxel data file missing")
        # Uncompressed data: the file size is known from the header; name a truncation plainly.
        nbytes = _ELEMENT_BYTES.get(header.get("ElementType", ""))
        if header.get("CompressedData", "False").lower() != "true" and nbytes:
            try:
                n = int(np.prod([int(v) for v in header.get("DimSize", "").split()])) * nbytes
            except ValueError:
                raise BadItem(str(path), f"malformed DimSize {header.get('DimSize')!r}") from None
            got = raw.stat().st_size
            if got < n:
                raise BadItem(str(raw), f"voxel data file truncated: {got} of {n} bytes")
    vol = scan.sitk_to_volume(scan.read_image_file(path), str(path))
    scan.check_ct_values(vol)
    return vol


def nodule_lesions(vol: Volume, plan: preprocess.Resampling, nodules: list[Nodule], *, provenance: int,
                   with_masks: bool, first_id: int = 0) -> list[Lesion2D]:
    """Sphere sections of nodules in a canonical volume's output grid. BadItem when a centre is
    outside the scan."""
    out = []
    target, valid = organ_target("lung")
    zs, ys, xs = vol.hu.shape
    for n, nod in enumerate(nodules):
        zyx = vol.world_to_index(np.asarray(nod.centre_xyz))
        if not (-0.5 <= zyx[0] <= zs - 0.5 and -0.5 <= zyx[1] <= ys - 0.5 and -0.5 <= zyx[2] <= xs - 0.5):
            table = ANNOTATIONS if provenance == Provenance.ORIGINAL else EXCLUDED
            raise BadItem(f"{table} row {nod.row} ({vol.source})",
                          f"nodule centre {nod.centre_xyz} mm is outside scan {nod.seriesuid} "
                          f"(voxel zyx {np.round(zyx, 1).tolist()}, size {vol.hu.shape})")
        yx, z_mm = world_to_output(vol, plan, nod.centre_xyz)
        d = nod.diameter_mm if nod.diameter_mm > 0 else UNKNOWN_DIAMETER_MM
        for k, box, mask in preprocess.sphere_sections(yx, z_mm, d, plan, with_masks=with_masks):
            if provenance == Provenance.ORIGINAL:
                out.append(Lesion2D(slice_index=k, box=box.astype(np.float32), mask=mask, provenance=provenance,
                                    lesion_id=first_id + n, organ_target=target, organ_valid=valid))
            else:
                out.append(Lesion2D(slice_index=k, box=box.astype(np.float32), mask=None, provenance=provenance))
    return out


def case_from_volume(vol: Volume, uid: str, nodules: list[Nodule], excluded: list[Nodule], *,
                     pixel_mm: float, slice_mm: float, max_side: int | None, with_masks: bool = True) -> Case:
    """A LUNA16 scan (as read) + its nodules -> Case (reoriented, resampled).

    ``sample_slices`` = every slice (lesion slices and lesion-free candidates alike); lesions: one
    per (nodule, crossed slice) with disk mask, lesion_id = the nodule's index in the scan's
    annotation rows, organ target lung; excluded findings as IGNORE boxes.
    """
    cvol, _ = canonicalize(vol)
    plan = plan_for_volume(cvol, pixel_mm=pixel_mm, slice_mm=slice_mm, max_side=max_side)
    slices = preprocess.resample_volume(cvol.hu, plan)
    lesions = nodule_lesions(cvol, plan, nodules, provenance=int(Provenance.ORIGINAL), with_masks=with_masks)
    lesions += nodule_lesions(cvol, plan, excluded, provenance=int(Provenance.IGNORE), with_masks=False)
    return make_case(dataset="luna16", case_id=uid, patient_id=uid, study_id=uid, series_id=uid,
                     split=preprocess.patient_split(f"luna16:{uid}"), slices=slices, plan=plan, lesions=lesions,
                     sample_slices=range(slices.shape[0]), source=vol.source)


def read_tables(raw_root, *, skip_bad: bool = False, bad_items: list[BadItem] | None = None):
    """(annotations, excluded) dicts; the excluded file is optional."""
    d = _dataset_dir(raw_root)
    ann = parse_annotations(d / ANNOTATIONS, skip_bad=skip_bad, bad_items=bad_items)
    exc = {}
    if (d / EXCLUDED).is_file():
        exc = parse_annotations(d / EXCLUDED, allow_unknown_diameter=True, skip_bad=skip_bad, bad_items=bad_items)
    return ann, exc


def iter_cases(raw_root, *, skip_bad: bool = False, bad_items: list[BadItem] | None = None,
               pixel_mm: float = TARGET_PIXEL_MM, slice_mm: float = TARGET_SLICE_MM,
               max_side: int | None = MAX_IMAGE_SIDE, show_progress: bool | None = None) -> Iterator[Case]:
    """Yields one Case per LUNA16 scan found under ``subset*/`` (see :func:`case_from_volume`)."""
    ann, exc = read_tables(raw_root, skip_bad=skip_bad, bad_items=bad_items)
    scans = find_scans(raw_root, skip_bad=skip_bad, bad_items=bad_items)
    for uid, path in progress(scans.items(), "LUNA16 scans", total=len(scans), enable=show_progress):
        try:
            vol = read_mhd(path)
            yield case_from_volume(vol, uid, ann.get(uid, []), exc.get(uid, []), pixel_mm=pixel_mm,
                                   slice_mm=slice_mm, max_side=max_side)
        except BadItem as e:
            report_bad(e, skip_bad, bad_items)


def check(raw_root, *, show_progress: bool | None = None) -> list[BadItem]:
    """Every problem of a raw LUNA16 folder: tables, scans (readable, HU, nodules inside)."""
    bad: list[BadItem] = []
    d = _dataset_dir(raw_root)
    ann, exc = read_tables(raw_root, skip_bad=True, bad_items=bad)
    scans = find_scans(raw_root, skip_bad=True, bad_items=bad)
    if not scans:
        bad.append(BadItem(str(d), "no subset*/*.mhd scans found"))
    if (d / SERIESUIDS).is_file():
        try:
            listed = parse_seriesuids(d / SERIESUIDS)
            absent = [u for u in listed if u not in scans]
            if absent:
                bad.append(BadItem(str(d / SERIESUIDS), f"{len(absent)} listed series have no .mhd scan "
                                                         f"(first: {absent[0]})"))
        except BadItem as e:
            bad.append(e)
    no_scan = sorted(set(ann) - set(scans))
    if no_scan:
        bad.append(BadItem(f"{d / ANNOTATIONS} row {ann[no_scan[0]][0].row}",
                           f"{len(no_scan)} annotated series have no .mhd scan (first: {no_scan[0]})"))
    for uid, path in progress(scans.items(), "LUNA16 scans", total=len(scans), enable=show_progress):
        try:
            vol, _ = canonicalize(read_mhd(path))
            plan = plan_for_volume(vol, pixel_mm=TARGET_PIXEL_MM, slice_mm=TARGET_SLICE_MM, max_side=MAX_IMAGE_SIDE,
                                   crop=(0, vol.hu.shape[1], 0, vol.hu.shape[2]))
            nodule_lesions(vol, plan, ann.get(uid, []), provenance=int(Provenance.ORIGINAL), with_masks=False)
            nodule_lesions(vol, plan, exc.get(uid, []), provenance=int(Provenance.IGNORE), with_masks=False)
        except BadItem as e:
            bad.append(e)
    return bad
