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
optional MASKS [B, G, H, W], LESION_TYPE [B, G], LESION_ID [B, G], ORGAN_TARGET / ORGAN_VALID
[B, G, 3], IGNORE_BOXES [B, R, 4] / IGNORE_VALID [B, R]. Inference: IMAGE only.

Shapes are static: every variable-length set is a fixed-size array with a validity mask; no host
synchronisation happens inside (no boolean indexing, no Python branching on values).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uld_jax.core import Keys, Provenance
from uld_jax.models import detops as ops
from uld_jax.models.fpn import DenseNetFPN
from uld_jax.models.roi_heads import (BoxHead, EmbeddingHead, MaskHead, OrganClassifierHeads,
                                      OrganGate, fuse_scores, organ_weights)
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
        self.backbone = DenseNetFPN(cfg, dt)
        self.rpn = DatasetRPN(cfg.num_datasets, self.num_anchors, cfg.rpn.conv_dim, dt)
        self.box_head = BoxHead(tuple(cfg.roi.box_head_dims), cfg.num_datasets, dt)
        self.cls_heads = OrganClassifierHeads(cfg.num_organ_heads, cfg.num_datasets,
                                              tuple(cfg.cls_head.dims), dt)
        if cfg.use_gate and cfg.num_organ_heads > 1:
            self.gate = OrganGate(cfg.num_organ_heads - 1, tuple(cfg.gate.dims), dt)
        if cfg.use_mask:
            self.mask_head = MaskHead(cfg.mask.num_convs, cfg.mask.conv_dim, dt)
        if cfg.use_embedding:
            self.embed_head = EmbeddingHead(cfg.embedding.dim, cfg.embedding.hidden,
                                            cfg.embedding.num_types, cfg.embedding.temperature, dt)

    # ----------------------------------------------------------------------------------------------
    def __call__(self, batch: dict, train: bool = False) -> dict:
        if train:
            return self.train_outputs(batch)
        return self.inference_outputs(batch)

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
            self.embed_head(box_feat)
        return feat

    def _anchors(self, feat_h: int, feat_w: int) -> jax.Array:
        a = self.cfg.anchors
        return ops.anchor_grid(feat_h, feat_w, a.stride, a.sizes, a.ratios)

    def _gate_logits(self, roi_feats):
        if self.cfg.use_gate and self.cfg.num_organ_heads > 1:
            return self.gate(roi_feats)
        return None

    def _proposals(self, logits, deltas, anchors, img_h, img_w, pre_n, post_n):
        """One image, one RPN: logits [N], deltas [N, 4] -> (boxes [post_n, 4], valid [post_n])."""
        rc = self.cfg.rpn
        idx, ok = ops.top_k(logits, pre_n)
        top = logits[idx]
        boxes = ops.clip_boxes(ops.decode(deltas[idx], anchors[idx], rc.box_weights), img_h, img_w)
        hw = boxes[:, 2:] - boxes[:, :2]
        ok = ok & jnp.all(hw >= rc.min_size, axis=-1)
        keep, kvalid = ops.nms(boxes, top, ok, rc.nms_iou, post_n)
        return boxes[keep], kvalid

    # ----------------------------------------------------------------------------------------------
    def train_outputs(self, batch: dict) -> dict:
        """Training forward with targets. Returns a dict (B samples, n = rpn.batch_per_image,
        S = roi.batch_per_image, P = mask.max_per_image, H heads):

        * ``rpn_logits`` [B, n], ``rpn_labels`` [B, n] (1 pos, 0 neg, -1 not sampled),
          ``rpn_deltas`` / ``rpn_box_targets`` [B, n, 4], ``rpn_box_mask`` [B, n]: sampled anchors of
          the sample's own dataset RPN;
        * ``roi_boxes`` [B, S, 4], ``roi_labels`` [B, S], ``roi_gt_index`` [B, S],
          ``cls_logits`` [B, S, H] (the sample's dataset column of every head),
          ``cls_logits_all`` [B, S, H, D], ``organ_weights`` [B, S, H] (w0 = 1),
          ``gate_logits`` [B, S, H-1] (absent without a gate), ``gate_targets`` / ``gate_mask``
          [B, S, H-1], ``box_deltas`` / ``box_targets`` [B, S, 4], ``box_mask`` [B, S] (positives
          of original, not mined, boxes);
        * mask head: ``mask_logits`` / ``mask_targets`` [B, P, 28, 28], ``mask_valid`` [B, P];
        * embedding head: ``embeddings`` [B, P, E], ``type_logits`` [B, P, T], ``emb_valid`` [B, P],
          ``emb_lesion_id`` [B, P] (-1 unknown), ``emb_gt_index`` [B, P], ``emb_type`` [B, P];
        * ``proposals`` [B, post_nms_train, 4], ``proposal_valid``; ``dataset_id`` [B].
        """
        cfg = self.cfg
        image = batch[Keys.IMAGE]
        b, img_h, img_w, _ = image.shape
        dataset_id = batch[Keys.DATASET_ID].astype(jnp.int32)
        feat = self.backbone(image, train=True)
        fh, fw = feat.shape[1:3]
        anchors = self._anchors(fh, fw)

        logits_all, deltas_all = self.rpn(feat)
        logits = _select_dataset(logits_all, dataset_id, 1)          # [B, N]
        deltas = _select_dataset(deltas_all, dataset_id, 1)          # [B, N, 4]

        gt = batch[Keys.BOXES].astype(jnp.float32)
        g = gt.shape[1]
        prov = batch.get(Keys.PROVENANCE, jnp.zeros(gt.shape[:2], jnp.int32))
        box_valid = batch[Keys.BOX_VALID].astype(bool)
        gt_valid = box_valid & (prov != Provenance.IGNORE)
        regress_ok = gt_valid & (prov == Provenance.ORIGINAL)
        ign = batch.get(Keys.IGNORE_BOXES, jnp.zeros((b, 0, 4), jnp.float32)).astype(jnp.float32)
        ign_valid = batch.get(Keys.IGNORE_VALID, jnp.zeros(ign.shape[:2], bool)).astype(bool)
        ign = jnp.concatenate([ign, gt], axis=1)
        ign_valid = jnp.concatenate([ign_valid, box_valid & (prov == Provenance.IGNORE)], axis=1)

        out = {"dataset_id": dataset_id}
        k_rpn, k_roi = jax.random.split(self.make_rng("sample"))

        # ---- RPN targets (the sample's own RPN) ----
        rc = cfg.rpn
        inside = ops.anchors_inside(anchors, img_h, img_w, rc.straddle)[None]  # [1, N]
        if Keys.IMAGE_VALID in batch:
            # anchors centred on padding (outside the scan) are neither positive nor negative
            cy = jnp.clip(((anchors[:, 0] + anchors[:, 2]) / 2).astype(jnp.int32), 0, img_h - 1)
            cx = jnp.clip(((anchors[:, 1] + anchors[:, 3]) / 2).astype(jnp.int32), 0, img_w - 1)
            inside = inside & batch[Keys.IMAGE_VALID].astype(bool)[:, cy, cx]
        inside = jnp.broadcast_to(inside, (b, anchors.shape[0]))
        labels, midx = jax.vmap(
            lambda gb, gv, ib, iv, av: ops.match(anchors, gb, gv, ib, iv, rc.fg_iou, rc.bg_iou, True,
                                                 cfg.roi.ignore_iobb, av))(
            gt, gt_valid, ign, ign_valid, inside)
        sidx, slab = jax.vmap(lambda k, l: ops.sample(k, l, rc.batch_per_image, rc.positive_fraction))(
            jax.random.split(k_rpn, b), labels)
        s_anchor = anchors[sidx]                                     # [B, n, 4]
        s_gt = _take(midx, sidx)                                     # [B, n]
        out["rpn_logits"] = _take(logits, sidx)
        out["rpn_labels"] = slab
        out["rpn_deltas"] = _take(deltas, sidx)
        out["rpn_box_targets"] = ops.encode(_take(gt, s_gt), s_anchor, rc.box_weights)
        out["rpn_box_mask"] = (slab == 1) & _take(regress_ok, s_gt)

        # ---- proposals (no gradient), plus the ground truth ----
        props, pvalid = jax.vmap(
            lambda l, d: self._proposals(l, d, anchors, img_h, img_w, rc.pre_nms_train,
                                         rc.post_nms_train))(
            jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas))
        out["proposals"], out["proposal_valid"] = props, pvalid
        cand = jnp.concatenate([props, gt], axis=1)
        cvalid = jnp.concatenate([pvalid, gt_valid], axis=1)

        # ---- ROI sampling with targets ----
        oc = cfg.roi
        rlab, ridx = jax.vmap(
            lambda c, cv, gb, gv, ib, iv: ops.match(c, gb, gv, ib, iv, oc.fg_iou, oc.bg_iou, False,
                                                    oc.ignore_iobb, cv))(
            cand, cvalid, gt, gt_valid, ign, ign_valid)
        sidx, slab = jax.vmap(lambda k, l: ops.sample(k, l, oc.batch_per_image, oc.positive_fraction))(
            jax.random.split(k_roi, b), rlab)
        rois = jax.lax.stop_gradient(_take(cand, sidx))              # [B, S, 4]
        rgt = _take(ridx, sidx)                                      # [B, S]
        out["roi_boxes"], out["roi_labels"], out["roi_gt_index"] = rois, slab, rgt

        roi_feats = self._roi_align(feat, rois, oc.pool_size)        # [B, S, 7, 7, C]
        box_feat, box_deltas_all = self.box_head(roi_feats)
        out["box_deltas"] = _select_dataset(box_deltas_all, dataset_id, 2)
        out["box_targets"] = ops.encode(_take(gt, rgt), rois, oc.box_weights)
        out["box_mask"] = (slab == 1) & _take(regress_ok, rgt)
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

        # ---- positive ROIs for the mask and embedding heads (fixed P, positives first) ----
        if cfg.use_mask or cfg.use_embedding:
            p = min(cfg.mask.max_per_image, oc.batch_per_image)
            s = slab.shape[1]
            prio = jnp.where(slab == 1, 2 * s - jnp.arange(s), s - jnp.arange(s))
            _, pidx = jax.lax.top_k(prio, p)                         # [B, P]
            ppos = _take(slab, pidx) == 1
            pbox = _take(rois, pidx)
            pgt = _take(rgt, pidx)
            if cfg.use_mask:
                mfeat = self._roi_align(feat, pbox, cfg.mask.pool_size)
                out["mask_logits"] = self.mask_head(mfeat)
                if Keys.MASKS in batch:
                    tgt, has = self._mask_targets(batch[Keys.MASKS], pbox, pgt)
                    out["mask_targets"] = tgt
                    out["mask_valid"] = ppos & has & _take(regress_ok, pgt)
                else:
                    out["mask_targets"] = jnp.zeros_like(out["mask_logits"])
                    out["mask_valid"] = jnp.zeros_like(ppos)
            if cfg.use_embedding:
                emb, probe = self.embed_head(_take(box_feat, pidx))
                out["embeddings"], out["type_logits"] = emb, probe
                out["emb_valid"] = ppos & _take(gt_valid, pgt)
                lid = batch.get(Keys.LESION_ID, -jnp.ones((b, g), jnp.int32))
                lt = batch.get(Keys.LESION_TYPE, -jnp.ones((b, g), jnp.int32))
                out["emb_lesion_id"] = _take(lid, pgt)
                out["emb_type"] = _take(lt.astype(jnp.int32), pgt)
                out["emb_gt_index"] = pgt
        return out

    # ----------------------------------------------------------------------------------------------
    def inference_outputs(self, batch: dict) -> dict:
        """Detections of every dataset expert (D experts, K = roi.detections_per_image, H heads):

        * ``boxes`` [B, D, K, 4] (input pixels, internal format), ``scores`` [B, D, K] (eq. 1 fused,
          in [0, 1]), ``head_scores`` [B, D, K, H], ``organ_weights`` [B, D, K, H] (w0 = 1),
          ``valid`` [B, D, K] bool (False on padding), sorted by score within each expert;
        * ``masks`` [B, D, K, 28, 28] mask probabilities in the box frame (with use_mask);
        * ``embeddings`` [B, D, K, E] unit vectors (with use_embedding);
        * ``proposals`` [B, D, post_nms_test, 4], ``proposal_valid``.
        """
        cfg, rc, oc = self.cfg, self.cfg.rpn, self.cfg.roi
        image = batch[Keys.IMAGE]
        b, img_h, img_w, _ = image.shape
        d = cfg.num_datasets
        feat = self.backbone(image, train=False)
        anchors = self._anchors(*feat.shape[1:3])
        logits_all, deltas_all = self.rpn(feat)                     # [B, D, N], [B, D, N, 4]
        prop_fn = lambda l, dl: self._proposals(l, dl, anchors, img_h, img_w, rc.pre_nms_test,  # noqa
                                                rc.post_nms_test)
        props, pvalid = jax.vmap(jax.vmap(prop_fn))(logits_all, deltas_all)  # [B, D, P, 4]
        n_p = props.shape[2]
        roi_feats = self._roi_align(feat, props.reshape(b, d * n_p, 4), oc.pool_size)
        roi_feats = roi_feats.reshape(b, d, n_p, *roi_feats.shape[2:])
        box_feat, box_deltas_all = self.box_head(roi_feats)          # [B, D, P, F], [B, D, P, D, 4]
        eye = jnp.eye(d, dtype=jnp.float32)
        # expert e uses its own proposals and its own output column e
        box_deltas = jnp.einsum("bepdk,ed->bepk", box_deltas_all, eye)
        cls_all = self.cls_heads(roi_feats)                          # [B, D, P, H, D]
        head_scores = jax.nn.sigmoid(jnp.einsum("bephd,ed->beph", cls_all, eye))
        w = organ_weights(self._gate_logits(roi_feats), cfg.num_organ_heads, props.shape[:3])
        fused = fuse_scores(head_scores, w)                          # [B, D, P]
        boxes = ops.clip_boxes(ops.decode(box_deltas, props, oc.box_weights), img_h, img_w)
        ok = pvalid & (fused > oc.test_score_threshold)
        k = oc.detections_per_image
        keep, kvalid = jax.vmap(jax.vmap(
            lambda bx, sc, v: ops.nms(bx, sc, v, oc.test_nms_iou, k)))(boxes, fused, ok)
        g = lambda x: jax.vmap(jax.vmap(lambda a, i: a[i]))(x, keep)  # noqa: E731
        out = {
            "boxes": g(boxes), "scores": jnp.where(kvalid, g(fused), 0.0),
            "head_scores": g(head_scores), "organ_weights": g(w), "valid": kvalid,
            "proposals": props, "proposal_valid": pvalid,
        }
        if cfg.use_mask:
            mf = self._roi_align(feat, out["boxes"].reshape(b, d * k, 4), cfg.mask.pool_size)
            m = jax.nn.sigmoid(self.mask_head(mf))
            out["masks"] = m.reshape(b, d, k, *m.shape[2:])
        if cfg.use_embedding:
            emb, _ = self.embed_head(g(box_feat))
            out["embeddings"] = emb
        return out

    # ----------------------------------------------------------------------------------------------
    def _roi_align(self, feat: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
        """feat [B, h, w, C], boxes [B, R, 4] (input pixels) -> [B, R, size, size, C]."""
        return jax.vmap(lambda f, bx: ops.roi_align(f, bx, size, self.cfg.anchors.stride,
                                                    self.cfg.roi.sampling_ratio))(feat, boxes)

    def _mask_targets(self, masks: jax.Array, boxes: jax.Array, gt_idx: jax.Array):
        """Binary targets [B, P, 28, 28] of the matched GT masks resampled into the ROI boxes, and
        whether that GT has a (non-empty) mask [B, P]."""
        res = self.cfg.mask.resolution
        has = jnp.any(masks > 0, axis=(2, 3))                        # [B, G]

        one = lambda m, bx, gi: ops.crop_masks(m, bx, gi, res)  # noqa: E731
        tgt = jax.vmap(one)(masks, boxes, gt_idx)
        return (tgt >= 0.5).astype(jnp.float32), _take(has, gt_idx)


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
