"""Builds the ``train.Task`` and ``train.Data`` named by a config (``config.task.name``,
``config.data.name``).

* ``meld``: the MELD detector (``uld_jax.models.meld.MELD`` with ``config.model``, a
  ``uld_jax.models.config.model_config``) and ``uld_jax.losses.meld_loss``. Used by
  ``configs/baseline.py`` (one dataset expert, one head, no gate), ``configs/meld.py`` and
  ``configs/finetune.py``.

* ``pipeline``: the grain input pipeline (``uld_jax.input_pipeline.make_dataset`` with
  ``config.data``, a ``default_input_config`` plus ``name`` and ``val_split``) on the datasets built
  by ``python -m data_prep.build`` in ``config.data.data_dir``.

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

from absl import logging

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from uld_jax import core
from uld_jax.core import Keys
from uld_jax.train import ConfigError, Data, Task


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
    raise ConfigError(f"task.name={name!r}: expected 'meld' or 'toy'")


def build_data(config: ml_collections.ConfigDict) -> Data:
    name = config.data.name
    if name == "toy":
        return toy_data(config)
    if name == "pipeline":
        return pipeline_data(config)
    raise ConfigError(f"data.name={name!r}: expected 'pipeline' or 'toy'")


# ------------------------------------------------------------------------------------------------
# MELD and the grain pipeline.
# ------------------------------------------------------------------------------------------------
def _dataset_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Names of the model's dataset columns in the logged metrics ('merged' for the one expert of
    ``data.merge_datasets``)."""
    d = int(config.model.num_datasets)
    if config.data.get("merge_datasets", False) and d == 1:
        return ("merged",)
    names = tuple(config.data.datasets)
    return names if len(names) == d else tuple(core.DATASETS[:d])


def check_model_data(config: ml_collections.ConfigDict) -> None:
    """ConfigError when the input pipeline's dataset ids have no expert in the model
    (``uld_jax.input_pipeline.check_config``), e.g. ``data.merge_datasets`` with several experts."""
    if config.data.get("name", "pipeline") != "pipeline":
        return
    ip = _import("uld_jax.input_pipeline", ("check_config",), "data.name='pipeline'")
    try:
        ip.check_config(config.data, int(config.model.num_datasets))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def meld_metrics(out: dict, logs: dict, names: tuple[str, ...], num_heads: int) -> dict[str, Any]:
    """``losses.meld_loss`` logs + model outputs -> ``train.Task`` metrics.

    * every loss term as ``loss/<term>`` (``loss/rpn_cls``, ``loss/roi_cls/lung``, ...);
    * per-dataset terms (``loss/rpn_cls/luna16``) as ``(value, samples of that dataset)`` pairs, so
      an interval's value is the mean over that dataset's samples (meld_loss gives 0 for a dataset
      absent from a batch; weighting by its count drops those);
    * ``gate/<organ>_mean``: mean gate weight over the sampled ROIs and ``gate/<organ>_pos_mean``
      over the positive ROIs (organ heads 1..H-1; w0 = 1 is not logged);
    * ``sampling/rpn_pos_fraction`` / ``sampling/roi_pos_fraction``: positives among the sampled
      anchors / ROIs (a collapse to 0 means the matcher finds no lesion).
    """
    loss_names = core.DATASETS if len(names) == len(core.DATASETS) else tuple(
        f"dataset{i}" for i in range(len(names)))
    ds = out["dataset_id"]
    m: dict[str, Any] = {}
    for key, value in logs.items():
        if key == "total":
            continue
        term, _, tail = key.rpartition("/")
        if term and tail in loss_names:
            i = loss_names.index(tail)
            count = jnp.sum(ds == i).astype(jnp.float32)
            m[f"loss/{term}/{names[i]}"] = (jnp.reshape(value, (1,)), jnp.reshape(count, (1,)))
        else:
            m[f"loss/{key}"] = value
    roi_pos = (out["roi_labels"] == 1).astype(jnp.float32)
    if "gate_logits" in out:
        w = out["organ_weights"]                                    # [B, S, H]
        for j, organ in enumerate(core.ORGAN_HEADS[1:num_heads], start=1):
            m[f"gate/{organ}_mean"] = jnp.mean(w[..., j])
            m[f"gate/{organ}_pos_mean"] = (w[..., j], roi_pos)
    rpn_sampled = (out["rpn_labels"] >= 0).astype(jnp.float32)
    m["sampling/rpn_pos_fraction"] = (jnp.sum(out["rpn_labels"] == 1) /
                                      jnp.maximum(jnp.sum(rpn_sampled), 1.0))
    m["sampling/roi_pos_fraction"] = (jnp.sum(roi_pos) /
                                      jnp.maximum(jnp.sum(out["roi_labels"] >= 0), 1.0))
    return m


def meld_task(config: ml_collections.ConfigDict) -> Task:
    """MELD (or the MULAN-like baseline, by ``config.model``) as a ``train.Task``.

    Training runs ``MELD.train_outputs`` (targets and ROI sampling inside, rng stream ``'sample'``)
    and ``losses.meld_loss``; BatchNorm statistics (``bn_mode='batch'``) are the other variables.
    Validation losses run the same forward with a fixed sampling key; it normalises with batch
    statistics (the training forward's), and the padding samples of a final evaluation batch take
    part in the batch means.
    """
    meld = _import("uld_jax.models.meld", ("MELD",), "task.name='meld'")
    losses = _import("uld_jax.losses", ("meld_loss",), "task.name='meld'")
    check_model_data(config)
    mcfg = config.model
    model = meld.MELD(mcfg)
    names = _dataset_names(config)
    heads = int(mcfg.num_organ_heads)

    def init(rng, batch):
        # An rbg key for the initialisers: XLA compiles MELD's hundreds of threefry draws ~5x slower
        # on CPU (models/meld.py:init_variables does the same); still a function of the seed.
        data = jax.random.key_data(rng).reshape(-1).astype(jnp.uint32)
        key = jax.random.wrap_key_data(jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])[:4],
                                       impl="rbg")
        return model.init({"params": key}, batch[Keys.IMAGE], method=meld.MELD.init_all)

    def forward(params, other, batch, rng):
        variables = {"params": params, **other}
        if other:
            out, updates = model.apply(variables, batch, train=True, rngs={"sample": rng},
                                       mutable=list(other))
            return out, {**other, **updates}
        return model.apply(variables, batch, train=True, rngs={"sample": rng}), other

    def loss_fn(params, other, batch, rng, train):
        out, new_other = forward(params, other, batch, rng)
        loss, logs = losses.meld_loss(out, batch, mcfg)
        return loss, (new_other if train else other, meld_metrics(out, logs, names, heads))

    def eval_fn(params, other, batch):
        out, _ = forward(params, other, batch, jax.random.key(int(config.seed)))
        loss, logs = losses.meld_loss(out, batch, mcfg)
        return dict(meld_metrics(out, logs, names, heads), loss=loss)

    return Task(init=init, loss_fn=loss_fn, eval_fn=eval_fn, extra_eval=meld_detection_eval(config))


def meld_detection_eval(config: ml_collections.ConfigDict):
    """The ``Task.extra_eval`` of MELD: key-slice FROC on ``data.val_split``
    (``uld_jax.evaluate.periodic.DetectionEvaluator``), or None when ``detection_eval.enabled`` is
    off or the data is not the built pipeline with a validation split."""
    de = config.get("detection_eval")
    if (de is None or not de.enabled or config.data.get("name", "pipeline") != "pipeline"
            or not config.data.get("val_split") or not config.data.data_dir):
        return None
    periodic = _import("uld_jax.evaluate.periodic", ("DetectionEvaluator",), "detection_eval")
    return periodic.DetectionEvaluator(config)


def pipeline_data(config: ml_collections.ConfigDict) -> Data:
    """The grain input pipeline (``config.data``) as a ``train.Data``: endless mixed training
    batches of this process's share, and (``data.val_split``) the evaluation split once, in order,
    the last batch padded."""
    ip = _import("uld_jax.input_pipeline", ("make_dataset", "steps_per_epoch", "load_tables"),
                 "data.name='pipeline'")
    if not config.data.data_dir:
        raise ConfigError("data.data_dir is empty: pass --config.data.data_dir=<DATA_DIR of "
                         "python -m data_prep.build>")

    def _cfg(**kw) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict(config.data.to_dict())
        c.global_batch_size = int(config.batch_size)
        c.seed = int(config.seed)
        c.num_epochs = -1
        c.update(kw)
        return c

    train_cfg = _cfg()
    val_cfg = None
    if config.data.val_split:
        val_cfg = _cfg(split=config.data.val_split, mix=False, shuffle=False, num_epochs=1,
                       augment=False)
        try:
            tables, _ = ip.load_tables(val_cfg)
            if not sum(len(t) for t in tables):
                raise ValueError("no samples")
        except (OSError, ValueError, KeyError) as e:
            logging.warning("no evaluation during training: split %r of %s unusable (%s)",
                            config.data.val_split, config.data.data_dir, e)
            val_cfg = None

    def train_iter(pidx, pcount):
        return iter(ip.make_dataset(train_cfg, process_index=pidx, process_count=pcount))

    def eval_iter(pidx, pcount):
        return iter(ip.make_dataset(val_cfg, process_index=pidx, process_count=pcount,
                                    pad_final_batch=True))

    return Data(train_iter=train_iter,
                steps_per_epoch=int(ip.steps_per_epoch(train_cfg, process_count=jax.process_count())),
                eval_iter=eval_iter if val_cfg is not None else None)


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
