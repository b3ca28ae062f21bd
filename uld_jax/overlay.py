"""Annotation overlays: mined rows added to a sample table without rebuilding the slice store.

File format: docs/formats.md, "Annotation overlay" (``.npz``; columns ``dataset``, ``case_id``,
``slice_index``, ``kind``, ``box``, ``score``, ``expert``, ``lesion_id``, ``meta``), written, read
and validated by :mod:`uld_jax.mine.table` (the one implementation, shared with mining). Kinds:

* 1 (:data:`KIND_MINED`): a MAM positive, stored as a box with ``Provenance.MINED``;
* 2 (:data:`KIND_IGNORE`): an NRM ignore region, ``Provenance.IGNORE`` (-> ``ignore_boxes``);
* 3 (:data:`KIND_ADDED`): an unlabeled slice added as a sample (its box is ignored).

Rows on a slice that is not yet a sample create a new sample with ``added = True`` (the loader's
``added_ratio`` pool). Two ways to use overlays, both leaving the base build untouched:

* at load time: ``load_sample_table(..., overlays=[a.npz, b.npz])`` / ``config.overlays``;
* merged into a named, immutable table version: :func:`merge_overlays` writes
  ``DATA_DIR/<ds>/overlays/<name>/`` atomically (temporary folder + rename) with the overlay files'
  SHA-256 and metadata in ``overlay_info.json``; select it with ``config.samples_version = name``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Mapping, Sequence

import numpy as np

from uld_jax import slice_data as sd
from uld_jax.core import DATASETS, Provenance
from uld_jax.mine import table as fmt
from uld_jax.mine.table import KIND_IGNORE, KIND_MINED, OverlayError  # noqa: F401 (re-exported)

KIND_ADDED = fmt.KIND_UNLABELED
_KIND_PROVENANCE = {KIND_MINED: int(Provenance.MINED), KIND_IGNORE: int(Provenance.IGNORE)}
COLUMNS = tuple(fmt.FIELDS)
_outside = fmt.box_outside


def _columns(rows: Any) -> dict[str, np.ndarray]:
    """Rows as a dict of columns (accepts a dict of columns or a list of row dicts); ``score``,
    ``expert``, ``lesion_id`` and ``box`` (of kind-3 rows) may be left out."""
    if isinstance(rows, Mapping):
        cols = dict(rows)
    else:
        rows = list(rows)
        cols = {k: [r[k] for r in rows] for k in COLUMNS if rows and k in rows[0]}
        if not rows:
            cols = {k: [] for k in COLUMNS}
    n = len(cols.get("case_id", []))
    defaults = {"score": np.ones(n, np.float32), "expert": np.full(n, -1, np.int8),
                "lesion_id": np.full(n, -1, np.int64), "box": np.zeros((n, 4), np.float32)}
    for k, v in defaults.items():
        cols.setdefault(k, v)
    missing = [k for k in COLUMNS if k not in cols]
    if missing:
        raise OverlayError("overlay rows", None, f"missing columns {missing}")
    out = {}
    for k in COLUMNS:
        dtype, tail = fmt.FIELDS[k]
        v = np.asarray(cols[k])
        if dtype.kind == "U":
            v = v.astype(str)
        elif v.size == 0:
            v = v.astype(dtype)
        out[k] = v.reshape((-1,) + tail)
    return out


def _case_extents(data_dir: str, datasets: Sequence[str]) -> dict[str, dict[str, tuple[int, int, int]]]:
    out = {}
    for ds in datasets:
        out[ds] = {sd._text(c["case_id"]): (int(c["num_slices"]), int(c["height"]), int(c["width"]))
                   for c in sd.load_cases(data_dir, ds)}
    return out


def write_overlay(path: str, rows: Any, meta: Mapping[str, Any], *, data_dir: str | None = None) -> str:
    """Validates ``rows`` (format and against the build) and writes them as an overlay ``.npz``
    atomically, through :func:`uld_jax.mine.table.write_overlay` (the one writer of the format).

    Args:
      path: the ``.npz`` to write.
      rows: a dict of columns (``dataset``, ``case_id``, ``slice_index``, ``kind``, ``box`` [N, 4];
        optional ``score``, ``expert``, ``lesion_id``) or a list of row dicts with those keys.
      meta: provenance (checkpoint step, config hash, theta, sigma, ...); missing provenance keys get
        "not from mining" values (``checkpoint_step`` -1, ``config_hash`` "", ``theta`` / ``sigma``
        null); ``created`` and ``tool_version`` are added. Must be JSON-serialisable.
      data_dir: the build's DATA_DIR (default ``meta['data_dir']``): every case id, slice index and
        box is checked against its case tables.
    Returns: ``path``.
    """
    data_dir = data_dir or meta.get("data_dir")
    if not data_dir:
        raise OverlayError(path, None, "write_overlay needs data_dir (or meta['data_dir']) to "
                           "validate rows")
    meta = dict(meta)
    prov = {k: meta.pop(k, d) for k, d in (("checkpoint_step", -1), ("config_hash", ""),
                                           ("theta", None), ("sigma", None))}
    meta.pop("created", None)
    meta.pop("tool_version", None)
    try:
        full_meta = fmt.make_meta(**prov, **meta)
    except (TypeError, ValueError) as e:
        raise OverlayError(path, "meta", f"not usable provenance: {e}") from e
    cols = _columns(rows)
    ov = fmt.build_overlay(**cols, meta=full_meta, source=path)        # format checks, rows in canonical order
    fmt.check_against_cases(path, cols,    # errors name the caller's rows
                            _case_extents(data_dir, sorted(set(ov.arrays["dataset"].tolist()))))
    fmt.write_overlay(path, ov)
    return path


def read_overlay(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """-> (columns, meta), validated by :func:`uld_jax.mine.table.read_overlay` (case ids are
    checked when applied)."""
    ov = fmt.read_overlay(path)
    return ov.arrays, ov.meta


def apply_overlays(table: sd.SampleTable, paths: Sequence[str]) -> sd.SampleTable:
    """A new :class:`SampleTable` = ``table`` + the rows of ``paths`` for its dataset and split.

    Rows of other datasets, and of cases in other splits, are skipped. A row naming a case the
    dataset does not have, a slice outside the case or a box outside the slice raises
    :class:`OverlayError` naming the file and row.
    """
    cidx = table.case_index()
    sample_of = {(int(table.case_row[s]), int(table.slice_index[s])): s for s in range(len(table))}
    extra: dict[int, list[dict]] = {}
    new_samples: list[tuple[int, int]] = []        # (case row, slice index)
    for path in paths:
        cols, _ = read_overlay(path)
        for i in range(len(cols["case_id"])):
            if str(cols["dataset"][i]) != table.dataset:
                continue
            cid, z, kind = str(cols["case_id"][i]), int(cols["slice_index"][i]), int(cols["kind"][i])
            w = f"{path} row {i} ({table.dataset}/{cid} slice {z})"
            if cid not in cidx:
                if cid in table.all_case_ids:
                    continue                        # another split's case
                raise OverlayError(f"{w}: unknown case id {cid!r} in dataset {table.dataset!r}")
            c = cidx[cid]
            if not 0 <= z < int(table.case_num_slices[c]):
                raise OverlayError(f"{w}: slice index {z} outside 0..{int(table.case_num_slices[c]) - 1}")
            h, wd = (int(v) for v in table.case_hw[c])
            box = cols["box"][i]
            if kind != KIND_ADDED and _outside(box, h, wd):
                raise OverlayError(f"{w}: box {box.tolist()} outside the {h}x{wd} slice")
            key = (c, z)
            if key not in sample_of:
                sample_of[key] = len(table) + len(new_samples)
                new_samples.append(key)
            if kind != KIND_ADDED:
                extra.setdefault(sample_of[key], []).append({
                    "box": box, "provenance": _KIND_PROVENANCE[kind],
                    "lesion_id": int(cols["lesion_id"][i]), "score": float(cols["score"][i]),
                    "expert": int(cols["expert"][i])})
    return _rebuild(table, new_samples, extra)


def _rebuild(table: sd.SampleTable, new_samples, extra) -> sd.SampleTable:
    S, A = len(table), len(new_samples)
    n_extra = sum(len(v) for v in extra.values())
    base_L = int(table.lesion_ptr[-1])
    # Lesion pool = base rows + overlay rows; each sample gathers its rows from the pool.
    pool = {k: np.concatenate([v, np.zeros((n_extra,) + v.shape[1:], v.dtype)])
            for k, v in table.lesions.items()}
    pool["lesion_type"][base_L:] = -1
    masks = np.concatenate([table.masks, np.array([b""] * n_extra, dtype=object)])
    order, ptr = [], [0]
    nxt = base_L
    for s in range(S + A):
        if s < S:
            order.extend(range(int(table.lesion_ptr[s]), int(table.lesion_ptr[s + 1])))
        for r in extra.get(s, []):
            pool["boxes"][nxt] = r["box"]
            pool["provenance"][nxt] = r["provenance"]
            pool["lesion_id"][nxt] = r["lesion_id"]
            pool["score"][nxt] = r["score"]
            pool["expert"][nxt] = r["expert"]
            order.append(nxt)
            nxt += 1
        ptr.append(len(order))
    order = np.asarray(order, np.int64)
    new_c = np.asarray([c for c, _ in new_samples], np.int64)
    new_z = np.asarray([z for _, z in new_samples], np.int64)
    new_zmm = np.asarray([table.case_z_mm[c][z] for c, z in new_samples], np.float32)
    return sd.SampleTable(
        dataset=table.dataset, split=table.split, case_id=table.case_id, case_patient=table.case_patient,
        case_study=table.case_study, case_series=table.case_series, case_split=table.case_split,
        case_slice_start=table.case_slice_start, case_num_slices=table.case_num_slices,
        case_hw=table.case_hw, case_pixel_mm=table.case_pixel_mm, case_slice_mm=table.case_slice_mm,
        case_z_mm=table.case_z_mm,
        case_row=np.concatenate([table.case_row, new_c]),
        slice_index=np.concatenate([table.slice_index, new_z]),
        z_mm=np.concatenate([table.z_mm, new_zmm]),
        is_key_slice=np.concatenate([table.is_key_slice, np.zeros(A, bool)]),
        added=np.concatenate([table.added, np.ones(A, bool)]),
        study_id=np.concatenate([table.study_id, table.case_study[new_c]]).astype(object),
        series_id=np.concatenate([table.series_id, table.case_series[new_c]]).astype(object),
        source=np.concatenate([table.source, np.array(["overlay"] * A, dtype=object)]).astype(object),
        lesion_ptr=np.asarray(ptr, np.int64),
        lesions={k: v[order] for k, v in pool.items()},
        masks=masks[order] if order.size else masks[:0],
        all_case_ids=table.all_case_ids)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def merge_overlays(data_dir: str, dataset: str, overlays: Sequence[str], name: str,
                   base_version: str | None = None) -> str:
    """Writes base sample table (or ``base_version``) + ``overlays`` as the table version ``name``.

    The result, ``DATA_DIR/<ds>/overlays/<name>/`` (a TFDS sample table + ``overlay_info.json``), is
    assembled in a temporary folder and renamed; an existing version is never overwritten. The
    slice store and case table are shared with the base build.
    """
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
        raise OverlayError(f"overlay table name {name!r}: use letters, digits, '-', '_', '.'")
    ddir = sd.dataset_dir_for(data_dir, dataset)
    root = os.path.join(ddir, "overlays")
    final = os.path.join(root, name)
    if os.path.exists(final):
        raise OverlayError(f"{final} exists; overlay table versions are immutable, choose another name")
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    split_records = {}
    for split in sd.SPLITS:
        table = sd.load_sample_table(data_dir, dataset, split, version=base_version)
        if len(table.case_id) == 0:
            continue
        merged = apply_overlays(table, overlays)
        split_records[split] = merged.to_records()
        counts[split] = {"samples": len(merged),
                         "added_samples": int(merged.added.sum()) - int(table.added.sum()),
                         "rows": int(merged.lesion_ptr[-1]) - int(table.lesion_ptr[-1])}
    sd.write_table(sd.table_dir(tmp, dataset, "samples"), dataset, "samples", sd.sample_features(),
                   split_records, description=f"ULD sample table of {dataset} + overlays {name}")
    info = {"name": name, "dataset": dataset, "base_version": base_version or "",
            "overlays": [{"path": os.path.abspath(p), "sha256": _sha256(p), "meta": read_overlay(p)[1]}
                         for p in overlays],
            "counts": counts, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    sd.atomic_write_json(os.path.join(tmp, "overlay_info.json"), info)
    os.rename(tmp, final)
    return final


def add_slices(table: sd.SampleTable, every_mm: float = 5.0) -> sd.SampleTable:
    """``table`` plus, as added samples, every slice about ``every_mm`` apart of each of its cases.

    For mining (DESIGN: proposals on training slices sampled every 5 mm) and whole-volume
    evaluation (``every_mm = slice_mm``): feed the result to ``input_pipeline.make_dataset(config,
    tables=[...], stores=[...])`` with ``config.mix = False``. Existing samples keep their annotations;
    added: for each multiple of ``every_mm`` from the first slice, the nearest slice (ties: the later).
    """
    have = {(int(table.case_row[s]), int(table.slice_index[s])) for s in range(len(table))}
    new = []
    for c in range(len(table.case_id)):
        n, mm = int(table.case_num_slices[c]), float(table.case_slice_mm[c])
        zs = np.floor(np.arange(0.0, n * mm, every_mm) / mm + 0.5).astype(np.int64)
        zs = np.unique(zs[zs < n])
        new.extend((c, int(z)) for z in zs if (c, int(z)) not in have)
    return _rebuild(table, new, {})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m uld_jax.overlay merge --data DATA --dataset DS --name NAME a.npz [b.npz ...]``
    (and ``show a.npz``: row counts by dataset and kind, and the metadata)."""
    import argparse  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    p = argparse.ArgumentParser(prog="python -m uld_jax.overlay")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge overlays into a named sample-table version")
    m.add_argument("--data", required=True, help="DATA_DIR of the build")
    m.add_argument("--dataset", required=True, choices=DATASETS)
    m.add_argument("--name", required=True)
    m.add_argument("--base-version", default=None)
    m.add_argument("overlays", nargs="+")
    s = sub.add_parser("show", help="summarise an overlay file")
    s.add_argument("overlay")
    a = p.parse_args(argv)
    try:
        if a.cmd == "merge":
            print(merge_overlays(a.data, a.dataset, a.overlays, a.name, a.base_version))
        else:
            cols, meta = read_overlay(a.overlay)
            for ds in sorted(set(cols["dataset"].tolist())):
                sel = cols["dataset"] == ds
                kinds = {k: int((cols["kind"][sel] == k).sum()) for k in (1, 2, 3)}
                print(f"{ds}: mined {kinds[1]}, ignore {kinds[2]}, added slices {kinds[3]}")
            print(json.dumps(meta, indent=1, sort_keys=True))
    except (OverlayError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
