"""Negative region mining (NRM): suspicious regions from the single-type dataset experts.

DeepLesion leaves most lesions unmarked, so a background anchor on a DeepLesion slice may well be
an unmarked lesion. MELD has one expert per dataset; the single-type experts (LUNA16: lung nodules,
LiTS: liver tumours, NIH-LN: lymph nodes) were trained on fully labeled data of their own type.
When such an expert is confident (score > ``sigma``, default 0.5) about a region of a DeepLesion
slice that no existing annotation and no MAM-mined positive explains, that region is *suspicious*:
it is excluded from both positive and negative sampling during finetuning
(:attr:`uld_jax.core.Provenance.IGNORE`). Yan et al. (TMI 2020) also compare treating the
regions as positives instead (``as_positive=True``, their Table 4) and using only a subset of the
experts (``experts=...``, their Table 2).

Rules (decided once, tested in tests/test_nrm.py):
* score rule: strictly greater than ``sigma``; ``score == sigma`` is not suspicious;
* overlap rule: the proposal is explained when it overlaps an existing annotation or a mined
  positive *on the same slice* with IoU > ``overlap_iou`` (default 0.0: any intersection of positive
  area; touching edges are no overlap), see :mod:`uld_jax.mine.overlap`. A lenient rule on purpose:
  an ignore region on top of a positive would remove the positive's own anchors from sampling;
* the universal (DeepLesion) expert's proposals are never suspicious regions: they are MAM's input;
* suspicious regions of different experts that overlap each other are all kept (ignoring the union
  is harmless) unless ``dedupe_iou`` asks for greedy de-duplication by score.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from uld_jax.core import DATASET_ID, SINGLE_TYPE_DATASETS, Provenance
from uld_jax.mine import overlap

DEFAULT_SIGMA: float = 0.5


class NrmResult(NamedTuple):
    """Outcome of NRM over the single-type proposals.

    Attributes:
      suspicious: [N] bool, True for the proposals that become suspicious regions.
      provenance: the row kind they take in the mined table: ``Provenance.IGNORE`` (default) or
        ``Provenance.MINED`` when treated as positives.
    """

    suspicious: np.ndarray
    provenance: Provenance


def expert_ids(experts: Sequence[str]) -> np.ndarray:
    """Dataset ids of single-type experts given by name; raises ValueError on any other name."""
    experts = tuple(experts)
    bad = [e for e in experts if e not in SINGLE_TYPE_DATASETS]
    if bad:
        raise ValueError(f"NRM experts must be among the single-type datasets "
                         f"{SINGLE_TYPE_DATASETS}; got {bad}")
    return np.asarray(sorted({DATASET_ID[e] for e in experts}), dtype=np.int64)


def expert_thresholds(sigma: float | Mapping[str, float], experts: Sequence[str],
                      prop_expert: np.ndarray) -> np.ndarray | float:
    """``sigma`` itself, or with one threshold per expert name the [N] threshold of each row
    (inf for rows of experts not in ``experts``; a threshold None is inf). Raises ValueError
    naming a missing expert."""
    if not isinstance(sigma, Mapping):
        return float(sigma)
    missing = [e for e in experts if e not in sigma]
    if missing:
        raise ValueError(f"NRM sigma per expert has no threshold for {missing} (has "
                         f"{sorted(sigma)})")
    th = np.full(np.shape(prop_expert), np.inf)
    for e in experts:
        v = sigma[e]
        th[np.asarray(prop_expert) == DATASET_ID[e]] = np.inf if v is None else float(v)
    return th


def nrm(
    prop_slice: np.ndarray,
    prop_box: np.ndarray,
    prop_score: np.ndarray,
    prop_expert: np.ndarray,
    *,
    existing_slice: np.ndarray,
    existing_box: np.ndarray,
    mined_slice: np.ndarray | None = None,
    mined_box: np.ndarray | None = None,
    sigma: float | Mapping[str, float] = DEFAULT_SIGMA,
    experts: Sequence[str] = SINGLE_TYPE_DATASETS,
    as_positive: bool = False,
    overlap_iou: float = 0.0,
    dedupe_iou: float | None = None,
) -> NrmResult:
    """Suspicious regions among dataset-expert proposals on the mined slices.

    Args:
      prop_slice: [N] int slice key of each proposal (row of the run's slice table).
      prop_box: [N, 4] internal ``[y1, x1, y2, x2]`` boxes, pixels of the preprocessed slice.
      prop_score: [N] the proposing expert's score in [0, 1].
      prop_expert: [N] int dataset id (``uld_jax.core.DATASET_ID``) of the proposing expert; rows
        of the universal expert (DeepLesion) or of experts not in ``experts`` are never suspicious.
      existing_slice, existing_box: [A], [A, 4] the original annotations on those slices.
      mined_slice, mined_box: [M], [M, 4] the MAM-mined positives (optional).
      sigma: score threshold (strict); or one per expert name (every expert in ``experts`` must
        have one; ``inf`` marks nothing), e.g. from :mod:`uld_jax.mine.calibrate`.
      experts: names of the single-type experts used (a subset of ``SINGLE_TYPE_DATASETS``).
      as_positive: the regions become mined positives instead of ignore regions.
      overlap_iou: IoU above which a proposal is explained by an annotation or mined positive.
      dedupe_iou: if set, suspicious regions on one slice with IoU above it are reduced to the
        highest-scoring one.

    Returns:
      :class:`NrmResult`.
    """
    prop_slice = np.asarray(prop_slice).reshape(-1)
    prop_box = np.asarray(prop_box, dtype=np.float64).reshape(-1, 4)
    prop_score = np.asarray(prop_score, dtype=np.float64).reshape(-1)
    prop_expert = np.asarray(prop_expert).reshape(-1)
    n = prop_slice.size
    if not (prop_box.shape[0] == prop_score.size == prop_expert.size == n):
        raise ValueError(f"NRM proposal arrays differ in length: slice {n}, box "
                         f"{prop_box.shape[0]}, score {prop_score.size}, expert {prop_expert.size}")
    if np.any(~np.isfinite(prop_score)):
        raise ValueError("NRM proposal scores contain NaN or inf")
    ids = expert_ids(experts)
    cand = np.isin(prop_expert, ids) & (prop_score > expert_thresholds(sigma, experts, prop_expert))
    ref_slice = [np.asarray(existing_slice).reshape(-1)]
    ref_box = [np.asarray(existing_box, dtype=np.float64).reshape(-1, 4)]
    if mined_slice is not None:
        ref_slice.append(np.asarray(mined_slice).reshape(-1))
        ref_box.append(np.asarray(mined_box, dtype=np.float64).reshape(-1, 4))
    idx = np.flatnonzero(cand)
    if idx.size:
        explained = overlap.overlaps_same_key(prop_slice[idx], prop_box[idx],
                                              np.concatenate(ref_slice), np.concatenate(ref_box),
                                              overlap_iou)
        cand[idx[explained]] = False
    if dedupe_iou is not None:
        idx = np.flatnonzero(cand)
        keep = overlap.greedy_dedupe_same_key(prop_slice[idx], prop_box[idx], -prop_score[idx],
                                              dedupe_iou)
        cand[idx[~keep]] = False
    return NrmResult(cand, Provenance.MINED if as_positive else Provenance.IGNORE)
