"""The training loop in-process: the loss falls, TensorBoard scalars, a NaN stops training."""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import train_helpers as th
from jax.sharding import NamedSharding, PartitionSpec as P
from uld_jax import train


def _scalar_tags(workdir: str) -> dict[str, list[float]]:
    files = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {workdir}"
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        vals = [tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(tag)]
        if all(v.ndim == 0 and v.dtype.kind == "f" for v in vals):   # scalars, not hparams
            out[tag] = [float(v) for v in vals]
    return out


def test_tiny_run_loss_falls_and_writes_tensorboard(tmp_path):
    cfg = th.tiny_config(num_epochs=8, log_every_steps=4)
    cfg.optimizer.decay_epochs = (6, 7)
    data = th.make_data(64, 8)                                # 8 steps per epoch, 64 steps
    out = train.train_and_evaluate(cfg, str(tmp_path), task=th.make_task(), data=data)
    assert out["step"] == 64
    tags = _scalar_tags(str(tmp_path))
    for tag in ("train/loss", "train/loss/mse", "train/loss/mse/ds0", "train/loss/mse/ds1",
                "train/norm/grad", "train/norm/param", "train/lr", "throughput/steps_per_sec",
                "throughput/samples_per_sec", "throughput/data_wait_fraction", "val/loss",
                "val/loss/mse/ds1", "steps_per_sec"):
        assert tag in tags, f"missing TensorBoard scalar {tag}; have {sorted(tags)}"
    loss = tags["train/loss"]
    assert len(loss) == 16
    assert np.mean(loss[-4:]) < 0.5 * np.mean(loss[:2]), loss
    val = tags["val/loss"]
    assert len(val) == 8 and val[-1] < 0.5 * val[0], val
    # lr decays x0.1 after epochs 6 and 7
    np.testing.assert_allclose(tags["train/lr"][0], 5e-2, rtol=1e-6)
    np.testing.assert_allclose(tags["train/lr"][-1], 5e-4, rtol=1e-6)
    # epoch-end checkpoints are kept beyond checkpoint.keep
    ckpts = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert ckpts == [8, 16, 24, 32, 40, 48, 56, 64]
    assert train.checkpoint_steps(str(tmp_path)) == ckpts           # read through orbax
    assert train.checkpoint_steps(str(tmp_path / "none")) == []

    # Finetuning starts from this run's epoch-3 checkpoint: its params and BatchNorm statistics,
    # a fresh optimizer and step 0.
    ft = th.tiny_config()
    ft.init_from.workdir, ft.init_from.epoch = str(tmp_path), 3
    mesh = train.make_mesh(-1)
    repl = NamedSharding(mesh, P())
    tx, _ = train.make_optimizer(ft.optimizer, 8)
    it = data.train_iter(0, 1)
    fresh = train.init_state(th.make_task(), tx, th.global_batch(next(it), mesh), 0, repl)
    state = jax.device_get(train._init_from(fresh, ft.init_from, repl))
    _, src = train.load_checkpoint_state(str(tmp_path), step=24)
    assert th.tree_allclose(state["params"], src["params"], rtol=0, atol=0)
    assert th.tree_allclose(state["other"], src["other"], rtol=0, atol=0)
    assert int(state["step"]) == 0
    assert th.tree_allclose(state["opt_state"], jax.device_get(fresh["opt_state"]), rtol=0, atol=0)


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path):
    # Record 36 has a NaN pixel: without shuffling it is in the 5th batch (records 32..39).
    cfg = th.tiny_config(num_epochs=2, log_every_steps=3)
    cfg.checkpoint.every_steps = 2
    data = th.make_data(64, 8, shuffle=False, nan_ids=(36,))
    with pytest.raises(train.NonFiniteLossError, match=r"at step 5\b.*last good checkpoint is step 4"):
        train.train_and_evaluate(cfg, str(tmp_path), task=th.make_task(), data=data)
    step, state = train.load_checkpoint_state(str(tmp_path))
    assert step == 4 and int(state["step"]) == 4
    leaves = jax.tree.leaves(state)
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
