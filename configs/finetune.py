"""Finetune MELD with mined annotations (MAM positives, NRM ignore regions) and unlabeled slices.

Starts from the epoch-4 checkpoint of a MELD run (params and batch statistics; a fresh optimizer)
and trains 4 epochs at lr 1e-5, then 1e-6 for the last 2 (the paper schedule's epochs 5-8), on the
original key slices plus unlabeled slices (half as many as key slices, redrawn each epoch):

    python -m uld_jax.main --config configs/finetune.py:paper --workdir runs/finetune \
        --config.init_from.workdir=runs/meld --config.data.overlays="('runs/mined.npz',)"

The mined positives (MAM) and ignore regions (NRM) reach the pipeline as overlays of the sample
tables (``data.overlays`` or a merged ``data.samples_version``, see docs/data_pipeline.md).
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.base_config(common.parse_variant(arg))
    c.init_from.epoch = 4 if c.variant == "paper" else 2
    c.num_epochs = 4 if c.variant == "paper" else 2
    c.optimizer.lr = 1e-5 if c.variant == "paper" else 1e-4
    c.optimizer.decay_epochs = (2,) if c.variant == "paper" else (1,)
    c.optimizer.decay_factor = 0.1
    c.optimizer.warmup_steps = 0
    c.data.added_ratio = 0.5                 # unlabeled (overlay-added) slices per key slice
    c.mine.theta = 0.15
    c.mine.sigma = 0.5
    return c
