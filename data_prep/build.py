"""Build the TFDS slice datasets from the raw downloads.

    python -m data_prep.build --raw DIR --out DATA_DIR [--datasets deeplesion,luna16,lits,nihln]
                              [--skip-bad] [--pixel-mm 0.8] [--slice-mm 2.0]

For each dataset the reader ``data_prep.readers.<name>.iter_cases(raw, skip_bad=, bad_items=,
pixel_mm=, slice_mm=)`` yields preprocessed :class:`data_prep.types.Case` objects; this module writes
them into ``DATA_DIR/<name>/`` (format: :mod:`uld_jax.slice_data`): a slice store holding each slice
once, a case table and a sample table, all TFDS ``array_record`` datasets readable without
TensorFlow.

Why not a ``tfds.core.GeneratorBasedBuilder``: a builder generates one TFDS dataset per pass, but
one pass over the raw files (the expensive part: decoding PNG/DICOM/NIfTI and resampling) must feed
three tables, and TFDS only resumes whole datasets. So the cases are written in chunks of
array_record shards with the TFDS file naming, and the TFDS metadata (``dataset_info.json``,
``features.json``) is written at the end with ``tfds.folder_dataset.write_metadata``, the adapter TFDS
provides for externally written shards.

Resumable and atomic: a dataset is built in ``DATA_DIR/.incomplete-<name>/``; every finished chunk
of cases is recorded in its ``progress.json`` (atomic write); a rerun skips the datasets whose final
folder exists and, inside an unfinished dataset, the cases of finished chunks (the reader still
iterates them, since ``iter_cases`` has no skip hook, but nothing is re-encoded or re-written). The
finished dataset is assembled in ``.incomplete-<name>/final`` and renamed to ``DATA_DIR/<name>`` in
one ``os.rename``; ``build_info.json`` inside it marks completeness for the loaders.

Bad input: the readers raise :class:`data_prep.types.BadItem`, and this module raises it too for
Cases that break the contract (wrong dtype/shape, non-increasing z, inconsistent spacing, boxes
outside the slice, NaN boxes, duplicate case ids, ...). Without ``--skip-bad`` the build stops at the
first one with its message (file/row and problem); with it, each is skipped and listed in
``DATA_DIR/<name>/skipped_items.tsv`` and ``DATA_DIR/build_report.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from data_prep.types import BadItem, Case
from uld_jax import slice_data as sd
from uld_jax.core import DATASET_ID, DATASETS, Provenance

ReaderLookup = Callable[[str], Any]


class BuildError(RuntimeError):
    """A build cannot go on (no usable cases, inconsistent resume state, ...)."""


def default_reader_lookup(name: str):
    """``data_prep.readers.<name>`` (imported lazily: only the datasets being built are needed)."""
    try:
        return importlib.import_module(f"data_prep.readers.{name}")
    except ModuleNotFoundError as e:
        raise BuildError(f"no reader module data_prep.readers.{name} ({e})") from e


# --------------------------------------------------------------------------------------------------
# Case validation (the builder's side of the bad-input handling).
# --------------------------------------------------------------------------------------------------
def _where(case: Case) -> str:
    return f"{case.source or '<no source>'} (case {case.case_id!r})"


def validate_case(case: Case, dataset: str, pixel_mm: float, slice_mm: float) -> None:
    """Raises :class:`BadItem` naming the case's source and the problem if ``case`` breaks the contract."""
    w = _where(case)
    if case.dataset != dataset:
        raise BadItem(w, f"Case.dataset is {case.dataset!r}, expected {dataset!r}")
    if not case.case_id:
        raise BadItem(w, "empty case_id")
    if case.split not in sd.SPLITS:
        raise BadItem(w, f"split {case.split!r} is not one of {sd.SPLITS}")
    s = case.slices
    if not isinstance(s, np.ndarray) or s.ndim != 3 or s.dtype != np.int16:
        raise BadItem(w, f"slices must be a [Z, H, W] int16 HU array, got "
                         f"{getattr(s, 'dtype', type(s))} {getattr(s, 'shape', '')}")
    z, h, wd = s.shape
    if min(z, h, wd) < 1 or max(h, wd) > 65535:
        raise BadItem(w, f"slices have an unusable shape {s.shape}")
    zmm = np.asarray(case.z_mm, np.float64)
    if zmm.shape != (z,):
        raise BadItem(w, f"z_mm has shape {zmm.shape}, expected ({z},)")
    if not np.all(np.isfinite(zmm)):
        raise BadItem(w, "z_mm has NaN/inf values")
    if z > 1 and not np.all(np.diff(zmm) > 0):
        raise BadItem(w, "z_mm is not strictly increasing")
    # Readers enlarge the pixel size of a wide field of view so that the long side stays <= 512
    # (DESIGN section 3), so coarser pixels are fine; finer ones mean a reader ignored the request.
    if not (np.isfinite(case.pixel_mm) and case.pixel_mm >= pixel_mm * (1 - 1e-3)):
        raise BadItem(w, f"inconsistent spacing: pixel_mm {case.pixel_mm} is finer than the requested "
                         f"{pixel_mm}")
    if not np.isclose(case.slice_mm, slice_mm, rtol=1e-3):
        raise BadItem(w, f"inconsistent spacing: slice_mm {case.slice_mm} != requested {slice_mm}")
    if z > 1 and not np.allclose(np.diff(zmm), case.slice_mm, rtol=1e-2, atol=1e-3):
        raise BadItem(w, f"z_mm steps {np.unique(np.round(np.diff(zmm), 3))[:5]} differ from "
                         f"slice_mm {case.slice_mm}")
    samples = np.asarray(case.sample_slices, np.int64).reshape(-1)
    if samples.size and (samples.min() < 0 or samples.max() >= z):
        raise BadItem(w, f"sample_slices outside 0..{z - 1}: {samples[(samples < 0) | (samples >= z)][:5]}")
    if np.unique(samples).size != samples.size:
        raise BadItem(w, "sample_slices has duplicates")
    keys = np.asarray(case.key_slices, np.int64).reshape(-1)
    if not np.all(np.isin(keys, samples)):
        raise BadItem(w, f"key_slices {keys[~np.isin(keys, samples)][:5]} are not in sample_slices")
    for i, les in enumerate(case.lesions):
        lw = f"{w} lesion {i}"
        if not 0 <= int(les.slice_index) < z:
            raise BadItem(lw, f"slice_index {les.slice_index} outside 0..{z - 1}")
        box = np.asarray(les.box, np.float64)
        if box.shape != (4,) or not np.all(np.isfinite(box)):
            raise BadItem(lw, f"box must be 4 finite numbers, got {box}")
        y1, x1, y2, x2 = box
        if not (y2 > y1 and x2 > x1):
            raise BadItem(lw, f"empty box {box} (expected y1 < y2, x1 < x2)")
        tol = 1e-3
        if y1 < -tol or x1 < -tol or y2 > h + tol or x2 > wd + tol:
            raise BadItem(lw, f"box {box} outside the {h}x{wd} slice")
        if les.mask is not None and np.asarray(les.mask).shape != (h, wd):
            raise BadItem(lw, f"mask shape {np.asarray(les.mask).shape} != slice shape {(h, wd)}")
        if int(les.provenance) not in {int(p) for p in Provenance}:
            raise BadItem(lw, f"unknown provenance {les.provenance}")
        ot = np.asarray(les.organ_target, np.float64)
        ov = np.asarray(les.organ_valid)
        if (ot.shape != (3,) or ov.shape != (3,) or not np.all(np.isfinite(ot))
                or ot.min() < 0 or ot.max() > 1):
            raise BadItem(lw, f"organ_target must be 3 values in [0, 1] with 3 validity flags, "
                              f"got {ot} / {ov}")
        if les.recist is not None and np.asarray(les.recist).shape != (4, 2):
            raise BadItem(lw, f"recist must be [4, 2], got {np.asarray(les.recist).shape}")


# --------------------------------------------------------------------------------------------------
# Records.
# --------------------------------------------------------------------------------------------------
def case_sample_records(case: Case) -> list[dict]:
    """One sample-table record (``uld_jax.slice_data.sample_features``) per sample slice of ``case``."""
    by_slice: dict[int, list] = {}
    for les in case.lesions:
        by_slice.setdefault(int(les.slice_index), []).append(les)
    keys = set(int(k) for k in np.asarray(case.key_slices).reshape(-1))
    zmm = np.asarray(case.z_mm, np.float32)
    out = []
    for zi in sorted(int(v) for v in np.asarray(case.sample_slices).reshape(-1)):
        les = by_slice.get(zi, [])
        n = len(les)
        rects, masks = [], []
        for l in les:
            if l.mask is None:
                rects.append((0, 0, 0, 0))
                masks.append(b"")
            else:
                r, m = sd.encode_mask(np.asarray(l.mask))
                rects.append(r)
                masks.append(m if r[2] > r[0] else b"")
        out.append({
            "dataset_id": DATASET_ID[case.dataset],
            "case_id": case.case_id,
            "patient_id": case.patient_id,
            "study_id": case.study_id,
            "series_id": case.series_id,
            "split": case.split,
            "slice_index": zi,
            "z_mm": float(zmm[zi]),
            "is_key_slice": zi in keys,
            "added": False,
            "boxes": np.asarray([l.box for l in les], np.float32).reshape(n, 4),
            "provenance": np.asarray([int(l.provenance) for l in les], np.int32),
            "lesion_type": np.asarray([int(l.lesion_type) for l in les], np.int32),
            "lesion_id": np.asarray([int(l.lesion_id) for l in les], np.int64),
            "organ_target": np.asarray([l.organ_target for l in les], np.float32).reshape(n, 3),
            "organ_valid": np.asarray([l.organ_valid for l in les], bool).reshape(n, 3),
            "mask_rect": np.asarray(rects, np.int32).reshape(n, 4),
            "mask": masks,
            "recist": np.asarray([l.recist if l.recist is not None else np.zeros((4, 2))
                                  for l in les], np.float32).reshape(n, 4, 2),
            "recist_valid": np.asarray([l.recist is not None for l in les], bool),
            "score": np.ones(n, np.float32),
            "expert": np.full(n, -1, np.int32),
            "source": case.source,
        })
    return out


def _case_meta(case: Case) -> dict:
    return {
        "case_id": case.case_id, "patient_id": case.patient_id, "study_id": case.study_id,
        "series_id": case.series_id, "split": case.split, "num_slices": int(case.slices.shape[0]),
        "height": int(case.slices.shape[1]), "width": int(case.slices.shape[2]),
        "pixel_mm": float(case.pixel_mm), "slice_mm": float(case.slice_mm),
        "z_mm": [float(v) for v in np.asarray(case.z_mm)],
        "source_crop_yx": [int(v) for v in case.source_crop_yx], "source": case.source,
    }


# --------------------------------------------------------------------------------------------------
# Chunked writer with resume.
# --------------------------------------------------------------------------------------------------
class _DatasetWriter:
    """Writes one dataset's Cases in chunks into ``tmp`` and records finished chunks."""

    def __init__(self, dataset: str, tmp: str, params: dict, chunk_slices: int, encode_map=map):
        self.encode_map = encode_map
        self.dataset = dataset
        self.tmp = tmp
        self.params = params
        self.chunk_slices = chunk_slices
        self.progress_path = os.path.join(tmp, "progress.json")
        self.chunks: list[dict] = []
        if os.path.isfile(self.progress_path):
            with open(self.progress_path, encoding="utf-8") as f:
                prog = json.load(f)
            if prog.get("params") == params:
                self.chunks = prog["chunks"]
            else:
                print(f"[build] {dataset}: parameters changed since the interrupted build; "
                      f"starting over", file=sys.stderr)
                shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "chunks"), exist_ok=True)
        self.done_cases = {c["case_id"] for ch in self.chunks for c in self.chunk_cases(ch)}
        # Files of a chunk that was being written when the build died: not in progress.json.
        known = {f for ch in self.chunks for f in ch["files"]}
        for fn in os.listdir(os.path.join(tmp, "chunks")):
            if fn not in known:
                os.remove(os.path.join(tmp, "chunks", fn))
        self.seen_cases: set[str] = set()
        self._reset_buffer()

    def chunk_cases(self, chunk: dict) -> list[dict]:
        """Case metadata of a finished chunk (kept in its own file: progress.json stays small)."""
        with open(os.path.join(self.tmp, "chunks", chunk["cases_file"]), encoding="utf-8") as f:
            return json.load(f)

    def _reset_buffer(self):
        self.buf_cases: list[dict] = []
        self.num_buf_slices = 0
        self.slice_writer = None          # streams slice records into the chunk's .part file
        self.buf_samples: dict[str, list[dict]] = {s: [] for s in sd.SPLITS}

    def _slice_part(self) -> str:
        return os.path.join(self.tmp, "chunks", f"chunk-{len(self.chunks):05d}.slices.part")

    def add(self, case: Case) -> bool:
        """Buffers ``case`` (encoding its slices); returns False if a finished chunk holds it."""
        if case.case_id in self.done_cases:
            return False
        feats = sd.slice_features()
        if self.slice_writer is None:
            from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
            self.slice_writer = array_record_module.ArrayRecordWriter(self._slice_part(),
                                                                      sd.SLICE_RECORD_OPTIONS)
        # zlib releases the GIL: encoding the slices of a case in threads scales with cores.
        for zi, data in enumerate(self.encode_map(sd.encode_slice, list(case.slices))):
            self.slice_writer.write(feats.serialize_example({
                "case_id": case.case_id, "slice_index": zi,
                "height": case.slices.shape[1], "width": case.slices.shape[2],
                "hu": data}))
        self.num_buf_slices += case.slices.shape[0]
        self.buf_cases.append(_case_meta(case))
        self.buf_samples[case.split].extend(case_sample_records(case))
        if self.num_buf_slices >= self.chunk_slices:
            self.flush()
        return True

    def flush(self) -> None:
        if not self.buf_cases:
            return
        k = len(self.chunks)
        files = []
        cdir = os.path.join(self.tmp, "chunks")

        def write(name, records):
            part = os.path.join(cdir, name + ".part")
            sd.write_array_record(part, records)
            os.replace(part, os.path.join(cdir, name))
            files.append(name)

        self.slice_writer.close()
        os.replace(self._slice_part(), os.path.join(cdir, f"chunk-{k:05d}.slices"))
        files.append(f"chunk-{k:05d}.slices")
        cases_file = f"chunk-{k:05d}.cases.json"
        sd.atomic_write_json(os.path.join(cdir, cases_file), self.buf_cases)
        files.append(cases_file)
        sfeat = sd.sample_features()
        sample_counts = {}
        for split, recs in self.buf_samples.items():
            if recs:
                write(f"chunk-{k:05d}.samples-{split}", [sfeat.serialize_example(r) for r in recs])
                sample_counts[split] = len(recs)
        self.chunks.append({"index": k, "files": files, "num_slices": self.num_buf_slices,
                            "samples": sample_counts, "cases_file": cases_file})
        sd.atomic_write_json(self.progress_path, {"params": self.params, "chunks": self.chunks})
        for c in self.buf_cases:
            self.done_cases.add(c["case_id"])
        self._reset_buffer()

    def finalize(self, skipped: list[BadItem], notes: dict) -> str:
        """Assembles the TFDS datasets in ``tmp/final``; returns that path."""
        self.flush()
        ds = self.dataset
        final = os.path.join(self.tmp, "final")
        if os.path.exists(final):
            shutil.rmtree(final)
        cdir = os.path.join(self.tmp, "chunks")

        def place(src_name, dst_dir, dst_name):
            os.makedirs(dst_dir, exist_ok=True)
            src, dst = os.path.join(cdir, src_name), os.path.join(dst_dir, dst_name)
            try:
                os.link(src, dst)      # no copy on the same file system
            except OSError:
                shutil.copyfile(src, dst)

        # Slice store: one shard per chunk, global record index = running slice count.
        sdir = sd.table_dir(final, ds, "slices")
        n = len(self.chunks)
        cases, start = [], 0
        for ch in self.chunks:
            place(f"chunk-{ch['index']:05d}.slices", sdir,
                  sd.shard_filename(ds, "slices", sd.SLICES_SPLIT, ch["index"], n))
            for c in self.chunk_cases(ch):
                cases.append(dict(c, slice_start=start))
                start += c["num_slices"]
        if not cases:
            raise BuildError(f"{ds}: no usable cases (skipped {len(skipped)} bad items)")
        sd.write_tfds_metadata(sdir, sd.slice_features(),
                               {sd.SLICES_SPLIT: [c["num_slices"] for c in self.chunks]},
                               description=f"ULD slice store of {ds}: each resampled axial slice once "
                                           f"(int16 HU, codec {sd.SLICE_CODEC}).")
        # Sample table: per split, the chunks that hold samples of it.
        tdir = sd.table_dir(final, ds, "samples")
        split_lengths = {}
        for split in sd.SPLITS:
            chs = [ch for ch in self.chunks if split in ch["samples"]]
            for k, ch in enumerate(chs):
                place(f"chunk-{ch['index']:05d}.samples-{split}", tdir,
                      sd.shard_filename(ds, "samples", split, k, len(chs)))
            if chs:
                split_lengths[split] = [ch["samples"][split] for ch in chs]
        sd.write_tfds_metadata(tdir, sd.sample_features(), split_lengths,
                               description=f"ULD sample table of {ds}: sample slices with boxes, masks, "
                                           f"ids, organ targets and provenance.")
        # Case table.
        recs = [dict(c, z_mm=np.asarray(c["z_mm"], np.float32),
                     source_crop_yx=np.asarray(c["source_crop_yx"], np.int32)) for c in cases]
        sd.write_table(sd.table_dir(final, ds, "cases"), ds, "cases", sd.case_features(),
                       {sd.CASES_SPLIT: recs}, description=f"ULD case table of {ds}.")
        _write_skipped(os.path.join(final, "skipped_items.tsv"), skipped)
        info = dict(self.params, format_version=sd.FORMAT_VERSION, slice_codec=sd.SLICE_CODEC,
                    num_cases=len(cases), num_slices=start,
                    num_samples={s: int(sum(v)) for s, v in split_lengths.items()},
                    num_skipped=len(skipped), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **notes)
        sd.atomic_write_json(os.path.join(final, sd.BUILD_INFO), info)
        return final


def _flush_on_bad_item(cases, writer):
    """Iterates the reader; a BadItem it raises first flushes the buffered good cases."""
    try:
        yield from cases
    except BadItem:
        writer.flush()
        raise


def _write_skipped(path: str, items: Sequence[BadItem]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("where\tproblem\n")
        for b in items:
            f.write(f"{b.where}\t{b.problem}\n".replace("\r", " "))


# --------------------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------------------
def build_dataset(raw: str, out: str, dataset: str, *, skip_bad: bool = False, pixel_mm: float = 0.8,
                  slice_mm: float = 2.0, reader_lookup: ReaderLookup | None = None,
                  chunk_slices: int = 2048, progress: bool = True, encode_threads: int = 4,
                  _stop_after_chunks: int | None = None) -> dict:
    """Builds ``out/<dataset>``; returns its build info. Skips a dataset already complete.

    ``_stop_after_chunks`` (tests): raise KeyboardInterrupt after that many chunks were written,
    to simulate a killed build.
    """
    if dataset not in DATASETS:
        raise BuildError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    final = os.path.join(out, dataset)
    if os.path.isfile(os.path.join(final, sd.BUILD_INFO)):
        with open(os.path.join(final, sd.BUILD_INFO), encoding="utf-8") as f:
            info = json.load(f)
        print(f"[build] {dataset}: complete in {final}; skipped (delete it to rebuild)", file=sys.stderr)
        return dict(info, status="already_built")
    if os.path.exists(final):
        raise BuildError(f"{final} exists but has no {sd.BUILD_INFO}; it is not a build of this tool. "
                         f"Move it away and rerun.")
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".incomplete-{dataset}")
    params = {"dataset": dataset, "raw": os.path.abspath(raw), "pixel_mm": float(pixel_mm),
              "slice_mm": float(slice_mm), "format_version": sd.FORMAT_VERSION}
    pool = concurrent.futures.ThreadPoolExecutor(max(1, encode_threads)) if encode_threads > 1 else None
    writer = _DatasetWriter(dataset, tmp, params, chunk_slices, pool.map if pool else map)
    resumed_chunks = len(writer.chunks)
    reader = (reader_lookup or default_reader_lookup)(dataset)
    bad_items: list[BadItem] = []
    skipped_by_builder: list[BadItem] = []
    dropped_annotations = 0
    t0 = time.perf_counter()
    n_new_slices = 0
    bar = None
    if progress:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        bar = tqdm(desc=f"build {dataset}", unit="case", file=sys.stderr, dynamic_ncols=True)
    try:
        cases = reader.iter_cases(raw, skip_bad=skip_bad, bad_items=bad_items,
                                  pixel_mm=pixel_mm, slice_mm=slice_mm)
        for case in _flush_on_bad_item(cases, writer):
            try:
                validate_case(case, dataset, pixel_mm, slice_mm)
                if case.case_id in writer.seen_cases:
                    raise BadItem(_where(case), "duplicate case_id in this dataset")
            except BadItem as e:
                if not skip_bad:
                    writer.flush()      # keep the good cases before it for the resumed build
                    raise
                skipped_by_builder.append(e)
                continue
            writer.seen_cases.add(case.case_id)
            samples = set(int(v) for v in np.asarray(case.sample_slices).reshape(-1))
            dropped_annotations += sum(int(l.slice_index) not in samples for l in case.lesions)
            chunks_before = len(writer.chunks)
            if writer.add(case):
                n_new_slices += case.slices.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(slices_per_s=f"{n_new_slices / max(time.perf_counter() - t0, 1e-9):.1f}",
                                skipped=len(bad_items) + len(skipped_by_builder))
            if (_stop_after_chunks is not None and len(writer.chunks) > chunks_before
                    and len(writer.chunks) - resumed_chunks >= _stop_after_chunks):
                raise KeyboardInterrupt(f"test: stopped after {_stop_after_chunks} chunks")
        skipped = list(bad_items) + skipped_by_builder
        final_tmp = writer.finalize(skipped, {
            "annotations_on_non_sample_slices_dropped": int(dropped_annotations),
            "build_seconds_this_run": round(time.perf_counter() - t0, 3),
            "slices_written_this_run": int(n_new_slices),
            "resumed_chunks": resumed_chunks})
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown()
    os.rename(final_tmp, final)          # the one step that makes the dataset visible
    shutil.rmtree(tmp, ignore_errors=True)
    if dropped_annotations:
        print(f"[build] {dataset}: warning: {dropped_annotations} annotations lie on slices that are "
              f"not samples and were not stored", file=sys.stderr)
    with open(os.path.join(final, sd.BUILD_INFO), encoding="utf-8") as f:
        info = json.load(f)
    info["status"] = "built"
    info["skipped"] = [{"where": b.where, "problem": b.problem} for b in skipped]
    return info


def build(raw: str, out: str, datasets: Iterable[str] = DATASETS, skip_bad: bool = False,
          pixel_mm: float = 0.8, slice_mm: float = 2.0, *,
          reader_lookup: ReaderLookup | None = None, chunk_slices: int = 2048,
          progress: bool = True, encode_threads: int = 4) -> dict:
    """Builds every dataset in ``datasets`` into ``out``; returns {dataset: build info}.

    Writes ``out/build_report.json`` (per dataset: status, counts, skipped items). Raises
    :class:`BadItem` at the first bad item when ``skip_bad`` is False.
    """
    datasets = list(datasets)
    for d in datasets:
        if d not in DATASETS:
            raise BuildError(f"unknown dataset {d!r}; expected some of {','.join(DATASETS)}")
    report_path = os.path.join(out, "build_report.json")
    report = {}
    if os.path.isfile(report_path):       # keep the entries of datasets built by earlier runs
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    for d in datasets:
        report[d] = build_dataset(raw, out, d, skip_bad=skip_bad, pixel_mm=pixel_mm,
                                  slice_mm=slice_mm, reader_lookup=reader_lookup,
                                  chunk_slices=chunk_slices, progress=progress,
                                  encode_threads=encode_threads)
        sd.atomic_write_json(report_path, report)
    return {d: report[d] for d in datasets}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", required=True, help="folder holding DeepLesion/, LUNA16/, LiTS/, NIH-LN/")
    p.add_argument("--out", required=True, help="output DATA_DIR")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad items and list them in DATA_DIR/<name>/skipped_items.tsv")
    p.add_argument("--pixel-mm", type=float, default=0.8, help="in-plane pixel size (mm)")
    p.add_argument("--slice-mm", type=float, default=2.0, help="distance between slices (mm)")
    p.add_argument("--chunk-slices", type=int, default=2048, help="slices per shard (resume unit)")
    p.add_argument("--encode-threads", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads compressing slices")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    names = [s.strip() for s in a.datasets.split(",") if s.strip()]
    try:
        report = build(a.raw, a.out, names, a.skip_bad, a.pixel_mm, a.slice_mm,
                       chunk_slices=a.chunk_slices, progress=not a.no_progress,
                       encode_threads=a.encode_threads)
    except BadItem as e:
        print(f"error: bad input: {e}\n(rerun with --skip-bad to skip such items and list them in a "
              f"report; the finished part of the build is kept and resumed)", file=sys.stderr)
        return 1
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for d, info in report.items():
        print(f"{d}: {info['status']}: {info.get('num_cases')} cases, {info.get('num_slices')} slices, "
              f"samples {info.get('num_samples')}, skipped {info.get('num_skipped')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
