"""Shared pieces of the experiment configs (``baseline.py``, ``meld.py``, ``finetune.py``).

Every config is ``get_config(arg)`` with ``arg`` one of the variants

* ``tiny``: runs on 2 CPU cores in minutes (narrow DenseNet, 128 px, batch 8);
* ``paper``: the constants of Yan et al. 2020 / DESIGN.md section 3 (DenseNet-121 truncated after
  dense block 3, 512 px, RAdam lr 1e-4 x0.1 after epochs 4 and 6, 8 epochs, batch 4).

All keys exist in every config (unused ones keep their defaults), and ``uld_jax.main`` locks the
config, so an override of a key that does not exist is an error naming it.
"""

from __future__ import annotations

import ml_collections

from uld_jax import core

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

    c.model = ml_collections.ConfigDict()
    m = c.model
    m.datasets = core.DATASETS                 # dataset experts (dataset-indexed heads)
    m.organ_heads = core.ORGAN_HEADS           # classification heads; head 0 = whole body
    m.use_gate = True                          # organ gate -> w1..w3 (w0 = 1)
    m.backbone = "densenet_tiny" if tiny else "densenet121"
    m.densenet_blocks = (2, 2, 2) if tiny else (6, 12, 24)   # truncated after dense block 3
    m.densenet_growth = 8 if tiny else 32
    m.pretrained_weights = ""                  # local ImageNet weights file ('' = random init)
    m.num_context_slices = core.NUM_CONTEXT_SLICES
    m.fpn_dim = 32 if tiny else 256
    m.anchor_stride = 4
    m.anchor_sizes = (16, 24, 32, 48, 96)
    m.anchor_ratios = (0.5, 1.0, 2.0)
    m.rpn_fg_iou = 0.7
    m.rpn_bg_iou = 0.3
    m.rpn_samples_per_image = 32
    m.rpn_positive_fraction = 0.5
    m.rpn_nms_iou = 0.7
    m.rpn_pre_nms_train = 2000 if tiny else 12000
    m.rpn_post_nms_train = 256 if tiny else 2000
    m.rpn_pre_nms_test = 1000 if tiny else 6000
    m.rpn_post_nms_test = 100 if tiny else 300
    m.roi_size = 7
    m.roi_samples_per_image = 64
    m.roi_positive_fraction = 0.25
    m.roi_fg_iou = 0.5
    m.box_head_dim = 64 if tiny else 1024
    m.gate_dim = 32 if tiny else 512
    m.mask_head = True
    m.mask_size = 28
    m.embedding_dim = 32 if tiny else 256
    m.max_detections = 50 if tiny else 300

    c.loss = ml_collections.ConfigDict()
    c.loss.box_weight = 10.0                   # box regression loss weight (paper)
    c.loss.mask_weight = 1.0
    c.loss.gate_weight = 1.0
    c.loss.embedding_weight = 0.1

    # --- data: see uld_jax/input_pipeline.py (data.name='pipeline') ------------------------------
    c.data = ml_collections.ConfigDict()
    d = c.data
    d.name = "pipeline"                        # 'pipeline' | 'toy'
    d.root = ""                                # folder of the built datasets (array_record)
    d.datasets = core.DATASETS
    d.image_size = 128 if tiny else core.MAX_IMAGE_SIDE   # long side, pixels
    d.max_boxes = 8 if tiny else 16            # G: boxes per slice, padded
    d.max_ignore = 8 if tiny else 32           # R: NRM ignore regions per slice, padded
    d.lesion_free_ratio = 1.0                  # single-type sets: lesion-free slices per lesion slice
    d.mined_annotations = ""                   # finetune: mined annotation table (uld_jax.mine)
    d.unlabeled_ratio = 0.0                    # finetune: unlabeled slices per key slice per epoch
    d.num_workers = 0 if tiny else 8           # grain worker processes per host
    d.augment = True

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

    # MAM / NRM (uld_jax.mine), used by the finetune recipe
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
