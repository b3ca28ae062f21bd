"""NRM's sigma as a precision level on each single-type expert's own, fully labeled data.

The paper's rule marks a region suspicious when a single-type expert scores it above sigma = 0.5.
That reads "the expert thinks it more likely a lesion than not" only for an expert whose scores are
calibrated. An expert trained briefly from scratch (the CPU recipes here) is not: its scores on its
own lesions may never reach 0.5, and NRM then finds nothing whatever the expert has learnt.

This module gives each expert its own threshold from data a user has: the expert's own dataset (the
LUNA16-, LiTS- or NIH-LN-like set), fully labeled for that expert's lesion type. The expert is run
on the samples of one split of that dataset (its lesion slices and lesion-free slices); a detection
is *right* when its IoU with a box of its own slice is at least ``hit_iou`` (0.5). Then, for a
precision level ``p`` (the paper's sigma reused: 0.5), the expert's threshold is the score below
which the detections stop being right at least a fraction ``p`` of the time:

* sort the detections by score, highest first; ``prec(k)`` = the fraction right among the top k;
* take the largest k with ``prec(k) >= p``, counting tied scores together (a threshold cannot split
  a tie);
* sigma_e = the midpoint between the k-th score and the next lower one (just below the lowest score
  when every detection is kept), so that NRM's strict rule ``score > sigma_e`` keeps exactly
  those top k;
* no k reaches ``p``: sigma_e = inf, the expert marks nothing (reported as such).

For a calibrated expert, ``score > 0.5`` and "precision at least 0.5 above the threshold" pick
about the same regions, so the variant keeps the paper's meaning; it never looks at DeepLesion's
labels, the test split or the synthetic world's hidden truth.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from uld_jax import core
from uld_jax.mine import overlap

DEFAULT_HIT_IOU = 0.5


def precision_threshold(scores: np.ndarray, right: np.ndarray, precision: float) -> float:
    """The score threshold (for the strict rule ``score > t``) that keeps the largest top-scoring
    set of detections whose fraction of ``right`` ones is at least ``precision``; inf when no such
    non-empty set exists. Tied scores are kept or dropped together."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    right = np.asarray(right, dtype=bool).reshape(-1)
    if scores.size != right.size:
        raise ValueError(f"scores ({scores.size}) and right ({right.size}) differ in length")
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision {precision} must be in (0, 1]")
    if np.any(~np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    if scores.size == 0:
        return math.inf
    order = np.argsort(-scores, kind="stable")
    s, r = scores[order], right[order]
    k = np.arange(1, s.size + 1)
    prec = np.cumsum(r) / k
    # a cut may only fall after the last detection of a run of equal scores
    last_of_tie = np.append(s[1:] < s[:-1], True)
    ok = np.flatnonzero(last_of_tie & (prec >= precision))
    if ok.size == 0:
        return math.inf
    i = int(ok[-1])
    if i == s.size - 1:                     # all of them: just below the lowest score
        return float(np.nextafter(s[-1], -np.inf))
    return float((s[i] + s[i + 1]) / 2.0)


def right_detections(sd: Any, hit_iou: float = DEFAULT_HIT_IOU) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N], right [N]) of a split's detections (``from_workdir.SplitDetections``): right
    when the IoU with an original box of the same sample is at least ``hit_iou``."""
    t = sd.table
    q_key, q_box, q_score, r_key, r_box = [], [], [], [], []
    for row in range(len(t)):
        b = np.asarray(sd.boxes[row], np.float64).reshape(-1, 4)
        q_key.append(np.full(len(b), row))
        q_box.append(b)
        q_score.append(np.asarray(sd.scores[row], np.float64).reshape(-1))
        les = t.sample_lesions(row)
        orig = np.asarray(les["provenance"]) == int(core.Provenance.ORIGINAL)
        rb = np.asarray(les["boxes"], np.float64).reshape(-1, 4)[orig]
        r_key.append(np.full(len(rb), row))
        r_box.append(rb)
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
    qk, qb, qs = cat(q_key, (0,)), cat(q_box, (0, 4)), cat(q_score, (0,))
    iou = overlap.max_iou_same_key(qk.astype(np.int64), qb, cat(r_key, (0,)).astype(np.int64),
                                   cat(r_box, (0, 4)))
    return qs, iou >= float(hit_iou)


def expert_sigmas(loaded: Any, data_dir: str, experts: Sequence[str], precision: float, *,
                  split: str = "train", hit_iou: float = DEFAULT_HIT_IOU, batch_size: int = 4,
                  min_score: float = 0.05, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Runs each single-type expert of ``loaded`` (a ``uld_jax.inference.LoadedModel``) on its own
    dataset's ``split`` and returns ``{expert: {"sigma", "detections", "right", "precision_above",
    "split", "samples"}}`` (``sigma`` inf: no threshold reaches ``precision``). Detections below
    ``min_score`` are not counted (the mining driver keeps none below it either)."""
    from uld_jax.evaluate import from_workdir

    out: dict[str, dict[str, Any]] = {}
    for e in experts:
        if e not in core.SINGLE_TYPE_DATASETS:
            raise ValueError(f"sigma calibration: {e!r} is not a single-type dataset "
                             f"{core.SINGLE_TYPE_DATASETS}")
        sd = from_workdir.infer_split(loaded, data_dir, e, split, expert=e, batch_size=batch_size,
                                      score_threshold=min_score, progress=progress)
        scores, right = right_detections(sd, hit_iou)
        sigma = precision_threshold(scores, right, precision)
        above = scores > sigma
        out[e] = {"sigma": sigma, "split": split, "samples": int(len(sd.table)),
                  "detections": int(scores.size), "right": int(right.sum()),
                  "kept": int(above.sum()),
                  "precision_above": float(right[above].mean()) if above.any() else None,
                  "max_score": float(scores.max()) if scores.size else None}
    return out
