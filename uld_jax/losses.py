"""MELD losses, computed from the training outputs of ``MELD.train_outputs`` (targets included).

Every term is a per-sample value ``[B]`` first, so that the total is a batch mean and the logged
per-dataset values are means over that dataset's samples. Terms and their choices:

* ``rpn_cls`` / ``rpn_box``: the sample's own dataset RPN only (the model selects it), BCE over the
  sampled anchors and smooth-L1 (beta 1/9) over positive anchors of *original* boxes, both divided by
  the number of sampled anchors (maskrcnn-benchmark).
* ``roi_cls``: ``L = sum_i w_i L_i`` (MELD): ``L_i`` is the BCE of organ head i's output column of the
  sample's dataset, averaged over the sampled ROIs; ``w_0 = 1``, ``w_1..3`` the gate's weights.
  The weights are **stop-gradient** (``gate.stop_gradient_weights``): otherwise the cheapest way to
  lower L is to drive every ``w_i`` to 0, and the paper trains the gate with its own organ targets.
* ``roi_box``: smooth-L1 (beta 1) x ``roi.box_loss_weight`` (10, MULAN) on positives matched to
  original boxes; mined positives (``Provenance.MINED``) train classification only.
* ``gate``: BCE of the gate logits on soft or hard organ targets, masked where unknown, averaged over
  the known (ROI, organ) entries.
* ``mask``: per-pixel BCE of the 28x28 mask logits on the matched box's (weak or real) mask, over
  positive ROIs whose box has a non-empty mask.
* ``embedding``: supervised-contrastive loss (Khosla et al. 2020) over the positive-ROI embeddings of
  the whole batch: two embeddings are a positive pair when they come from the same lesion (same box
  of the same slice -- different ROIs of one lesion, and two augmented views of one slice (batch
  rows with the same ``sample_id``) -- or the same known ``lesion_id`` across samples/studies); plus a cross-entropy type probe on the coarse lesion type
  where known. Rows without a positive partner contribute nothing. Sampled background ROIs
  (``emb_background``, model.embedding.background_negatives) join every lesion row's denominator as
  negatives, never as anchors or positives: lesions are pushed away from non-lesion regions.
  With ``embedding.num_proxies`` > 0, a lesion-identity term (``embedding.proxy_weight``): the
  cross-entropy of the ROI's cosine logits against a learnt proxy per lesion identity
  (:func:`embedding_identity`: the known ``lesion_id``, else the annotation of a key slice).
  Within a batch, the supervised-contrastive positives above only ever pair a lesion with itself on
  the same image; the proxies carry a lesion's identity across steps, so the views of one
  annotation seen in different epochs -- other slices near the key slice (``data.z_jitter``), other
  augmentations --
  are pulled together and other lesions pushed apart. That is what MAM measures: an unmarked
  cross-section of an annotated lesion, on another slice, near its annotation. With
  ``background_negatives`` the sampled background ROIs are classified to a proxy of their own (row
  0), away from every lesion's.

Every normaliser is ``max(count, 1)``, so slices without lesions give finite (negative-only) losses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from uld_jax.core import DATASETS, ORGAN_HEADS


def _smooth_l1(x: jax.Array, beta: float) -> jax.Array:
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def _masked_mean(v: jax.Array, m: jax.Array, axis) -> jax.Array:
    m = m.astype(v.dtype)
    return jnp.sum(v * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def rpn_cls_terms(out: dict) -> jax.Array:
    """[B, N] each anchor's objectness cross-entropy against its label (1: positive, else 0); the
    RPN's classification loss is their mean over the sampled anchors."""
    return optax.sigmoid_binary_cross_entropy(out["rpn_logits"],
                                              (out["rpn_labels"] == 1).astype(jnp.float32))


def roi_cls_terms(out: dict, cfg: Any) -> tuple[jax.Array, jax.Array]:
    """Each ROI's classification cross-entropy against its label (1: positive, else 0): per head
    [B, S, H], and summed with the organ weights [B, S] (``gate.stop_gradient_weights``: no
    gradient into the weights); the ROI classification losses are their means over the sampled
    ROIs."""
    tgt = (out["roi_labels"] == 1).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(out["cls_logits"], tgt[..., None])   # [B, S, H]
    w = out["organ_weights"]                                                      # [B, S, H]
    if cfg.gate.stop_gradient_weights:
        w = jax.lax.stop_gradient(w)
    return bce, jnp.sum(w * bce, axis=-1)


def rpn_losses(out: dict, cfg: Any) -> dict[str, jax.Array]:
    """Per-sample RPN losses [B]: 'rpn_cls', 'rpn_box'."""
    lab = out["rpn_labels"]
    sampled = lab >= 0
    bce = rpn_cls_terms(out)
    n = jnp.maximum(jnp.sum(sampled, axis=1), 1).astype(jnp.float32)
    cls = jnp.sum(jnp.where(sampled, bce, 0.0), axis=1) / n
    l1 = jnp.sum(_smooth_l1(out["rpn_deltas"] - out["rpn_box_targets"], cfg.rpn.smooth_l1_beta), -1)
    box = jnp.sum(jnp.where(out["rpn_box_mask"], l1, 0.0), axis=1) / n
    return {"rpn_cls": cls, "rpn_box": box}


def roi_losses(out: dict, cfg: Any) -> dict[str, jax.Array]:
    """Per-sample ROI losses [B]: 'roi_cls' (sum_i w_i L_i), 'roi_cls/<head>' (L_i), 'roi_box',
    and 'gate' when the model has a gate."""
    sampled = out["roi_labels"] >= 0
    logits = out["cls_logits"]                                     # [B, S, H]
    bce, per_roi = roi_cls_terms(out, cfg)
    per_head = _masked_mean(bce, sampled[..., None], axis=1)       # [B, H]
    weighted = _masked_mean(per_roi, sampled, axis=1)
    n = jnp.maximum(jnp.sum(sampled, axis=1), 1).astype(jnp.float32)
    l1 = jnp.sum(_smooth_l1(out["box_deltas"] - out["box_targets"], cfg.roi.smooth_l1_beta), -1)
    box = cfg.roi.box_loss_weight * jnp.sum(jnp.where(out["box_mask"], l1, 0.0), axis=1) / n
    res = {"roi_cls": weighted, "roi_box": box}
    names = ORGAN_HEADS if logits.shape[-1] == len(ORGAN_HEADS) else [f"head{i}" for i in
                                                                     range(logits.shape[-1])]
    for i, name in enumerate(names):
        res[f"roi_cls/{name}"] = per_head[:, i]
    if "gate_logits" in out:
        gb = optax.sigmoid_binary_cross_entropy(out["gate_logits"], out["gate_targets"])
        res["gate"] = _masked_mean(gb, out["gate_mask"], axis=(1, 2))
    return res


def mask_loss(out: dict) -> jax.Array:
    """Per-sample mask BCE [B] over valid positive ROIs (mean over their 28x28 pixels)."""
    bce = optax.sigmoid_binary_cross_entropy(out["mask_logits"], out["mask_targets"]).mean((-1, -2))
    return _masked_mean(bce, out["mask_valid"], axis=1)


_HASH_MUL = 0x9E3779B1    # odd 32-bit multiplier of the identity hash (Knuth's golden ratio)


def embedding_identity(lesion_id, dataset_id, sample_id, gt_index, is_key_slice,
                       num_proxies: int) -> jax.Array:
    """[B, P] int32 row of each embedding slot's lesion identity in a ``num_proxies`` proxy table
    (rows 1 .. num_proxies - 1; row 0 is kept for the background), or -1 where the slot has none.

    ``lesion_id`` [B, P] (-1 unknown), ``gt_index`` [B, P] (the slot's box in its sample),
    ``dataset_id`` / ``sample_id`` / ``is_key_slice`` [B]. A known ``lesion_id`` is the identity
    (the same lesion across studies shares it); otherwise a key slice's annotation is its own
    identity, keyed by (dataset, sample row, box). Slots of non-key slices without a lesion id
    (single-type datasets' per-slice boxes, which would split one lesion into many identities,
    and mined positives) have none. Keys are hashed into the table (32-bit multiplicative hash, the
    two kinds of key in disjoint halves of the key space). Two identities sharing a row are pulled
    together; k lesions in n rows leave about k / n of them sharing one. MAM compares lesions only
    within a patient, where a shared row is about (patient's lesions) / n likely, so a table a few
    times the number of annotated lesions is enough (``embedding.num_proxies``).
    """
    lid = jnp.asarray(lesion_id).astype(jnp.int32)
    b = lid.shape[0]
    ds = jnp.broadcast_to(jnp.asarray(dataset_id).astype(jnp.uint32)[:, None], lid.shape)
    sid = jnp.broadcast_to(jnp.asarray(sample_id).astype(jnp.uint32)[:, None], lid.shape)
    key = jnp.broadcast_to(jnp.asarray(is_key_slice).astype(bool).reshape(b, 1), lid.shape)
    gt = jnp.asarray(gt_index).astype(jnp.uint32)
    ann = (((ds << 24) ^ (sid << 6) ^ gt) | jnp.uint32(0x80000000))
    known = lid >= 0
    k = jnp.where(known, lid.astype(jnp.uint32) & jnp.uint32(0x7FFFFFFF), ann)
    h = k * jnp.uint32(_HASH_MUL)
    h = h ^ (h >> 15)
    # row 0 is the background proxy (losses.embedding_loss with emb_background)
    row = (h % jnp.uint32(num_proxies - 1)).astype(jnp.int32) + 1
    ok = known | (key & (jnp.asarray(sample_id).reshape(b, 1) >= 0))
    return jnp.where(ok, row, -1)


def embedding_loss(out: dict, cfg: Any) -> jax.Array:
    """Per-sample embedding loss [B]: supervised contrastive on lesion identity + type probe CE."""
    e = out["embeddings"]                                          # [B, P, E]
    b, p, _ = e.shape
    v = out["emb_valid"].reshape(-1)
    z = e.reshape(b * p, -1)
    # same box of the same slice: the same batch row, or another row with the same sample id (two
    # augmented views of one slice keep their box order)
    sid = out.get("sample_id", jnp.arange(b))
    sample = jnp.repeat(jnp.asarray(sid), p)
    gt = out["emb_gt_index"].reshape(-1)
    lid = out["emb_lesion_id"].reshape(-1)
    same = ((sample[:, None] == sample[None, :]) & (gt[:, None] == gt[None, :])) | (
        (lid[:, None] == lid[None, :]) & (lid[:, None] >= 0))
    eye = jnp.eye(b * p, dtype=bool)
    bg = out.get("emb_background")
    member = v if bg is None else v | bg.reshape(-1)
    pair_ok = member[:, None] & member[None, :] & ~eye
    pos = same & v[:, None] & v[None, :] & ~eye
    sim = (z @ z.T) / cfg.embedding.temperature
    sim = jnp.where(pair_ok, sim, -1e9)
    log_prob = sim - jax.nn.logsumexp(sim, axis=1, keepdims=True)
    n_pos = jnp.sum(pos, axis=1)
    supcon = -jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / jnp.maximum(n_pos, 1)
    row_ok = v & (n_pos > 0)
    supcon = _masked_mean(supcon.reshape(b, p), row_ok.reshape(b, p), axis=1)
    t = out["emb_type"]
    t_ok = out["emb_valid"] & (t >= 0) & (t < out["type_logits"].shape[-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(out["type_logits"], jnp.maximum(t, 0))
    total = supcon + _masked_mean(ce, t_ok, axis=1)
    if "proxy_logits" in out:
        ident = embedding_identity(out["emb_lesion_id"], out["dataset_id"], out["sample_id"],
                                   out["emb_gt_index"], out["is_key_slice"],
                                   out["proxy_logits"].shape[-1])
        i_ok = out["emb_valid"] & (ident >= 0)
        if bg is not None:                       # background ROIs: the background proxy, row 0
            ident = jnp.where(bg, 0, ident)
            i_ok = i_ok | bg
        pce = optax.softmax_cross_entropy_with_integer_labels(out["proxy_logits"],
                                                              jnp.maximum(ident, 0))
        total = total + cfg.embedding.get("proxy_weight", 1.0) * _masked_mean(pce, i_ok, axis=1)
    return total


def meld_loss(out: dict, batch: dict | None, cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total MELD loss and a dict of named scalars for logging.

    ``out``: ``MELD.train_outputs``; ``batch`` is unused (the targets travel in ``out``) but kept in
    the signature for losses that need raw batch fields. Returns ``(total, logs)``; ``logs`` holds
    every term's batch mean (``'rpn_cls'``, ``'roi_box'``, ``'roi_cls/lung'``, ...), the same per
    dataset (``'rpn_cls/luna16'``, NaN-free: 0 where a dataset has no sample in the batch) and
    ``'total'``.
    """
    del batch
    w = cfg.loss_weights
    terms = {**rpn_losses(out, cfg), **roi_losses(out, cfg)}
    if "mask_logits" in out:
        terms["mask"] = mask_loss(out)
    if "embeddings" in out:
        terms["embedding"] = embedding_loss(out, cfg)
    weights = {"rpn_cls": w.rpn_cls, "rpn_box": w.rpn_box, "roi_cls": w.roi_cls,
               "roi_box": w.roi_box, "gate": w.gate, "mask": w.mask, "embedding": w.embedding}
    per_sample = sum(weights[k] * v for k, v in terms.items() if k in weights)
    total = jnp.mean(per_sample)
    logs = {k: jnp.mean(v) for k, v in terms.items()}
    d = cfg.num_datasets
    oh = jax.nn.one_hot(out["dataset_id"], d)                      # [B, D]
    cnt = jnp.maximum(oh.sum(0), 1.0)
    names = DATASETS if d == len(DATASETS) else [f"dataset{i}" for i in range(d)]
    for k in ("rpn_cls", "rpn_box", "roi_cls", "roi_box"):
        per_d = (terms[k][:, None] * oh).sum(0) / cnt
        for i, name in enumerate(names):
            logs[f"{k}/{name}"] = per_d[i]
    logs["total"] = total
    return total, logs
