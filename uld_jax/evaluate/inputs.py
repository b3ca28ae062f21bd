"""Loading prediction / truth files in the released 1K set's structure (.pkl, .npz, .json).

Structure: {volume name: array}, optionally nested one level by split ({'val': {...}, 'test':
{...}} as the real ``DeepLesion_manual_1K_test_release.pkl``). Formats:

* ``.pkl``: loaded only through :func:`uld_jax.io.safe_pickle.safe_load` (numpy arrays and plain
  containers; anything else is refused);
* ``.npz``: one array per volume, the array name is the volume name; a split may be encoded as
  ``"<split>/<name>"``;
* ``.json``: ``{name: [[...], ...]}`` or ``{split: {name: [[...]]}}``; labels files map names to
  lists of strings.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import numpy as np

from uld_jax.evaluate.boxes import EvaluationInputError
from uld_jax.io.safe_pickle import safe_load

DEFAULT_SPLIT = "test"


def _read_any(path: str) -> Any:
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise EvaluationInputError(f"{path}: no such file")
    if ext in (".pkl", ".pickle"):
        try:
            return safe_load(path)
        except pickle.UnpicklingError as e:
            raise EvaluationInputError(str(e)) from e
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                flat = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise EvaluationInputError(f"{path}: not a readable .npz of numeric arrays ({e})") from e
        if any("/" in k for k in flat):
            nested: dict[str, dict[str, np.ndarray]] = {}
            for k, v in flat.items():
                if "/" not in k:
                    raise EvaluationInputError(f"{path}: array {k!r} mixes split-less names with 'split/name' ones")
                s, n = k.split("/", 1)
                nested.setdefault(s, {})[n] = v
            return nested
        return flat
    if ext == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise EvaluationInputError(f"{path}: not readable JSON ({e})") from e
    raise EvaluationInputError(f"{path}: unsupported extension {ext!r} (use .pkl, .npz or .json)")


def load_volume_dict(path: str | os.PathLike, *, split: str | None = None) -> dict[str, Any]:
    """{volume name: array-like} from ``path``; selects ``split`` when the file is split-nested
    (default ``'test'`` when present). Raises :class:`EvaluationInputError` naming the file."""
    path = os.fspath(path)
    obj = _read_any(path)
    if not isinstance(obj, dict):
        raise EvaluationInputError(f"{path}: top level is {type(obj).__name__}, expected a dict {{name: array}}")
    if obj and all(isinstance(v, dict) for v in obj.values()):
        if split is None:
            if DEFAULT_SPLIT not in obj:
                raise EvaluationInputError(f"{path}: split-nested file with splits {sorted(obj)}; choose one with --split")
            split = DEFAULT_SPLIT
        if split not in obj:
            raise EvaluationInputError(f"{path}: no split {split!r}; available: {sorted(obj)}")
        obj = obj[split]
    elif split is not None and split in obj and isinstance(obj[split], dict):
        obj = obj[split]
    bad = [k for k, v in obj.items() if isinstance(v, dict)]
    if bad:
        raise EvaluationInputError(f"{path}: key {bad[0]!r} holds a dict, expected an array")
    return {str(k): v for k, v in obj.items()}


def load_labels(path: str | os.PathLike, *, split: str | None = None) -> dict[str, list[str]]:
    """Per-truth organ labels {name: [label per truth row]} (.json / .pkl / .npz of string arrays)."""
    d = load_volume_dict(path, split=split)
    out = {}
    for k, v in d.items():
        arr = np.asarray(v).reshape(-1)
        out[k] = [str(x) for x in arr]
    return out


def parse_subvolume_name(name: str) -> tuple[str, int, int] | None:
    """``'PPPPPP_SS_RR_AAA-BBB'`` (optionally ``.nii.gz``) -> ``('PPPPPP_SS_RR', AAA, BBB)``, else None.

    AAA..BBB is the 1-based slice range; the released 1K set's z values are slice numbers in that
    range, so the k-th slice (0-based) of the sub-volume's NIfTI is ``z = AAA + k``.
    """
    base = name[:-7] if name.endswith(".nii.gz") else name
    head, sep, rng = base.rpartition("_")
    if not sep or "-" not in rng:
        return None
    a, _, b = rng.partition("-")
    if not (a.isdigit() and b.isdigit()):
        return None
    return head, int(a), int(b)


def subvolume_index_to_release_z(name: str, k: np.ndarray | int) -> np.ndarray:
    """0-based slice index within the sub-volume ``name`` -> the release's z (1-based slice number)."""
    p = parse_subvolume_name(name)
    if p is None:
        raise EvaluationInputError(f"{name!r} is not a sub-volume name PPPPPP_SS_RR_AAA-BBB")
    return np.asarray(k) + p[1]


def slice_detections_from_internal(
    name: str, slice_in_subvolume: np.ndarray, boxes_yxyx: np.ndarray, scores: np.ndarray
) -> np.ndarray:
    """Per-slice detections in the library's internal format -> rows for ``evaluate_predictions``.

    ``name``: sub-volume name ``PPPPPP_SS_RR_AAA-BBB``; ``slice_in_subvolume``: [n] 0-based slice
    index within that sub-volume; ``boxes_yxyx``: [n, 4] internal continuous ``[y1, x1, y2, x2]``
    in pixels of the *original* slice grid (undo any resampling first); ``scores``: [n].
    Returns [n, 6] ``[z, x1, y1, x2, y2, score]`` with z the release's slice number and the box as
    inclusive pixel indices (:func:`uld_jax.core.internal_to_inclusive_xyxy`).
    """
    from uld_jax.core import internal_to_inclusive_xyxy

    k = np.asarray(slice_in_subvolume).reshape(-1)
    b = np.asarray(boxes_yxyx, np.float64).reshape(-1, 4)
    s = np.asarray(scores, np.float64).reshape(-1)
    if not (len(k) == len(b) == len(s)):
        raise EvaluationInputError(f"{name}: {len(k)} slice indices, {len(b)} boxes, {len(s)} scores")
    z = subvolume_index_to_release_z(name, k).astype(np.float64)
    return np.column_stack([z, internal_to_inclusive_xyxy(b), s])
