"""Dice of predicted vs true masks (LiTS tumours, NIH-LN nodes).

Definitions (the LiTS challenge's "Dice per case" and "Dice global"):

* per case: ``2 |P & T| / (|P| + |T|)`` on binary masks of one case (any shape, e.g. [Z, Y, X]);
* global: all cases pooled, ``2 sum |P & T| / sum (|P| + |T|)``;
* ``mean_per_case``: the mean of the per-case values.

Empty-mask conventions: a case whose prediction and truth are both empty has Dice
``empty_value`` (default 1.0: nothing to find and nothing claimed is a perfect answer, as the LiTS
evaluation scores it); with ``empty_value=None`` such cases are left out of the mean (NaN in the
per-case list). A case with exactly one of the two empty has Dice 0. Global Dice over only-empty
cases is ``empty_value`` (NaN when ``None``).

Label volumes are binarised with ``label``: ``mask == label`` when given (e.g. LiTS tumour = 2),
otherwise ``mask != 0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from uld_jax.evaluate.boxes import EvaluationInputError


@dataclasses.dataclass
class DiceResult:
    per_case: dict[str, float]
    mean_per_case: float
    global_dice: float
    num_cases: int
    num_both_empty: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _binary(m: Any, label: int | None, name: str, key: str) -> np.ndarray:
    a = np.asarray(m)
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise EvaluationInputError(f"{name}: case {key!r}: mask of dtype {a.dtype} is not numeric")
    return a == label if label is not None else a != 0


def dice(pred: Any, truth: Any, *, label: int | None = None, empty_value: float | None = 1.0) -> float:
    """Dice of one case (see the module docstring). ``pred``, ``truth``: same-shape masks."""
    p = _binary(pred, label, "pred", "-")
    t = _binary(truth, label, "truth", "-")
    if p.shape != t.shape:
        raise EvaluationInputError(f"dice: prediction shape {p.shape} != truth shape {t.shape}")
    inter = int(np.count_nonzero(p & t))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if total == 0:
        return float("nan") if empty_value is None else float(empty_value)
    return 2.0 * inter / total


def dice_cases(
    pred: Mapping[str, Any],
    truth: Mapping[str, Any],
    *,
    label: int | None = None,
    empty_value: float | None = 1.0,
    keys: Sequence[str] | None = None,
) -> DiceResult:
    """Per-case, mean and global Dice over cases {case id: mask}; every truth case needs a prediction."""
    keys = list(truth.keys()) if keys is None else list(keys)
    missing = [k for k in keys if k not in pred]
    if missing:
        raise EvaluationInputError(f"dice: no predicted mask for {len(missing)} case(s), e.g. {missing[0]!r}")
    per, inter_sum, total_sum, both_empty = {}, 0, 0, 0
    for k in keys:
        p = _binary(pred[k], label, "pred", k)
        t = _binary(truth[k], label, "truth", k)
        if p.shape != t.shape:
            raise EvaluationInputError(f"dice: case {k!r}: prediction shape {p.shape} != truth shape {t.shape}")
        inter = int(np.count_nonzero(p & t))
        total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
        inter_sum += inter
        total_sum += total
        if total == 0:
            both_empty += 1
            per[k] = float("nan") if empty_value is None else float(empty_value)
        else:
            per[k] = 2.0 * inter / total
    vals = np.array([v for v in per.values() if not np.isnan(v)])
    mean = float(vals.mean()) if len(vals) else float("nan")
    if total_sum:
        glob = 2.0 * inter_sum / total_sum
    else:
        glob = float("nan") if empty_value is None else float(empty_value)
    return DiceResult(per, mean, glob, len(keys), both_empty)
