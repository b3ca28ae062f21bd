"""Detection metrics during training: the ``Task.extra_eval`` hook of the MELD task.

At every evaluation of the training loop (``config.eval_every_steps``; -1: every epoch) this runs
the model being trained over the validation split (``config.data.val_split``) of each dataset, each
by its own expert (``deeplesion``'s is the universal one), through the same inference path as
``python -m uld_jax.evaluate --workdir W --protocol keyslice`` (``from_workdir.load_split`` /
``keyslice_split`` / ``predict_split`` / ``keyslice_report``), and returns MULAN's key-slice FROC
sensitivities, which the loop writes as ``val/<dataset>/sens@<r>fp`` (r = 0.5, 1, 2, 4 FPs per
key slice) and ``val/<dataset>/froc_mean`` (their mean, MULAN's headline).

Cost control (``config.detection_eval``):

* ``max_samples``: at most this many key slices per dataset, evenly spaced over the split's table
  (-1: all; with all, the numbers equal the CLI's on the same checkpoint and batch size);
* ``batch_size``: images per compiled batch (the CLI's ``--batch-size``, default 4);
* the split's tables are read once, and each expert's jitted predict function
  (``uld_jax.inference.Predictor``) is compiled once and reused by every later evaluation: the
  parameters are an argument of the compiled function, not a constant of it.

Only process 0 evaluates (the others return nothing; only process 0 writes TensorBoard files). The
replicated training variables are read from this process's first device, without a copy.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from uld_jax.evaluate import from_workdir
from uld_jax.evaluate.boxes import EvaluationInputError

# The rates MULAN reports (FPs per key slice); froc_mean is their mean.
RATES = (0.5, 1.0, 2.0, 4.0)


def _local_replica(x):
    """A replicated (global) array -> this process's copy on its first device (no transfer); host
    arrays (a restored checkpoint) -> that device too, so that every call of the compiled predict
    function sees the same placement (an uncommitted argument would compile a second time)."""
    if isinstance(x, jax.Array):
        if x.is_fully_replicated:
            return x.addressable_data(0)
        if not x.is_fully_addressable:
            raise ValueError("detection evaluation needs replicated (or process-local) variables")
    return jax.device_put(x, jax.local_devices()[0])


class DetectionEvaluator:
    """Key-slice FROC of in-memory variables on a built split: ``evaluator(step, variables)``.

    ``config``: the experiment config (``configs/*.py``); its model, input pipeline, ``data.data_dir``,
    ``data.val_split`` and ``detection_eval`` keys are used. Build it where the model is built
    (nothing is read until the first call).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, datasets: Sequence[str] | None = None,
                 split: str | None = None, max_samples: int | None = None,
                 batch_size: int | None = None):
        from uld_jax import inference
        from uld_jax.models.meld import MELD

        de = config.detection_eval
        # The model and input configs exactly as the CLI rebuilds them from a checkpoint's config.
        mcfg, dcfg = inference.configs_from_saved(json.loads(config.to_json_best_effort()))
        if int(mcfg.image_size) != int(dcfg.image_size[0]):    # as inference.load_model does
            mcfg.image_size = int(dcfg.image_size[0])
        self.loaded = inference.LoadedModel(
            model=MELD(mcfg), variables=None, model_config=mcfg, data_config=dcfg, step=-1,
            source="the training run's variables")
        self.data_dir = str(config.data.data_dir)
        self.split = str(split if split is not None else config.data.val_split)
        self.datasets = tuple(datasets if datasets is not None else dcfg.datasets)
        self.max_samples = int(de.max_samples if max_samples is None else max_samples)
        self.batch_size = int(de.batch_size if batch_size is None else batch_size)
        self._splits: list[from_workdir.SplitInput] | None = None
        self._predictors: dict[str, Any] = {}
        self.last_seconds = 0.0

    # ------------------------------------------------------------------ set-up (first call)
    def splits(self) -> list[from_workdir.SplitInput]:
        """The evaluated rows of each dataset's split, read on first use; datasets whose split is
        missing or holds no lesion are skipped with a warning."""
        if self._splits is None:
            self._splits = []
            for ds in self.datasets:
                try:
                    si = from_workdir.load_split(self.loaded.data_config, self.data_dir, ds,
                                                 self.split, self.batch_size)
                except (EvaluationInputError, OSError, ValueError, KeyError) as e:
                    logging.warning("detection metrics: %s skipped (split %r unusable: %s)", ds,
                                    self.split, e)
                    continue
                si = from_workdir.keyslice_split(si, self.max_samples)
                if not len(si.table):
                    logging.warning("detection metrics: %s/%s has no samples", ds, self.split)
                    continue
                self._splits.append(si)
                logging.info("detection metrics: %s/%s, %d images (key slices)", ds, self.split,
                             len(si.table))
        return self._splits

    def predictor(self, expert: str):
        """One ``Predictor`` (one compilation) per expert for the evaluator's lifetime."""
        from uld_jax import inference

        if expert not in self._predictors:
            self._predictors[expert] = inference.Predictor(self.loaded, self.batch_size, expert,
                                                           with_masks=False)
        return self._predictors[expert]

    # ------------------------------------------------------------------ evaluation
    def reports(self, step: int, variables: Mapping[str, Any]) -> list:
        """One key-slice ``EvaluationReport`` per dataset for ``variables`` (``{'params', ...}``)."""
        t0 = time.perf_counter()
        self.loaded.variables = jax.tree.map(_local_replica, dict(variables))
        self.loaded.step = int(step)
        try:
            out = []
            for si in self.splits():
                pred = self.predictor(from_workdir.expert_for(self.loaded, si.dataset))
                sd = from_workdir.predict_split(pred, si, progress=False)
                out.append(from_workdir.keyslice_report(
                    sd, f"{self.loaded.source} at step {step}",
                    f"{self.data_dir}/{si.dataset} {self.split} sample table"))
        finally:
            # no reference to the training state survives (the train step donates it)
            self.loaded.variables = None
        self.last_seconds = time.perf_counter() - t0
        return out

    def __call__(self, step: int, variables: Mapping[str, Any]) -> dict[str, float]:
        """``{'<dataset>/sens@<r>fp': s, '<dataset>/froc_mean': m}`` (the loop adds ``val/``);
        non-finite values (a split without lesions) are left out."""
        if jax.process_index() != 0:
            return {}
        out: dict[str, float] = {}
        for rep in self.reports(step, variables):
            ds = rep.info["dataset"]
            out.update(scalars(rep, ds))
            logging.info("step %d detection metrics %s: %d images, %d lesions, froc_mean %.4f",
                         step, ds, rep.info["counts"]["images"], rep.info["counts"]["truths"],
                         out.get(f"{ds}/froc_mean", float("nan")))
        logging.info("step %d detection metrics took %.1f s", step, self.last_seconds)
        return {k: v for k, v in out.items() if np.isfinite(v)}


def scalars(rep, dataset: str) -> dict[str, float]:
    """A key-slice report -> ``{'<dataset>/sens@<r>fp' for r in RATES, '<dataset>/froc_mean'}``."""
    t = rep.tables["keyslice"]
    by_rate = {float(r): float(s) for r, s in zip(t.fp_rates, t.sensitivity)}
    out = {f"{dataset}/sens@{r:g}fp": by_rate[r] for r in RATES}
    out[f"{dataset}/froc_mean"] = float(np.mean([by_rate[r] for r in RATES]))
    return out
