"""On-disk format of the built datasets (slice store, case table, sample table) and their readers.

``python -m data_prep.build`` writes, per source dataset ``<ds>`` (one of ``uld_jax.core.DATASETS``),
one folder ``DATA_DIR/<ds>/`` holding three TFDS datasets in ``array_record`` format (loadable with
``tfds.builder_from_directory(path)`` or ``tfds.data_source('uld_<ds>_samples', data_dir=DATA_DIR/<ds>,
split='train')``; none of the reading code imports TensorFlow):

``uld_<ds>_slices/1.0.0``, split ``slices``: the slice store. Record ``i`` is one resampled axial
  slice, stored once: ``case_id``, ``slice_index``, ``height``, ``width`` and ``hu`` (int16 HU,
  compressed with :func:`encode_slice`). The slices of a case are consecutive records, so slice ``z``
  of case ``c`` is record ``cases.slice_start[c] + z``.
``uld_<ds>_cases/1.0.0``, split ``cases``: one record per Case: ids, split, ``slice_start``,
  ``num_slices``, ``height``, ``width``, ``pixel_mm``, ``slice_mm``, ``z_mm [Z]``, crop, source.
``uld_<ds>_samples/1.0.0``, splits ``train`` / ``val`` / ``test`` (Case.split): one record per sample
  slice with its annotations (see :data:`SAMPLE_FEATURES`). Annotation rows ("lesions") carry a
  provenance (original / mined / ignore region); masks are stored cropped to their bounding
  rectangle, bit-packed and zlib-compressed (:func:`encode_mask`).

``DATA_DIR/<ds>/build_info.json`` is written last inside the folder; the folder itself appears under
its final name only when the dataset is complete (built in ``DATA_DIR/.incomplete-<ds>/`` and
renamed), so a folder ``DATA_DIR/<ds>`` is always a complete dataset.

Merged annotation overlays (``uld_jax.overlay``) live in ``DATA_DIR/<ds>/overlays/<name>/`` as a
sample table of the same format (``uld_<ds>_samples/1.0.0``) plus ``overlay_info.json``.

In memory, :class:`SampleTable` holds one dataset's cases and samples as flat numpy columns (the
per-sample annotation rows in CSR form: ``lesion_ptr``), which is what the grain loader indexes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import threading
import zlib
from typing import Any, Sequence

import numpy as np

from uld_jax.core import DATASET_ID, DATASETS, Provenance
from uld_jax.io import atomic

FORMAT_VERSION = 1
TFDS_VERSION = "1.0.0"
SLICE_CODEC = "delta_planes_zlib1"   # see encode_slice
SPLITS = ("train", "val", "test")
SLICES_SPLIT = "slices"
CASES_SPLIT = "cases"
BUILD_INFO = "build_info.json"


def tfds_name(dataset: str, table: str) -> str:
    """TFDS dataset name of ``table`` in {'slices', 'cases', 'samples'} for ``dataset``."""
    return f"uld_{dataset}_{table}"


def table_dir(dataset_dir: str | os.PathLike, dataset: str, table: str) -> str:
    """``DATA_DIR/<ds>/uld_<ds>_<table>/1.0.0`` (the TFDS dataset directory)."""
    return os.path.join(os.fspath(dataset_dir), tfds_name(dataset, table), TFDS_VERSION)


# --------------------------------------------------------------------------------------------------
# Codecs.
# --------------------------------------------------------------------------------------------------
def encode_slice(hu: np.ndarray, level: int = 1) -> bytes:
    """[H, W] int16 HU -> bytes (lossless).

    Horizontal first differences (int16, wrapping) split into low/high byte planes, then zlib: on
    real CT about 1.6x smaller than raw and ~2 ms to decode a 512 x 512 slice (PNG-16 is 5% smaller
    but 2-3x slower to encode and ~1.5x slower to decode).
    """
    hu = np.asarray(hu)
    if hu.dtype != np.int16 or hu.ndim != 2:
        raise ValueError(f"encode_slice: expected [H, W] int16 HU, got {hu.dtype} {hu.shape}")
    d = np.diff(hu, axis=1, prepend=np.int16(0)).astype("<i2", copy=False)
    planes = np.ascontiguousarray(d.view(np.uint8).reshape(-1, 2).T)   # [low bytes, high bytes]
    return zlib.compress(planes.tobytes(), level)


def decode_slice(data: bytes, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_slice`: bytes -> [height, width] int16 HU."""
    raw = zlib.decompress(data)
    if len(raw) != 2 * height * width:
        raise ValueError(
            f"decode_slice: {len(raw)} bytes decoded, expected {2 * height * width} for {height}x{width}")
    planes = np.frombuffer(raw, np.uint8).reshape(2, height * width)
    d = np.empty((height * width, 2), np.uint8)
    d[:, 0] = planes[0]
    d[:, 1] = planes[1]
    return np.cumsum(d.view("<i2").reshape(height, width), axis=1, dtype=np.int16)


def mask_rect(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding rectangle ``(y0, x0, y1, x1)`` (exclusive ends) of the nonzero pixels of ``mask``."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return (0, 0, 0, 0)
    return (int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1)


def encode_mask(mask: np.ndarray) -> tuple[tuple[int, int, int, int], bytes]:
    """[H, W] bool mask -> (rect ``(y0, x0, y1, x1)``, zlib(packbits(mask[y0:y1, x0:x1])))."""
    mask = np.asarray(mask).astype(bool)
    rect = mask_rect(mask)
    y0, x0, y1, x1 = rect
    return rect, zlib.compress(np.packbits(mask[y0:y1, x0:x1]).tobytes(), 6)


def decode_mask(rect: Sequence[int], data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_mask`: -> the [y1 - y0, x1 - x0] bool crop of the mask."""
    y0, x0, y1, x1 = (int(v) for v in rect)
    h, w = y1 - y0, x1 - x0
    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), bool)
    bits = np.unpackbits(np.frombuffer(zlib.decompress(data), np.uint8), count=h * w)
    return bits.reshape(h, w).astype(bool)


# --------------------------------------------------------------------------------------------------
# TFDS feature specs (imported lazily: tensorflow_datasets is heavy, and never pulls in TensorFlow
# for these operations).
# --------------------------------------------------------------------------------------------------
def _tfds():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds


@functools.lru_cache(maxsize=None)
def slice_features():
    """Features of a slice-store record."""
    tfds = _tfds()
    return tfds.features.FeaturesDict({
        "case_id": tfds.features.Text(),
        "slice_index": tfds.features.Scalar(np.int32),
        "height": tfds.features.Scalar(np.int32),
        "width": tfds.features.Scalar(np.int32),
        "hu": tfds.features.Tensor(shape=(), dtype=np.object_),
    })


@functools.lru_cache(maxsize=None)
def case_features():
    """Features of a case-table record."""
    tfds = _tfds()
    return tfds.features.FeaturesDict({
        "case_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "study_id": tfds.features.Text(),
        "series_id": tfds.features.Text(),
        "split": tfds.features.Text(),
        "slice_start": tfds.features.Scalar(np.int64),
        "num_slices": tfds.features.Scalar(np.int32),
        "height": tfds.features.Scalar(np.int32),
        "width": tfds.features.Scalar(np.int32),
        "pixel_mm": tfds.features.Scalar(np.float32),
        "slice_mm": tfds.features.Scalar(np.float32),
        "z_mm": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "source_crop_yx": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "source": tfds.features.Text(),
    })


@functools.lru_cache(maxsize=None)
def sample_features():
    """Features of a sample-table record (N = number of annotation rows of the slice).

    ``boxes`` [N, 4] internal ``[y1, x1, y2, x2]`` pixels of the stored slice; ``provenance`` [N]
    (uld_jax.core.Provenance); ``lesion_type`` [N] coarse type (-1 unknown); ``lesion_id`` [N];
    ``organ_target`` / ``organ_valid`` [N, 3] (lung, liver, lymph node); ``mask_rect`` [N, 4]
    ``(y0, x0, y1, x1)`` and ``mask`` [N] bytes (empty: no mask); ``recist`` [N, 4, 2] (x, y) with
    ``recist_valid`` [N]; ``score`` [N] (1 for original rows) and ``expert`` [N] (-1 for original rows)
    from mining; ``added``: a slice added by an overlay (not a sample of the base build).
    """
    tfds = _tfds()
    t = tfds.features.Tensor
    return tfds.features.FeaturesDict({
        "dataset_id": tfds.features.Scalar(np.int32),
        "case_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "study_id": tfds.features.Text(),
        "series_id": tfds.features.Text(),
        "split": tfds.features.Text(),
        "slice_index": tfds.features.Scalar(np.int32),
        "z_mm": tfds.features.Scalar(np.float32),
        "is_key_slice": tfds.features.Scalar(np.bool_),
        "added": tfds.features.Scalar(np.bool_),
        "boxes": t(shape=(None, 4), dtype=np.float32),
        "provenance": t(shape=(None,), dtype=np.int32),
        "lesion_type": t(shape=(None,), dtype=np.int32),
        "lesion_id": t(shape=(None,), dtype=np.int64),
        "organ_target": t(shape=(None, 3), dtype=np.float32),
        "organ_valid": t(shape=(None, 3), dtype=np.bool_),
        "mask_rect": t(shape=(None, 4), dtype=np.int32),
        "mask": t(shape=(None,), dtype=np.object_),
        "recist": t(shape=(None, 4, 2), dtype=np.float32),
        "recist_valid": t(shape=(None,), dtype=np.bool_),
        "score": t(shape=(None,), dtype=np.float32),
        "expert": t(shape=(None,), dtype=np.int32),
        "source": tfds.features.Text(),
    })


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


# --------------------------------------------------------------------------------------------------
# Writing TFDS tables (array_record shards + metadata).
# --------------------------------------------------------------------------------------------------
def shard_filename(dataset: str, table: str, split: str, shard: int, num_shards: int) -> str:
    """TFDS' default file name template ``{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}``."""
    return f"{tfds_name(dataset, table)}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"


# Slice records hold zlib'd pixels already: array_record's own compression would only cost time
# (measured: 2.4 -> 0.9 ms per 300 kB record to write, 0.85 -> 0.5 ms to read).
SLICE_RECORD_OPTIONS = "group_size:1,uncompressed"
TABLE_RECORD_OPTIONS = "group_size:1"


def write_array_record(path: str, records: Sequence[bytes], options: str = TABLE_RECORD_OPTIONS) -> None:
    """Writes serialized records to one ArrayRecord file (``group_size:1``: cheap random access)."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    writer = array_record_module.ArrayRecordWriter(path, options)
    try:
        for r in records:
            writer.write(r)
    finally:
        writer.close()


def write_tfds_metadata(tdir: str, features, split_shards: dict[str, list[int]],
                        description: str, metadata: dict | None = None) -> None:
    """Writes ``dataset_info.json`` / ``features.json`` for shards already in ``tdir``.

    ``split_shards``: split name -> number of records of each shard, in shard order.
    """
    tfds = _tfds()
    infos = []
    for split, lengths in split_shards.items():
        nbytes = 0
        for k in range(len(lengths)):
            name = os.path.basename(os.path.dirname(tdir))
            fn = f"{name}-{split}.array_record-{k:05d}-of-{len(lengths):05d}"
            nbytes += os.path.getsize(os.path.join(tdir, fn))
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=list(lengths), num_bytes=nbytes))
    kwargs = {}
    if metadata is not None:
        kwargs["metadata"] = tfds.core.MetadataDict(metadata)
    tfds.folder_dataset.write_metadata(
        data_dir=tdir, features=features, split_infos=infos, check_data=False,
        description=description, **kwargs)


def write_table(tdir: str, dataset: str, table: str, features, split_records: dict[str, list[dict]],
                description: str, shard_size: int = 50_000) -> None:
    """Serializes dict records with ``features`` into a TFDS array_record dataset at ``tdir``."""
    os.makedirs(tdir, exist_ok=True)
    split_shards: dict[str, list[int]] = {}
    for split, records in split_records.items():
        if not records:
            continue
        n_shards = max(1, -(-len(records) // shard_size))
        lengths = []
        for k in range(n_shards):
            part = records[k * shard_size:(k + 1) * shard_size]
            write_array_record(os.path.join(tdir, shard_filename(dataset, table, split, k, n_shards)),
                               [features.serialize_example(r) for r in part])
            lengths.append(len(part))
        split_shards[split] = lengths
    write_tfds_metadata(tdir, features, split_shards, description)


def read_table(tdir: str, split: str) -> list[dict]:
    """All records of ``split`` of the TFDS dataset at ``tdir``, deserialized to numpy (no TF)."""
    tfds = _tfds()
    builder = tfds.builder_from_directory(tdir)
    if split not in builder.info.splits:
        return []
    src = builder.as_data_source(split)
    n = len(src)
    out: list[dict] = []
    step = 4096
    for i in range(0, n, step):
        out.extend(src.__getitems__(list(range(i, min(n, i + step)))))
    return out


def atomic_write_json(path: str, obj: Any) -> None:
    """Writes JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    atomic.atomic_write_json(path, obj, fsync=True, indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Slice store reader.
# --------------------------------------------------------------------------------------------------
class SliceStore:
    """Random access to one dataset's slice store; picklable (opened lazily in each process).

    ``cache_slices``: decoded slices kept per process (LRU). In-order reading (evaluation, mining
    every 5 mm) reuses most of the 9 context slices of the previous sample; shuffled training
    rarely hits, so the default is small.
    """

    def __init__(self, dataset_dir: str | os.PathLike, dataset: str, cache_slices: int = 32):
        self.dataset_dir = os.fspath(dataset_dir)
        self.dataset = dataset
        self.cache_slices = int(cache_slices)
        self._src = None
        self._cache: collections.OrderedDict | None = None
        self._lock = threading.Lock()

    def _source(self):
        if self._src is None:
            tfds = _tfds()
            builder = tfds.builder_from_directory(table_dir(self.dataset_dir, self.dataset, "slices"))
            self._src = builder.as_data_source(SLICES_SPLIT)
        return self._src

    def __len__(self) -> int:
        return len(self._source())

    def __getstate__(self):
        return {"dataset_dir": self.dataset_dir, "dataset": self.dataset,
                "cache_slices": self.cache_slices}

    def __setstate__(self, state):
        self.__init__(state["dataset_dir"], state["dataset"], state["cache_slices"])

    def read(self, indices: Sequence[int], case_id: str | None = None,
             slice_indices: Sequence[int] | None = None) -> list[np.ndarray]:
        """Slice-store record indices -> list of [h, w] int16 HU slices (treat as read-only).

        With ``case_id`` / ``slice_indices`` each record is checked to be that slice (a table that
        does not match its store fails loudly instead of feeding the wrong pixels).
        """
        indices = [int(i) for i in indices]
        out: list[np.ndarray | None] = [None] * len(indices)
        with self._lock:
            if self._cache is None:
                self._cache = collections.OrderedDict()
            for k, i in enumerate(indices):
                hit = self._cache.get(i)
                if hit is not None and (case_id is None or (
                        hit[0] == case_id and (slice_indices is None or hit[1] == int(slice_indices[k])))):
                    self._cache.move_to_end(i)
                    out[k] = hit[2]
        miss = [k for k, v in enumerate(out) if v is None]
        if miss:
            recs = self._source().__getitems__([indices[k] for k in miss])
            for k, r in zip(miss, recs):
                got = (_text(r["case_id"]), int(r["slice_index"]))
                if case_id is not None:
                    want = (case_id, int(slice_indices[k]) if slice_indices is not None else got[1])
                    if got != want:
                        raise ValueError(
                            f"{table_dir(self.dataset_dir, self.dataset, 'slices')}: record {indices[k]} "
                            f"holds {got[0]!r} slice {got[1]}, the sample table expects {want[0]!r} "
                            f"slice {want[1]}")
                out[k] = decode_slice(r["hu"], int(r["height"]), int(r["width"]))
                if self.cache_slices > 0:
                    with self._lock:
                        self._cache[indices[k]] = (got[0], got[1], out[k])
                        while len(self._cache) > self.cache_slices:
                            self._cache.popitem(last=False)
        return out

    def read_records(self, indices: Sequence[int]) -> list[dict]:
        """Raw records (with ``case_id`` / ``slice_index`` for verification)."""
        return list(self._source().__getitems__([int(i) for i in indices]))


# --------------------------------------------------------------------------------------------------
# In-memory sample table.
# --------------------------------------------------------------------------------------------------
_LESION_FIELDS = ("boxes", "provenance", "lesion_type", "lesion_id", "organ_target", "organ_valid",
                  "mask_rect", "recist", "recist_valid", "score", "expert")
_LESION_SHAPES = {"boxes": ((4,), np.float32), "provenance": ((), np.int32),
                  "lesion_type": ((), np.int32), "lesion_id": ((), np.int64),
                  "organ_target": ((3,), np.float32), "organ_valid": ((3,), np.bool_),
                  "mask_rect": ((4,), np.int32), "recist": ((4, 2), np.float32),
                  "recist_valid": ((), np.bool_), "score": ((), np.float32),
                  "expert": ((), np.int32)}


@dataclasses.dataclass
class SampleTable:
    """One dataset's cases and samples of one split, as numpy columns.

    Cases (C): ``case_id`` [C] str, ``case_patient`` / ``case_study`` / ``case_series`` [C] str,
    ``case_split`` [C] str,
    ``case_slice_start`` [C] int64 (first slice-store record), ``case_num_slices`` [C],
    ``case_hw`` [C, 2], ``case_pixel_mm`` [C], ``case_slice_mm`` [C], ``case_z_mm`` list of [Z_c].
    Samples (S): ``case_row`` [S] (into the case columns), ``slice_index`` [S], ``z_mm`` [S],
    ``is_key_slice`` [S], ``added`` [S], ``study_id`` / ``series_id`` [S] str, and CSR annotation rows
    ``lesion_ptr`` [S + 1] into the lesion columns ``lesions[name]`` [L, ...] and ``masks`` [L]
    (bytes, empty = no mask).
    """

    dataset: str
    split: str
    case_id: np.ndarray
    case_patient: np.ndarray
    case_study: np.ndarray
    case_series: np.ndarray
    case_split: np.ndarray
    case_slice_start: np.ndarray
    case_num_slices: np.ndarray
    case_hw: np.ndarray
    case_pixel_mm: np.ndarray
    case_slice_mm: np.ndarray
    case_z_mm: list
    case_row: np.ndarray
    slice_index: np.ndarray
    z_mm: np.ndarray
    is_key_slice: np.ndarray
    added: np.ndarray
    study_id: np.ndarray
    series_id: np.ndarray
    source: np.ndarray
    lesion_ptr: np.ndarray
    lesions: dict
    masks: np.ndarray
    # Every case id of the dataset (all splits): overlays use it to tell "another split" from
    # "unknown case".
    all_case_ids: frozenset = frozenset()

    @property
    def dataset_id(self) -> int:
        return DATASET_ID[self.dataset]

    def __len__(self) -> int:
        return int(self.case_row.shape[0])

    def case_index(self) -> dict[str, int]:
        """case_id -> case row."""
        return {str(c): i for i, c in enumerate(self.case_id)}

    def sample_lesions(self, s: int) -> dict[str, np.ndarray]:
        """Annotation rows of sample ``s`` (each field [n, ...]) plus ``mask`` [n] bytes."""
        a, b = int(self.lesion_ptr[s]), int(self.lesion_ptr[s + 1])
        out = {k: v[a:b] for k, v in self.lesions.items()}
        out["mask"] = self.masks[a:b]
        return out

    def has_provenance(self, provenance: int) -> np.ndarray:
        """[S] bool: the sample has at least one box of this :class:`Provenance`."""
        hit = (self.lesions["provenance"] == int(provenance)).astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(hit)])
        return (csum[self.lesion_ptr[1:]] - csum[self.lesion_ptr[:-1]]) > 0

    def has_original(self) -> np.ndarray:
        """[S] bool: the sample has at least one original (source-annotated) box."""
        return self.has_provenance(Provenance.ORIGINAL)

    def to_records(self) -> list[dict]:
        """Sample-table records (the :func:`sample_features` dicts) of every sample, in order."""
        recs = []
        for s in range(len(self)):
            c = int(self.case_row[s])
            les = self.sample_lesions(s)
            rec = {
                "dataset_id": self.dataset_id,
                "case_id": str(self.case_id[c]),
                "patient_id": str(self.case_patient[c]),
                "study_id": str(self.study_id[s]),
                "series_id": str(self.series_id[s]),
                "split": self.split,
                "slice_index": int(self.slice_index[s]),
                "z_mm": float(self.z_mm[s]),
                "is_key_slice": bool(self.is_key_slice[s]),
                "added": bool(self.added[s]),
                "mask": [bytes(m) for m in les.pop("mask")],
                "source": str(self.source[s]),
            }
            rec.update({k: v for k, v in les.items()})
            recs.append(rec)
        return recs


def _empty_lesions(n: int) -> dict[str, np.ndarray]:
    return {k: np.zeros((n,) + shp, dt) for k, (shp, dt) in _LESION_SHAPES.items()}


def assemble_table(dataset: str, split: str, cases: list[dict], samples: list[dict]) -> SampleTable:
    """Builds a :class:`SampleTable` from case records and sample records (feature dicts)."""
    cidx = {_text(c["case_id"]): i for i, c in enumerate(cases)}
    case_row = np.zeros(len(samples), np.int64)
    ptr = np.zeros(len(samples) + 1, np.int64)
    for i, s in enumerate(samples):
        cid = _text(s["case_id"])
        if cid not in cidx:
            raise KeyError(f"{dataset}/{split}: sample {i} names case_id {cid!r}, not in the case table")
        case_row[i] = cidx[cid]
        ptr[i + 1] = ptr[i] + len(s["boxes"])
    lesions = _empty_lesions(int(ptr[-1]))
    masks = np.empty(int(ptr[-1]), dtype=object)
    for i, s in enumerate(samples):
        a, b = int(ptr[i]), int(ptr[i + 1])
        if b > a:
            for k in _LESION_FIELDS:
                lesions[k][a:b] = np.asarray(s[k]).reshape((b - a,) + _LESION_SHAPES[k][0])
            masks[a:b] = [bytes(m) for m in s["mask"]]

    def col(key, dtype, recs):
        return np.asarray([r[key] for r in recs], dtype=dtype)

    return SampleTable(
        dataset=dataset, split=split,
        case_id=np.asarray([_text(c["case_id"]) for c in cases], dtype=object),
        case_patient=np.asarray([_text(c["patient_id"]) for c in cases], dtype=object),
        case_study=np.asarray([_text(c["study_id"]) for c in cases], dtype=object),
        case_series=np.asarray([_text(c["series_id"]) for c in cases], dtype=object),
        case_split=np.asarray([_text(c["split"]) for c in cases], dtype=object),
        case_slice_start=col("slice_start", np.int64, cases),
        case_num_slices=col("num_slices", np.int64, cases),
        case_hw=np.asarray([[c["height"], c["width"]] for c in cases], np.int64).reshape(-1, 2),
        case_pixel_mm=col("pixel_mm", np.float32, cases),
        case_slice_mm=col("slice_mm", np.float32, cases),
        case_z_mm=[np.asarray(c["z_mm"], np.float32) for c in cases],
        case_row=case_row,
        slice_index=col("slice_index", np.int64, samples),
        z_mm=col("z_mm", np.float32, samples),
        is_key_slice=col("is_key_slice", bool, samples),
        added=col("added", bool, samples),
        study_id=np.asarray([_text(s["study_id"]) for s in samples], dtype=object),
        series_id=np.asarray([_text(s["series_id"]) for s in samples], dtype=object),
        source=np.asarray([_text(s["source"]) for s in samples], dtype=object),
        lesion_ptr=ptr, lesions=lesions, masks=masks)


def dataset_dir_for(data_dir: str | os.PathLike, dataset: str) -> str:
    """``DATA_DIR/<ds>``, checked to be a complete build."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    d = os.path.join(os.fspath(data_dir), dataset)
    if not os.path.isfile(os.path.join(d, BUILD_INFO)):
        raise FileNotFoundError(
            f"{d}: no complete build of {dataset!r} (missing {BUILD_INFO}); run "
            f"`python -m data_prep.build --out {data_dir} --datasets {dataset}`")
    return d


def read_build_info(data_dir: str | os.PathLike, dataset: str) -> dict:
    with open(os.path.join(dataset_dir_for(data_dir, dataset), BUILD_INFO), encoding="utf-8") as f:
        return json.load(f)


def load_cases(data_dir: str | os.PathLike, dataset: str) -> list[dict]:
    """All case records of a built dataset."""
    d = dataset_dir_for(data_dir, dataset)
    return read_table(table_dir(d, dataset, "cases"), CASES_SPLIT)


def load_sample_table(data_dir: str | os.PathLike, dataset: str, split: str,
                      version: str | None = None, overlays: Sequence[str] = ()) -> SampleTable:
    """Loads one dataset's sample table of ``split`` into memory.

    Args:
      data_dir: the build's output folder (``DATA_DIR``).
      dataset: a name in ``uld_jax.core.DATASETS``.
      split: 'train', 'val' or 'test'.
      version: None for the base table, or the name of a merged overlay table
        (``uld_jax.overlay.merge_overlays``).
      overlays: overlay ``.npz`` files applied on top, in order (rows of other datasets/splits are
        skipped; see ``uld_jax.overlay.apply_overlays``).
    """
    d = dataset_dir_for(data_dir, dataset)
    cases = read_table(table_dir(d, dataset, "cases"), CASES_SPLIT)
    if version:
        sdir = os.path.join(d, "overlays", version)
        if not os.path.isfile(os.path.join(sdir, "overlay_info.json")):
            raise FileNotFoundError(f"{sdir}: no merged overlay table named {version!r}")
        tdir = table_dir(sdir, dataset, "samples")
    else:
        tdir = table_dir(d, dataset, "samples")
    samples = read_table(tdir, split)
    split_cases = [c for c in cases if _text(c["split"]) == split]
    table = assemble_table(dataset, split, split_cases, samples)
    table.all_case_ids = frozenset(_text(c["case_id"]) for c in cases)
    if overlays:
        from uld_jax import overlay as overlay_lib  # pylint: disable=g-import-not-at-top
        table = overlay_lib.apply_overlays(table, overlays)
    return table
