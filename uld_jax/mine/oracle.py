"""Oracle mining on the synthetic world: what a perfect MAM would add, and which unmarked lesions
the paper's matching could reach at all.

    python -m uld_jax.mine.oracle --mined WORKDIR/mined.npz --truth WORLD/truth --data_dir DATA \
        --out WORKDIR/mined_oracle.npz

A diagnosis tool, not a training method: it reads the world's complete truth, which real data does
not have. Two questions, both about the training split only (the test split is never read):

* **Upper bound of MAM.** :func:`oracle_positives` mines, on exactly the slices a mining run looked
  at (its chunk store's slice table: one slice every 5 mm plus the key slices), every lesion
  cross-section that is not already annotated, with its true box and no false positive. The table it
  writes (those positives plus the mining run's added unlabeled slices) is finetuned like
  MELD + MAM; against the finetuning control (the same added slices, nothing mined) it measures
  how much a perfect MAM could add to the detector, whatever the embedding. With ``--as ignore`` the same boxes
  become ignore regions: a perfect NRM, which keeps every lesion the annotations miss out of the
  negatives and adds no positive.
* **Reach of the paper's rule.** :func:`unmarked_reach` counts the unmarked lesions of each
  sub-volume by what could find them: the same lesion marked in another study of the patient (what a
  lesion identity matches), a marked lesion of the same type in the patient (what a type-level
  embedding like LesaNet's matches), or nothing marked like it.

The cross-section of a lesion on a slice is its in-plane extent shrunk as an ellipsoid's
(``sqrt(1 - t^2)``, t the slice's offset from the lesion's centre in half-extents); slices where
that factor is below ``min_extent`` (the lesion's poles) get no positive. A cross-section already
annotated (IoU >= ``annotated_iou`` with an annotation on the same slice) is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from uld_jax.io.atomic import atomic_write_json
from uld_jax.io.json_safe import json_safe
from uld_jax.mine import overlap, quality, run, table

DEFAULT_MIN_EXTENT: float = 0.5
DEFAULT_ANNOTATED_IOU: float = 0.2
# --as: the table kind and expert of the oracle's rows
AS_KINDS = {"positive": (table.KIND_MINED, run.UNIVERSAL_EXPERT), "ignore": (table.KIND_IGNORE, -1)}


def cross_sections(box3d: np.ndarray, zc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-plane boxes ``[y1, x1, y2, x2]`` [N, 4] of lesions ``box3d`` [N, 6] (``[z1, y1, x1, z2,
    y2, x2]``) at slice positions ``zc`` [N], and the ellipsoid's extent factor [N] in [0, 1]
    (0 outside ``[z1, z2]``)."""
    b = np.asarray(box3d, np.float64).reshape(-1, 6)
    zc = np.asarray(zc, np.float64).reshape(-1)
    half_z = np.maximum(0.5 * (b[:, 3] - b[:, 0]), 1e-9)
    t = (zc - 0.5 * (b[:, 0] + b[:, 3])) / half_z
    f = np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))
    cy, cx = 0.5 * (b[:, 1] + b[:, 4]), 0.5 * (b[:, 2] + b[:, 5])
    hy, hx = 0.5 * (b[:, 4] - b[:, 1]) * f, 0.5 * (b[:, 5] - b[:, 2]) * f
    return np.stack([cy - hy, cx - hx, cy + hy, cx + hx], 1), f


def oracle_positives(
    truth: quality.LesionTruth,
    slice_case: np.ndarray,
    slice_index: np.ndarray,
    ann_slice: np.ndarray,
    ann_box: np.ndarray,
    *,
    min_extent: float = DEFAULT_MIN_EXTENT,
    annotated_iou: float = DEFAULT_ANNOTATED_IOU,
    unmarked_only: bool = False,
) -> dict[str, np.ndarray]:
    """Every lesion cross-section on the given slices that no annotation covers.

    Args:
      truth: every lesion, in the Case frame of the slices.
      slice_case, slice_index: [S] the slices mined (row s is slice key s).
      ann_slice, ann_box: [A] slice keys and [A, 4] boxes of the existing annotations.
      min_extent: smallest ellipsoid extent factor of a cross-section kept (see module docstring).
      annotated_iou: a cross-section with at least this IoU with an annotation on its slice is the
        annotation itself and is skipped.
      unmarked_only: keep only lesions unmarked in their sub-volume.

    Returns:
      ``slice`` [M] slice keys, ``box`` [M, 4], ``truth_row`` [M] (row of ``truth``), sorted by
      (slice, truth row).
    """
    slice_case = np.asarray(slice_case).reshape(-1).astype(str)
    slice_index = np.asarray(slice_index, np.int64).reshape(-1)
    empty = {"slice": np.zeros(0, np.int64), "box": np.zeros((0, 4)),
             "truth_row": np.zeros(0, np.int64)}
    if slice_case.size == 0 or len(truth) == 0:
        return empty
    _, inv = np.unique(np.concatenate([slice_case, np.asarray(truth.case_id, str)]),
                       return_inverse=True)
    si, tj = overlap.same_key_pairs(inv[: slice_case.size], inv[slice_case.size:])
    t3 = np.asarray(truth.box3d, np.float64)
    zc = slice_index[si] + 0.5
    on = (t3[tj, 0] <= zc) & (zc <= t3[tj, 3])
    if unmarked_only:
        on &= ~np.asarray(truth.marked, bool)[tj]
    si, tj, zc = si[on], tj[on], zc[on]
    box, f = cross_sections(t3[tj], zc)
    keep = f >= min_extent
    si, tj, box = si[keep], tj[keep], box[keep]
    ann_slice = np.asarray(ann_slice, np.int64).reshape(-1)
    ann_box = np.asarray(ann_box, np.float64).reshape(-1, 4)
    covered = np.zeros(si.size, bool)
    if si.size and ann_slice.size:
        qi, aj = overlap.same_key_pairs(si, ann_slice)
        hit = overlap.paired_iou(box[qi], ann_box[aj]) >= annotated_iou
        covered[qi[hit]] = True
    si, tj, box = si[~covered], tj[~covered], box[~covered]
    order = np.lexsort((tj, si))
    return {"slice": si[order], "box": box[order], "truth_row": tj[order]}


# --------------------------------------------------------------------------------------------------
# Which unmarked lesions the paper's matching could reach.
# --------------------------------------------------------------------------------------------------
REACH_COLUMNS = ("subvolume", "lesion_id", "patient", "split", "lesion_type", "marked")


def unmarked_reach(path: str, split: str = "train") -> dict[str, int]:
    """Counts the unmarked lesions of ``split``'s sub-volumes (``deeplesion_lesions.csv``, one row
    per lesion and sub-volume) by what could match them within the patient.

    Returns ``sub_volumes``, ``lesions`` (rows), ``marked``, ``unmarked``,
    ``unmarked_marked_elsewhere`` (the same lesion is marked in another sub-volume of the patient:
    a match by identity), ``unmarked_same_type_marked`` (a lesion of the same type is marked in the
    patient: a match by type) and ``unmarked_no_marked_like`` (neither). Raises ValueError naming
    the file and the line for a missing column or a bad value."""
    from uld_jax.mine.report import truth_csv_rows  # pylint: disable=g-import-not-at-top
    rows = []
    for line, rec in truth_csv_rows(path, split, REACH_COLUMNS):
        try:
            rows.append((rec["subvolume"].strip(), int(float(rec["lesion_id"])),
                         rec["patient"].strip(), rec["lesion_type"].strip(),
                         bool(int(float(rec["marked"])))))
        except ValueError as e:
            raise ValueError(f"{path} line {line}: {e}") from None
    marked_ids = {(p, lid) for _, lid, p, _, m in rows if m}
    marked_types = {(p, t) for _, _, p, t, m in rows if m}
    un = [(sv, lid, p, t) for sv, lid, p, t, m in rows if not m]
    elsewhere = sum((p, lid) in marked_ids for _, lid, p, _ in un)
    same_type = sum((p, t) in marked_types for _, _, p, t in un)
    unlike = sum((p, lid) not in marked_ids and (p, t) not in marked_types for _, lid, p, t in un)
    return {"sub_volumes": len({r[0] for r in rows}), "lesions": len(rows),
            "marked": len(rows) - len(un), "unmarked": len(un),
            "unmarked_marked_elsewhere": int(elsewhere),
            "unmarked_same_type_marked": int(same_type),
            "unmarked_no_marked_like": int(unlike)}


# --------------------------------------------------------------------------------------------------
# The oracle table.
# --------------------------------------------------------------------------------------------------
def write_oracle(mined: str, truth: quality.LesionTruth, data_dir: str, out: str, *,
                 store_dir: str | None = None, reach: Mapping[str, int] | None = None,
                 min_extent: float = DEFAULT_MIN_EXTENT,
                 annotated_iou: float = DEFAULT_ANNOTATED_IOU,
                 unmarked_only: bool = False, as_kind: str = "positive",
                 with_added: bool = True) -> dict[str, Any]:
    """Writes ``out``: the oracle's boxes (:func:`oracle_positives` of ``truth``, in the Case
    frames) on the slices the mining run ``mined`` looked at, plus that run's added unlabeled slices
    (nothing else of it); returns the summary also written beside ``out`` (``.json``): counts, the
    oracle table's quality against ``truth`` (all hits, by construction) and ``reach``.

    ``as_kind``: ``'positive'`` writes them as mined positives of the universal expert (a perfect
    MAM), ``'ignore'`` as ignore regions of no expert (-1: a perfect NRM, which keeps every lesion
    the annotations miss out of the negatives). ``with_added`` False leaves the added slices out
    (the table then adds labels only, for training from scratch with complete labels)."""
    # pylint: disable=g-import-not-at-top
    from uld_jax.mine import report
    from uld_jax.overlay import KIND_ADDED, write_overlay

    if as_kind not in AS_KINDS:
        raise ValueError(f"as_kind {as_kind!r}: expected one of {sorted(AS_KINDS)}")
    kind, expert = AS_KINDS[as_kind]
    src, slices, ann, _ = report.load_run_outputs(mined, store_dir)
    pos = oracle_positives(truth, slices.case_id, slices.slice_index, ann.slice, ann.box,
                           min_extent=min_extent, annotated_iou=annotated_iou,
                           unmarked_only=unmarked_only)
    cols, meta = src.arrays, src.meta
    added = (np.asarray(cols["kind"]) == KIND_ADDED) & with_added
    n = pos["slice"].size
    new = {"dataset": np.asarray(slices.dataset).astype(str)[pos["slice"]],
           "case_id": np.asarray(slices.case_id).astype(str)[pos["slice"]],
           "slice_index": np.asarray(slices.slice_index)[pos["slice"]],
           "kind": np.full(n, kind, np.int8), "box": pos["box"],
           "score": np.ones(n, np.float32), "expert": np.full(n, expert, np.int8),
           "lesion_id": np.asarray(truth.lesion_id)[pos["truth_row"]]}
    rows = {k: np.concatenate([np.asarray(cols[k])[added], v]) for k, v in new.items()}
    m = {k: v for k, v in meta.items()
         if k not in ("created", "tool_version", "counts", "theta", "sigma", "options")}
    m["oracle"] = {"source": os.path.abspath(mined), "min_extent": min_extent,
                   "annotated_iou": annotated_iou, "unmarked_only": unmarked_only,
                   "as": as_kind, "with_added": with_added}
    write_overlay(out, rows, m, data_dir=data_dir)
    q = quality.mining_quality(truth, table.read_overlay(out),
                               seen_case_id=np.asarray(slices.case_id),
                               seen_slice_index=np.asarray(slices.slice_index))
    marked = np.asarray(truth.marked, bool)[pos["truth_row"]]
    mam_rows = ((np.asarray(cols["kind"]) == table.KIND_MINED)
                & (np.asarray(cols["expert"]) == run.UNIVERSAL_EXPERT))
    summary = {
        "out": os.path.abspath(out), "as": as_kind, "slices_mined": len(slices),
        "added_slices": int(added.sum()), "oracle_boxes": int(n),
        "oracle_on_unmarked": int(np.sum(~marked)), "oracle_on_marked": int(np.sum(marked)),
        "oracle_lesions": int(np.unique(pos["truth_row"]).size),
        "mam_positives": int(mam_rows.sum()),
        "quality": {k: q[k] for k in report.SUMMARY_KEYS},
        "reach": dict(reach or {}),
    }
    summary = json_safe(summary)
    atomic_write_json(os.path.splitext(out)[0] + ".json", summary, indent=1)
    return summary


def oracle_table(mined: str, truth_dir: str, data_dir: str, out: str, *,
                 raw: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`write_oracle` with the world's truth of the training split (``truth_dir``'s
    ``deeplesion_lesions.csv`` mapped into the build's Cases) and its :func:`unmarked_reach`."""
    from uld_jax.mine import report  # pylint: disable=g-import-not-at-top
    truth = report.world_truth(truth_dir, data_dir, raw)
    return write_oracle(mined, truth, data_dir, out, reach=unmarked_reach(
        os.path.join(truth_dir, "deeplesion_lesions.csv"), "train"), **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uld_jax.mine.oracle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mined", required=True,
                   help="a mining run's table (WORKDIR/mined.npz): its slices and added slices")
    p.add_argument("--truth", required=True, help="WORLD/truth (deeplesion_lesions.csv)")
    p.add_argument("--raw", default=None, help="WORLD (default: the parent of --truth)")
    p.add_argument("--data_dir", required=True, help="the build's DATA_DIR")
    p.add_argument("--store_dir", default=None, help="the run's chunk store (default: its meta)")
    p.add_argument("--out", required=True,
                   help="the oracle table (.npz); a .json summary beside it")
    p.add_argument("--min_extent", type=float, default=DEFAULT_MIN_EXTENT)
    p.add_argument("--annotated_iou", type=float, default=DEFAULT_ANNOTATED_IOU)
    p.add_argument("--as", dest="as_kind", choices=sorted(AS_KINDS), default="positive",
                   help="positive: mined positives (a perfect MAM); ignore: ignore regions (a "
                   "perfect NRM)")
    p.add_argument("--without_added", action="store_true",
                   help="leave the run's added unlabeled slices out (labels only)")
    p.add_argument("--unmarked_only", action="store_true",
                   help="mine only lesions unmarked in their sub-volume")
    a = p.parse_args(argv)
    try:
        s = oracle_table(a.mined, a.truth, a.data_dir, a.out, store_dir=a.store_dir, raw=a.raw,
                         min_extent=a.min_extent, annotated_iou=a.annotated_iou,
                         unmarked_only=a.unmarked_only, as_kind=a.as_kind,
                         with_added=not a.without_added)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
