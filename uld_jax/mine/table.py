"""The annotation overlay ``.npz`` (docs/formats.md, "Annotation overlay"): the one writer, reader and
validator of the format, used by mining (the mined-annotation table) and by the data pipeline
(:mod:`uld_jax.overlay` builds its rows here and checks them against a build with
:func:`check_against_cases`). This module imports numpy only.

One row per mined positive (kind 1), ignore region (kind 2) or added unlabeled slice (kind 3), with
the fields the data pipeline merges into its sample table, and a 0-d ``meta`` string holding JSON
provenance: checkpoint step, config hash, theta, sigma, creation time, tool version (plus whatever
the mining run adds: options, counts). An overlay not made by MAM/NRM (written by hand through
:func:`uld_jax.overlay.write_overlay`) has ``theta`` / ``sigma`` null and ``checkpoint_step`` -1.

* :func:`build_overlay` checks the arrays and puts the rows in a canonical order (dataset, case,
  slice, kind, box, ...), so the same mining result always gives the same arrays (a resumed run can
  be compared with an uninterrupted one; only ``meta['created']`` differs).
* :func:`write_overlay` writes atomically: a temporary file in the same folder, fsync, then
  ``os.replace`` onto the final name (atomic on POSIX); a writer killed at any point leaves the
  previous file intact (and at worst a stray ``.<name>.*.tmp`` file, never read).
* :func:`read_overlay` validates everything and raises :class:`OverlayError` naming the file and
  the field.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

import uld_jax
from uld_jax.core import DATASETS, Provenance

KIND_MINED: int = int(Provenance.MINED)       # 1: classification-only positive
KIND_IGNORE: int = int(Provenance.IGNORE)     # 2: excluded from positive and negative sampling
KIND_UNLABELED: int = 3                       # 3: added unlabeled slice (no box)
KINDS: tuple[int, ...] = (KIND_MINED, KIND_IGNORE, KIND_UNLABELED)

# Field -> (dtype, trailing shape). Strings are fixed-width unicode so that np.load needs no pickle.
FIELDS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "dataset": (np.dtype("U"), ()),
    "case_id": (np.dtype("U"), ()),
    "slice_index": (np.dtype(np.int32), ()),
    "kind": (np.dtype(np.int8), ()),
    "box": (np.dtype(np.float32), (4,)),
    "score": (np.dtype(np.float32), ()),
    "expert": (np.dtype(np.int8), ()),
    "lesion_id": (np.dtype(np.int64), ()),
}
REQUIRED_META: tuple[str, ...] = (
    "checkpoint_step", "config_hash", "theta", "sigma", "created", "tool_version")


class OverlayError(ValueError):
    """A mined-annotation table that cannot be used; the message names the file and the field."""

    def __init__(self, source: str, field: str | None = None, problem: str | None = None):
        where = f"{source}: field '{field}'" if field else source
        super().__init__(where if problem is None else f"{where}: {problem}")
        self.source = source
        self.field = field
        self.problem = problem


@dataclasses.dataclass
class Overlay:
    """The table in memory: ``arrays`` (the FIELDS, length N) and ``meta`` (JSON-able dict)."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.arrays["kind"].shape[0])

    def counts(self) -> dict[str, int]:
        k = self.arrays["kind"]
        return {"mined": int(np.sum(k == KIND_MINED)), "ignore": int(np.sum(k == KIND_IGNORE)),
                "unlabeled_slices": int(np.sum(k == KIND_UNLABELED))}

    def equal_rows(self, other: "Overlay") -> bool:
        """Same rows (arrays bitwise equal); meta is not compared."""
        return all(np.array_equal(self.arrays[f], other.arrays[f], equal_nan=f in ("box", "score"))
                   for f in FIELDS)


def config_hash(config: Any) -> str:
    """sha256 (hex, 16 chars) of a config's canonical JSON (``ConfigDict`` or mapping)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    text = json.dumps(config, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_meta(*, checkpoint_step: int, config_hash: str, theta: float | None, sigma: float | None,
              **extra: Any) -> dict[str, Any]:
    """Provenance for a table: the required keys, creation time (UTC, ISO 8601), tool version.
    ``theta`` / ``sigma`` None: the rows do not come from MAM / NRM."""
    meta = {
        "checkpoint_step": int(checkpoint_step),
        "config_hash": str(config_hash),
        "theta": None if theta is None else float(theta),
        "sigma": None if sigma is None else float(sigma),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": f"uld_jax {uld_jax.__version__}",
    }
    meta.update(extra)
    json.dumps(meta)                           # fail here, not at write time, if not JSON-able
    return meta


def build_overlay(
    *,
    dataset: np.ndarray,
    case_id: np.ndarray,
    slice_index: np.ndarray,
    kind: np.ndarray,
    box: np.ndarray,
    score: np.ndarray,
    expert: np.ndarray,
    lesion_id: np.ndarray,
    meta: Mapping[str, Any],
    source: str = "<build>",
) -> Overlay:
    """Checks and canonically orders the rows; ``meta`` gets the per-kind counts added.

    Args are the FIELDS (length N each, ``box`` [N, 4] internal ``[y1, x1, y2, x2]`` pixels of the
    preprocessed slice). Raises :class:`OverlayError` naming ``source`` (e.g. the file to be
    written) and the row (in the order given) on bad values.
    """
    raw = dict(dataset=dataset, case_id=case_id, slice_index=slice_index, kind=kind, box=box,
               score=score, expert=expert, lesion_id=lesion_id)
    arrays = {f: _coerce(source, f, np.asarray(v)) for f, v in raw.items()}
    meta = dict(meta)
    _validate(source, arrays, meta)
    order = np.lexsort((
        arrays["lesion_id"], arrays["expert"], arrays["score"],
        arrays["box"][:, 3], arrays["box"][:, 2], arrays["box"][:, 1], arrays["box"][:, 0],
        arrays["kind"], arrays["slice_index"], arrays["case_id"], arrays["dataset"]))
    arrays = {f: v[order] for f, v in arrays.items()}
    out = Overlay(arrays, meta)
    out.meta["counts"] = out.counts()
    return out


def _coerce(source: str, field: str, v: np.ndarray) -> np.ndarray:
    dtype, tail = FIELDS[field]
    if v.ndim != 1 + len(tail) or v.shape[1:] != tail:
        raise OverlayError(source, field, f"shape {v.shape}, expected [N{''.join(f', {t}' for t in tail)}]")
    if dtype.kind == "U":
        if v.size and v.dtype.kind not in "US":
            raise OverlayError(source, field, f"dtype {v.dtype}, expected strings")
        return v.astype(str) if v.size else np.zeros(0, dtype="U1")
    if dtype.kind in "iu":
        if v.size and v.dtype.kind not in "iu":
            raise OverlayError(source, field, f"dtype {v.dtype}, expected integers")
        info = np.iinfo(dtype)
        if v.size and (v.min() < info.min or v.max() > info.max):
            raise OverlayError(source, field, f"values outside {dtype} range")
        return v.astype(dtype)
    if v.size and v.dtype.kind not in "fiu":
        raise OverlayError(source, field, f"dtype {v.dtype}, expected numbers")
    return v.astype(dtype)


def _validate(source: str, arrays: dict[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    n = arrays["kind"].shape[0]
    for f, v in arrays.items():
        if v.shape[0] != n:
            raise OverlayError(source, f, f"{v.shape[0]} rows, but 'kind' has {n}")
    bad = ~np.isin(arrays["dataset"], DATASETS)
    if bad.any():
        raise OverlayError(source, "dataset", f"row {int(np.argmax(bad))}: "
                           f"{str(arrays['dataset'][bad][0])!r} is not one of {DATASETS}")
    bad = np.char.str_len(arrays["case_id"]) == 0 if n else np.zeros(0, bool)
    if bad.any():
        raise OverlayError(source, "case_id", f"row {int(np.argmax(bad))}: empty")
    kind = arrays["kind"]
    bad = ~np.isin(kind, KINDS)
    if bad.any():
        raise OverlayError(source, "kind", f"row {int(np.argmax(bad))}: {int(kind[bad][0])} is not "
                           f"1 (mined), 2 (ignore) or 3 (unlabeled slice)")
    bad = arrays["slice_index"] < 0
    if bad.any():
        raise OverlayError(source, "slice_index", f"row {int(np.argmax(bad))}: negative")
    boxed = kind != KIND_UNLABELED
    b = arrays["box"]
    bad = boxed & ~(np.all(np.isfinite(b), axis=1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
    if bad.any():
        raise OverlayError(source, "box", f"row {int(np.argmax(bad))}: {b[bad][0].tolist()} is not a "
                           "finite [y1, x1, y2, x2] box with y2 > y1 and x2 > x1")
    bad = boxed & ~np.isfinite(arrays["score"])
    if bad.any():
        raise OverlayError(source, "score", f"row {int(np.argmax(bad))}: not finite")
    e = arrays["expert"]
    bad = (e < -1) | (e >= len(DATASETS))
    if bad.any():
        raise OverlayError(source, "expert", f"row {int(np.argmax(bad))}: {int(e[bad][0])} is not -1 "
                           f"or a dataset id 0..{len(DATASETS) - 1}")
    bad = arrays["lesion_id"] < -1
    if bad.any():
        raise OverlayError(source, "lesion_id", f"row {int(np.argmax(bad))}: below -1")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise OverlayError(source, "meta", f"missing provenance keys {missing}")
    for k in ("theta", "sigma"):
        if meta[k] is None:                      # not from MAM / NRM
            continue
        if isinstance(meta[k], bool) or not isinstance(meta[k], (int, float)) or not np.isfinite(meta[k]):
            raise OverlayError(source, "meta", f"{k} must be a finite number or null, got {meta[k]!r}")
    if not isinstance(meta["checkpoint_step"], int):
        raise OverlayError(source, "meta", f"checkpoint_step must be an integer, "
                           f"got {meta['checkpoint_step']!r}")


def atomic_write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes ``arrays`` as a compressed .npz atomically (temp file in the same folder, fsync,
    ``os.replace``, fsync of the folder). A writer killed at any point leaves the old file intact."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:                                          # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_overlay(path: str | os.PathLike, overlay: Overlay) -> None:
    """Validates and writes the table atomically (see :func:`atomic_write_npz`)."""
    path = os.fspath(path)
    _validate(path, overlay.arrays, overlay.meta)
    atomic_write_npz(path, {"meta": np.array(json.dumps(overlay.meta, sort_keys=True)),
                            **overlay.arrays})


def read_overlay(path: str | os.PathLike) -> Overlay:
    """Reads and validates a table; raises :class:`OverlayError` naming the file and field."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OverlayError(path, None, "no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            missing = sorted((set(FIELDS) | {"meta"}) - names)
            if missing:
                raise OverlayError(path, missing[0], "missing")
            extra = sorted(names - set(FIELDS) - {"meta"})
            if extra:
                raise OverlayError(path, extra[0], "unexpected field")
            loaded = {f: z[f] for f in FIELDS}
            meta_arr = z["meta"]
    except OverlayError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise OverlayError(path, None, f"not a readable overlay .npz (truncated or corrupt?): {e}") from e
    except ValueError as e:                          # e.g. an object array (pickle refused)
        raise OverlayError(path, None, f"not a readable overlay .npz (unreadable array: {e})") from e
    arrays = {}
    for f, v in loaded.items():
        dtype, _ = FIELDS[f]
        if v.size and (v.dtype.kind != dtype.kind or (dtype.kind != "U" and v.dtype != dtype)):
            raise OverlayError(path, f, f"dtype {v.dtype}, expected {dtype if dtype.kind != 'U' else 'str'}")
        arrays[f] = _coerce(path, f, v)
    if meta_arr.shape != () or meta_arr.dtype.kind != "U":
        raise OverlayError(path, "meta", "expected a 0-d string array holding JSON")
    try:
        meta = json.loads(str(meta_arr))
    except json.JSONDecodeError as e:
        raise OverlayError(path, "meta", f"not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise OverlayError(path, "meta", "JSON is not an object")
    _validate(path, arrays, meta)
    return Overlay(arrays, meta)


def check_against_cases(source: str, arrays: Mapping[str, np.ndarray],
                        cases: Mapping[str, Mapping[str, tuple[int, int, int]]],
                        tol: float = 1e-3) -> None:
    """Checks rows against a build: every case id exists, every slice index is inside its case,
    every box (kinds 1, 2) inside its ``height x width`` slice (``tol`` pixels of slack).

    ``cases``: {dataset: {case_id: (num_slices, height, width)}}. Raises :class:`OverlayError`
    naming the row.
    """
    for i in range(int(arrays["kind"].shape[0])):
        ds, cid = str(arrays["dataset"][i]), str(arrays["case_id"][i])
        z, kind = int(arrays["slice_index"][i]), int(arrays["kind"][i])
        where = f"row {i} ({ds}/{cid} slice {z})"
        known = cases.get(ds, {})
        if cid not in known:
            raise OverlayError(source, "case_id", f"{where}: unknown case id {cid!r} in dataset {ds!r}")
        zn, h, w = known[cid]
        if not 0 <= z < zn:
            raise OverlayError(source, "slice_index", f"{where}: slice index {z} outside 0..{zn - 1} "
                               f"of case {cid!r}")
        b = arrays["box"][i]
        if kind != KIND_UNLABELED and box_outside(b, h, w, tol):
            raise OverlayError(source, "box", f"{where}: box {b.tolist()} outside the {h}x{w} slice")


def box_outside(box: np.ndarray, h: int, w: int, tol: float = 1e-3) -> bool:
    """Whether internal box ``[y1, x1, y2, x2]`` leaves the ``h x w`` slice (by more than ``tol``)."""
    return bool(box[0] < -tol or box[1] < -tol or box[2] > h + tol or box[3] > w + tol)
