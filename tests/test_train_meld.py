"""MELD + the grain pipeline through the training loop (slow: MELD's compile takes minutes here)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import meld_data
from configs import baseline, meld
from uld_jax import tasks, train


def _small(c, data_dir):
    c.data.data_dir = str(data_dir)
    c.data.image_size = (64, 64)
    c.data.pixel_mm = 1.6
    c.model.image_size = 64
    c.batch_size = 8
    c.total_steps = 4
    c.log_every_steps = 2
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    return c


@pytest.mark.slow
def test_meld_tiny_trains_on_the_pipeline(tmp_path):
    world = meld_data.build_small_world(tmp_path / "world")
    c = _small(meld.get_config("tiny"), world)
    out = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert out["step"] == 4
    m = out["train"]
    for key in ("loss", "loss/rpn_cls", "loss/roi_cls/lung", "loss/roi_cls/whole_body",
                "loss/rpn_cls/luna16", "loss/roi_box/deeplesion", "gate/liver_mean",
                "sampling/roi_pos_fraction", "norm/grad"):
        assert key in m and np.isfinite(m[key]), (key, sorted(m))
    assert "loss" in out["eval"] and np.isfinite(out["eval"]["loss"])
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[:2] == ["2", "4"]
    cfg = train.load_checkpoint_config(str(tmp_path / "run"))
    assert cfg["_derived"]["steps_per_epoch"] > 0


def test_pipeline_and_meld_adapters_build_without_running(tmp_path):
    c = baseline.get_config("tiny")
    task = tasks.build_task(c)
    assert task.eval_fn is not None
    with pytest.raises(ValueError, match="data.data_dir"):
        tasks.build_data(c)
