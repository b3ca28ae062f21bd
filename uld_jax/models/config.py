"""Model configuration: ``model_config(variant)`` for the MELD detector.

Two variants share one code path:

* ``tiny``: a narrow DenseNet (growth 8, 2/2/2 layers), 128 px input, 32-channel FPN, 64-wide FCs and
  a few ROIs; compiles and steps in seconds on 2 CPU cores (the tests use it).
* ``paper``: DenseNet-121 truncated after dense block 3 (6/12/24 layers, growth 32), 512 px input,
  FC-1024 classification heads, FC-512 gate, 256-D embeddings, the MULAN/MELD anchor, RPN and ROI
  constants (DESIGN.md section 3).

The baseline (MULAN-like, one dataset, one head, no gate) is ``num_datasets=1, num_organ_heads=1,
use_gate=False``. The training engineer composes this dict into ``configs/*.py``.
"""

from __future__ import annotations

import ml_collections

from uld_jax import core


def model_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """Returns the locked model config of ``variant`` ('tiny' or 'paper')."""
    if variant not in ("tiny", "paper"):
        raise ValueError(f"unknown model variant {variant!r}; expected 'tiny' or 'paper'")
    paper = variant == "paper"
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.image_size = 512 if paper else 128          # pixels, square model input (H = W)
    c.num_slices = core.NUM_CONTEXT_SLICES         # 9 -> 3 three-channel images
    c.num_datasets = len(core.DATASETS)            # D: dataset experts
    c.num_organ_heads = len(core.ORGAN_HEADS)      # classification heads (whole body first)
    c.use_gate = True                              # organ gate for heads 1..; False: all w = 1
    c.use_mask = True
    c.use_embedding = True
    c.context_fusion = True                        # 3D context fusion (MULAN/3DCE)
    # The pipeline's image is windowed to [0, 255] minus PIXEL_MEAN; the backbone sees it times
    # input_scale, i.e. with a spread like ImageNet-normalised input (std ~1 for [0,1]/0.225), which
    # frozen ImageNet BatchNorm statistics assume.
    c.input_scale = 1.0 / (255.0 * 0.225)
    c.dtype = "float32"                            # compute dtype ('bfloat16' on accelerators)
    # How convolutions and max pooling are written (models/layers.py): 'xla' (XLA's own ops),
    # 'cpu' (matrix products and slices, whose gradients XLA:CPU runs several times faster), or
    # 'auto': 'cpu' on the CPU backend, 'xla' elsewhere. Same parameters and results either way.
    c.layer_impl = "auto"

    b = c.backbone = ml_collections.ConfigDict()
    b.growth_rate = 32 if paper else 8
    b.block_layers = (6, 12, 24) if paper else (2, 2, 2)
    b.num_init_features = 64 if paper else 16
    b.bn_size = 4 if paper else 2
    # 'frozen': BatchNorm always uses its stored statistics (ImageNet's), scale/bias still train
    # (as MULAN/maskrcnn-benchmark with small per-device batches). 'batch': batch statistics in
    # training, running averages updated in the 'batch_stats' collection, used at eval.
    b.bn_mode = "frozen" if paper else "batch"
    b.bn_momentum = 0.9

    c.fpn_dim = 256 if paper else 32               # channels of the fused stride-4 feature map

    a = c.anchors = ml_collections.ConfigDict()
    a.stride = 4
    a.sizes = (16, 24, 32, 48, 96)                 # pixels (square-root of the area)
    a.ratios = (0.5, 1.0, 2.0)                     # height / width

    r = c.rpn = ml_collections.ConfigDict()
    r.conv_dim = 256 if paper else 32
    r.fg_iou = 0.7
    r.bg_iou = 0.3
    r.batch_per_image = 32
    r.positive_fraction = 0.5
    r.nms_iou = 0.7
    r.pre_nms_train = 12000 if paper else 512
    r.post_nms_train = 2000 if paper else 64
    r.pre_nms_test = 6000 if paper else 512
    r.post_nms_test = 300 if paper else 32
    r.straddle = 0.0                               # anchors crossing the border by more: ignored
    r.min_size = 0.0                               # pixels; proposals not above this are dropped
    r.box_weights = (1.0, 1.0, 1.0, 1.0)
    r.smooth_l1_beta = 1.0 / 9.0

    o = c.roi = ml_collections.ConfigDict()
    o.pool_size = 7
    o.sampling_ratio = 2
    o.batch_per_image = 64 if paper else 16
    o.positive_fraction = 0.25
    o.fg_iou = 0.5
    o.bg_iou = 0.5
    # An anchor/ROI whose intersection-over-own-area with an NRM ignore region exceeds this is
    # excluded from negative sampling (never from positives of a real box).
    o.ignore_iobb = 0.5
    o.ignore_overrides_positive = False            # a real lesion box stays positive inside one
    o.box_head_dims = (1024, 1024) if paper else (64, 64)
    o.box_weights = (10.0, 10.0, 5.0, 5.0)
    o.box_loss_weight = 10.0                       # MULAN's weight of the ROI box loss
    o.smooth_l1_beta = 1.0
    o.test_nms_iou = 0.5
    o.test_score_threshold = 0.0                   # keep everything; evaluation thresholds later
    o.detections_per_image = 100 if paper else 16  # per dataset expert

    h = c.cls_head = ml_collections.ConfigDict()
    h.dims = (1024, 1024) if paper else (64, 64)   # each organ head: FC, FC, FC-D
    g = c.gate = ml_collections.ConfigDict()
    g.dims = (512, 512) if paper else (32, 32)     # FC, FC, FC-(heads-1), sigmoid
    g.stop_gradient_weights = True                 # L = sum_i sg(w_i) L_i, gate trained by its BCE

    m = c.mask = ml_collections.ConfigDict()
    m.pool_size = 14
    m.num_convs = 4 if paper else 2
    m.conv_dim = 256 if paper else 16
    m.resolution = 28                              # 14 -> deconv x2 -> 28
    m.max_per_image = 16 if paper else 4           # positive ROIs given to the mask/embedding heads

    e = c.embedding = ml_collections.ConfigDict()
    e.dim = 256 if paper else 16
    e.hidden = 1024 if paper else 64
    e.temperature = 0.1                            # supervised-contrastive temperature
    # True: sampled background ROIs join the contrastive denominators (never anchors or positives)
    # and, with proxies, are classified to a background proxy, pushing lesion embeddings away from
    # non-lesion regions (losses.embedding_loss). Off by default: on the quick recipe it did not
    # raise MAM's precision (15.5% against 22.4%, one MELD run on seed 0's world; docs/mining.md,
    # "Trying to make the embedding carry identity")
    e.background_negatives = False
    e.num_types = max(core.COARSE_LESION_TYPES) + 1  # type-probe classes (0 unused)
    # Lesion-identity proxies (losses.embedding_identity): a learnt unit vector per annotated
    # lesion, hashed into a table of this many rows (0: off); keep it well above the number of
    # annotated lesions (DeepLesion: ~33k) so that few identities share a row. proxy_weight scales
    # its cross-entropy inside the embedding loss.
    e.num_proxies = 0
    e.proxy_weight = 1.0
    # True: the embedding also reads the ROI's place and size on the canvas (roi_heads.box_location)
    e.location = False

    w = c.loss_weights = ml_collections.ConfigDict()
    w.rpn_cls = 1.0
    w.rpn_box = 1.0
    w.roi_cls = 1.0
    w.roi_box = 1.0          # on top of roi.box_loss_weight
    w.gate = 1.0
    w.mask = 1.0
    w.embedding = 0.1
    c.lock()
    return c
