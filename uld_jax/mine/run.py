"""From a mining run's per-slice outputs to the mined-annotation table (MAM + NRM, end to end).

The ``python -m uld_jax.mine`` driver runs MELD over the training slices (sampled every 5 mm, plus
the key slices that carry the annotations) and collects, per slice, every expert's proposals with
their scores and embeddings, and the embeddings of the annotated lesions (the embedding head run on
the ground-truth boxes). It then calls :func:`mine_overlay`, which is pure and host-side except for
the jitted MAM kernel:

1. MAM (:mod:`uld_jax.mine.mam`) on the universal (DeepLesion) expert's proposals, grouped by
   patient -> mined positives (kind 1, ``lesion_id`` of the matched annotated lesion).
2. NRM (:mod:`uld_jax.mine.nrm`) on the single-type experts' proposals, explained by the original
   annotations and the mined positives -> ignore regions (kind 2) or positives (``as_positive``).
3. Every slice of the run that carries no original annotation is offered as an unlabeled slice
   (kind 3); finetuning draws a fresh random subset of them each epoch.

Slices are referred to by *slice key*: the row of :class:`SliceTable`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from uld_jax.core import DATASET_ID, SINGLE_TYPE_DATASETS
from uld_jax.mine import mam, nrm, table

UNIVERSAL_EXPERT: int = DATASET_ID["deeplesion"]


@dataclasses.dataclass
class SliceTable:
    """The slices of a mining run; row i is slice key i.

    Attributes:
      dataset: [S] str, a name in ``uld_jax.core.DATASETS`` (``deeplesion`` for mining).
      case_id: [S] str, the preprocessed Case (sub-volume) id.
      slice_index: [S] int, index into the Case's slices (the sample table's numbering).
      patient_id: [S] int, the patient (MAM compares lesions and proposals within a patient);
        DeepLesion's ``PPPPPP`` as an integer. (Strings work too, but sort slower.)
      pixel_mm, slice_mm: [S] float, the Case's pixel size and slice spacing (mm), or None; needed
        by MAM's location term (``MiningOptions.location_mm``).
    """

    dataset: np.ndarray
    case_id: np.ndarray
    slice_index: np.ndarray
    patient_id: np.ndarray
    pixel_mm: np.ndarray | None = None
    slice_mm: np.ndarray | None = None

    def __len__(self) -> int:
        return int(np.asarray(self.case_id).shape[0])


def mining_slice_indices(num_slices: int, *, slice_mm: float = 2.0, step_mm: float = 5.0,
                         include: np.ndarray | None = None) -> np.ndarray:
    """Slices of a Case to mine: one every ``step_mm`` (the paper's 5 mm) plus ``include``.

    Case slices are ``slice_mm`` apart (2 mm); the slice nearest to each multiple of ``step_mm``
    from the first slice is taken (ties to the higher slice), then the ``include`` slices (the key
    slices, whose annotations MAM needs) are added. Returns sorted unique int64 indices.
    """
    if num_slices <= 0:
        return np.zeros(0, np.int64)
    extent = (num_slices - 1) * slice_mm
    pos = np.arange(0.0, extent + 1e-6 * slice_mm, step_mm)
    idx = np.minimum(np.floor(pos / slice_mm + 0.5).astype(np.int64), num_slices - 1)
    if include is not None:
        inc = np.asarray(include, np.int64).reshape(-1)
        if inc.size and (inc.min() < 0 or inc.max() >= num_slices):
            raise ValueError(f"include has slice indices outside 0..{num_slices - 1}")
        idx = np.concatenate([idx, inc])
    return np.unique(idx)


@dataclasses.dataclass
class Annotations:
    """Original annotations on the run's slices.

    Attributes:
      slice: [A] int slice key; box: [A, 4] internal boxes (pixels of the preprocessed slice).
      lesion_id: [A] int64 unique id of the annotated lesion (e.g. its DL_info row), written to the
        ``lesion_id`` of the MAM rows it explains.
      embedding: [A, D] float32 L2-normalised embedding of the annotated lesion.
    """

    slice: np.ndarray
    box: np.ndarray
    lesion_id: np.ndarray
    embedding: np.ndarray


@dataclasses.dataclass
class Proposals:
    """Every expert's proposals on the run's slices (post-NMS).

    Attributes:
      slice: [P] int slice key; box: [P, 4]; score: [P] in [0, 1] (the expert's fused score).
      expert: [P] int dataset id of the expert (``UNIVERSAL_EXPERT`` for MAM's input).
      embedding: [P, D] float32, or None; only the universal expert's rows are used.
    """

    slice: np.ndarray
    box: np.ndarray
    score: np.ndarray
    expert: np.ndarray
    embedding: np.ndarray | None = None


@dataclasses.dataclass
class MiningOptions:
    """MAM/NRM settings (paper defaults); recorded in the table's provenance."""

    theta: float = mam.DEFAULT_THETA
    sigma: float = nrm.DEFAULT_SIGMA
    # one threshold per NRM expert instead of ``sigma`` (None or inf: that expert marks nothing),
    # e.g. from uld_jax.mine.calibrate; ``sigma`` is then the precision level they were chosen for
    sigma_by_expert: dict[str, float | None] | None = None
    nrm_experts: Sequence[str] = SINGLE_TYPE_DATASETS
    nrm_as_positive: bool = False
    overlap_iou: float = 0.0          # same-slice overlap rule for MAM and NRM (IoU > this)
    mam_dedupe_iou: float = 0.5
    nrm_dedupe_iou: float | None = None
    mam_min_score: float | None = None
    add_unlabeled_slices: bool = True
    # > 0: MAM matches on the embedding and the place in the volume together (mam_features): the
    # box centre (y, x) and the slice's z, in mm, divided by location_mm, appended to the embedding;
    # places are comparable only within one volume, so MAM then compares within a Case
    location_mm: float = 0.0


@dataclasses.dataclass
class MiningOutcome:
    """The table and what produced it (for reports and quality measurement).

    Attributes:
      overlay: the table to write with :func:`uld_jax.mine.table.write_overlay`.
      mam_result: per universal proposal (rows ``universal_rows`` of the proposals).
      universal_rows, mined: [PU] proposal rows of the universal expert and which were mined.
      single_rows, suspicious: [PS] proposal rows of single-type experts and which are suspicious.
    """

    overlay: table.Overlay
    mam_result: mam.MamResult
    universal_rows: np.ndarray
    mined: np.ndarray
    single_rows: np.ndarray
    suspicious: np.ndarray


def mam_features(slices: SliceTable, annotations: Annotations, proposals: Proposals,
                 options: MiningOptions, rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What MAM compares: ``(ann_group [A], ann_vec [A, D'], prop_group [R], prop_vec [R, D'])`` for
    the annotations and the proposal ``rows``.

    The paper's rule (``location_mm`` 0): groups are patients, vectors the embeddings. With
    ``location_mm`` > 0, each vector is the embedding followed by the box centre and the slice
    position in the volume, ``(y * pixel_mm, x * pixel_mm, slice_index * slice_mm) / location_mm``,
    and groups are Cases (one volume's frame), so that the L2 distance MAM thresholds is
    ``sqrt(d_embedding^2 + (d_place / location_mm)^2)``: a proposal matches an annotation only if it
    also lies near it in the volume, as the same lesion on a neighbouring slice does.
    """
    a_slice = np.asarray(annotations.slice)
    p_slice = np.asarray(proposals.slice)[rows]
    a_vec = np.asarray(annotations.embedding, dtype=np.float32).reshape(len(a_slice), -1)
    if rows.size and proposals.embedding is None:
        raise ValueError("proposals.embedding is required for the universal expert's rows (MAM)")
    emb = np.asarray(proposals.embedding) if proposals.embedding is not None else None
    if emb is None or not rows.size:
        p_vec = np.zeros((0, a_vec.shape[1]), np.float32)
    else:
        p_vec = (emb if emb.shape[0] == rows.size else emb[rows]).astype(np.float32)
    if not options.location_mm or options.location_mm <= 0:
        patient = np.asarray(slices.patient_id)
        return patient[a_slice], a_vec, patient[p_slice], p_vec
    if slices.pixel_mm is None or slices.slice_mm is None:
        raise ValueError(f"location_mm={options.location_mm}: the slice table has no pixel_mm / "
                         "slice_mm (its chunk store was mined by an older version: delete the "
                         "store, WORKDIR/mining/step_N, to mine again, or use location_mm=0)")
    px = np.asarray(slices.pixel_mm, np.float64)
    zmm = np.asarray(slices.slice_index, np.float64) * np.asarray(slices.slice_mm, np.float64)
    _, case = np.unique(np.asarray(slices.case_id).astype(str), return_inverse=True)

    def place(keys, boxes):
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        c = 0.5 * (b[:, :2] + b[:, 2:]) * px[keys][:, None]
        return (np.concatenate([c, zmm[keys][:, None]], 1) / options.location_mm).astype(np.float32)

    a_vec = np.concatenate([a_vec, place(a_slice, annotations.box)], 1)
    p_vec = np.concatenate([p_vec, place(p_slice, np.asarray(proposals.box).reshape(-1, 4)[rows])],
                           1)
    return case[a_slice], a_vec, case[p_slice], p_vec


def mam_positives(slices: SliceTable, annotations: Annotations, proposals: Proposals,
                  options: MiningOptions = MiningOptions(), devices=None
                  ) -> tuple[np.ndarray, mam.MamResult, np.ndarray]:
    """MAM alone: ``(universal_rows [PU], result, mined [PU] bool)`` -- the universal expert's
    proposal rows, their :func:`mam.mam_match` result under ``options`` (:func:`mam_features`) and
    which :func:`mam.select_mined_positives` keeps. Step 1 of :func:`mine_overlay`."""
    uni = np.flatnonzero(np.asarray(proposals.expert) == UNIVERSAL_EXPERT)
    a_group, a_vec, p_group, p_vec = mam_features(slices, annotations, proposals, options, uni)
    res = mam.mam_match(a_group, a_vec, p_group, p_vec, options.theta, devices=devices)
    return uni, res, _mam_selector(annotations, proposals, options, uni)(res)


def _mam_selector(annotations: Annotations, proposals: Proposals, options: MiningOptions,
                  uni: np.ndarray):
    """``select(result, theta=None) -> mined [PU] bool``: :func:`mam.select_mined_positives` on the
    universal rows ``uni`` under ``options`` (``theta`` re-thresholds the result)."""
    kw = dict(prop_slice=np.asarray(proposals.slice)[uni],
              prop_box=np.asarray(proposals.box, dtype=np.float32).reshape(-1, 4)[uni],
              ann_slice=np.asarray(annotations.slice),
              ann_box=np.asarray(annotations.box, dtype=np.float32).reshape(-1, 4),
              overlap_iou=options.overlap_iou, dedupe_iou=options.mam_dedupe_iou,
              prop_score=np.asarray(proposals.score, dtype=np.float32)[uni],
              min_score=options.mam_min_score)
    return lambda result, theta=None: mam.select_mined_positives(result, theta=theta, **kw)


def yield_matched_theta(slices: SliceTable, annotations: Annotations, proposals: Proposals,
                        options: MiningOptions, devices=None) -> dict[str, Any]:
    """The theta at which MAM with its location term mines as many positives as the paper's rule.

    The location term (``options.location_mm`` > 0) is meant to change *which* proposals MAM
    matches (those near the annotation in the volume), not how many; but it adds to every distance
    (and compares within a Case, a subset of the patient's annotations), so at the paper's theta it
    mines only a fraction of what the paper's rule mines. This keeps the paper's theta as the
    yield: the paper's rule (``location_mm`` 0) is run at ``options.theta`` and its mined positives
    counted; the result is the smallest theta >= ``options.theta`` at which the location rule mines
    at least as many (the count never falls as theta rises: candidates admitted later are farther,
    and the greedy de-duplication visits the nearer ones first), or the one that matches every
    proposal with an annotation in its Case when even that mines fewer (``reached`` False). It
    reads no label beyond MAM's own inputs.

    Returns ``{"theta", "paper_theta", "paper_mined", "mined", "reached"}``.
    """
    if not options.location_mm or options.location_mm <= 0:
        raise ValueError("a yield-matched theta needs MAM's location term (location_mm > 0); "
                         "with location_mm 0 MAM is the paper's rule and theta is used as given")
    _, _, paper = mam_positives(slices, annotations, proposals,
                                dataclasses.replace(options, location_mm=0.0), devices)
    target = int(paper.sum())
    uni, res, mined = mam_positives(slices, annotations, proposals, options, devices)
    select = _mam_selector(annotations, proposals, options, uni)
    out = {"paper_theta": float(options.theta), "paper_mined": target}
    if int(mined.sum()) >= target:
        return out | {"theta": float(options.theta), "mined": int(mined.sum()), "reached": True}
    d = res.distance
    # theta just above each farther distance admits that proposal (the rule is distance < theta)
    cand = np.nextafter(np.unique(d[np.isfinite(d) & (d >= np.float32(options.theta))]),
                        np.float32(np.inf)).astype(np.float32)
    if cand.size == 0 or int(select(res, float(cand[-1])).sum()) < target:
        theta = float(cand[-1]) if cand.size else float(options.theta)
        return out | {"theta": theta, "mined": int(select(res, theta).sum()), "reached": False}
    lo, hi = 0, cand.size - 1
    while lo < hi:                                   # smallest index whose count reaches target
        mid = (lo + hi) // 2
        if int(select(res, float(cand[mid])).sum()) >= target:
            hi = mid
        else:
            lo = mid + 1
    theta = float(cand[lo])
    return out | {"theta": theta, "mined": int(select(res, theta).sum()), "reached": True}


def mine_overlay(
    slices: SliceTable,
    annotations: Annotations,
    proposals: Proposals,
    *,
    options: MiningOptions = MiningOptions(),
    checkpoint_step: int,
    config_hash: str,
    devices=None,
    extra_meta: dict[str, Any] | None = None,
) -> MiningOutcome:
    """MAM + NRM over one run's slices -> the mined-annotation table (not yet written)."""
    n_slices = len(slices)
    for name, keys in (("annotations", annotations.slice), ("proposals", proposals.slice)):
        keys = np.asarray(keys)
        if keys.size and (keys.min() < 0 or keys.max() >= n_slices):
            raise ValueError(f"{name}.slice refers to slice keys outside 0..{n_slices - 1}")
    expert = np.asarray(proposals.expert)
    single = np.flatnonzero(np.isin(expert, [DATASET_ID[d] for d in SINGLE_TYPE_DATASETS]))
    p_slice = np.asarray(proposals.slice)
    p_box = np.asarray(proposals.box, dtype=np.float32).reshape(-1, 4)
    p_score = np.asarray(proposals.score, dtype=np.float32)
    a_slice = np.asarray(annotations.slice)
    a_box = np.asarray(annotations.box, dtype=np.float32).reshape(-1, 4)

    # 1. MAM.
    uni, res, mined = mam_positives(slices, annotations, proposals, options, devices)
    mined_rows = uni[mined]

    # 2. NRM.
    nres = nrm.nrm(p_slice[single], p_box[single], p_score[single], expert[single],
                   existing_slice=a_slice, existing_box=a_box,
                   mined_slice=p_slice[mined_rows], mined_box=p_box[mined_rows],
                   sigma=options.sigma_by_expert or options.sigma, experts=options.nrm_experts,
                   as_positive=options.nrm_as_positive, overlap_iou=options.overlap_iou,
                   dedupe_iou=options.nrm_dedupe_iou)
    sus_rows = single[nres.suspicious]

    # 3. Unlabeled slices: every slice of the run without an original annotation.
    unl = np.setdiff1d(np.arange(n_slices), a_slice) if options.add_unlabeled_slices \
        else np.zeros(0, np.int64)

    lesion_ids = np.asarray(annotations.lesion_id, dtype=np.int64)
    row_slice = np.concatenate([p_slice[mined_rows], p_slice[sus_rows], unl]).astype(np.int64)
    n_m, n_s, n_u = mined_rows.size, sus_rows.size, unl.size
    kind = np.concatenate([np.full(n_m, table.KIND_MINED), np.full(n_s, int(nres.provenance)),
                           np.full(n_u, table.KIND_UNLABELED)]).astype(np.int8)
    box = np.concatenate([p_box[mined_rows], p_box[sus_rows], np.zeros((n_u, 4), np.float32)])
    score = np.concatenate([p_score[mined_rows], p_score[sus_rows], np.full(n_u, np.nan, np.float32)])
    expert_col = np.concatenate([expert[mined_rows], expert[sus_rows], np.full(n_u, -1)])
    lesion_col = np.concatenate([lesion_ids[res.lesion[mined]], np.full(n_s + n_u, -1, np.int64)])
    opts = dataclasses.asdict(options)
    opts["nrm_experts"] = list(options.nrm_experts)
    if options.sigma_by_expert:
        opts["sigma_by_expert"] = {e: (float(v) if v is not None and np.isfinite(v) else None)
                                   for e, v in options.sigma_by_expert.items()}
    meta = table.make_meta(checkpoint_step=checkpoint_step, config_hash=config_hash,
                           theta=options.theta, sigma=options.sigma, options=opts,
                           slices_mined=int(n_slices), **(extra_meta or {}))
    overlay = table.build_overlay(
        dataset=np.asarray(slices.dataset)[row_slice], case_id=np.asarray(slices.case_id)[row_slice],
        slice_index=np.asarray(slices.slice_index)[row_slice], kind=kind, box=box, score=score,
        expert=expert_col, lesion_id=lesion_col, meta=meta)
    return MiningOutcome(overlay, res, uni, mined, single, nres.suspicious)
