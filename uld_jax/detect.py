"""``python -m uld_jax.detect``: lesion detection on one CT scan file with a trained MELD.

    python -m uld_jax.detect --workdir runs/meld --input scan.nii.gz --out out/ [--masks]
    python -m uld_jax.detect --checkpoint runs/meld/checkpoints/4000 --input dicom_folder/ --out out/

SCAN: a NIfTI file (``.nii``, ``.nii.gz``), a DICOM series folder, a MetaImage (``.mhd``/``.mha``) or
an NRRD file (``.nrrd``/``.nhdr``), read by ``data_prep.readers.scan.read_scan``.

Steps, each the training pipeline's own function:

1. preprocessing as the dataset builders do it (``data_prep.readers.common.preprocess_scan``):
   canonical axial orientation from the scan's direction matrix, body crop, resampling to the
   build's 0.8 mm pixels (long side <= 512) and 2 mm slices;
2. the loader's placement without augmentation (``input_pipeline.choose_placement``: rescaling to
   the run's ``data.pixel_mm``, centred on its ``data.image_size`` canvas, padding = air), window
   -1024..3071 HU -> [0, 255] - 50, 9 context slices 2 mm apart with the edge slices replicated;
3. every slice through one jitted batched function (``uld_jax.inference.Predictor``: fixed batch,
   the last batch padded and masked; compiled once), the selected dataset expert's detections
   (default: the universal DeepLesion expert);
4. 2D detections with score >= ``--score-threshold`` stacked into 3D boxes
   (``uld_jax.evaluate.stacking.stack_slices``: IoU > 0.5 on consecutive 2 mm slices);
5. each 3D box mapped back to the scan's voxel grid and world coordinates
   (``uld_jax.inference.ScanMapping``).

Outputs in OUT (each written atomically):

* ``detections.csv``: one row per 3D detection, highest score first (columns in
  :data:`CSV_COLUMNS`): voxel indices ``i, j, k`` (SimpleITK order: column, row, slice of the scan as
  stored on disk, 0-based, inclusive min/max), the centre as a continuous index and in world mm
  (LPS, as SimpleITK / DICOM), the world extent, the size in mm, the score (eq. 1 of the paper),
  the organ-gate weights (w0 = 1, lung, liver, lymph node), each organ head's score and each
  dataset expert's score of the box;
* ``detections.json``: the same detections plus the scan geometry, the preprocessing, the
  checkpoint and the peak slice's 2D box;
* ``masks.nii.gz`` (``--masks``): label volume on the input scan's grid and geometry, voxel value =
  detection rank (1 = highest score), 0 = background;
* ``overlays/finding_NNN.png``: the top ``--top-k-overlays`` findings on their peak slice
  (soft-tissue window -160..240 HU, lung window -1350..150 HU when the lung gate weight is the
  largest), box outlined.

Unreadable or non-CT input exits with status 2 and one line ``error: <file>: <problem>``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from uld_jax import core
from uld_jax.io.atomic import atomic_write

SOFT_TISSUE_WINDOW = (-160.0, 240.0)
LUNG_WINDOW = (-1350.0, 150.0)


# ------------------------------------------------------------------------------------------------
# Preprocessing (the pipeline's functions).
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PreparedScan:
    """A scan ready for the model.

    ``slices``: [Z, h, w] int16 HU stored slices (canonical orientation, cropped, resampled);
    ``canvas``: [H, W, Z] float32 windowed slices placed on the model's canvas; ``canvas_valid``
    [H, W] bool; ``placement``: stored slice -> model input; ``plan``: the resampling plan;
    ``mapping``: stored slices -> the scan's voxels / world mm; ``context_step``: stored slices
    between context channels.
    """

    slices: np.ndarray
    canvas: np.ndarray
    canvas_valid: np.ndarray
    placement: Any
    plan: Any
    mapping: Any
    context: int
    context_step_mm: float

    @property
    def num_slices(self) -> int:
        return int(self.slices.shape[0])

    def context_indices(self, z: int) -> np.ndarray:
        from uld_jax.input_pipeline import context_indices

        return context_indices(z, self.num_slices, float(self.plan.slice_mm), self.context,
                               self.context_step_mm)

    def images(self, zs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """[len(zs), H, W, 9] model images of stored slices ``zs`` and [len(zs), H, W] validity."""
        img = np.stack([self.canvas[:, :, self.context_indices(int(z))] for z in zs])
        return img, np.broadcast_to(self.canvas_valid, img.shape[:3]).copy()


def prepare_scan(vol, data_config, *, build_pixel_mm: float = core.TARGET_PIXEL_MM,
                 build_slice_mm: float = core.TARGET_SLICE_MM,
                 max_side: int = core.MAX_IMAGE_SIDE) -> PreparedScan:
    """A Volume as read -> :class:`PreparedScan` with the builders' and the loader's functions.

    ``build_pixel_mm`` / ``build_slice_mm`` / ``max_side``: the dataset build's resampling (the
    defaults of ``python -m data_prep.build``); ``data_config``: the run's input config
    (``pixel_mm``, ``image_size``, ``context_slices``, ``context_mm``).
    """
    from data_prep.readers.common import preprocess_scan
    from uld_jax import inference
    from uld_jax import input_pipeline as ip

    _, plan, slices = preprocess_scan(vol, pixel_mm=build_pixel_mm, slice_mm=build_slice_mm,
                                      max_side=max_side)
    size = tuple(int(v) for v in data_config.image_size)
    z, h, w = slices.shape
    p = ip.choose_placement(h, w, float(plan.pixel_mm), float(data_config.pixel_mm), size, None)
    canvas = np.empty(size + (z,), np.float32)
    valid = None
    for a in range(0, z, 64):  # warping is per channel: all slices at once, in chunks for memory
        chunk = np.ascontiguousarray(ip.window_lut(slices[a:a + 64]).transpose(1, 2, 0))
        canvas[:, :, a:a + 64], valid = ip.warp_image_antialiased(chunk, p, size)
    return PreparedScan(slices, canvas, valid, p, plan, inference.ScanMapping.from_volume(vol, plan),
                        int(data_config.context_slices), float(data_config.context_mm))


# ------------------------------------------------------------------------------------------------
# Inference over every slice.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SliceDetections:
    """2D detections on stored slices (N rows): ``slice_index`` [N], ``boxes`` [N, 4] stored-slice
    pixels, ``input_boxes`` [N, 4] model-input pixels, ``scores`` [N], ``organ_weights`` [N, H],
    ``head_scores`` [N, H], ``expert_scores`` [N, D], ``masks`` [N, 28, 28] or None."""

    slice_index: np.ndarray
    boxes: np.ndarray
    input_boxes: np.ndarray
    scores: np.ndarray
    organ_weights: np.ndarray
    head_scores: np.ndarray
    expert_scores: np.ndarray
    masks: np.ndarray | None


def input_boxes_to_stored(boxes: np.ndarray, scan: PreparedScan) -> tuple[np.ndarray, np.ndarray]:
    """[N, 4] model-input boxes -> stored-slice pixels (the loader's placement inverted), clipped to
    the stored slice, and the bool [N] mask of those left with a positive extent
    (``input_pipeline.image_boxes_in_slice``)."""
    from uld_jax.input_pipeline import image_boxes_in_slice

    h, w = scan.slices.shape[1:]
    return image_boxes_in_slice(np.asarray(boxes, np.float32).reshape(-1, 4), scan.placement, h, w)


def detect_slices(predictor, scan: PreparedScan, score_threshold: float = 0.0,
                  progress: bool = True) -> SliceDetections:
    """Runs ``predictor`` on every stored slice (batches of its fixed size, the next batch prepared
    while the device runs the current one) and keeps the valid detections scoring at least
    ``score_threshold``."""
    from tqdm import tqdm

    from uld_jax.inference import pad_batch

    bs = predictor.batch_size
    starts = list(range(0, scan.num_slices, bs))
    rows: dict[str, list] = {k: [] for k in ("z", "box", "score", "w", "head", "exp", "mask")}

    def collect(zs, dev):
        import jax

        out = jax.tree.map(np.asarray, dev)
        keep = out["valid"][: len(zs)] & (out["scores"][: len(zs)] >= score_threshold)
        b, k = np.nonzero(keep)
        rows["z"].append(np.asarray(zs)[b])
        rows["box"].append(out["boxes"][b, k])
        rows["score"].append(out["scores"][b, k])
        rows["w"].append(out["organ_weights"][b, k])
        rows["head"].append(out["head_scores"][b, k])
        rows["exp"].append(out["expert_scores"][b, k])
        if "masks" in out:
            rows["mask"].append(out["masks"][b, k])

    pending = None
    bar = tqdm(total=scan.num_slices, desc="detect", unit="slice", file=sys.stderr,
               disable=not progress)
    for a in starts:
        zs = list(range(a, min(a + bs, scan.num_slices)))
        img, val, sv = pad_batch(*scan.images(zs), bs)
        dev = predictor.device_call(img, val, sv)        # asynchronous: overlaps the next batch
        if pending is not None:
            collect(*pending)
            bar.update(len(pending[0]))
        pending = (zs, dev)
    if pending is not None:
        collect(*pending)
        bar.update(len(pending[0]))
    bar.close()
    cat = lambda k, shape: (np.concatenate(rows[k]) if rows[k]  # noqa: E731
                            else np.zeros((0,) + shape, np.float32))
    nh = int(predictor.loaded.model_config.num_organ_heads)
    nd = len(predictor.loaded.expert_names)
    ib = cat("box", (4,))
    sb, inside = input_boxes_to_stored(ib, scan)      # boxes wholly in the padding are dropped
    masks = cat("mask", (28, 28))[inside] if rows["mask"] else None
    return SliceDetections(
        slice_index=(np.concatenate(rows["z"]).astype(np.int64)[inside] if rows["z"]
                     else np.zeros(0, np.int64)),
        boxes=sb[inside], input_boxes=ib[inside], scores=cat("score", ())[inside],
        organ_weights=cat("w", (nh,))[inside],
        head_scores=cat("head", (nh,))[inside], expert_scores=cat("exp", (nd,))[inside],
        masks=masks)


# ------------------------------------------------------------------------------------------------
# 2D -> 3D findings in scan coordinates.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Findings:
    """3D detections (T rows, highest score first).

    ``z_first`` / ``z_last`` [T] stored slices, ``boxes`` [T, 4] union of the member 2D boxes
    (stored-slice pixels), ``scores`` [T] (max of the members), ``peak`` [T] row of the
    highest-scoring member in the :class:`SliceDetections`, ``members`` list of [n_t] rows,
    ``scan`` dict of ``ScanMapping.boxes_to_scan`` arrays.
    """

    z_first: np.ndarray
    z_last: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    peak: np.ndarray
    members: list
    scan: dict


def stack_findings(dets: SliceDetections, mapping, iou_threshold: float = 0.5) -> Findings:
    """Stacks 2D detections into 3D (``uld_jax.evaluate.stacking``) and maps them to the scan."""
    from uld_jax.evaluate.stacking import stack_slices

    n = len(dets.scores)
    if n == 0:
        e = np.zeros(0, np.int64)
        return Findings(e, e, np.zeros((0, 4)), np.zeros(0), e, [],
                        mapping.boxes_to_scan(e, e, np.zeros((0, 4))))
    st = stack_slices(dets.slice_index, core.internal_to_inclusive_xyxy(dets.boxes), dets.scores,
                      iou_threshold=iou_threshold, score_mode="max")
    t = len(st.scores)
    members = [[] for _ in range(t)]
    for i, tr in enumerate(st.track):
        members[tr].append(i)
    members = [np.asarray(m, np.int64) for m in members]
    boxes = np.stack([np.r_[dets.boxes[m, :2].min(0), dets.boxes[m, 2:].max(0)] for m in members])
    z_first = np.array([dets.slice_index[m].min() for m in members], np.int64)
    z_last = np.array([dets.slice_index[m].max() for m in members], np.int64)
    peak = np.array([m[np.argmax(dets.scores[m])] for m in members], np.int64)
    scores = dets.scores[peak].astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    members = [members[i] for i in order]
    z_first, z_last, boxes, peak, scores = (a[order] for a in (z_first, z_last, boxes, peak, scores))
    return Findings(z_first, z_last, boxes, scores, peak, members,
                    mapping.boxes_to_scan(z_first, z_last, boxes))


CSV_COLUMNS = (
    ["rank", "score", "expert", "num_slices",
     "voxel_min_i", "voxel_min_j", "voxel_min_k", "voxel_max_i", "voxel_max_j", "voxel_max_k",
     "center_i", "center_j", "center_k", "center_x_mm", "center_y_mm", "center_z_mm",
     "world_min_x_mm", "world_min_y_mm", "world_min_z_mm",
     "world_max_x_mm", "world_max_y_mm", "world_max_z_mm",
     "size_i_mm", "size_j_mm", "size_k_mm"]
    + [f"w_{o}" for o in core.ORGAN_HEADS] + [f"head_{o}" for o in core.ORGAN_HEADS]
    + [f"score_{d}" for d in core.DATASETS])


def finding_records(f: Findings, dets: SliceDetections, expert: str,
                    experts: Sequence[str]) -> list[dict[str, Any]]:
    """One JSON-able dict per finding (the CSV columns plus nested lists)."""
    out = []
    s = f.scan
    for r in range(len(f.scores)):
        p = int(f.peak[r])
        w = dets.organ_weights[p]
        hs = dets.head_scores[p]
        rec = {
            "rank": r + 1, "score": float(f.scores[r]), "expert": expert,
            "num_slices": int(f.z_last[r] - f.z_first[r] + 1),
            "voxel_min": [int(v) for v in s["voxel_min"][r]],
            "voxel_max": [int(v) for v in s["voxel_max"][r]],
            "center_voxel": [float(v) for v in s["center_voxel"][r]],
            "center_world_mm": [float(v) for v in s["center_world"][r]],
            "world_min_mm": [float(v) for v in s["world_min"][r]],
            "world_max_mm": [float(v) for v in s["world_max"][r]],
            "size_mm": [float(v) for v in s["size_mm"][r]],
            "organ_weights": {o: float(w[i]) for i, o in enumerate(core.ORGAN_HEADS[: len(w)])},
            "head_scores": {o: float(hs[i]) for i, o in enumerate(core.ORGAN_HEADS[: len(hs)])},
            "expert_scores": {d: float(dets.expert_scores[p, i]) for i, d in enumerate(experts)},
            "stored_slices": [int(f.z_first[r]), int(f.z_last[r])],
            "peak_stored_slice": int(dets.slice_index[p]),
            "peak_box_stored_yxyx": [float(v) for v in dets.boxes[p]],
        }
        out.append(rec)
    return out


def _csv_row(rec: dict[str, Any]) -> list[Any]:
    row = [rec["rank"], f"{rec['score']:.6f}", rec["expert"], rec["num_slices"],
           *rec["voxel_min"], *rec["voxel_max"],
           *(f"{v:.3f}" for v in rec["center_voxel"]), *(f"{v:.3f}" for v in rec["center_world_mm"]),
           *(f"{v:.3f}" for v in rec["world_min_mm"]), *(f"{v:.3f}" for v in rec["world_max_mm"]),
           *(f"{v:.3f}" for v in rec["size_mm"])]
    row += [f"{rec['organ_weights'][o]:.6f}" if o in rec["organ_weights"] else "" for o in core.ORGAN_HEADS]
    row += [f"{rec['head_scores'][o]:.6f}" if o in rec["head_scores"] else "" for o in core.ORGAN_HEADS]
    row += [f"{rec['expert_scores'][d]:.6f}" if d in rec["expert_scores"] else "" for d in core.DATASETS]
    return row


# ------------------------------------------------------------------------------------------------
# Writers.
# ------------------------------------------------------------------------------------------------
def write_tables(out_dir: str, records: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """``detections.csv`` and ``detections.json`` (atomic)."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(CSV_COLUMNS)
    for rec in records:
        wr.writerow(_csv_row(rec))
    pc, pj = os.path.join(out_dir, "detections.csv"), os.path.join(out_dir, "detections.json")
    atomic_write(pc, buf.getvalue().encode())
    atomic_write(pj, (json.dumps({**meta, "detections": records}, indent=1) + "\n").encode())
    return [pc, pj]


def _uncanonicalize(arr: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Inverse of ``preprocess.reorient_array``: a canonical [z, y, x] array -> the scan's order."""
    from data_prep import preprocess

    src_axis, flip = preprocess.canonical_axes(direction)
    perm = [2 - src_axis[2 - n] for n in range(3)]
    out = arr
    for w in range(3):
        if flip[w]:
            out = np.flip(out, axis=2 - w)
    return np.ascontiguousarray(np.transpose(out, np.argsort(perm)))


def mask_volume(f: Findings, dets: SliceDetections, scan: PreparedScan) -> np.ndarray:
    """[Z, Y, X] int16 labels on the scan's own grid: voxel = rank of the finding whose mask
    (probability >= 0.5) covers it, higher-ranked findings first; 0 background.

    Each voxel of the canonical grid reads the stored slice nearest to its position, and the mask
    (``inference.sample_mask``) at its centre's position on the model input.
    """
    from uld_jax.inference import sample_mask
    from uld_jax.input_pipeline import slice_boxes_to_image

    if dets.masks is None:
        raise ValueError("this model has no mask head (use_mask=False)")
    m = scan.mapping
    _, _, shape_c, sp_c, origin_c = m._canon
    labels = np.zeros(shape_c, np.int16)
    p = scan.placement
    zc = origin_c[2] + sp_c[0] * np.arange(shape_c[0])
    nearest = np.clip(np.floor((zc - m.out_z[0]) / m.slice_mm + 0.5), 0, len(m.out_z) - 1).astype(int)
    inside = (zc >= m.out_z[0] - 0.5 * m.slice_mm) & (zc <= m.out_z[-1] + 0.5 * m.slice_mm)
    # canonical voxel centre (index n -> continuous n + 0.5) -> stored pixel -> model input
    uy = (np.arange(shape_c[1]) + 0.5 - m.crop_yx[0]) * m.scale_yx[0] * p.scale + p.ty
    ux = (np.arange(shape_c[2]) + 0.5 - m.crop_yx[1]) * m.scale_yx[1] * p.scale + p.tx
    for r, mem in enumerate(f.members, start=1):
        for i in mem:
            js = np.flatnonzero((nearest == dets.slice_index[i]) & inside)
            # only inside the reported box (the input box clipped to the stored slice), as Mask
            # R-CNN pastes a mask inside its box
            y1, x1, y2, x2 = (float(v) for v in slice_boxes_to_image(dets.boxes[i], p))
            vy = np.flatnonzero((uy >= y1) & (uy <= y2))
            vx = np.flatnonzero((ux >= x1) & (ux <= x2))
            if js.size == 0 or vy.size == 0 or vx.size == 0:
                continue
            sub = sample_mask(dets.masks[i], dets.input_boxes[i], uy[vy], ux[vx]) >= 0.5
            if not sub.any():
                continue
            for j in js:
                plane = labels[j][np.ix_(vy, vx)]
                plane[(plane == 0) & sub] = r
                labels[j][np.ix_(vy, vx)] = plane
    return _uncanonicalize(labels, m.direction)


def write_mask_nifti(path: str, labels: np.ndarray, vol) -> str:
    """A [Z, Y, X] label array on the scan's grid -> NIfTI with the scan's geometry (atomic)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(labels.astype(np.int16))
    img.SetSpacing(tuple(float(v) for v in vol.spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(v) for v in vol.origin_xyz))
    img.SetDirection(tuple(float(v) for v in np.asarray(vol.direction).reshape(-1)))
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".nii.gz", dir=d)
    os.close(fd)
    try:
        sitk.WriteImage(img, tmp, True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def overlay_png(hu_slice: np.ndarray, box_yxyx: np.ndarray, window: tuple[float, float],
                caption: str, min_side: int = 512) -> bytes:
    """A stored slice [h, w] HU with one box outlined -> PNG bytes (upscaled to ``min_side``)."""
    from PIL import Image, ImageDraw

    lo, hi = window
    g = (np.clip((hu_slice.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    h, w = g.shape
    f = max(1, int(np.ceil(min_side / max(h, w))))
    img = Image.fromarray(g).resize((w * f, h * f), Image.NEAREST).convert("RGB")
    d = ImageDraw.Draw(img)
    y1, x1, y2, x2 = (float(v) * f for v in box_yxyx)
    d.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=(255, 40, 40), width=max(1, f))
    d.text((4, 4), caption, fill=(255, 255, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_overlays(out_dir: str, f: Findings, dets: SliceDetections, scan: PreparedScan,
                   records: list[dict[str, Any]], top_k: int) -> list[str]:
    """``overlays/finding_NNN.png`` of the ``top_k`` highest-scoring findings."""
    paths = []
    if top_k <= 0 or not records:
        return paths
    od = os.path.join(out_dir, "overlays")
    os.makedirs(od, exist_ok=True)
    for r, rec in enumerate(records[:top_k]):
        p = int(f.peak[r])
        w = rec["organ_weights"]
        gated = {o: v for o, v in w.items() if o != "whole_body"}
        lung = bool(gated) and max(gated, key=gated.get) == "lung"
        window = LUNG_WINDOW if lung else SOFT_TISSUE_WINDOW
        cap = (f"#{rec['rank']} score {rec['score']:.3f} slice k={rec['voxel_min'][2]}..{rec['voxel_max'][2]}"
               f" {'lung' if lung else 'soft-tissue'} window")
        path = os.path.join(od, f"finding_{rec['rank']:03d}.png")
        atomic_write(path, overlay_png(scan.slices[int(dets.slice_index[p])], dets.boxes[p], window, cap))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uld_jax.detect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (its latest checkpoint)")
    src.add_argument("--checkpoint", help="one checkpoint folder WORKDIR/checkpoints/<step>")
    p.add_argument("--step", type=int, default=None, help="with --workdir: this step instead of the latest")
    p.add_argument("--config", default=None,
                   help="config file[:variant] (e.g. configs/meld.py:tiny) instead of the checkpoint's")
    p.add_argument("--input", required=True, help="NIfTI file, DICOM folder, .mhd or .nrrd")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--expert", default="deeplesion",
                   help="dataset expert whose detections are reported (default: deeplesion, universal)")
    p.add_argument("--score-threshold", type=float, default=0.05,
                   help="2D detections below this score are dropped before stacking")
    p.add_argument("--stack-iou", type=float, default=0.5, help="IoU (strict) linking consecutive slices")
    p.add_argument("--masks", action="store_true", help="also write masks.nii.gz")
    p.add_argument("--top-k-overlays", type=int, default=5, help="overlay PNGs of the top N findings")
    p.add_argument("--batch-size", type=int, default=4, help="slices per compiled batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs detection as the command line describes; returns the JSON document written."""
    from data_prep.readers.scan import read_scan
    from uld_jax import inference

    t0 = time.perf_counter()
    vol = read_scan(args.input)                         # BadItem first: no model load for bad input
    loaded = inference.cached_model(
        os.path.abspath(args.workdir) if args.workdir else None,
        os.path.abspath(args.checkpoint) if args.checkpoint else None, args.step, args.config)
    # One compiled function whether or not masks are written (the model computes them anyway).
    predictor = inference.cached_predictor(loaded, int(args.batch_size), args.expert, True)
    scan = prepare_scan(vol, loaded.data_config)
    t1 = time.perf_counter()
    dets = detect_slices(predictor, scan, float(args.score_threshold), progress=not args.no_progress)
    t2 = time.perf_counter()
    f = stack_findings(dets, scan.mapping, float(args.stack_iou))
    records = finding_records(f, dets, predictor.expert_name, loaded.expert_names)
    os.makedirs(args.out, exist_ok=True)
    p = scan.placement
    meta = {
        "input": os.path.abspath(args.input),
        "checkpoint": loaded.source, "step": loaded.step, "expert": predictor.expert_name,
        "experts": list(loaded.expert_names),
        "scan": {"shape_ijk": list(vol.hu.shape[::-1]), "spacing_ijk_mm": list(vol.spacing_zyx[::-1]),
                 "origin_xyz_mm": list(vol.origin_xyz),
                 "direction": np.asarray(vol.direction).reshape(-1).tolist(),
                 "coordinates": "voxel indices (i, j, k) = (column, row, slice) of the scan on disk, "
                                "0-based; world = LPS mm (SimpleITK / DICOM patient coordinates)"},
        "preprocessing": {"stored_pixel_mm": float(scan.plan.pixel_mm),
                          "stored_slice_mm": float(scan.plan.slice_mm),
                          "stored_slices": scan.num_slices, "stored_hw": list(scan.slices.shape[1:]),
                          "crop_yx": list(scan.plan.crop_yx),
                          "model_pixel_mm": float(scan.plan.pixel_mm / p.scale),
                          "image_size": list(loaded.image_size),
                          "placement": {"scale": p.scale, "ty": p.ty, "tx": p.tx},
                          "context_slices": scan.context, "context_mm": scan.context_step_mm},
        "score_threshold": float(args.score_threshold), "stack_iou": float(args.stack_iou),
        "num_2d_detections": int(len(dets.scores)), "num_detections": len(records),
        "seconds": {"read_and_preprocess": round(t1 - t0, 3), "inference": round(t2 - t1, 3)},
        "slices_per_second": round(scan.num_slices / max(t2 - t1, 1e-9), 3),
    }
    write_tables(args.out, records, meta)
    if args.masks:
        write_mask_nifti(os.path.join(args.out, "masks.nii.gz"), mask_volume(f, dets, scan), vol)
    write_overlays(args.out, f, dets, scan, records, int(args.top_k_overlays))
    meta["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return {**meta, "detections": records}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from data_prep.types import BadItem
    from uld_jax.inference import ModelLoadError

    try:
        doc = run(args)
    except (BadItem, ModelLoadError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"{doc['num_detections']} detections ({doc['num_2d_detections']} 2D) in "
          f"{doc['preprocessing']['stored_slices']} slices -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
