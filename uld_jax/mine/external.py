"""External lesion embeddings for MAM (e.g. LesaNet's): export what to embed, read the vectors back.

The paper's MAM compares LesaNet embeddings (a separate network trained on DeepLesion's lesions
with body-part, type and attribute labels mined from the reports). This project learns its
embedding with the detector; a user who has a better lesion embedding can replace it without
retraining MELD or running the detector again:

    python -m uld_jax.mine --workdir RUN ...           # mines; chunk store RUN/mining/step_N
    python -m uld_jax.mine.external --store RUN/mining/step_N --out targets.npz
    # embed targets.npz's crops with your model; write embeddings.npz (below)
    python -m uld_jax.mine --workdir RUN --embeddings embeddings.npz --out RUN/mined_ext.npz
    python -m uld_jax.mine.report --workdir RUN --overlay RUN/mined_ext.npz --truth ...  # synthetic

The second mining call, given the first one's checkpoint and slice options (``--epoch`` or
``--step``, ``--every_mm``, ``--min_score``, ``--chunk_slices``), finds every chunk in the same
store and runs no inference: only MAM and NRM run again, MAM on the external vectors (other options
would mine a new store, whose targets the file's fingerprint then does not match). The report
reads the same vectors again (the table's provenance names the file and its SHA-256), so its
sweeps and inputs check measure the external embedding.

``targets.npz`` (written atomically; ``targets.csv`` beside it, the same rows without the crops):

- one row per annotated lesion of the store, then one per proposal of the universal (DeepLesion)
  expert, in store order: ``kind`` (``annotation`` / ``proposal``), ``index`` (the row among the
  annotations or among the universal proposals), ``dataset``, ``case_id``, ``slice_index``,
  ``patient_id``, ``box`` (the library's ``[y1, x1, y2, x2]``, continuous pixel coordinates of the
  preprocessed slice: pixel ``(r, c)`` covers ``[r, r + 1) x [c, c + 1)``), ``pixel_mm`` (the
  preprocessed slice's pixel size);
- unless ``--crop_px 0`` (rows only, for a model that reads the images itself; the crops take
  N x (2 context + 1) x crop_px^2 x 2 bytes, which at the paper's scale can be tens of GB),
  ``crop`` [N, 2 * context + 1, crop_px, crop_px] int16 HU: the slices ``slice_index - context ...
  slice_index + context`` of the Case (clamped at its ends), a window of ``crop_px`` pixels centred
  on the box centre (padded with -1024 outside the slice), and ``crop_box``, the box in the crop's
  pixels, ``[y1, x1, y2, x2]`` (it may extend past the window for boxes larger than it);
- ``fingerprint``: SHA-256 of the rows above, which the embeddings file must echo.

``--radiomic FILE`` also writes a worked example of an embeddings file from hand-made descriptors
of the crops (:func:`radiomic_embedding`).

``embeddings.npz`` (arrays, no pickles): ``annotation`` [A, D] and ``proposal`` [PU, D] floats, the
rows of ``targets.npz`` of each kind in order, and ``fingerprint``, the targets' string. The
vectors are L2-normalised when read (as the model's own are; MAM's theta is a distance between
unit vectors), so a zero or non-finite vector is an error.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
from typing import Any, Sequence

import numpy as np

from uld_jax import slice_data as sd
from uld_jax.io.atomic import atomic_write
from uld_jax.mine import run, store, table

PAD_HU = -1024
KINDS = ("annotation", "proposal")


class EmbeddingsError(ValueError):
    """An embeddings file that does not fit the mining run; the message names the file and key."""


def universal_rows(proposals: run.Proposals) -> np.ndarray:
    """Rows of the universal expert's proposals (MAM's input), in store order."""
    return np.flatnonzero(np.asarray(proposals.expert) == run.UNIVERSAL_EXPERT)


def targets(slices: run.SliceTable, annotations: run.Annotations,
            proposals: run.Proposals) -> dict[str, np.ndarray]:
    """The rows to embed: every annotation, then every universal proposal (module docstring)."""
    uni = universal_rows(proposals)
    keys = np.concatenate([np.asarray(annotations.slice, np.int64),
                           np.asarray(proposals.slice, np.int64)[uni]])
    n_a = len(annotations.slice)
    px = (np.asarray(slices.pixel_mm, np.float32)[keys] if slices.pixel_mm is not None
          else np.full(keys.shape, np.nan, np.float32))
    return {
        "kind": np.asarray([KINDS[0]] * n_a + [KINDS[1]] * uni.size, dtype=str),
        "index": np.concatenate([np.arange(n_a), np.arange(uni.size)]).astype(np.int64),
        "dataset": np.asarray(slices.dataset).astype(str)[keys],
        "case_id": np.asarray(slices.case_id).astype(str)[keys],
        "slice_index": np.asarray(slices.slice_index, np.int64)[keys],
        "patient_id": np.asarray(slices.patient_id).astype(str)[keys],
        "box": np.concatenate([np.asarray(annotations.box, np.float32).reshape(-1, 4),
                               np.asarray(proposals.box, np.float32).reshape(-1, 4)[uni]]),
        "pixel_mm": px,
    }


def fingerprint(rows: dict[str, np.ndarray]) -> str:
    """SHA-256 of the target rows (kind, ids, slice, box), independent of the crops."""
    h = hashlib.sha256()
    for k in ("kind", "dataset", "case_id", "patient_id"):
        h.update("\x1f".join(rows[k].tolist()).encode())
        h.update(b"\x1e")
    for k in ("index", "slice_index"):
        h.update(np.ascontiguousarray(rows[k], "<i8").tobytes())
    h.update(np.ascontiguousarray(rows["box"], "<f4").tobytes())
    return h.hexdigest()


def crops(data_dir: str, rows: dict[str, np.ndarray], crop_px: int = 64,
          context: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(crop [N, 2*context+1, crop_px, crop_px] int16, crop_box [N, 4] float32)`` read from the
    build's slice store (module docstring)."""
    if crop_px < 1 or context < 0:
        raise ValueError(f"crop_px {crop_px} and context {context}: need crop_px >= 1 and "
                         "context >= 0")
    n = len(rows["kind"])
    out = np.full((n, 2 * context + 1, crop_px, crop_px), PAD_HU, np.int16)
    box = np.asarray(rows["box"], np.float64).reshape(-1, 4)
    # top-left corner of the window (boxes are [y1, x1, y2, x2]): the box centre minus half the
    # window, in whole pixels
    y0 = np.floor(0.5 * (box[:, 0] + box[:, 2]) - crop_px / 2).astype(np.int64)
    x0 = np.floor(0.5 * (box[:, 1] + box[:, 3]) - crop_px / 2).astype(np.int64)
    crop_box = (box - np.stack([y0, x0, y0, x0], 1)).astype(np.float32)
    for ds in np.unique(rows["dataset"]):
        ddir = sd.dataset_dir_for(data_dir, str(ds))
        cases = {sd._text(c["case_id"]): c for c in sd.load_cases(data_dir, str(ds))}
        slices = sd.SliceStore(ddir, str(ds), cache_slices=4 * (2 * context + 1))
        for i in np.flatnonzero(rows["dataset"] == ds):
            cid = str(rows["case_id"][i])
            if cid not in cases:
                raise ValueError(f"{ddir}: no Case {cid!r} (row {i} of the targets); the store "
                                 "was mined on another build (pass its --data_dir)")
            c = cases[cid]
            zs = np.clip(int(rows["slice_index"][i]) + np.arange(-context, context + 1), 0,
                         int(c["num_slices"]) - 1)
            imgs = slices.read([int(c["slice_start"]) + int(z) for z in zs], case_id=cid,
                               slice_indices=zs)
            for k, img in enumerate(imgs):
                h, w = img.shape
                ya, yb = max(0, y0[i]), min(h, y0[i] + crop_px)
                xa, xb = max(0, x0[i]), min(w, x0[i] + crop_px)
                if ya < yb and xa < xb:
                    out[i, k, ya - y0[i]:yb - y0[i], xa - x0[i]:xb - x0[i]] = img[ya:yb, xa:xb]
    return out, crop_box


def export(store_dir: str, out: str, data_dir: str | None = None, crop_px: int = 64,
           context: int = 1) -> dict[str, Any]:
    """Writes ``out`` (targets with crops unless ``crop_px`` is 0, .npz) and ``out`` with ``.csv``
    (the rows); returns a summary. ``data_dir``: the build the store was mined on (default: the
    record of the table beside the store)."""
    st = store.ChunkStore.open(store_dir)
    slices, ann, props = st.load()
    if data_dir is None and crop_px:
        data_dir = _store_data_dir(store_dir)
    rows = targets(slices, ann, props)
    fp = fingerprint(rows)
    arrays = {**rows, "fingerprint": np.asarray(fp)}
    if crop_px:
        arrays["crop"], arrays["crop_box"] = crops(data_dir, rows, crop_px, context)
    table.atomic_write_npz(out, arrays)
    csv_path = os.path.splitext(out)[0] + ".csv"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "index", "dataset", "case_id", "slice_index", "patient_id", "y1", "x1",
                "y2", "x2", "pixel_mm"])
    for i in range(len(rows["kind"])):
        w.writerow([rows["kind"][i], int(rows["index"][i]), rows["dataset"][i], rows["case_id"][i],
                    int(rows["slice_index"][i]), rows["patient_id"][i],
                    *(f"{v:.2f}" for v in rows["box"][i]), f"{rows['pixel_mm'][i]:.4f}"])
    atomic_write(csv_path, lambda f: f.write(buf.getvalue().encode()))
    return {"out": out, "csv": csv_path, "annotations": int((rows["kind"] == KINDS[0]).sum()),
            "proposals": int((rows["kind"] == KINDS[1]).sum()), "fingerprint": fp,
            "crop": list(arrays["crop"].shape[1:]) if crop_px else None}


def _store_data_dir(store_dir: str) -> str:
    """The build a store was mined on: the mined table beside the run records it."""
    # store_dir is WORKDIR/mining/step_N by default; the driver's table records its build
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(store_dir)))
    path = os.path.join(workdir, "mined.npz")
    if os.path.isfile(path):
        d = (table.read_overlay(path).meta.get("mining") or {}).get("data_dir")
        if d:
            return d
    raise FileNotFoundError(f"{store_dir}: cannot tell which build it was mined on (no "
                            f"{path} naming it); pass --data_dir")


def load_embeddings(path: str, slices: run.SliceTable, annotations: run.Annotations,
                    proposals: run.Proposals) -> tuple[run.Annotations, run.Proposals, dict]:
    """``annotations`` and ``proposals`` with the embeddings of file ``path`` (module docstring):
    checked against the store's targets, L2-normalised. Returns them and the provenance to record
    (``path``, ``sha256``, ``dim``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such embeddings file")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise EmbeddingsError(f"{path}: not a readable .npz of arrays ({e})") from e
    for k in ("annotation", "proposal", "fingerprint"):
        if k not in got:
            raise EmbeddingsError(f"{path}: no array {k!r} (has {sorted(got)})")
    want = fingerprint(targets(slices, annotations, proposals))
    if str(got["fingerprint"]) != want:
        raise EmbeddingsError(f"{path}: 'fingerprint' {str(got['fingerprint'])[:16]}... is not "
                              f"this mining run's targets' ({want[:16]}...); export the targets of "
                              "this store again and embed those")
    uni = universal_rows(proposals)
    n_a = len(annotations.slice)
    vecs = {}
    for k, n in (("annotation", n_a), ("proposal", uni.size)):
        v = got[k]
        if v.ndim != 2 or v.shape[0] != n or not np.issubdtype(v.dtype, np.number):
            raise EmbeddingsError(f"{path}: {k!r} has shape {v.shape} ({v.dtype}); expected "
                                  f"[{n}, D] numbers, one row per {k} of the targets")
        v = v.astype(np.float64)
        norm = np.linalg.norm(v, axis=1)
        bad = np.flatnonzero(~np.isfinite(norm) | (norm == 0))
        if bad.size:
            raise EmbeddingsError(f"{path}: {k!r} row {int(bad[0])} is zero or not finite "
                                  f"({bad.size} such rows)")
        vecs[k] = (v / norm[:, None]).astype(np.float32)
    if vecs["annotation"].shape[1] != vecs["proposal"].shape[1] and n_a and uni.size:
        raise EmbeddingsError(f"{path}: 'annotation' has {vecs['annotation'].shape[1]} columns, "
                              f"'proposal' {vecs['proposal'].shape[1]}; they must be equal")
    d = vecs["annotation"].shape[1] if n_a else vecs["proposal"].shape[1]
    full = np.zeros((len(proposals.slice), d), np.float32)
    full[uni] = vecs["proposal"]
    ann = run.Annotations(annotations.slice, annotations.box, annotations.lesion_id,
                          vecs["annotation"].reshape(n_a, d))
    props = run.Proposals(proposals.slice, proposals.box, proposals.score, proposals.expert, full)
    return ann, props, {"path": os.path.abspath(path), "sha256": digest, "dim": int(d)}


RADIOMIC_FEATURES = ("hu_mean", "hu_std", "hu_contrast", "log_long_mm", "log_short_mm",
                     "hu_mean_above", "hu_mean_below")


def radiomic_features(targets_npz: dict[str, np.ndarray]) -> np.ndarray:
    """[N, 7] hand-made descriptors of each target's crop (:data:`RADIOMIC_FEATURES`): mean and
    standard deviation of HU inside the box on its own slice, its contrast with a ring around it
    (the box grown to twice its size, minus the box), the log of its long and short sides in mm,
    and the mean HU inside the box on the slices above and below. A worked example of an external
    embedding (no learning, nothing from the truth): it describes a lesion's kind (density, size,
    3D extent), not its identity."""
    crop = np.asarray(targets_npz["crop"], np.float64)
    n, z, h, w = crop.shape
    mid = z // 2
    box = np.asarray(targets_npz["crop_box"], np.float64).reshape(-1, 4)
    px = np.asarray(targets_npz["pixel_mm"], np.float64)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = np.zeros((n, len(RADIOMIC_FEATURES)))
    for i in range(n):
        y1, x1, y2, x2 = box[i]
        inside = (xx >= x1) & (xx <= x2) & (yy >= y1) & (yy <= y2)
        cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        if not inside.any():          # a box thinner than a pixel: its nearest pixel
            inside[min(h - 1, max(0, int(cy))), min(w - 1, max(0, int(cx)))] = True
        grown = (np.abs(xx - cx) <= bw) & (np.abs(yy - cy) <= bh)
        ring = grown & ~inside
        v = crop[i, mid][inside]
        ring_mean = crop[i, mid][ring].mean() if ring.any() else v.mean()
        side = np.sort([max(bw, 1.0), max(bh, 1.0)]) * (px[i] if np.isfinite(px[i]) else 1.0)
        out[i] = (v.mean(), v.std(), v.mean() - ring_mean, np.log(side[1]), np.log(side[0]),
                  crop[i, 0][inside].mean(), crop[i, -1][inside].mean())
    return out


def radiomic_embedding(targets_npz: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The embeddings file's arrays for :func:`radiomic_features`: each feature centred on its
    median and scaled by its interquartile range over all targets (so that HU and log-mm weigh
    alike), split into ``annotation`` and ``proposal`` rows, with the targets' fingerprint."""
    f = radiomic_features(targets_npz)
    q1, med, q3 = np.percentile(f, (25, 50, 75), axis=0) if len(f) else (0.0, 0.0, 1.0)
    f = (f - med) / np.where(q3 - q1 > 0, q3 - q1, 1.0)
    kind = np.asarray(targets_npz["kind"]).astype(str)
    return {"annotation": f[kind == KINDS[0]].astype(np.float32),
            "proposal": f[kind == KINDS[1]].astype(np.float32),
            "fingerprint": np.asarray(targets_npz["fingerprint"])}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uld_jax.mine.external",
                                description="Export a mining run's annotations and universal "
                                "proposals (rows and image crops) for an external lesion embedding")
    p.add_argument("--store", required=True, help="the mining run's chunk store "
                   "(WORKDIR/mining/step_N)")
    p.add_argument("--out", required=True, help="targets .npz (a .csv of the rows goes beside it)")
    p.add_argument("--data_dir", default=None,
                   help="the build it was mined on (default: recorded by WORKDIR/mined.npz)")
    p.add_argument("--crop_px", type=int, default=64,
                   help="crop window (preprocessed pixels); 0: rows only, no crops (the crops "
                   "take N x (2 context + 1) x crop_px^2 x 2 bytes in memory and on disk)")
    p.add_argument("--context", type=int, default=1, help="slices on each side of the crop's own")
    p.add_argument("--radiomic", default=None, metavar="EMBEDDINGS",
                   help="also write this embeddings file from hand-made crop descriptors "
                   "(radiomic_embedding: density, contrast, size, extent; a worked example)")
    a = p.parse_args(argv)
    if a.crop_px < 0 or a.context < 0 or (a.radiomic and not a.crop_px):
        p.error(f"--crop_px {a.crop_px}, --context {a.context}: need both >= 0, and crops "
                "(--crop_px > 0) for --radiomic")
    try:
        s = export(a.store, a.out, a.data_dir, a.crop_px, a.context)
        if a.radiomic:
            with np.load(a.out, allow_pickle=False) as z:
                emb = radiomic_embedding({k: z[k] for k in z.files})
            table.atomic_write_npz(a.radiomic, emb)
    except (FileNotFoundError, ValueError, store.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    crops_said = f"crops {'x'.join(map(str, s['crop']))}" if s["crop"] else "no crops"
    print(f"{s['annotations']} annotations and {s['proposals']} proposals, {crops_said} -> "
          f"{s['out']} (rows: {s['csv']}); fingerprint {s['fingerprint']}")
    if a.radiomic:
        print(f"radiomic embeddings ({len(RADIOMIC_FEATURES)}-D) -> {a.radiomic}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
