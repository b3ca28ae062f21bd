"""Evaluation of a trained workdir on a built TFDS split (``python -m uld_jax.evaluate --workdir``).

Runs the run's MELD (``uld_jax.inference``) over every sample of the split with the input pipeline in
evaluation mode (no mixing, no shuffling, no augmentation, one epoch, the last batch padded and
masked), maps the detections back to the stored slices' pixels (``image_boxes_in_slice`` with the
loader's unaugmented placement), and calls the offline evaluation:

* ``keyslice`` (default without ``--truth``): MULAN key-slice FROC per dataset against the sample
  table's original boxes, on the key slices (datasets without key slices: every sample slice);
* ``volumetric`` (``--truth`` a 1K-set structured file): 2D detections on every stored slice of each
  case, mapped to the case's original voxel grid (the case's source scan header, or for DeepLesion
  PNG folders the ``--dl-info`` rows), z numbered as the release does for ``PPPPPP_SS_RR_AAA-BBB``
  names (``AAA + k``), then ``evaluate_predictions`` (stacking, both hit rules); organ strata
  from ``--labels`` (a label per truth box) or, without it, from the ``--dl-info`` rows of the
  marked lesions (``uld_jax.evaluate.organs``);
* ``luna16`` (``--truth`` annotations.csv or its folder): 2D detections stacked per scan, 3D box
  centres in world mm from the source ``.mhd`` header, LUNA16 FROC / CPM over the split's scans.

Each dataset is evaluated by its own expert when the model has it (``--expert`` overrides), else by
the first expert (a one-expert model, including one trained with ``data.merge_datasets``,
evaluates every dataset with it).

The pieces (also used during training by ``uld_jax.evaluate.periodic`` on in-memory variables):
``load_split`` (the split's table and slice store, once), ``keyslice_split`` (the rows the key-slice
protocol evaluates, optionally capped), ``predict_split`` (one ``inference.Predictor`` over a loaded
split) and ``keyslice_report``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import numpy as np

from uld_jax import core
from uld_jax.evaluate.boxes import EvaluationInputError


@dataclasses.dataclass
class SplitDetections:
    """Per-sample detections of one dataset's split: ``table`` (the sample table), ``boxes`` /
    ``scores`` lists over its rows ([n, 4] internal stored-slice pixels, [n])."""

    dataset: str
    expert: str
    table: Any
    boxes: list
    scores: list


def _eval_input_config(data_config, data_dir: str, dataset: str, split: str, batch_size: int):
    """The run's input-pipeline config (``data_config``, or a ``LoadedModel``) in evaluation mode
    for ``dataset``/``split``: no mixing, shuffling or augmentation, one epoch, no worker processes,
    no overlays, global batch ``batch_size``."""
    import ml_collections

    data_config = getattr(data_config, "data_config", data_config)
    c = ml_collections.ConfigDict(data_config.to_dict())
    c.data_dir = os.fspath(data_dir)
    c.datasets = (dataset,)
    c.split = split
    c.mix, c.shuffle, c.augment = False, False, False
    c.num_epochs = 1
    c.global_batch_size = int(batch_size)
    c.num_workers = 0
    c.overlays = ()
    return c


@dataclasses.dataclass
class SplitInput:
    """One dataset's split loaded for inference: ``config`` (the input pipeline in evaluation mode,
    :func:`_eval_input_config`), ``table`` (the sample table, possibly a subset of its rows, see
    :func:`keyslice_split`) and ``store`` (its slice store). Load once, predict many times."""

    dataset: str
    split: str
    config: Any
    table: Any
    store: Any


def load_split(data_config, data_dir: str, dataset: str, split: str, batch_size: int, *,
               every_slice: bool = False) -> SplitInput:
    """The sample table and slice store of ``dataset``/``split`` (with ``every_slice``: plus every
    stored slice of its cases, through ``uld_jax.overlay.add_slices``). ``data_config``: the run's
    input-pipeline config (``LoadedModel.data_config``)."""
    from uld_jax import input_pipeline as ip

    cfg = _eval_input_config(data_config, data_dir, dataset, split, batch_size)
    try:
        tables, stores = ip.load_tables(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise EvaluationInputError(f"{data_dir}: {e}") from None
    table = tables[0]
    if every_slice:
        from uld_jax.overlay import add_slices

        mm = float(np.min(table.case_slice_mm)) if len(table.case_slice_mm) else 2.0
        table = add_slices(table, every_mm=mm)
    if len(table) == 0:
        raise EvaluationInputError(f"{data_dir}: {dataset} has no samples in split {split!r}")
    return SplitInput(dataset, split, cfg, table, stores[0])


def keyslice_rows(table) -> np.ndarray:
    """Rows the key-slice protocol evaluates: the key slices (every sample when there are none)."""
    return np.flatnonzero(table.is_key_slice) if table.is_key_slice.any() else np.arange(len(table))


def take_samples(table, rows: np.ndarray):
    """The sample table restricted to ``rows`` (in that order; cases and lesions kept as they are).
    Row ``i`` of the result is row ``rows[i]`` of ``table``."""
    rows = np.asarray(rows, np.int64)
    ptr = table.lesion_ptr
    counts = ptr[rows + 1] - ptr[rows]
    lesion_idx = (np.concatenate([np.arange(ptr[r], ptr[r + 1]) for r in rows]) if len(rows)
                  else np.zeros(0, np.int64)).astype(np.int64)
    fixed = {"dataset", "split", "all_case_ids", "lesion_ptr", "lesions", "masks"}
    per_sample = {}
    for f in dataclasses.fields(table):
        if f.name in fixed or (f.name.startswith("case_") and f.name != "case_row"):
            continue                                     # per-case columns (case_row is per sample)
        col = getattr(table, f.name)
        if len(col) != len(table):
            raise ValueError(f"SampleTable.{f.name}: expected one value per sample")
        per_sample[f.name] = col[rows]
    return dataclasses.replace(
        table, **per_sample, lesion_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        lesions={k: v[lesion_idx] for k, v in table.lesions.items()}, masks=table.masks[lesion_idx])


def keyslice_split(si: SplitInput, max_samples: int = -1) -> SplitInput:
    """``si`` restricted to the rows the key-slice protocol evaluates (:func:`keyslice_rows`), at
    most ``max_samples`` of them (evenly spaced over the table; < 0: all). Inference on the result
    gives the key-slice report of the whole split without running the model on other samples."""
    rows = keyslice_rows(si.table)
    if 0 <= max_samples < len(rows):
        rows = rows[np.unique(np.round(np.linspace(0, len(rows) - 1, max_samples)).astype(np.int64))]
    return dataclasses.replace(si, table=take_samples(si.table, rows))


def expert_for(loaded, dataset: str, expert: str | None = None) -> str:
    """The expert that evaluates ``dataset``: ``expert`` if given, else the dataset's own expert
    when the model has one, else the first (universal) expert."""
    if expert is not None:
        return expert
    return dataset if dataset in loaded.expert_names else loaded.expert_names[0]


def predict_split(pred, si: SplitInput, *, score_threshold: float = 0.0,
                  progress: bool = True) -> SplitDetections:
    """Runs ``pred`` (a :class:`uld_jax.inference.Predictor` compiled for
    ``si.config.global_batch_size``) on every sample of ``si.table`` with the input pipeline in
    evaluation mode, and maps the detections to the stored slices' pixels."""
    from tqdm import tqdm

    from uld_jax import input_pipeline as ip
    from uld_jax.core import Keys

    cfg, table = si.config, si.table
    if pred.batch_size != int(cfg.global_batch_size):
        raise ValueError(f"predictor compiled for batch {pred.batch_size}, split loaded for "
                         f"{cfg.global_batch_size}")
    boxes: list = [np.zeros((0, 4), np.float32)] * len(table)
    scores: list = [np.zeros(0, np.float32)] * len(table)
    ds = ip.make_dataset(cfg, tables=[table], stores=[si.store], process_index=0, process_count=1,
                         pad_final_batch=True)
    bar = tqdm(total=len(table), desc=f"evaluate {si.dataset}/{si.split}", unit="slice",
               file=sys.stderr, disable=not progress)
    for batch in ds:
        sid = np.asarray(batch[Keys.SAMPLE_ID])
        out = pred(np.asarray(batch[Keys.IMAGE]), np.asarray(batch[Keys.IMAGE_VALID]), sid >= 0)
        for b in np.flatnonzero(sid >= 0):
            row = int(sid[b])
            keep = out["valid"][b] & (out["scores"][b] >= score_threshold)
            p = ip.unaugmented_placement(table, row, cfg)
            h, w = (int(v) for v in table.case_hw[table.case_row[row]])
            sb, inside = ip.image_boxes_in_slice(out["boxes"][b][keep], p, h, w)
            boxes[row] = sb[inside]
            scores[row] = out["scores"][b][keep][inside].astype(np.float32)
        bar.update(int((sid >= 0).sum()))
    bar.close()
    return SplitDetections(si.dataset, pred.expert_name, table, boxes, scores)


def infer_split(loaded, data_dir: str, dataset: str, split: str, *, expert: str | None = None,
                batch_size: int = 4, score_threshold: float = 0.0, every_slice: bool = False,
                progress: bool = True) -> SplitDetections:
    """Detections on every sample of ``dataset``/``split`` (with ``every_slice``: on every stored
    slice of its cases, through ``uld_jax.overlay.add_slices``)."""
    from uld_jax import inference

    si = load_split(loaded.data_config, data_dir, dataset, split, batch_size, every_slice=every_slice)
    pred = inference.cached_predictor(loaded, int(batch_size), expert_for(loaded, dataset, expert),
                                      False)
    return predict_split(pred, si, score_threshold=score_threshold, progress=progress)


# ------------------------------------------------------------------------------------------------
# Protocols.
# ------------------------------------------------------------------------------------------------
def keyslice_dicts(sd: SplitDetections) -> tuple[dict, dict]:
    """(truth {image: n x 4}, pred {image: n x 5}) in inclusive ``[x1, y1, x2, y2]`` pixels of the
    stored slices; images ``<case_id>:<slice>`` = key slices (every sample without key slices)."""
    t = sd.table
    truth, pred = {}, {}
    for r in keyslice_rows(t):
        name = f"{t.case_id[t.case_row[r]]}:{int(t.slice_index[r])}"
        les = t.sample_lesions(int(r))
        orig = les["provenance"] == int(core.Provenance.ORIGINAL)
        truth[name] = core.internal_to_inclusive_xyxy(les["boxes"][orig]).reshape(-1, 4)
        pred[name] = np.column_stack([core.internal_to_inclusive_xyxy(sd.boxes[r]).reshape(-1, 4),
                                      sd.scores[r].astype(np.float64)])
    return truth, pred


def keyslice_report(sd: SplitDetections, model_source: str, truth_source: str,
                    fp_rates: Sequence[float] | None = None):
    """MULAN key-slice FROC report of one dataset's detections (``info['dataset']`` set)."""
    from uld_jax.evaluate import report

    tr, pr = keyslice_dicts(sd)
    extra = {"fp_rates": tuple(fp_rates)} if fp_rates else {}
    rep = report.evaluate_keyslice(tr, pr, missing_as_empty=True,
                                   pred_source=f"{model_source} ({sd.expert} expert)",
                                   truth_source=truth_source, **extra)
    rep.info["dataset"] = sd.dataset
    return rep


def _case_records(data_dir: str, dataset: str) -> dict[str, dict]:
    from uld_jax import slice_data

    return {slice_data._text(c["case_id"]): c for c in slice_data.load_cases(data_dir, dataset)}


def case_mapping(rec: dict, dl_rows: dict | None = None):
    """``ScanMapping`` of a built case from its source scan's header, or for DeepLesion from its
    DL_info row (``dl_rows``: case_id -> DLRow)."""
    import SimpleITK as sitk

    from uld_jax import slice_data
    from uld_jax.inference import ScanMapping

    cid = slice_data._text(rec["case_id"])
    kw = dict(crop_yx=tuple(int(v) for v in rec["source_crop_yx"]), pixel_mm=float(rec["pixel_mm"]),
              z_mm=np.asarray(rec["z_mm"], np.float64), slice_mm=float(rec["slice_mm"]))
    if dl_rows is not None and cid in dl_rows:
        r = dl_rows[cid]
        sx, sy, dz = r.spacing_mm
        a, b = r.slice_range
        w, h = r.image_size
        return ScanMapping.from_header((b - a + 1, h, w), (dz, sy, sx), (0.0, 0.0, (a - 1.0) * dz),
                                       np.eye(3), **kw)
    src = slice_data._text(rec["source"])
    try:
        if os.path.isdir(src):
            rd = sitk.ImageSeriesReader()
            rd.SetFileNames(rd.GetGDCMSeriesFileNames(src))
            img = rd.Execute()
            size, sp, org, d = img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
        else:
            info = sitk.ImageFileReader()
            info.SetFileName(src)
            info.ReadImageInformation()
            size, sp, org, d = info.GetSize(), info.GetSpacing(), info.GetOrigin(), info.GetDirection()
    except RuntimeError as e:
        raise EvaluationInputError(
            f"case {cid}: its source scan {src!r} cannot be read for the geometry "
            f"({' '.join(str(e).split())[:200]}); for DeepLesion pass --dl-info") from None
    return ScanMapping.from_header(tuple(size[::-1]), tuple(sp[::-1]), org,
                                   np.asarray(d).reshape(3, 3), **kw)


def _stack_case(sd: SplitDetections, rows: np.ndarray, iou: float):
    """2D detections of one case's rows -> (z_first, z_last, boxes [T, 4] stored px, scores [T])."""
    from uld_jax.evaluate.stacking import stack_slices

    t = sd.table
    z = np.concatenate([np.full(len(sd.scores[r]), int(t.slice_index[r])) for r in rows] + [np.zeros(0, int)])
    b = np.concatenate([sd.boxes[r] for r in rows] + [np.zeros((0, 4), np.float32)])
    s = np.concatenate([sd.scores[r] for r in rows] + [np.zeros(0, np.float32)])
    if len(s) == 0:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros((0, 4)), np.zeros(0)
    st = stack_slices(z, core.internal_to_inclusive_xyxy(b), s, iou_threshold=iou)
    n = len(st.scores)
    lo_y = np.full(n, np.inf); lo_x = np.full(n, np.inf)
    hi_y = np.full(n, -np.inf); hi_x = np.full(n, -np.inf)
    np.minimum.at(lo_y, st.track, b[:, 0]); np.minimum.at(lo_x, st.track, b[:, 1])
    np.maximum.at(hi_y, st.track, b[:, 2]); np.maximum.at(hi_x, st.track, b[:, 3])
    zf = np.full(n, np.iinfo(np.int64).max); zl = np.full(n, -1)
    np.minimum.at(zf, st.track, z); np.maximum.at(zl, st.track, z)
    return zf, zl, np.stack([lo_y, lo_x, hi_y, hi_x], 1), st.scores


def volumetric_pred(sd: SplitDetections, data_dir: str, dl_rows: dict | None,
                    stack_iou: float = 0.5) -> dict[str, np.ndarray]:
    """{case_id: n x 6 per-slice 2D detections ``[z, x1, y1, x2, y2, score]``} on the case's original
    voxel grid (z: the release's slice number for sub-volume names, else the 0-based slice index),
    one row per (detection, original slice whose centre lies in the stored slice's 2 mm slab)."""
    from uld_jax.evaluate.inputs import parse_subvolume_name

    recs = _case_records(data_dir, sd.dataset)
    t = sd.table
    out: dict[str, np.ndarray] = {}
    for c, cid in enumerate(t.case_id):
        rows = np.flatnonzero(t.case_row == c)
        m = case_mapping(recs[str(cid)], dl_rows)
        parts = []
        for r in rows:
            n = len(sd.scores[r])
            if n == 0:
                continue
            k = np.full(n, int(t.slice_index[r]))
            s = m.boxes_to_scan(k, k, sd.boxes[r])
            for i in range(n):
                lo, hi = s["voxel_min"][i], s["voxel_max"][i]
                # the original slices whose centres lie in this stored slice's slab (slabs tile z:
                # each original slice is reported from one stored slice, none when it has none)
                k0 = int(np.ceil(s["index_lo"][i][2] - 1e-9))
                k1 = int(np.ceil(s["index_hi"][i][2] - 1e-9)) - 1
                for zz in range(max(k0, 0), min(k1, m.shape_zyx[0] - 1) + 1):
                    parts.append([zz, lo[0], lo[1], hi[0], hi[1], float(sd.scores[r][i])])
        a = np.asarray(parts, np.float64).reshape(-1, 6)
        sub = parse_subvolume_name(str(cid))
        if sub is not None and len(a):
            a[:, 0] += sub[1]
        out[str(cid)] = a
    return out


def luna_candidates(sd: SplitDetections, data_dir: str, stack_iou: float = 0.5):
    """LUNA16 candidates (``PointTable``: seriesuid, world centre mm, score) of 3D-stacked
    detections, and the split's scan ids."""
    from uld_jax.evaluate.luna import PointTable

    recs = _case_records(data_dir, sd.dataset)
    t = sd.table
    uids, xyz, p = [], [], []
    for c, cid in enumerate(t.case_id):
        zf, zl, b, s = _stack_case(sd, np.flatnonzero(t.case_row == c), stack_iou)
        if len(s) == 0:
            continue
        w = case_mapping(recs[str(cid)]).boxes_to_scan(zf, zl, b)["center_world"]
        uids += [str(cid)] * len(s)
        xyz.append(w)
        p.append(s)
    cand = PointTable.from_rows(uids, np.concatenate(xyz) if xyz else np.zeros((0, 3)),
                                np.concatenate(p) if p else np.zeros(0))
    return cand, [str(c) for c in t.case_id]


def _check_npz_name(path: str) -> None:
    if not str(path).endswith(".npz"):
        raise EvaluationInputError(f"{path}: detections are written as .npz; give a name ending in .npz")


def write_volume_npz(path: str, arrays: dict) -> None:
    """{name: array} to an .npz (atomically; the names become the archive's keys)."""
    from uld_jax.io.atomic import atomic_write

    _check_npz_name(path)
    atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v, np.float64) for k, v in arrays.items()}),
                 makedirs=True)


def evaluate_workdir(workdir: str | None, data_dir: str, *, checkpoint: str | None = None,
                     split: str = "test", protocol: str | None = None, truth: str | None = None,
                     datasets: Sequence[str] | None = None, expert: str | None = None,
                     batch_size: int = 4, dl_info: str | None = None, stack_iou: float = 0.5,
                     step: int | None = None, progress: bool = True,
                     fp_rates: Sequence[float] | None = None, max_marks: int = 100,
                     labels: str | None = None, save_pred: str | None = None,
                     precise_bn: int = 0, precise_bn_datasets: Sequence[str] | None = None,
                     precise_bn_data: str | None = None) -> list:
    """Runs inference and the protocol; returns a list of ``EvaluationReport`` (one per dataset for
    key slices, one otherwise). ``labels``: volumetric only, a file of organ labels per truth box
    ``{name: [label, ...]}`` for the organ strata (default: from ``dl_info``'s marked lesions when
    given). ``save_pred``: volumetric only, also write the per-slice 2D detections that were
    evaluated to this .npz ({sub-volume: n x 6 ``[z, x1, y1, x2, y2, score]``}, the input of
    ``python -m uld_jax.evaluate --pred FILE --pred-2d`` and of :mod:`uld_jax.evaluate.bootstrap`).
    ``precise_bn``: when > 0, evaluate with BatchNorm statistics recomputed from that many of the
    run's training batches (of ``precise_bn_datasets``, default all; from ``precise_bn_data``,
    default the training data folder the run's config records), :mod:`uld_jax.evaluate.precise_bn`."""
    from uld_jax import inference, slice_data
    from uld_jax.evaluate import inputs, report

    if save_pred is not None:
        _check_npz_name(save_pred)
    try:
        loaded = inference.cached_model(os.path.abspath(workdir) if workdir else None,
                                        os.path.abspath(checkpoint) if checkpoint else None, step, None)
    except inference.ModelLoadError as e:
        raise EvaluationInputError(str(e)) from None
    if precise_bn:
        from uld_jax.evaluate.precise_bn import with_precise_bn

        loaded = with_precise_bn(loaded, int(precise_bn), data_dir=precise_bn_data,
                                 datasets=precise_bn_datasets)
    protocol = protocol or ("volumetric" if truth else "keyslice")
    if datasets is None:
        datasets = [d for d in loaded.data_config.datasets
                    if os.path.isfile(os.path.join(data_dir, d, slice_data.BUILD_INFO))]
        if protocol == "luna16":
            datasets = ["luna16"]
        elif protocol == "volumetric":
            datasets = ["deeplesion"] if "deeplesion" in datasets else datasets[:1]
    if not datasets:
        raise EvaluationInputError(f"{data_dir}: none of the run's datasets "
                                   f"{tuple(loaded.data_config.datasets)} is built there")
    if save_pred is not None and protocol != "volumetric":
        raise EvaluationInputError(f"--save-pred writes volumetric detections, not {protocol}")
    if labels is not None and protocol != "volumetric":
        raise EvaluationInputError("--labels (organ strata per truth box) applies to the volumetric "
                                   f"protocol, not {protocol}")
    kw = dict(expert=expert, batch_size=batch_size, progress=progress)
    reports = []
    if protocol == "keyslice":
        for ds in datasets:
            # only the evaluated rows (key slices) go through the model
            si = keyslice_split(load_split(loaded.data_config, data_dir, ds, split, batch_size))
            pred = inference.cached_predictor(loaded, int(batch_size), expert_for(loaded, ds, expert), False)
            sd = predict_split(pred, si, progress=progress)
            reports.append(keyslice_report(sd, loaded.source, f"{data_dir}/{ds} {split} sample table",
                                           fp_rates))
        return reports
    if truth is None:
        raise EvaluationInputError(f"--protocol {protocol} needs --truth")
    if protocol == "volumetric":
        dl_rows = None
        if dl_info:
            from data_prep.readers.deeplesion import parse_dl_info

            dl_rows = {r.case_id: r for r in parse_dl_info(dl_info)}
        tr_split = None if split not in ("val", "test") else split
        tr = inputs.load_volume_dict(truth, split=tr_split)
        truth_labels = None
        if labels is not None:
            truth_labels = inputs.load_labels(labels, split=tr_split)
        elif dl_info:
            from uld_jax.evaluate.organs import organ_labels_from_dl_info

            truth_labels, _ = organ_labels_from_dl_info(tr, dl_info)
        sd = infer_split(loaded, data_dir, datasets[0], split, every_slice=True, **kw)
        per_slice = volumetric_pred(sd, data_dir, dl_rows, stack_iou)
        if save_pred is not None:
            write_volume_npz(save_pred, per_slice)
        extra = {"fp_rates": tuple(fp_rates)} if fp_rates else {}
        rep = report.evaluate_predictions(tr, slice_detections=per_slice, stack_iou=stack_iou,
                                          pred_source=f"{loaded.source} ({sd.expert} expert)",
                                          truth_source=truth, truth_labels=truth_labels, **extra)
        if truth_labels is not None:
            rep.info["sources"]["labels"] = (os.fspath(labels) if labels is not None
                                             else f"{dl_info} (marked lesions)")
        return [rep]
    if protocol == "luna16":
        from uld_jax.evaluate.luna import PointTable, luna16_froc, read_points_csv

        folder = truth if os.path.isdir(truth) else os.path.dirname(os.path.abspath(truth))
        ann = os.path.join(truth, "annotations.csv") if os.path.isdir(truth) else truth
        exc = os.path.join(folder, "annotations_excluded.csv")
        sd = infer_split(loaded, data_dir, "luna16", split, every_slice=True, **kw)
        cand, scans = luna_candidates(sd, data_dir, stack_iou)
        excluded = (read_points_csv(exc, "diameter_mm") if os.path.isfile(exc)
                    else PointTable.from_rows([], np.zeros((0, 3)), []))
        r = luna16_froc(cand, read_points_csv(ann, "diameter_mm"), excluded, scans, max_marks=max_marks)
        return [report.evaluate_luna16(r, sources={"model": loaded.source, "annotations": ann,
                                                   "scans": f"{len(scans)} scans of {split}"})]
    raise EvaluationInputError(f"unknown protocol {protocol!r}")
