"""BatchNorm statistics recomputed from training batches ("precise BN").

A model trained with ``backbone.bn_mode = 'batch'`` (the tiny config's default) normalises with each
training batch's statistics but evaluates with running averages, an exponential average of the last
batches' statistics (``backbone.bn_momentum``). With small batches, or batches drawn from datasets
of different intensity statistics (MELD's mixing), the running averages can differ from what the
network saw in training, and the evaluation then measures that difference as well as the detector.

:func:`precise_batch_stats` replaces them with the plain mean of ``num_batches`` training batches'
statistics, each computed by the run's own BatchNorm layers in training mode, on the batches the
run's input pipeline draws from its training data (mixing and augmentation as configured; optionally
only some datasets). The training data is the folder the run's config records, or another one
given (``--precise-bn-data``), not the evaluated one: a held-out world has no training split.
Evaluating once with the stored and once with the recomputed statistics tells whether the running
averages cost anything::

    python -m uld_jax.evaluate --workdir RUN --data DATA_DIR ... --precise-bn 100
        [--precise-bn-datasets deeplesion] [--precise-bn-data TRAIN_DATA_DIR]

A model whose BatchNorm is ``'frozen'`` (the paper config: stored statistics in training too) has
nothing to recompute, and is refused with that reason.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uld_jax import core
from uld_jax.evaluate.boxes import EvaluationInputError


def _training_input(loaded, data_dir: str | None, datasets: Sequence[str] | None):
    """The run's training input-pipeline config (``loaded.data_config``: as the trainer ran it, its
    batch size and seed included), in process, on ``data_dir`` when given (else the run's own),
    restricted to ``datasets`` when given."""
    c = ml_collections.ConfigDict(loaded.data_config.to_dict())
    if data_dir is not None:
        c.data_dir = os.fspath(data_dir)
    if not c.get("data_dir"):
        raise EvaluationInputError(f"{loaded.source}: the run's config records no training data "
                                   "folder; give --precise-bn-data DIR")
    if datasets:
        unknown = [d for d in datasets if d not in tuple(c.datasets)]
        if unknown:
            raise EvaluationInputError(f"--precise-bn-datasets {','.join(datasets)}: {unknown} not "
                                       f"among the run's datasets {tuple(c.datasets)}")
        c.datasets = tuple(datasets)
    c.num_workers = 0
    return c


def precise_batch_stats(loaded, num_batches: int, *, data_dir: str | None = None,
                        datasets: Sequence[str] | None = None) -> dict:
    """The ``batch_stats`` collection of ``loaded`` (an ``inference.LoadedModel``) recomputed as the
    mean over ``num_batches`` training batches of each BatchNorm layer's batch mean and variance.
    ``data_dir``: the built training data (default: the folder the run's config records). The
    batches are the run's own size, drawn with its seed.

    The statistics of one batch are what the layer stores with momentum 0: the model is rebuilt
    with ``bn_momentum = 0`` (same parameters) and its backbone run in training mode."""
    from uld_jax import input_pipeline
    from uld_jax.models.meld import MELD

    if num_batches < 1:
        raise EvaluationInputError(f"--precise-bn {num_batches}: give a number of batches >= 1")
    if "batch_stats" not in loaded.variables:
        raise EvaluationInputError(f"{loaded.source}: the model has no BatchNorm statistics")
    if str(loaded.model_config.backbone.bn_mode) != "batch":
        raise EvaluationInputError(
            f"{loaded.source}: backbone.bn_mode is {loaded.model_config.backbone.bn_mode!r}; its "
            "training used the stored statistics, so there is nothing to recompute")
    cfg = ml_collections.ConfigDict(loaded.model_config.to_dict())
    cfg.backbone.bn_momentum = 0.0
    model = MELD(cfg)

    @jax.jit
    def one_batch(variables, image):
        _, upd = model.apply(variables, image, mutable=["batch_stats"],
                             method=lambda m, x: m.backbone(x, train=True))
        return upd["batch_stats"]

    config = _training_input(loaded, data_dir, datasets)
    try:
        it = iter(input_pipeline.make_dataset(config, process_index=0, process_count=1))
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationInputError(f"--precise-bn: cannot read the run's training data in "
                                   f"{config.data_dir} ({e})") from None
    total = None
    for k in range(int(num_batches)):
        try:
            batch = next(it)
        except StopIteration:
            raise EvaluationInputError(f"{config.data_dir}: the training input gave {k} batches, fewer "
                                       f"than --precise-bn {num_batches}") from None
        stats = one_batch(loaded.variables, jnp.asarray(batch[core.Keys.IMAGE]))
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    return jax.tree.map(lambda t: t / float(num_batches), total)


def stored_vs_recomputed(stored: dict, recomputed: dict) -> dict[str, tuple[float, float]]:
    """How far the stored statistics are from ``recomputed``: per kind (``'mean'``, ``'var'``),
    the median and the largest over the layers of ``mean|stored - recomputed| / mean|recomputed|``."""
    rec = dict(jax.tree_util.tree_flatten_with_path(recomputed)[0])
    rel: dict[str, list[float]] = {"mean": [], "var": []}
    for path, old in jax.tree_util.tree_flatten_with_path(stored)[0]:
        kind = getattr(path[-1], "key", None)
        if kind in rel:
            new = np.asarray(rec[path], np.float64)
            rel[kind].append(float(np.mean(np.abs(np.asarray(old, np.float64) - new))
                                   / max(float(np.mean(np.abs(new))), 1e-12)))
    return {k: (float(np.median(v)), float(np.max(v))) for k, v in rel.items() if v}


def with_precise_bn(loaded, num_batches: int, *, data_dir: str | None = None,
                    datasets: Sequence[str] | None = None):
    """A copy of ``loaded`` whose ``batch_stats`` are :func:`precise_batch_stats`; its ``source``
    says so, with how far the stored averages were from them (:func:`stored_vs_recomputed`; it
    appears in the evaluation report). ``loaded`` itself is not changed."""
    stats = precise_batch_stats(loaded, num_batches, data_dir=data_dir, datasets=datasets)
    which = f" of {','.join(datasets)}" if datasets else ""
    d = stored_vs_recomputed(loaded.variables["batch_stats"], stats)
    far = "; ".join(f"{k} {100 * med:.1f}% median, {100 * top:.1f}% max" for k, (med, top) in d.items())
    return dataclasses.replace(
        loaded, variables=dict(loaded.variables, batch_stats=stats),
        source=(f"{loaded.source}, BatchNorm statistics of {num_batches} training batches{which} "
                f"(the stored averages differ from them by: {far})"))
