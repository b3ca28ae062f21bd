"""MELD: multi-expert lesion detector (Yan et al., IEEE TMI 2020) on a 2.5D DenseNet-FPN.

Usage::

    model = MELD(model_config('tiny'))
    variables = model.init({'params': k0, 'sample': k1}, batch, train=False)
    # training forward (targets included), BN statistics updated when bn_mode == 'batch':
    out, updates = model.apply(variables, batch, train=True, rngs={'sample': k},
                               mutable=['batch_stats'])
    loss, logs = losses.meld_loss(out, batch, cfg)
    # inference (every dataset expert):
    det = model.apply(variables, batch, train=False)

Batch keys consumed (``uld_jax.core.Keys``; B samples, G boxes, R ignore regions):
training: IMAGE [B, H, W, 9], DATASET_ID [B], optional IMAGE_VALID [B, H, W] (anchors centred on
padding are not sampled), BOXES [B, G, 4], BOX_VALID [B, G], PROVENANCE [B, G],
optional MASKS [B, G, M, M] with MASK_BOXES [B, G, 4] (per-lesion crops, the input pipeline's
layout) or MASKS [B, G, H, W] alone (whole-image masks), LESION_TYPE [B, G], LESION_ID [B, G],
ORGAN_TARGET / ORGAN_VALID [B, G, 3], IGNORE_BOXES [B, R, 4] / IGNORE_VALID [B, R]. Inference:
IMAGE only (the pipeline's int16 fixed point or float; ``core.decode_image``).

Shapes are static: every variable-length set is a fixed-size array with a validity mask; no host
synchronisation happens inside (no boolean indexing, no Python branching on values).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uld_jax.core import Keys
from uld_jax.models import detops as ops
from uld_jax.models import layers
from uld_jax.ops import detections as detection_ops
from uld_jax.ops import proposals as proposal_ops
from uld_jax.ops import targets as target_ops
from uld_jax.models.fpn import DenseNetFPN
from uld_jax.models.roi_heads import (BoxHead, EmbeddingHead, MaskHead, OrganClassifierHeads,
                                      OrganGate, box_location, fuse_scores, organ_weights)
from uld_jax.models.rpn import DatasetRPN


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Per-sample gather along axis 1: x [B, N, ...], idx [B, K] -> [B, K, ...]."""
    return jax.vmap(lambda a, i: a[i])(x, idx)


def _select_dataset(x: jax.Array, dataset_id: jax.Array, axis: int) -> jax.Array:
    """Selects each sample's dataset slice along ``axis`` (batch on axis 0)."""
    oh = jax.nn.one_hot(dataset_id, x.shape[axis], dtype=x.dtype)
    shape = [1] * x.ndim
    shape[0], shape[axis] = x.shape[0], x.shape[axis]
    return jnp.sum(x * oh.reshape(shape), axis=axis)


class MELD(nn.Module):
    """The full detector. ``__call__(batch, train)``: training outputs (train=True) or per-expert
    detections (train=False). See the module docstring and :meth:`train_outputs` /
    :meth:`inference_outputs` for the output dicts."""

    cfg: Any

    def setup(self):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        self.num_anchors = len(cfg.anchors.sizes) * len(cfg.anchors.ratios)
        impl = layers.resolve_impl(str(cfg.get("layer_impl", "auto")))
        self.backbone = DenseNetFPN(cfg, dt, impl)
        self.rpn = DatasetRPN(cfg.num_datasets, self.num_anchors, cfg.rpn.conv_dim, dt, impl)
        self.box_head = BoxHead(tuple(cfg.roi.box_head_dims), cfg.num_datasets, dt)
        self.cls_heads = OrganClassifierHeads(cfg.num_organ_heads, cfg.num_datasets,
                                              tuple(cfg.cls_head.dims), dt)
        if cfg.use_gate and cfg.num_organ_heads > 1:
            self.gate = OrganGate(cfg.num_organ_heads - 1, tuple(cfg.gate.dims), dt)
        if cfg.use_mask:
            self.mask_head = MaskHead(cfg.mask.num_convs, cfg.mask.conv_dim, dt, impl)
        if cfg.use_embedding:
            self.embed_head = EmbeddingHead(cfg.embedding.dim, cfg.embedding.hidden,
                                            cfg.embedding.num_types, cfg.embedding.temperature, dt,
                                            num_proxies=int(cfg.embedding.get("num_proxies", 0)),
                                            location=bool(cfg.embedding.get("location", False)))

    # ----------------------------------------------------------------------------------------------
    def __call__(self, batch: dict, train: bool = False,
                 experts: tuple[int, ...] | None = None) -> dict:
        if train:
            return self.train_outputs(batch)
        return self.inference_outputs(batch, experts)

    def init_all(self, image: jax.Array) -> jax.Array:
        """Creates every parameter from an image batch [B, H, W, S] without the proposal/NMS/matching
        machinery (cheap to compile); use through :func:`init_variables`."""
        cfg = self.cfg
        feat = self.backbone(image, train=False)
        self.rpn(feat)
        b = image.shape[0]
        roi = jnp.zeros((b, 1, cfg.roi.pool_size, cfg.roi.pool_size, feat.shape[-1]), feat.dtype)
        box_feat, _ = self.box_head(roi)
        self.cls_heads(roi)
        self._gate_logits(roi)
        if cfg.use_mask:
            m = cfg.mask.pool_size
            self.mask_head(jnp.zeros((b, 1, m, m, feat.shape[-1]), feat.dtype))
        if cfg.use_embedding:
            self.embed_head(box_feat, loc=jnp.zeros((b, 1, 4), jnp.float32))
        return feat

    def _anchors(self, feat_h: int, feat_w: int) -> jax.Array:
        a = self.cfg.anchors
        return ops.anchor_grid(feat_h, feat_w, a.stride, a.sizes, a.ratios)  # numpy constant

    def _gate_logits(self, roi_feats):
        if self.cfg.use_gate and self.cfg.num_organ_heads > 1:
            return self.gate(roi_feats)
        return None

    # ----------------------------------------------------------------------------------------------
    def train_outputs(self, batch: dict) -> dict:
        """Training forward with targets (``uld_jax.ops.proposals`` / ``targets``). Returns a dict
        (B samples, N anchors, S = roi.batch_per_image, P = mask.max_per_image, H heads):

        * ``rpn_logits`` [B, N], ``rpn_deltas`` / ``rpn_box_targets`` [B, N, 4]: every anchor of the
          sample's own dataset RPN; ``rpn_labels`` [B, N] (1 sampled positive, 0 sampled negative,
          -1 not sampled), ``rpn_box_mask`` [B, N] (sampled positives of original, not mined,
          boxes);
        * ``roi_boxes`` [B, S, 4], ``roi_labels`` [B, S] (1 / 0 / -1 empty slot; positives first),
          ``roi_gt_index`` [B, S], ``cls_logits`` [B, S, H] (the sample's dataset column of every
          head), ``cls_logits_all`` [B, S, H, D], ``organ_weights`` [B, S, H] (w0 = 1),
          ``gate_logits`` [B, S, H-1] (absent without a gate), ``gate_targets`` / ``gate_mask``
          [B, S, H-1], ``box_deltas`` / ``box_targets`` [B, S, 4], ``box_mask`` [B, S];
        * mask head (first P slots, i.e. positives first): ``mask_logits`` / ``mask_targets``
          [B, P, 28, 28], ``mask_valid`` [B, P] (positives of original boxes with a mask);
        * embedding head (same P slots): ``embeddings`` [B, P, E], ``type_logits`` [B, P, T],
          ``emb_valid`` [B, P], ``emb_background`` [B, P] (sampled background ROIs, with
          ``embedding.background_negatives``), ``emb_lesion_id`` [B, P] (-1 unknown), ``emb_gt_index``,
          ``emb_type`` [B, P]; with ``embedding.num_proxies`` also ``proxy_logits`` [B, P, N] and
          ``is_key_slice`` [B] (the loss derives each slot's lesion identity from them,
          ``losses.embedding_identity``);
        * ``proposals`` [B, post_nms_train, 4], ``proposal_valid``; ``dataset_id`` [B];
          ``sample_id`` [B] (batch rows sharing it are augmented views of one slice).
        """
        cfg, rc, oc = self.cfg, self.cfg.rpn, self.cfg.roi
        image = batch[Keys.IMAGE]
        b, img_h, img_w, _ = image.shape
        sizes = jnp.tile(jnp.asarray([[img_h, img_w]], jnp.float32), (b, 1))
        dataset_id = batch[Keys.DATASET_ID].astype(jnp.int32)
        feat = self.backbone(image, train=True)
        anchors = self._anchors(*feat.shape[1:3])
        logits, deltas = self.rpn(feat, dataset_id)                 # [B, N], [B, N, 4]

        gt = batch[Keys.BOXES].astype(jnp.float32)
        g = gt.shape[1]
        prov = batch.get(Keys.PROVENANCE, jnp.zeros(gt.shape[:2], jnp.int32))
        gt_valid, no_reg, ign, ign_valid = target_ops.gt_from_provenance(
            gt, batch[Keys.BOX_VALID], prov, batch.get(Keys.IGNORE_BOXES),
            batch.get(Keys.IGNORE_VALID))
        regress_ok = gt_valid & ~no_reg
        anchor_ok = self._anchor_valid(anchors, batch, b, img_h, img_w)
        k_rpn, k_roi = jax.random.split(self.make_rng("sample"))
        # Rows with the same sample id are views (augmentations) of the same slice.
        sample_id = batch.get(Keys.SAMPLE_ID, jnp.arange(b))
        out = {"dataset_id": dataset_id, "sample_id": jnp.asarray(sample_id).astype(jnp.int32)}

        # ---- RPN targets of the sample's own RPN (dense over anchors) ----
        rt = target_ops.batch_rpn_targets(
            anchors, gt, gt_valid, k_rpn, gt_no_box_regression=no_reg, ignore_boxes=ign,
            ignore_valid=ign_valid, anchor_valid=anchor_ok, positive_iou=rc.fg_iou,
            negative_iou=rc.bg_iou, num_samples=rc.batch_per_image,
            positive_fraction=rc.positive_fraction, ignore_iobb=oc.ignore_iobb,
            ignore_overrides_positive=oc.ignore_overrides_positive, weights=rc.box_weights)
        out["rpn_logits"], out["rpn_deltas"] = logits, deltas
        out["rpn_labels"] = jnp.where(rt.cls_weight > 0, rt.objectness.astype(jnp.int32), -1)
        out["rpn_box_targets"] = rt.box_targets
        out["rpn_box_mask"] = rt.box_weight > 0

        # ---- proposals (no gradient) and sampled ROIs with their targets ----
        props = proposal_ops.batch_generate_proposals(
            jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas), anchors, sizes,
            pre_nms_top_n=rc.pre_nms_train, post_nms_top_n=rc.post_nms_train,
            nms_threshold=rc.nms_iou, min_size=rc.min_size, weights=rc.box_weights,
            anchor_valid=anchor_ok)
        out["proposals"], out["proposal_valid"] = props.boxes, props.valid
        masks = batch.get(Keys.MASKS)
        mask_kw = {}
        if cfg.use_mask and masks is not None:
            mask_kw = {"gt_masks": masks, "gt_mask_valid": jnp.any(masks > 0, axis=(2, 3)),
                       "gt_mask_boxes": batch.get(Keys.MASK_BOXES),
                       "mask_size": cfg.mask.resolution}
        tt = target_ops.batch_roi_targets(
            props.boxes, props.valid, gt, gt_valid, k_roi, gt_no_box_regression=no_reg,
            ignore_boxes=ign, ignore_valid=ign_valid, positive_iou=oc.fg_iou,
            negative_iou=oc.bg_iou, num_samples=oc.batch_per_image,
            positive_fraction=oc.positive_fraction, ignore_iobb=oc.ignore_iobb,
            ignore_overrides_positive=oc.ignore_overrides_positive, weights=oc.box_weights,
            **mask_kw)
        rois, rgt = tt.rois, tt.matched_gt
        slab = jnp.where(tt.valid, tt.labels, -1)
        out["roi_boxes"], out["roi_labels"], out["roi_gt_index"] = rois, slab, rgt

        roi_feats = self._roi_align(feat, rois, oc.pool_size)        # [B, S, 7, 7, C]
        box_feat, box_deltas_all = self.box_head(roi_feats)
        out["box_deltas"] = _select_dataset(box_deltas_all, dataset_id, 2)
        out["box_targets"] = tt.box_targets
        out["box_mask"] = tt.box_weight > 0
        cls_all = self.cls_heads(roi_feats)                          # [B, S, H, D]
        out["cls_logits_all"] = cls_all
        out["cls_logits"] = _select_dataset(cls_all, dataset_id, 3)
        gl = self._gate_logits(roi_feats)
        out["organ_weights"] = organ_weights(gl, cfg.num_organ_heads, rois.shape[:2])
        if gl is not None:
            out["gate_logits"] = gl
            ot = batch.get(Keys.ORGAN_TARGET, jnp.zeros((b, g, gl.shape[-1]), jnp.float32))
            ov = batch.get(Keys.ORGAN_VALID, jnp.zeros((b, g, gl.shape[-1]), bool))
            out["gate_targets"] = _take(ot.astype(jnp.float32), rgt)
            out["gate_mask"] = _take(ov.astype(bool), rgt) & (slab == 1)[..., None]

        # ---- mask and embedding heads on the first P slots (the sampler puts positives first) ----
        p = min(cfg.mask.max_per_image, oc.batch_per_image)
        ppos = slab[:, :p] == 1
        pgt = rgt[:, :p]
        if cfg.use_mask:
            out["mask_logits"] = self.mask_head(self._roi_align(feat, rois[:, :p],
                                                                cfg.mask.pool_size))
            if mask_kw:
                out["mask_targets"] = tt.mask_targets[:, :p]
                out["mask_valid"] = (tt.mask_weight[:, :p] > 0) & _take(regress_ok, pgt)
            else:
                out["mask_targets"] = jnp.zeros_like(out["mask_logits"])
                out["mask_valid"] = jnp.zeros_like(ppos)
        if cfg.use_embedding:
            num_proxies = int(cfg.embedding.get("num_proxies", 0))
            loc = box_location(rois[:, :p], img_h, img_w)
            if num_proxies > 0:
                emb, probe, out["proxy_logits"] = self.embed_head(box_feat[:, :p], proxies=True,
                                                                  loc=loc)
            else:
                emb, probe = self.embed_head(box_feat[:, :p], loc=loc)
            out["embeddings"], out["type_logits"] = emb, probe
            out["emb_valid"] = ppos
            out["emb_background"] = (slab[:, :p] == 0) & bool(cfg.embedding.get("background_negatives", False))
            lid = batch.get(Keys.LESION_ID, -jnp.ones((b, g), jnp.int32))
            lt = batch.get(Keys.LESION_TYPE, -jnp.ones((b, g), jnp.int32))
            out["emb_lesion_id"] = _take(lid, pgt)
            out["emb_type"] = _take(lt.astype(jnp.int32), pgt)
            out["emb_gt_index"] = pgt
            if num_proxies > 0:
                out["is_key_slice"] = jnp.asarray(batch.get(Keys.IS_KEY_SLICE,
                                                            jnp.zeros((b,), bool))).astype(bool)
        return out

    def _anchor_valid(self, anchors, batch, b, img_h, img_w):
        """[B, N]: anchors inside the image (straddle) and not centred on padding.

        The static part is computed in NumPy: as an XLA constant expression it is constant-folded
        at compile time, which takes seconds for the paper's 245,760 anchors.
        """
        a = np.asarray(anchors)
        st = self.cfg.rpn.straddle
        ok = np.ones(a.shape[0], bool) if st < 0 else (
            (a[:, 0] >= -st) & (a[:, 1] >= -st) & (a[:, 2] <= img_h + st) & (a[:, 3] <= img_w + st))
        ok = jnp.asarray(ok)[None]
        if Keys.IMAGE_VALID in batch:
            cy = np.clip(((a[:, 0] + a[:, 2]) / 2).astype(np.int32), 0, img_h - 1)
            cx = np.clip(((a[:, 1] + a[:, 3]) / 2).astype(np.int32), 0, img_w - 1)
            ok = ok & jnp.asarray(batch[Keys.IMAGE_VALID], bool)[:, cy, cx]
        return jnp.broadcast_to(ok, (b, a.shape[0]))

    # ----------------------------------------------------------------------------------------------
    def inference_outputs(self, batch: dict, experts: tuple[int, ...] | None = None) -> dict:
        """Detections of every dataset expert, or of ``experts`` only (a static tuple of dataset
        indices: the other experts' proposals, NMS and ROI heads are not computed; D below is then
        ``len(experts)``, in that order). K = roi.detections_per_image, H heads:

        * ``boxes`` [B, D, K, 4] (input pixels, internal format), ``scores`` [B, D, K] (eq. 1 fused,
          in [0, 1]; 0 on padding), ``head_scores`` [B, D, K, H], ``organ_weights`` [B, D, K, H]
          (w0 = 1), ``valid`` [B, D, K] bool, sorted by score within each expert;
        * ``masks`` [B, D, K, 28, 28] mask probabilities in the box frame (with use_mask; paste
          them onto the image with ``uld_jax.ops.roi_align.paste_masks``);
        * ``embeddings`` [B, D, K, E] unit vectors (with use_embedding);
        * ``proposals`` [B, D, post_nms_test, 4], ``proposal_valid``.

        Expert d uses RPN d's proposals, box-regression column d and classification column d of
        every organ head.
        """
        cfg, rc, oc = self.cfg, self.cfg.rpn, self.cfg.roi
        image = batch[Keys.IMAGE]
        b, img_h, img_w, _ = image.shape
        sel = tuple(range(cfg.num_datasets)) if experts is None else tuple(int(e) for e in experts)
        if not sel or any(not 0 <= e < cfg.num_datasets for e in sel):
            raise ValueError(f"experts {experts}: this model has {cfg.num_datasets} dataset experts")
        d = len(sel)
        size = jnp.asarray([img_h, img_w], jnp.float32)
        feat = self.backbone(image, train=False)
        anchors = self._anchors(*feat.shape[1:3])
        anchor_ok = self._anchor_valid(anchors, batch, b, img_h, img_w)
        logits_all, deltas_all = self.rpn(feat)                     # [B, D_all, N], [B, D_all, N, 4]
        if experts is not None:
            idx = jnp.asarray(sel)
            logits_all, deltas_all = logits_all[:, idx], deltas_all[:, idx]
        prop_fn = lambda l, dl, av: proposal_ops.generate_proposals(  # noqa: E731
            l, dl, anchors, size, pre_nms_top_n=rc.pre_nms_test, post_nms_top_n=rc.post_nms_test,
            nms_threshold=rc.nms_iou, min_size=rc.min_size, weights=rc.box_weights,
            anchor_valid=av)
        props = jax.vmap(jax.vmap(prop_fn, in_axes=(0, 0, None)))(logits_all, deltas_all, anchor_ok)
        pboxes, pvalid = props.boxes, props.valid                   # [B, D, P, 4], [B, D, P]
        n_p = pboxes.shape[2]
        roi_feats = self._roi_align(feat, pboxes.reshape(b, d * n_p, 4), oc.pool_size)
        roi_feats = roi_feats.reshape(b, d, n_p, *roi_feats.shape[2:])
        box_feat, box_deltas_all = self.box_head(roi_feats)          # [B, D, P, F], [B, D, P, D_all, 4]
        eye = jnp.eye(cfg.num_datasets, dtype=jnp.float32)[jnp.asarray(sel)]   # [D, D_all]
        box_deltas = jnp.einsum("bepdk,ed->bepk", box_deltas_all, eye)
        cls_all = self.cls_heads(roi_feats)                          # [B, D, P, H, D]
        head_scores = jax.nn.sigmoid(jnp.einsum("bephd,ed->beph", cls_all, eye))
        w = organ_weights(self._gate_logits(roi_feats), cfg.num_organ_heads, pboxes.shape[:3])
        fused = fuse_scores(head_scores, w)                          # [B, D, P]
        k = oc.detections_per_image
        det_fn = lambda r, dl, sc, v: detection_ops.postprocess_detections(  # noqa: E731
            r, dl, sc, size, roi_valid=v, weights=oc.box_weights,
            score_threshold=oc.test_score_threshold, nms_threshold=oc.test_nms_iou,
            max_detections=k, min_size=rc.min_size)
        det = jax.vmap(jax.vmap(det_fn))(pboxes, box_deltas, fused, pvalid)
        g = lambda x: jax.vmap(jax.vmap(lambda a, i: a[i]))(x, det.roi_index)  # noqa: E731
        out = {
            "boxes": det.boxes, "scores": det.scores, "head_scores": g(head_scores),
            "organ_weights": g(w), "valid": det.valid,
            "proposals": pboxes, "proposal_valid": pvalid,
        }
        if cfg.use_mask:
            mf = self._roi_align(feat, det.boxes.reshape(b, d * k, 4), cfg.mask.pool_size)
            m = jax.nn.sigmoid(self.mask_head(mf))
            out["masks"] = m.reshape(b, d, k, *m.shape[2:])
        if cfg.use_embedding:
            emb, _ = self.embed_head(g(box_feat), loc=box_location(g(pboxes), img_h, img_w))
            out["embeddings"] = emb
        return out

    # ----------------------------------------------------------------------------------------------
    def _roi_align(self, feat: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
        """feat [B, h, w, C], boxes [B, R, 4] (input pixels) -> [B, R, size, size, C]."""
        return jax.vmap(lambda f, bx: ops.roi_align(f, bx, size, self.cfg.anchors.stride,
                                                    self.cfg.roi.sampling_ratio))(feat, boxes)


def init_variables(model: MELD, seed: int = 0, batch_size: int = 1) -> dict:
    """Variables ({'params', 'batch_stats'}) of ``model`` for its configured square input size.

    Initialisation draws from an ``rbg`` PRNG key made from ``seed``: XLA compiles the hundreds of
    initialiser draws of the default threefry key 5x slower on CPU (tens of seconds for the tiny
    model), for no benefit to initial weights.
    """
    cfg = model.cfg
    image = jnp.zeros((batch_size, cfg.image_size, cfg.image_size, cfg.num_slices), jnp.float32)
    key = jax.random.key(seed, impl="rbg")
    return jax.jit(lambda k: model.init({"params": k}, image, method=MELD.init_all))(key)
