"""uld_jax.evaluate: the paper's evaluation protocols (volumetric FROC under both hit rules, key-slice
FROC, organ strata, LUNA16 FROC/CPM, Dice) and 2D->3D stacking. See report.py for the entry points
and ``python -m uld_jax.evaluate --help`` for the offline CLI."""

from uld_jax.evaluate.boxes import EvaluationInputError
from uld_jax.evaluate.dice import dice, dice_cases
from uld_jax.evaluate.froc import keyslice_froc, stratified_froc, volumetric_froc
from uld_jax.evaluate.luna import luna16_froc, luna16_froc_from_files
from uld_jax.evaluate.report import (
    EvaluationReport,
    evaluate_keyslice,
    evaluate_luna16,
    evaluate_predictions,
    stack_slice_detections,
)
from uld_jax.evaluate.stacking import stack_slices

__all__ = [
    "EvaluationInputError", "EvaluationReport", "dice", "dice_cases", "evaluate_keyslice", "evaluate_luna16",
    "evaluate_predictions", "keyslice_froc", "luna16_froc", "luna16_froc_from_files", "stack_slice_detections",
    "stack_slices", "stratified_froc", "volumetric_froc",
]
