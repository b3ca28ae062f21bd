"""Dice goldens and empty-mask conventions."""

from __future__ import annotations

import numpy as np
import pytest

from uld_jax.evaluate.boxes import EvaluationInputError
from uld_jax.evaluate.dice import dice, dice_cases


def test_dice_golden():
    t = np.zeros((2, 4, 4), np.uint8)
    t[0, :2, :2] = 1                      # 4 voxels
    p = np.zeros_like(t)
    p[0, :2, :1] = 1                      # 2 voxels, inside
    p[1, 0, 0] = 1                        # 1 voxel outside
    assert dice(p, t) == pytest.approx(2 * 2 / (3 + 4))
    assert dice(t, t) == 1.0
    assert dice(np.zeros_like(t), t) == 0.0


def test_labels_and_empty_conventions():
    lits_t = np.array([[0, 1, 2, 2]])
    lits_p = np.array([[0, 2, 2, 1]])
    assert dice(lits_p, lits_t, label=2) == pytest.approx(2 * 1 / 4)   # tumour
    assert dice(lits_p, lits_t) == 1.0                                   # liver + tumour
    z = np.zeros((3, 3))
    assert dice(z, z) == 1.0 and np.isnan(dice(z, z, empty_value=None))
    r = dice_cases({"a": z, "b": np.eye(3)}, {"a": z, "b": np.eye(3)[::-1]})
    # b: diagonals share the centre voxel: 2*1/6; global over both cases = the same sums
    assert r.per_case == {"a": 1.0, "b": pytest.approx(1 / 3)}
    assert r.mean_per_case == pytest.approx((1 + 1 / 3) / 2)
    assert r.global_dice == pytest.approx(1 / 3) and r.num_both_empty == 1
    r = dice_cases({"a": z}, {"a": z}, empty_value=None)
    assert np.isnan(r.global_dice) and np.isnan(r.mean_per_case)


def test_errors_name_the_case():
    with pytest.raises(EvaluationInputError, match="case 'x': prediction shape"):
        dice_cases({"x": np.zeros((2, 2))}, {"x": np.zeros((3, 2))})
    with pytest.raises(EvaluationInputError, match="no predicted mask for 1 case"):
        dice_cases({}, {"x": np.zeros((2, 2))})
