"""Organ labels for volumetric truths from DeepLesion's DL_info rows (for organ-stratified FROC).

The released 1K volumetric set has no lesion types. The DeepLesion rows (``DL_info.csv`` /
``DL_info_test_split.csv``) of the same sub-volumes carry ``Coarse_lesion_type`` for the lesions
that were *marked* (measured on a key slice). This module transfers those types to the 3D truths:

* a DL_info row belongs to sub-volume ``Nifti_ct_name`` (without ``.nii.gz``);
* its key-slice box is ``Bounding_boxes`` minus 1 (MULAN's 1-based -> 0-based inclusive pixels) on
  slice ``Key_slice_index`` (the release's 1-based slice number, the numbering of the truth's z);
* per sub-volume, rows and 3D truths that contain the key slice are matched one-to-one, greedily by
  decreasing 2D IoU (+1 convention) of the key box with the truth's xy rectangle, IoU >=
  ``min_iou`` (default 0.5);
* matched truths get the organ of their coarse type (3 mediastinum -> ``lymph_node``, 4 ->
  ``liver``, 5 -> ``lung``, as :data:`uld_jax.core.COARSE_TYPE_ORGAN`; other types -> ``other``);
  truths without a matched row get ``unknown`` (lesions the radiologist added in 3D, unmarked in
  DL_info).

Strata built this way cover only the marked lesions; a stratum's sensitivity is the FROC of those
truths (see :func:`uld_jax.evaluate.froc.stratified_froc`). This is this project's construction,
not a released protocol.

The synthetic world knows the organ of every lesion: :func:`organ_labels_from_world_truth` reads
``WORLD/truth/deeplesion_lesions.csv`` (one row per lesion of each sub-volume, written in the order
of the boxes of ``deeplesion_volumetric_truth.pkl``; the rows are checked against the boxes) and
labels every truth ``lung`` / ``liver`` / ``lymph_node`` or ``other``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from uld_jax.core import COARSE_TYPE_ORGAN
from uld_jax.evaluate.boxes import EvaluationInputError, open_csv, pair_overlap


def organ_labels_from_dl_info(
    truth: Mapping[str, Any], dl_info_csv: str | os.PathLike, *, min_iou: float = 0.5
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Returns ``(labels {name: [label per truth row]}, stats)``; see the module docstring."""
    path = os.fspath(dl_info_csv)
    by_volume: dict[str, list[tuple[int, np.ndarray, int]]] = {}
    with open_csv(path) as f:
        reader = csv.DictReader(f)
        need = {"Nifti_ct_name", "Key_slice_index", "Bounding_boxes", "Coarse_lesion_type"}
        if not need <= set(reader.fieldnames or []):
            raise EvaluationInputError(f"{path}: header lacks {sorted(need - set(reader.fieldnames or []))}")
        for line, row in enumerate(reader, start=2):
            name = row["Nifti_ct_name"].strip()
            name = name[:-7] if name.endswith(".nii.gz") else name
            if name not in truth:
                continue
            try:
                z = int(row["Key_slice_index"])
                box = np.array([float(x) for x in row["Bounding_boxes"].split(",")], np.float64) - 1.0
                ctype = int(float(row["Coarse_lesion_type"]))
            except ValueError as e:
                raise EvaluationInputError(f"{path}: line {line}: unreadable key slice / box / type ({e})") from None
            if box.shape != (4,):
                raise EvaluationInputError(f"{path}: line {line}: Bounding_boxes has {box.size} values, expected 4")
            by_volume.setdefault(name, []).append((z, box, ctype))
    labels: dict[str, list[str]] = {}
    stats = {"rows": 0, "matched": 0, "truths": 0}
    for name, t in truth.items():
        t = np.asarray(t, np.float64).reshape(-1, 6) if np.asarray(t).size else np.zeros((0, 6))
        lab = ["unknown"] * len(t)
        rows = by_volume.get(name, [])
        stats["rows"] += len(rows)
        stats["truths"] += len(t)
        cands = []
        for ri, (z, b, _) in enumerate(rows):
            if not len(t):
                continue
            on = (t[:, 2] <= z) & (z <= t[:, 5])
            iou = pair_overlap(t[:, [0, 1, 3, 4]], b[None], None, np.zeros(len(t), np.int64), "iou")
            for ti in np.flatnonzero(on & (iou >= min_iou)):
                cands.append((-iou[ti], ri, int(ti)))
        cands.sort()
        used_r, used_t = set(), set()
        for _, ri, ti in cands:
            if ri in used_r or ti in used_t:
                continue
            used_r.add(ri)
            used_t.add(ti)
            lab[ti] = COARSE_TYPE_ORGAN.get(rows[ri][2]) or "other"
            stats["matched"] += 1
        labels[name] = lab
    return labels, stats


WORLD_STRATA: tuple[str, ...] = ("lung", "liver", "lymph_node")   # other world organs -> "other"


def organ_labels_from_world_truth(truth: Mapping[str, Any], lesions_csv: str | os.PathLike
                                  ) -> dict[str, list[str]]:
    """``{name: [label per truth row]}`` for every volume of ``truth`` from the synthetic world's
    ``deeplesion_lesions.csv`` (columns ``subvolume``, ``x1 .. z2``, ``organ``): the rows of a
    sub-volume are its truth boxes in order. Raises :class:`EvaluationInputError` when a volume's
    rows do not match its boxes (count or coordinates)."""
    path = os.fspath(lesions_csv)
    keys = ("x1", "y1", "z1", "x2", "y2", "z2")
    rows: dict[str, list[tuple[np.ndarray, str]]] = {}
    with open_csv(path) as f:
        reader = csv.DictReader(f)
        need = {"subvolume", "organ", *keys}
        if not need <= set(reader.fieldnames or []):
            raise EvaluationInputError(f"{path}: header lacks {sorted(need - set(reader.fieldnames or []))}")
        for line, row in enumerate(reader, start=2):
            name = row["subvolume"].strip()
            if name not in truth:
                continue
            try:
                box = np.array([float(row[k]) for k in keys], np.float64)
            except ValueError as e:
                raise EvaluationInputError(f"{path}: line {line}: unreadable box ({e})") from None
            organ = row["organ"].strip()
            rows.setdefault(name, []).append((box, organ if organ in WORLD_STRATA else "other"))
    labels: dict[str, list[str]] = {}
    for name, t in truth.items():
        t = np.asarray(t, np.float64).reshape(-1, 6) if np.asarray(t).size else np.zeros((0, 6))
        mine = rows.get(name, [])
        boxes = np.asarray([b for b, _ in mine], np.float64).reshape(-1, 6)
        if len(boxes) != len(t) or not np.allclose(boxes, t, atol=1e-6):
            raise EvaluationInputError(
                f"{path}: the rows of {name!r} ({len(boxes)}) do not match its {len(t)} truth "
                "box(es) in order; is it the same world's truth?")
        labels[name] = [o for _, o in mine]
    return labels
