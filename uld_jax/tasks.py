"""Builds the ``train.Task`` and ``train.Data`` named by a config (``config.task.name``,
``config.data.name``).

* ``meld``: the MELD detector (``uld_jax/models/meld.py``) with its losses (``uld_jax/losses.py``).
  Used by ``configs/baseline.py`` (one dataset, one head, no gate), ``configs/meld.py`` and
  ``configs/finetune.py``. Expected from those modules (the contract this adapter is written to):

  - ``meld.build_model(model_config) -> flax.linen.Module``; ``module.apply(variables, batch,
    train=..., rngs=..., mutable=...)`` takes a batch of ``core.Keys`` arrays and returns its
    outputs (a pytree);
  - ``losses.meld_loss(outputs, batch, loss_config) -> (loss, metrics)`` with ``metrics`` following
    the ``train.Task`` convention (per head and per dataset losses, gate statistics).

* ``pipeline``: the grain input pipeline (``uld_jax/input_pipeline.py``), expected to provide
  ``train_dataset(config, process_index, process_count) -> grain.IterDataset`` of process-local
  batches of ``config.batch_size // process_count`` (endless, reshuffled each epoch),
  ``eval_dataset(config, process_index, process_count) -> grain.IterDataset | None`` (finite, padded)
  and ``steps_per_epoch(config) -> int``.

* ``toy``: a small Flax detector-shaped model (per-dataset lesion-presence logits, a box regressor,
  an organ gate; BatchNorm and dropout) on an in-memory grain dataset of synthetic images with one
  bright "lesion". It needs neither of the modules above: smoke tests of a new machine or cluster
  (``--config.task.name=toy --config.data.name=toy``), the training-system tests and benchmarks.

Imports of the model and pipeline modules happen only when such a task is built, and their absence
is reported as a :class:`TaskUnavailableError` naming the missing piece.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from uld_jax import core
from uld_jax.core import Keys
from uld_jax.train import Data, Task


class TaskUnavailableError(ImportError):
    """A config names a model or pipeline whose module is not in this checkout (yet)."""


def _import(module: str, needed: tuple[str, ...], what: str):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise TaskUnavailableError(
            f"{what} needs the module {module} ({', '.join(needed)}), which cannot be imported in "
            f"this checkout: {e}. To exercise the training system without it, run with "
            "--config.task.name=toy --config.data.name=toy") from e
    missing = [n for n in needed if not hasattr(mod, n)]
    if missing:
        raise TaskUnavailableError(
            f"{what}: {module} has no {', '.join(missing)} (the interface uld_jax/tasks.py expects; "
            "see its docstring)")
    return mod


def build_task(config: ml_collections.ConfigDict) -> Task:
    name = config.task.name
    if name == "toy":
        return toy_task(config)
    if name == "meld":
        return meld_task(config)
    raise ValueError(f"task.name={name!r}: expected 'meld' or 'toy'")


def build_data(config: ml_collections.ConfigDict) -> Data:
    name = config.data.name
    if name == "toy":
        return toy_data(config)
    if name == "pipeline":
        return pipeline_data(config)
    raise ValueError(f"data.name={name!r}: expected 'pipeline' or 'toy'")


# ------------------------------------------------------------------------------------------------
# MELD and the grain pipeline.
# ------------------------------------------------------------------------------------------------
def meld_task(config: ml_collections.ConfigDict) -> Task:
    """MELD (or the MULAN-like baseline, by ``config.model``) as a ``train.Task``."""
    meld = _import("uld_jax.models.meld", ("build_model",), "task.name='meld'")
    losses = _import("uld_jax.losses", ("meld_loss",), "task.name='meld'")
    model = meld.build_model(config.model)

    def init(rng, batch):
        r_params, r_drop, r_sample = jax.random.split(rng, 3)
        return model.init({"params": r_params, "dropout": r_drop, "sampling": r_sample}, batch,
                          train=False)

    def loss_fn(params, other, batch, rng, train):
        r_drop, r_sample = jax.random.split(rng)
        variables = {"params": params, **other}
        rngs = {"dropout": r_drop, "sampling": r_sample}
        if train and other:
            outputs, new_other = model.apply(variables, batch, train=True, rngs=rngs,
                                             mutable=list(other))
        else:
            outputs, new_other = model.apply(variables, batch, train=train, rngs=rngs), other
        loss, metrics = losses.meld_loss(outputs, batch, config.loss)
        return loss, (dict(new_other), metrics)

    return Task(init=init, loss_fn=loss_fn)


def pipeline_data(config: ml_collections.ConfigDict) -> Data:
    """The grain input pipeline as a ``train.Data``."""
    ip = _import("uld_jax.input_pipeline", ("train_dataset", "eval_dataset", "steps_per_epoch"),
                 "data.name='pipeline'")

    def train_iter(pidx, pcount):
        return iter(ip.train_dataset(config, pidx, pcount))

    def eval_iter(pidx, pcount):
        ds = ip.eval_dataset(config, pidx, pcount)
        return None if ds is None else iter(ds)

    return Data(train_iter=train_iter, steps_per_epoch=int(ip.steps_per_epoch(config)),
                eval_iter=eval_iter)


# ------------------------------------------------------------------------------------------------
# The toy task: a detector-shaped model and a synthetic in-memory grain dataset.
# ------------------------------------------------------------------------------------------------
class ToyDetector(nn.Module):
    """Image ``[B, H, W, C]`` -> per-dataset lesion logits ``[B, D]``, the first lesion's box
    ``[B, 4]`` (internal ``y1, x1, y2, x2`` as fractions of the image side) and organ-gate weights
    ``[B, 3]`` in (0, 1)."""

    width: int = 8
    num_datasets: int = len(core.DATASETS)
    dropout: float = 0.1

    @nn.compact
    def __call__(self, image, train: bool):
        x = nn.Conv(self.width, (3, 3), strides=(2, 2))(image / 128.0)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=(2, 2))(x))
        x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        h = nn.relu(nn.Dense(4 * self.width)(x))
        logits = nn.Dense(self.num_datasets)(h)
        box = nn.Dense(4)(h)
        gate = nn.sigmoid(nn.Dense(len(core.GATED_ORGANS))(h))
        return logits, box, gate


def toy_losses(outputs, batch) -> tuple[jax.Array, dict[str, Any]]:
    """Dataset-indexed BCE on lesion presence (only the sample's own dataset output is trained),
    L1 on the first lesion's box (fractions of the side; samples with a lesion), BCE of the gate
    against the dataset's organ (single-type datasets). Returns ``(loss, metrics)``."""
    logits, box, gate = outputs
    ds = batch[Keys.DATASET_ID]
    valid = batch[Keys.BOX_VALID]
    has = valid[:, 0].astype(jnp.float32)
    own = jnp.take_along_axis(logits, ds[:, None], axis=1)[:, 0]
    cls = optax.sigmoid_binary_cross_entropy(own, has)
    side = jnp.asarray(batch[Keys.IMAGE].shape[1], jnp.float32)
    l1 = jnp.abs(box - batch[Keys.BOXES][:, 0] / side).sum(-1)
    box_loss = (l1 * has).sum() / jnp.maximum(has.sum(), 1.0)
    organ = jnp.asarray([
        -1 if core.DATASET_ORGAN[d] is None else core.GATED_ORGANS.index(core.DATASET_ORGAN[d])
        for d in core.DATASETS])[ds]
    gate_t = jax.nn.one_hot(organ, len(core.GATED_ORGANS))
    gate_valid = (organ >= 0).astype(jnp.float32)
    gate_bce = -(gate_t * jnp.log(gate + 1e-6) + (1 - gate_t) * jnp.log(1 - gate + 1e-6)).mean(-1)
    gate_loss = (gate_bce * gate_valid).sum() / jnp.maximum(gate_valid.sum(), 1.0)
    loss = cls.mean() + box_loss + 0.1 * gate_loss
    m: dict[str, Any] = {"loss/cls": cls.mean(), "loss/box": box_loss, "loss/gate": gate_loss}
    for i, name in enumerate(core.DATASETS):
        m[f"loss/cls/{name}"] = (cls, (ds == i).astype(jnp.float32))
    for j, organ_name in enumerate(core.GATED_ORGANS):
        m[f"gate/{organ_name}_mean"] = gate[:, j].mean()
    return loss, m


def toy_task(config: ml_collections.ConfigDict) -> Task:
    model = ToyDetector(width=int(config.toy.width))

    def init(rng, batch):
        return model.init({"params": rng}, batch[Keys.IMAGE], train=False)

    def loss_fn(params, other, batch, rng, train):
        if train:
            out, new_other = model.apply({"params": params, **other}, batch[Keys.IMAGE], train=True,
                                         rngs={"dropout": rng}, mutable=["batch_stats"])
        else:
            out, new_other = model.apply({"params": params, **other}, batch[Keys.IMAGE],
                                         train=False), other
        loss, m = toy_losses(out, batch)
        return loss, (dict(new_other), m)

    return Task(init=init, loss_fn=loss_fn)


def toy_records(n: int, size: int, seed: int, channels: int = core.NUM_CONTEXT_SLICES,
                max_boxes: int = 4) -> list[dict[str, np.ndarray]]:
    """``n`` synthetic samples: noise images ``[size, size, channels]`` (HU-like values after the
    window, minus the pixel mean) where 70% hold a bright square "lesion" 3-8 px across, its box in
    row 0 of ``boxes [max_boxes, 4]`` (internal format, pixels)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.normal(0.0, 20.0, (size, size, channels)).astype(np.float32)
        boxes = np.zeros((max_boxes, 4), np.float32)
        valid = np.zeros((max_boxes,), bool)
        if rng.random() < 0.7:
            s = int(rng.integers(3, 9))
            y, x = (int(v) for v in rng.integers(0, size - s, 2))
            img[y:y + s, x:x + s, :] += 120.0
            boxes[0] = (y, x, y + s, x + s)
            valid[0] = True
        out.append({
            Keys.IMAGE: img,
            Keys.DATASET_ID: np.int32(rng.integers(0, len(core.DATASETS))),
            Keys.BOXES: boxes,
            Keys.BOX_VALID: valid,
            Keys.SAMPLE_ID: np.int64(i),
        })
    return out


def _toy_flip(element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random left-right flip (a stochastic transform, so resuming must restore its position)."""
    if rng.random() < 0.5:
        return element
    e = dict(element)
    w = e[Keys.IMAGE].shape[1]
    e[Keys.IMAGE] = e[Keys.IMAGE][:, ::-1].copy()
    b = e[Keys.BOXES].copy()
    b[:, 1], b[:, 3] = w - e[Keys.BOXES][:, 3], w - e[Keys.BOXES][:, 1]
    e[Keys.BOXES] = np.where(e[Keys.BOX_VALID][:, None], b, 0.0).astype(np.float32)
    return e


def toy_data(config: ml_collections.ConfigDict) -> Data:
    """In-memory grain datasets: train shuffled per epoch with a random flip, eval fixed."""
    t = config.toy
    gbs = int(config.batch_size)
    train_records = toy_records(int(t.num_train), int(t.image_size), int(config.seed))
    eval_records = toy_records(int(t.num_eval), int(t.image_size), int(config.seed) + 10_000)

    def train_iter(pidx, pcount):
        # The global stream (shuffled per epoch, random flip keyed by the global index) is the same
        # for any process count; process p reads rows [p*L, (p+1)*L) of every global batch, so a
        # job's result does not depend on how many processes share it.
        stream = (grain.MapDataset.source(train_records).shuffle(seed=int(config.seed)).repeat()
                  .random_map(_toy_flip, seed=int(config.seed) + 1))
        local = gbs // pcount
        ds = grain.MapDataset.range(2**62).map(
            lambda k: stream[(k // local) * gbs + pidx * local + k % local])
        return iter(ds.batch(local, drop_remainder=True).to_iter_dataset())

    def eval_iter(pidx, pcount):
        ds = grain.MapDataset.source(eval_records)[pidx::pcount].batch(
            gbs // pcount, drop_remainder=True)
        return iter(ds.to_iter_dataset())

    return Data(train_iter=train_iter, steps_per_epoch=max(1, int(t.num_train) // gbs),
                eval_iter=eval_iter)
