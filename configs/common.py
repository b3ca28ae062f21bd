"""Shared pieces of the experiment configs (``baseline.py``, ``meld.py``, ``finetune.py``).

Every config is ``get_config(arg)`` with ``arg`` one of the variants

* ``tiny``: runs on 2 CPU cores in minutes (narrow DenseNet, 160 px canvas of ~2 mm pixels,
  batch 8);
* ``paper``: the constants of Yan et al. 2020 / DESIGN.md section 3 (DenseNet-121 truncated after
  dense block 3, 512 px, RAdam lr 1e-4 x0.1 after epochs 4 and 6, 8 epochs, batch 4).

All keys exist in every config (unused ones keep their defaults), and ``uld_jax.main`` locks the
config, so an override of a key that does not exist is an error naming it.
"""

from __future__ import annotations

import ml_collections

from uld_jax.input_pipeline import default_input_config
from uld_jax.models.config import model_config

VARIANTS = ("tiny", "paper")


def parse_variant(arg: str | None) -> str:
    variant = (arg or "tiny").strip()
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}: expected one of {VARIANTS}")
    return variant


def base_config(variant: str) -> ml_collections.ConfigDict:
    """The full key set with the ``variant``'s values (MELD: 4 datasets, 4 organ heads, gate)."""
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0

    # --- what to train: see uld_jax/tasks.py ----------------------------------------------------
    c.task = ml_collections.ConfigDict({"name": "meld"})          # 'meld' | 'toy'

    # The MELD model (uld_jax/models/config.py: backbone, anchors, RPN, ROI, heads, loss weights).
    c.model = model_config(variant)

    # --- data: the grain input pipeline (uld_jax/input_pipeline.py) -------------------------------
    # Its keys are the pipeline's own; the trainer sets data.global_batch_size and data.seed from
    # batch_size and seed. data.name picks the source: 'pipeline' | 'toy'.
    c.data = default_input_config(variant)
    c.data.name = "pipeline"
    c.data.val_split = "val"                   # evaluation split ('' = no periodic evaluation)
    # One image size for the pipeline's canvas and the model's input.
    c.model.image_size = int(c.data.image_size[0])

    # --- the toy task (task.name='toy' / data.name='toy'; uld_jax/tasks.py) ----------------------
    c.toy = ml_collections.ConfigDict()
    c.toy.width = 8
    c.toy.image_size = 32
    c.toy.num_train = 256
    c.toy.num_eval = 64

    # --- optimisation ----------------------------------------------------------------------------
    c.batch_size = 8 if tiny else 4            # global (all devices of all hosts)
    c.num_epochs = 4 if tiny else 8
    c.steps_per_epoch = -1                     # -1: from the data source
    c.total_steps = -1                         # -1: num_epochs * steps_per_epoch
    c.optimizer = ml_collections.ConfigDict()
    o = c.optimizer
    o.name = "radam"
    o.lr = 1e-3 if tiny else 1e-4
    o.decay_epochs = (2, 3) if tiny else (4, 6)
    o.decay_factor = 0.1
    o.warmup_steps = 0
    o.warmup_init_factor = 0.1
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.momentum = 0.9                           # sgd only
    o.weight_decay = 0.0 if tiny else 1e-4
    o.grad_clip_norm = 10.0                    # global norm; <= 0 disables

    # finetuning starts from another run's checkpoint (params + batch stats; fresh optimizer)
    c.init_from = ml_collections.ConfigDict()
    c.init_from.workdir = ""
    c.init_from.epoch = -1                     # which epoch-end checkpoint (-1: use step)
    c.init_from.step = -1                      # -1 with epoch -1: the latest

    # MAM / NRM (uld_jax.mine), used by the finetune recipe (the mined rows reach training as
    # overlays of the sample tables: data.overlays / data.samples_version, data.added_ratio)
    c.mine = ml_collections.ConfigDict()
    c.mine.theta = 0.15                        # MAM embedding-distance threshold
    c.mine.sigma = 0.5                         # NRM score threshold
    c.mine.slice_interval_mm = 5.0             # mining on slices every 5 mm

    # --- loop, logging, checkpoints, scale-out ---------------------------------------------------
    c.log_every_steps = 10 if tiny else 100
    c.eval_every_steps = -1                    # -1: every epoch
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = -1              # -1: every epoch (epoch ends are always saved)
    c.checkpoint.keep = 3
    c.checkpoint.keep_epochs = True            # keep every epoch-end checkpoint (finetune init)
    c.checkpoint.async_save = True
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                           # devices on the 'data' axis (-1: all)
    c.debug = ml_collections.ConfigDict()
    c.debug.sleep_per_step_s = 0.0             # tests: slow the loop down to kill it mid-run
    return c
