"""DeepLesion reader: ``DL_info.csv`` + 16-bit PNG slices (docs/formats.md, DeepLesion section).

Layout under ``<raw>/DeepLesion/``: ``DL_info.csv``, ``Images_png/PPPPPP_SS_RR/NNN.png`` (value =
HU + 32768, NNN = 1-based slice number) and optionally ``lesion_organ_scores.csv``.

A *sub-volume* is one series' ``Slice_range``; every DL_info row (one marked lesion) belongs to one.
Each sub-volume becomes one :class:`~data_prep.types.Case` with ``case_id``
``PPPPPP_SS_RR_AAA-BBB`` (the released 1K test set's and ``Nifti_ct_name``'s naming; one series may
hold several sub-volumes).

Coordinates: ``Measurement_coordinates`` and ``Bounding_boxes`` are 1-based pixel indices (MULAN
subtracts 1). A 1-based index ``p`` is the pixel whose continuous extent is ``[p-1, p)``; boxes are
inclusive index ranges (:func:`uld_jax.core.deeplesion_box_to_internal`) and RECIST endpoints are
pixel centres (continuous ``p - 0.5``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
import re
from collections import OrderedDict
from typing import Iterator

import numpy as np
from PIL import Image

from data_prep import preprocess
from data_prep.readers.common import make_case, progress, report_bad, safe_join
from data_prep.types import BadItem, Case, Lesion2D
from uld_jax.core import (DEEPLESION_HU_OFFSET, MAX_IMAGE_SIDE, Provenance, TARGET_PIXEL_MM,
                          TARGET_SLICE_MM, deeplesion_box_to_internal)

FOLDER = "DeepLesion"
INFO_CSV = "DL_info.csv"
ORGAN_SCORES_CSV = "lesion_organ_scores.csv"
COLUMNS: tuple[str, ...] = (
    "File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index",
    "Measurement_coordinates", "Bounding_boxes", "Lesion_diameters_Pixel_",
    "Normalized_lesion_location", "Coarse_lesion_type", "Possibly_noisy", "Slice_range",
    "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender", "Patient_age",
    "Train_Val_Test",
)
SPLITS = {1: "train", 2: "val", 3: "test"}
_FILE_RE = re.compile(r"^(\d{6})_(\d{2})_(\d{2})_(\d{3,4})\.png$")
# (lung, liver, lymph node) target and validity per Coarse_lesion_type. Types without a gated organ
# are known negatives for lung and liver (they have their own types); lymph nodes hide in abdomen,
# soft tissue and pelvis lesions, so the lymph-node target is unknown there.
_TYPE_ORGAN: dict[int, tuple[tuple[float, float, float], tuple[bool, bool, bool]]] = {
    1: ((0, 0, 0), (True, True, True)),     # bone
    2: ((0, 0, 0), (True, True, False)),    # abdomen
    3: ((0, 0, 1), (True, True, True)),     # mediastinum (lymph nodes)
    4: ((0, 1, 0), (True, True, True)),     # liver
    5: ((1, 0, 0), (True, True, True)),     # lung
    6: ((0, 0, 0), (True, True, True)),     # kidney
    7: ((0, 0, 0), (True, True, False)),    # soft tissue
    8: ((0, 0, 0), (True, True, False)),    # pelvis
}


@dataclasses.dataclass(frozen=True)
class DLRow:
    """One typed row of DL_info.csv.

    Attributes:
      row: 0-based data-row index (the header is not a row); ``line``: 1-based line in the file.
      file_name: ``PPPPPP_SS_RR_KKK.png`` (key slice image).
      patient, study, series: Patient_index, Study_index, Series_ID.
      key_slice: 1-based key slice number.
      recist: [4, 2] float64 ``(x, y)``, 1-based as in the file: long-axis endpoints, short-axis endpoints.
      box: [4] float64 ``x1, y1, x2, y2``, 1-based inclusive as in the file (RECIST extent +- 5 px).
      diameters_px: (long, short) in pixels.
      normalized_location: (x, y, z) in [0, 1] of the body.
      coarse_type: 1..8, -1 unknown.
      possibly_noisy: the release's noisy-annotation flag.
      slice_range: (first, last) 1-based slice numbers of the sub-volume, inclusive.
      spacing_mm: (sx, sy, slice interval) mm.
      image_size: (width, height) pixels.
      dicom_window: (low, high) HU.
      gender: 'M'/'F' (as given), age: years (NaN when missing).
      split: 'train', 'val' or 'test'.
      nifti_ct_name: the extra ``Nifti_ct_name`` column when present, else ''.
    """

    row: int
    line: int
    file_name: str
    patient: int
    study: int
    series: int
    key_slice: int
    recist: np.ndarray
    box: np.ndarray
    diameters_px: tuple[float, float]
    normalized_location: tuple[float, float, float]
    coarse_type: int
    possibly_noisy: bool
    slice_range: tuple[int, int]
    spacing_mm: tuple[float, float, float]
    image_size: tuple[int, int]
    dicom_window: tuple[float, float]
    gender: str
    age: float
    split: str
    nifti_ct_name: str = ""

    @property
    def series_folder(self) -> str:
        """``PPPPPP_SS_RR``: the folder under ``Images_png``."""
        return f"{self.patient:06d}_{self.study:02d}_{self.series:02d}"

    @property
    def case_id(self) -> str:
        """``PPPPPP_SS_RR_AAA-BBB``: the sub-volume (series + Slice_range)."""
        return f"{self.series_folder}_{self.slice_range[0]:03d}-{self.slice_range[1]:03d}"

    @property
    def box_internal(self) -> np.ndarray:
        """[4] internal ``[y1, x1, y2, x2]`` continuous pixels of the original slice."""
        return deeplesion_box_to_internal(self.box)

    @property
    def recist_continuous(self) -> np.ndarray:
        """[4, 2] RECIST endpoints ``(x, y)`` in continuous pixels (pixel centres)."""
        return self.recist - 0.5

    @property
    def diameters_mm(self) -> tuple[float, float]:
        """(long, short) diameters in mm (pixel diameters times the in-plane spacing)."""
        return self.diameters_px[0] * self.spacing_mm[0], self.diameters_px[1] * self.spacing_mm[0]


# --------------------------------------------------------------------------------------------------
# DL_info.csv
# --------------------------------------------------------------------------------------------------
def _floats(text: str, n: int, col: str, where: str) -> tuple[float, ...]:
    parts = [p.strip() for p in (text or "").split(",")]
    if len(parts) != n:
        raise BadItem(where, f"column {col}: expected {n} comma-separated numbers, got {text!r}")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise BadItem(where, f"column {col}: not a number in {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise BadItem(where, f"column {col}: non-finite value in {text!r}")
    return vals


def _int(text: str, col: str, where: str) -> int:
    try:
        v = float((text or "").strip())
    except ValueError:
        raise BadItem(where, f"column {col}: not an integer: {text!r}") from None
    if not math.isfinite(v) or v != int(v):
        raise BadItem(where, f"column {col}: not an integer: {text!r}")
    return int(v)


def parse_row(rec: dict[str, str], row: int, line: int, path: str) -> DLRow:
    """Parses and validates one DL_info record (a csv.DictReader dict). Raises BadItem."""
    where = f"{path} row {row} (line {line})"
    if None in rec or any(rec.get(c) is None for c in COLUMNS):
        raise BadItem(where, "wrong number of fields")
    fname = rec["File_name"].strip()
    m = _FILE_RE.match(fname)
    if not m:
        if "/" in fname or "\\" in fname or ".." in fname:
            raise BadItem(where, f"column File_name: {fname!r} would escape the data root")
        raise BadItem(where, f"column File_name: {fname!r} is not PPPPPP_SS_RR_KKK.png")
    patient = _int(rec["Patient_index"], "Patient_index", where)
    study = _int(rec["Study_index"], "Study_index", where)
    series = _int(rec["Series_ID"], "Series_ID", where)
    key = _int(rec["Key_slice_index"], "Key_slice_index", where)
    for col, v, fv in (("Patient_index", patient, m.group(1)), ("Study_index", study, m.group(2)),
                       ("Series_ID", series, m.group(3)), ("Key_slice_index", key, m.group(4))):
        if v != int(fv):
            raise BadItem(where, f"column {col}: {v} disagrees with File_name {fname!r}")
    recist = np.array(_floats(rec["Measurement_coordinates"], 8, "Measurement_coordinates", where)).reshape(4, 2)
    box = np.array(_floats(rec["Bounding_boxes"], 4, "Bounding_boxes", where))
    if not (box[2] > box[0] and box[3] > box[1]):
        raise BadItem(where, f"column Bounding_boxes: empty box {box.tolist()}")
    diam = _floats(rec["Lesion_diameters_Pixel_"], 2, "Lesion_diameters_Pixel_", where)
    if min(diam) <= 0:
        raise BadItem(where, f"column Lesion_diameters_Pixel_: non-positive diameter {diam}")
    loc = _floats(rec["Normalized_lesion_location"], 3, "Normalized_lesion_location", where)
    ctype = _int(rec["Coarse_lesion_type"], "Coarse_lesion_type", where)
    if ctype != -1 and ctype not in _TYPE_ORGAN:
        raise BadItem(where, f"column Coarse_lesion_type: unknown code {ctype}")
    noisy = _int(rec["Possibly_noisy"], "Possibly_noisy", where)
    if noisy not in (0, 1):
        raise BadItem(where, f"column Possibly_noisy: expected 0 or 1, got {noisy}")
    sr = _floats(rec["Slice_range"], 2, "Slice_range", where)
    if any(v != int(v) for v in sr):
        raise BadItem(where, f"column Slice_range: not integers: {rec['Slice_range']!r}")
    sr = (int(sr[0]), int(sr[1]))
    if not 1 <= sr[0] <= key <= sr[1]:
        raise BadItem(where, f"column Slice_range: {sr} does not contain the key slice {key}")
    spacing = _floats(rec["Spacing_mm_px_"], 3, "Spacing_mm_px_", where)
    if min(spacing) <= 0:
        raise BadItem(where, f"column Spacing_mm_px_: non-positive spacing {spacing}")
    size = _floats(rec["Image_size"], 2, "Image_size", where)
    if any(v != int(v) or v <= 0 for v in size):
        raise BadItem(where, f"column Image_size: invalid size {rec['Image_size']!r}")
    size = (int(size[0]), int(size[1]))
    # RECIST endpoints must lie on the image; the box is their extent +- 5 px and may stick out.
    if (recist[:, 0].min() < 0 or recist[:, 1].min() < 0 or recist[:, 0].max() > size[0] + 1
            or recist[:, 1].max() > size[1] + 1):
        raise BadItem(where, f"column Measurement_coordinates: {recist.ravel().tolist()} outside the "
                             f"{size[0]}x{size[1]} image")
    if box[0] < -10 or box[1] < -10 or box[2] > size[0] + 10 or box[3] > size[1] + 10:
        raise BadItem(where, f"column Bounding_boxes: {box.tolist()} outside the {size[0]}x{size[1]} image")
    win = _floats(rec["DICOM_windows"], 2, "DICOM_windows", where)
    age_text = (rec["Patient_age"] or "").strip()
    try:
        age = float(age_text) if age_text else float("nan")
    except ValueError:
        raise BadItem(where, f"column Patient_age: not a number: {age_text!r}") from None
    split_code = _int(rec["Train_Val_Test"], "Train_Val_Test", where)
    if split_code not in SPLITS:
        raise BadItem(where, f"column Train_Val_Test: expected 1, 2 or 3, got {split_code}")
    return DLRow(row=row, line=line, file_name=fname, patient=patient, study=study, series=series,
                 key_slice=key, recist=recist, box=box, diameters_px=(diam[0], diam[1]),
                 normalized_location=(loc[0], loc[1], loc[2]), coarse_type=ctype, possibly_noisy=bool(noisy),
                 slice_range=sr, spacing_mm=(spacing[0], spacing[1], spacing[2]), image_size=size,
                 dicom_window=(win[0], win[1]), gender=(rec["Patient_gender"] or "").strip(), age=age,
                 split=SPLITS[split_code], nifti_ct_name=(rec.get("Nifti_ct_name") or "").strip())


def parse_dl_info(path: str | os.PathLike, *, skip_bad: bool = False,
                  bad_items: list[BadItem] | None = None) -> list[DLRow]:
    """Parses DL_info.csv into typed rows. Malformed rows raise BadItem (file, row, column, problem)
    or, with ``skip_bad``, are appended to ``bad_items`` and left out. Extra columns are tolerated."""
    path = str(path)
    if not os.path.isfile(path):
        report_bad(BadItem(path, "file not found"), skip_bad, bad_items)
        return []
    rows: list[DLRow] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            report_bad(BadItem(path, f"header lacks column(s) {', '.join(missing)}"), skip_bad, bad_items)
            return []
        try:
            for i, rec in enumerate(reader):
                try:
                    rows.append(parse_row(rec, i, reader.line_num, path))
                except BadItem as e:
                    report_bad(e, skip_bad, bad_items)
        except csv.Error as e:
            report_bad(BadItem(f"{path} line {reader.line_num}", f"malformed CSV ({e})"), skip_bad, bad_items)
    return rows


def parse_organ_scores(path: str | os.PathLike, rows: list[DLRow], *, skip_bad: bool = False,
                       bad_items: list[BadItem] | None = None) -> dict[int, np.ndarray]:
    """Parses ``lesion_organ_scores.csv`` (``row,File_name,lung,liver,lymph_node``).

    ``row`` is the 0-based data-row index of DL_info.csv; its ``File_name`` must match. Returns
    {row: [3] float32 scores in [0, 1]}. Rows of DL_info that failed to parse are not matched.
    """
    path = str(path)
    by_row = {r.row: r for r in rows}
    out: dict[int, np.ndarray] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        need = ("row", "File_name", "lung", "liver", "lymph_node")
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            report_bad(BadItem(path, f"header lacks column(s) {', '.join(missing)}"), skip_bad, bad_items)
            return {}
        for i, rec in enumerate(reader):
            where = f"{path} row {i} (line {reader.line_num})"
            try:
                if None in rec or any(rec.get(c) is None for c in need):
                    raise BadItem(where, "wrong number of fields")
                r = _int(rec["row"], "row", where)
                scores = np.array([_floats(rec[c], 1, c, where)[0] for c in need[2:]], np.float32)
                if np.any(scores < 0) or np.any(scores > 1):
                    raise BadItem(where, f"scores {scores.tolist()} outside [0, 1]")
                if r in out:
                    raise BadItem(where, f"column row: DL_info row {r} scored twice")
                if r not in by_row:
                    raise BadItem(where, f"column row: {r} is not a (valid) data row of DL_info.csv")
                if rec["File_name"].strip() != by_row[r].file_name:
                    raise BadItem(where, f"column File_name: {rec['File_name']!r} but DL_info row {r} "
                                         f"is {by_row[r].file_name!r}")
                out[r] = scores
            except BadItem as e:
                report_bad(e, skip_bad, bad_items)
    return out


def organ_target_for_row(row: DLRow, scores: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gate targets (lung, liver, lymph node) and validity of a row: soft scores from the side file
    where given, else hard targets from the coarse type, else unknown."""
    if scores is not None and row.row in scores:
        return scores[row.row].astype(np.float32), np.ones(3, bool)
    if row.coarse_type in _TYPE_ORGAN:
        t, v = _TYPE_ORGAN[row.coarse_type]
        return np.array(t, np.float32), np.array(v, bool)
    return np.zeros(3, np.float32), np.zeros(3, bool)


# --------------------------------------------------------------------------------------------------
# Sub-volumes and PNGs
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SubVolume:
    """A series' Slice_range with the DL_info rows (lesions) marked in it."""

    case_id: str
    series_folder: str
    slice_range: tuple[int, int]
    rows: list[DLRow]


def group_subvolumes(rows: list[DLRow], *, skip_bad: bool = False,
                     bad_items: list[BadItem] | None = None, csv_path: str = INFO_CSV) -> list[SubVolume]:
    """Groups rows by sub-volume and checks that rows of one sub-volume agree on spacing, image size
    and split. An inconsistent sub-volume is reported (BadItem naming both rows) and dropped."""
    groups: OrderedDict[str, list[DLRow]] = OrderedDict()
    for r in rows:
        groups.setdefault(r.case_id, []).append(r)
    out = []
    for cid, rs in groups.items():
        first = rs[0]
        try:
            for r in rs[1:]:
                for attr, what in (("spacing_mm", "spacing (Spacing_mm_px_)"), ("image_size", "Image_size"),
                                   ("split", "split (Train_Val_Test)")):
                    if getattr(r, attr) != getattr(first, attr):
                        raise BadItem(f"{csv_path} row {r.row} (line {r.line})",
                                      f"inconsistent {what} within sub-volume {cid}: {getattr(r, attr)} vs "
                                      f"{getattr(first, attr)} in row {first.row}")
            out.append(SubVolume(cid, first.series_folder, first.slice_range, rs))
        except BadItem as e:
            report_bad(e, skip_bad, bad_items)
    return out


def read_png_hu(path: str | os.PathLike) -> np.ndarray:
    """A DeepLesion 16-bit PNG -> [H, W] int16 HU (value - 32768). BadItem if missing/corrupt."""
    path = str(path)
    if not os.path.isfile(path):
        raise BadItem(path, "slice image missing")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors, ...
        raise BadItem(path, f"corrupt or truncated PNG ({type(e).__name__}: {e})") from None
    if mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise BadItem(path, f"not a 16-bit grayscale PNG (mode {mode})")
    arr = arr.astype(np.int32)
    if arr.ndim != 2 or arr.min() < 0 or arr.max() > 65535:
        raise BadItem(path, f"values outside the 16-bit range ({arr.min()}..{arr.max()})")
    return (arr - DEEPLESION_HU_OFFSET).astype(np.int16)


def load_subvolume(images_root: str | os.PathLike, sub: SubVolume,
                   problems: list[BadItem] | None = None) -> np.ndarray | None:
    """Reads every slice of a sub-volume's Slice_range -> [Z, H, W] int16 HU.

    BadItem for a missing slice inside the range, a corrupt/truncated PNG, slices of different
    sizes, or a size that disagrees with the rows' Image_size (width, height). With ``problems``
    every bad slice is appended there (and None returned when there was any) instead of raising at
    the first.
    """
    folder = safe_join(images_root, sub.series_folder, f"sub-volume {sub.case_id}")
    a, b = sub.slice_range
    if not folder.is_dir():
        rows = ", ".join(str(r.row) for r in sub.rows[:5])
        raise BadItem(str(folder), f"series folder missing (sub-volume {sub.case_id}, DL_info row(s) {rows})")
    width, height = sub.rows[0].image_size
    out = np.empty((b - a + 1, height, width), np.int16)
    n_bad = 0
    for k in range(a, b + 1):
        p = folder / f"{k:03d}.png"
        try:
            if not p.is_file():
                raise BadItem(str(p), f"missing slice {k} inside Slice_range {a}-{b} of {sub.case_id}")
            img = read_png_hu(p)
            if img.shape != (height, width):
                raise BadItem(str(p), f"image is {img.shape[1]}x{img.shape[0]} (w x h) but DL_info "
                                      f"Image_size of {sub.case_id} says {width}x{height}")
            out[k - a] = img
        except BadItem as e:
            if problems is None:
                raise
            problems.append(e)
            n_bad += 1
    return None if n_bad else out


def _anchor_key(keys: list[int], dz: float, slice_mm: float) -> int:
    """The key slice to anchor the output grid on: the one that puts the other keys nearest to
    grid positions (ties: the first)."""
    best, best_cost = keys[0], float("inf")
    for a in keys:
        cost = 0.0
        for k in keys:
            t = (k - a) * dz / slice_mm
            cost += abs(t - round(t))
        if cost < best_cost - 1e-9:
            best, best_cost = a, cost
    return best


def preprocess_subvolume(hu: np.ndarray, sub: SubVolume, *, organ_scores: dict[int, np.ndarray] | None = None,
                         pixel_mm: float = TARGET_PIXEL_MM, slice_mm: float = TARGET_SLICE_MM,
                         max_side: int | None = MAX_IMAGE_SIDE, with_masks: bool = True,
                         source: str = "") -> Case:
    """A loaded sub-volume [Z, H, W] HU -> Case.

    Slice positions are ``(slice_number - 1) * interval`` mm. The output grid contains one key slice
    exactly (the anchor, chosen so that other key slices fall as near as possible to grid slices);
    each lesion goes on the output slice nearest to its key slice (at most ``slice_mm / 2`` away).
    Lesions carry the box (``Bounding_boxes``), RECIST endpoints, the RECIST ellipse mask, coarse type
    and organ targets; ``sample_slices`` = ``key_slices`` = the lesions' slices.
    """
    first = sub.rows[0]
    sx, sy, dz = first.spacing_mm
    a, b = sub.slice_range
    src_z = (np.arange(a, b + 1, dtype=np.float64) - 1.0) * dz
    keys = sorted({r.key_slice for r in sub.rows})
    anchor = _anchor_key(keys, dz, slice_mm)
    crop = preprocess.body_crop(hu)
    plan = preprocess.plan_resampling(hu.shape[1:], (sy, sx), src_z, crop, pixel_mm=pixel_mm, slice_mm=slice_mm,
                                      max_side=max_side, z_anchor_mm=(anchor - 1.0) * dz)
    slices = preprocess.resample_volume(hu, plan)
    lesions = []
    for r in sub.rows:
        k = plan.nearest_slice((r.key_slice - 1.0) * dz)
        box = plan.clip_box(plan.map_boxes(r.box_internal))
        recist = plan.map_points_xy(r.recist_continuous)
        target, valid = organ_target_for_row(r, organ_scores)
        lesions.append(Lesion2D(
            slice_index=k, box=box.astype(np.float32),
            mask=preprocess.recist_mask(plan.out_hw, recist) if with_masks else None,
            provenance=int(Provenance.ORIGINAL), lesion_type=r.coarse_type, lesion_id=-1,
            organ_target=target, organ_valid=valid, recist=recist.astype(np.float32)))
    key_idx = [l.slice_index for l in lesions]
    return make_case(dataset="deeplesion", case_id=sub.case_id, patient_id=f"{first.patient:06d}",
                     study_id=f"{first.patient:06d}_{first.study:02d}", series_id=sub.series_folder,
                     split=first.split, slices=slices, plan=plan, lesions=lesions, sample_slices=key_idx,
                     key_slices=key_idx, source=source)


# --------------------------------------------------------------------------------------------------
# The reader API
# --------------------------------------------------------------------------------------------------
def _dataset_dir(raw_root: str | os.PathLike) -> pathlib.Path:
    root = pathlib.Path(raw_root)
    return root / FOLDER if (root / FOLDER).is_dir() else root


def read_tables(raw_root: str | os.PathLike, *, skip_bad: bool = False, bad_items: list[BadItem] | None = None):
    """Parses DL_info.csv (and lesion_organ_scores.csv when present) under ``raw_root``.

    Returns ``(subvolumes, organ_scores)``.
    """
    d = _dataset_dir(raw_root)
    info = d / INFO_CSV
    rows = parse_dl_info(info, skip_bad=skip_bad, bad_items=bad_items)
    scores: dict[int, np.ndarray] = {}
    if (d / ORGAN_SCORES_CSV).is_file():
        scores = parse_organ_scores(d / ORGAN_SCORES_CSV, rows, skip_bad=skip_bad, bad_items=bad_items)
    subs = group_subvolumes(rows, skip_bad=skip_bad, bad_items=bad_items, csv_path=str(info))
    return subs, scores


def iter_cases(raw_root: str | os.PathLike, *, skip_bad: bool = False, bad_items: list[BadItem] | None = None,
               pixel_mm: float = TARGET_PIXEL_MM, slice_mm: float = TARGET_SLICE_MM,
               max_side: int | None = MAX_IMAGE_SIDE, include_noisy: bool = True,
               splits: tuple[str, ...] | None = None, show_progress: bool | None = None) -> Iterator[Case]:
    """Yields one preprocessed Case per DeepLesion sub-volume (see :func:`preprocess_subvolume`).

    ``include_noisy=False`` drops rows flagged Possibly_noisy; ``splits`` restricts to some splits.
    """
    d = _dataset_dir(raw_root)
    subs, scores = read_tables(raw_root, skip_bad=skip_bad, bad_items=bad_items)
    for sub in progress(subs, "DeepLesion sub-volumes", enable=show_progress):
        rows = [r for r in sub.rows if include_noisy or not r.possibly_noisy]
        if not rows or (splits is not None and rows[0].split not in splits):
            continue
        sub = dataclasses.replace(sub, rows=rows)
        try:
            hu = load_subvolume(d / "Images_png", sub)
            yield preprocess_subvolume(hu, sub, organ_scores=scores, pixel_mm=pixel_mm, slice_mm=slice_mm,
                                       max_side=max_side, source=str(d / "Images_png" / sub.series_folder))
        except BadItem as e:
            report_bad(e, skip_bad, bad_items)


def check(raw_root: str | os.PathLike, *, show_progress: bool | None = None) -> list[BadItem]:
    """Every problem of a raw DeepLesion folder (tables and every PNG of every sub-volume)."""
    bad: list[BadItem] = []
    d = _dataset_dir(raw_root)
    subs, _ = read_tables(raw_root, skip_bad=True, bad_items=bad)
    for sub in progress(subs, "DeepLesion sub-volumes", enable=show_progress):
        try:
            load_subvolume(d / "Images_png", sub, problems=bad)
        except BadItem as e:
            bad.append(e)
    return bad
