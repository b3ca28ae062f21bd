"""MELD losses on hand-built outputs, against plain-numpy references and worked cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uld_jax import losses
from uld_jax.models.config import model_config


def _bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _sl1(x, beta):
    a = np.abs(x)
    return np.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def _outputs(seed=0, b=2, n=6, s=5, h=4, p=3, e=8, mined_row=True):
    rng = np.random.default_rng(seed)
    out = {
        "dataset_id": np.array([0, 1][:b], np.int32),
        "rpn_logits": rng.normal(size=(b, n)).astype(np.float32),
        "rpn_labels": np.array([[1, 0, 0, -1, 1, 0], [0, 0, -1, -1, -1, -1]][:b], np.int32),
        "rpn_deltas": rng.normal(size=(b, n, 4)).astype(np.float32),
        "rpn_box_targets": rng.normal(size=(b, n, 4)).astype(np.float32),
        "roi_labels": np.array([[1, 1, 0, 0, -1], [0, 0, 0, -1, -1]][:b], np.int32),
        "cls_logits": rng.normal(size=(b, s, h)).astype(np.float32),
        "organ_weights": np.concatenate([np.ones((b, s, 1)), rng.uniform(size=(b, s, h - 1))],
                                        -1).astype(np.float32),
        "box_deltas": rng.normal(size=(b, s, 4)).astype(np.float32),
        "box_targets": rng.normal(size=(b, s, 4)).astype(np.float32),
        "gate_logits": rng.normal(size=(b, s, h - 1)).astype(np.float32),
        "gate_targets": rng.uniform(size=(b, s, h - 1)).astype(np.float32),
        "gate_mask": rng.uniform(size=(b, s, h - 1)) < 0.5,
        "mask_logits": rng.normal(size=(b, p, 28, 28)).astype(np.float32),
        "mask_targets": (rng.uniform(size=(b, p, 28, 28)) < 0.5).astype(np.float32),
        "mask_valid": np.array([[True, False, True], [False, False, False]][:b]),
        "embeddings": rng.normal(size=(b, p, e)).astype(np.float32),
        "type_logits": rng.normal(size=(b, p, 9)).astype(np.float32),
        "emb_valid": np.array([[True, True, False], [True, False, False]][:b]),
        "emb_lesion_id": np.array([[5, -1, -1], [5, -1, -1]][:b], np.int32),
        "emb_gt_index": np.array([[0, 0, 1], [0, 0, 0]][:b], np.int32),
        "emb_type": np.array([[3, 3, -1], [-1, -1, -1]][:b], np.int32),
    }
    out["embeddings"] /= np.linalg.norm(out["embeddings"], axis=-1, keepdims=True)
    # positives' box regression: row 1 of sample 0 is a mined positive (mask False)
    out["rpn_box_mask"] = out["rpn_labels"] == 1
    out["box_mask"] = out["roi_labels"] == 1
    if mined_row:
        out["box_mask"][0, 1] = False
    return out


def test_rpn_losses_match_numpy():
    cfg = model_config("tiny")
    o = _outputs()
    got = losses.rpn_losses(o, cfg)
    lab = o["rpn_labels"]
    for i in range(2):
        smp = lab[i] >= 0
        n = max(smp.sum(), 1)
        cls = _bce(o["rpn_logits"][i], (lab[i] == 1).astype(float))[smp].sum() / n
        box = _sl1(o["rpn_deltas"][i] - o["rpn_box_targets"][i], 1 / 9).sum(-1)[lab[i] == 1].sum() / n
        np.testing.assert_allclose(got["rpn_cls"][i], cls, rtol=1e-5)
        np.testing.assert_allclose(got["rpn_box"][i], box, rtol=1e-5, atol=1e-7)


def test_roi_cls_is_gated_sum_with_stop_gradient():
    cfg = model_config("tiny")
    o = _outputs()
    got = losses.roi_losses(o, cfg)
    lab = o["roi_labels"]
    for i in range(2):
        smp = lab[i] >= 0
        bce = _bce(o["cls_logits"][i], (lab[i] == 1).astype(float)[:, None])  # [S, H]
        want = (o["organ_weights"][i] * bce).sum(-1)[smp].mean()
        np.testing.assert_allclose(got["roi_cls"][i], want, rtol=1e-5)
        np.testing.assert_allclose(got["roi_cls/lung"][i], bce[smp, 1].mean(), rtol=1e-5)
    # The gate weights receive no gradient from L = sum_i w_i L_i.
    g = jax.grad(lambda w: jnp.sum(losses.roi_losses({**o, "organ_weights": w}, cfg)["roi_cls"]))(
        jnp.asarray(o["organ_weights"]))
    assert np.all(np.asarray(g) == 0)


def test_mined_positives_do_not_regress_boxes():
    cfg = model_config("tiny")
    o = _outputs()
    base = losses.roi_losses(o, cfg)["roi_box"]
    o2 = dict(o)
    o2["box_deltas"] = o["box_deltas"].copy()
    o2["box_deltas"][0, 1] += 100.0  # the mined positive's prediction is wild: no effect
    np.testing.assert_allclose(losses.roi_losses(o2, cfg)["roi_box"], base)
    o2["box_deltas"][0, 0] += 100.0  # an original positive's is: large effect
    assert losses.roi_losses(o2, cfg)["roi_box"][0] > base[0] + 100
    lab = o["roi_labels"][0]
    want = 10.0 * _sl1(o["box_deltas"][0, 0] - o["box_targets"][0, 0], 1.0).sum() / (lab >= 0).sum()
    np.testing.assert_allclose(base[0], want, rtol=1e-5)
    # the mined positive still counts as a positive for classification
    assert o["roi_labels"][0, 1] == 1


def test_gate_and_mask_losses_masked():
    cfg = model_config("tiny")
    o = _outputs()
    got = losses.roi_losses(o, cfg)["gate"]
    m = o["gate_mask"][0]
    want = _bce(o["gate_logits"][0], o["gate_targets"][0])[m].mean()
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    mk = losses.mask_loss(o)
    want = _bce(o["mask_logits"][0], o["mask_targets"][0]).mean((-1, -2))[[0, 2]].mean()
    np.testing.assert_allclose(mk[0], want, rtol=1e-5)
    assert mk[1] == 0.0  # no valid mask: zero, not NaN


def test_embedding_pairs_same_lesion():
    cfg = model_config("tiny")
    o = _outputs()
    # rows (0,0), (0,1) share gt 0 of sample 0; (0,0) and (1,0) share lesion_id 5.
    # (0,1)'s only positive is (0,0) and its only negative (1,0).
    good = dict(o)
    e = np.zeros_like(o["embeddings"])
    e[0, 0, 0], e[0, 1, 0], e[1, 0, 2] = 1.0, 1.0, 1.0   # (0,1) on its positive
    good["embeddings"] = e
    bad = dict(o)
    e2 = np.zeros_like(o["embeddings"])
    e2[0, 0, 0], e2[0, 1, 1], e2[1, 0, 1] = 1.0, 1.0, 1.0  # (0,1) on its negative
    bad["embeddings"] = e2
    lg = losses.embedding_loss(good, cfg)
    lb = losses.embedding_loss(bad, cfg)
    assert np.all(np.isfinite(lg)) and np.all(np.isfinite(lb))
    assert lg[0] < lb[0]
    # worked case (type probe zeroed, all embeddings identical): every valid row sees 2 others with
    # equal similarity, so each positive has log-probability -log 2 and SupCon = log 2
    e3 = np.zeros_like(o["embeddings"])
    e3[..., 0] = 1.0
    z = dict(good, embeddings=e3, type_logits=np.zeros_like(o["type_logits"]), emb_type=-np.ones((2, 3), np.int32))
    np.testing.assert_allclose(losses.embedding_loss(z, cfg), [np.log(2.0)] * 2, rtol=1e-5)
    # two augmented views of one slice (same sample id): box 0 in both rows pairs up even without
    # a lesion id; rows (0,1) and (1,0) are now positives too
    views = dict(bad, sample_id=np.array([7, 7], np.int32),
                 emb_lesion_id=-np.ones((2, 3), np.int32))
    e4 = np.zeros_like(o["embeddings"])
    e4[0, 0, 0], e4[0, 1, 0], e4[1, 0, 0] = 1.0, 1.0, 1.0
    tight = dict(views, embeddings=e4, type_logits=np.zeros_like(o["type_logits"]),
                 emb_type=-np.ones((2, 3), np.int32))
    np.testing.assert_allclose(losses.embedding_loss(tight, cfg), [np.log(2.0)] * 2, rtol=1e-5)
    assert losses.embedding_loss(dict(tight, embeddings=e2), cfg)[0] > np.log(2.0) + 0.5


def test_embedding_background_rows_are_negatives_only():
    cfg = model_config("tiny")
    o = _outputs()
    e = np.zeros_like(o["embeddings"])
    e[..., 0] = 1.0                                   # every row, the background one too, equal
    base = dict(o, embeddings=e, type_logits=np.zeros_like(o["type_logits"]),
                emb_type=-np.ones((2, 3), np.int32))
    # the worked case above: three lesion rows, each with log 2
    np.testing.assert_allclose(losses.embedding_loss(base, cfg), [np.log(2.0)] * 2, rtol=1e-5)
    # row (0, 2), a sampled background ROI with the same gt index as (0, 0) and the same lesion id
    # (the matcher's filler values): one more row in every denominator (log 3), never a positive
    bg = np.zeros((2, 3), bool)
    bg[0, 2] = True
    gt, lid = o["emb_gt_index"].copy(), o["emb_lesion_id"].copy()
    gt[0, 2], lid[0, 2] = gt[0, 0], lid[0, 0]
    with_bg = dict(base, emb_background=bg, emb_gt_index=gt, emb_lesion_id=lid)
    np.testing.assert_allclose(losses.embedding_loss(with_bg, cfg), [np.log(3.0)] * 2, rtol=1e-5)
    # moving the background away from the lesions lowers the loss back to log 2 (up to e^-10 terms)
    far = e.copy()
    far[0, 2] = 0.0
    far[0, 2, 1] = 1.0
    np.testing.assert_allclose(losses.embedding_loss(dict(with_bg, embeddings=far), cfg),
                               [np.log(2.0)] * 2, rtol=1e-3)


def test_total_finite_when_nothing_is_positive():
    cfg = model_config("tiny")
    o = _outputs()
    for k in ("rpn_labels", "roi_labels"):
        o[k] = np.where(o[k] == 1, 0, o[k])
    for k in ("rpn_box_mask", "box_mask", "gate_mask", "mask_valid", "emb_valid"):
        o[k] = np.zeros_like(o[k])
    o["emb_type"] = -np.ones_like(o["emb_type"])
    total, logs = jax.jit(lambda x: losses.meld_loss(x, None, cfg))(o)
    assert np.isfinite(total)
    assert all(np.isfinite(v) for v in logs.values())
    assert float(logs["roi_box"]) == 0.0 and float(logs["mask"]) == 0.0


def test_jit_equals_eager_and_per_dataset_logs():
    cfg = model_config("tiny")
    o = _outputs()
    t_eager, logs_eager = losses.meld_loss(o, None, cfg)
    t_jit, logs_jit = jax.jit(lambda x: losses.meld_loss(x, None, cfg))(o)
    np.testing.assert_allclose(t_jit, t_eager, rtol=1e-5)
    for k in logs_eager:
        np.testing.assert_allclose(logs_jit[k], logs_eager[k], rtol=1e-5, atol=1e-7)
    per = losses.rpn_losses(o, cfg)["rpn_cls"]
    np.testing.assert_allclose(logs_eager["rpn_cls/deeplesion"], per[0], rtol=1e-6)
    np.testing.assert_allclose(logs_eager["rpn_cls/luna16"], per[1], rtol=1e-6)
    assert float(logs_eager["rpn_cls/lits"]) == 0.0


@pytest.mark.parametrize("stop", [True, False])
def test_gate_gradient_policy_is_configurable(stop):
    cfg = model_config("tiny")
    cfg.unlock()
    cfg.gate.stop_gradient_weights = stop
    o = _outputs()
    g = jax.grad(lambda w: jnp.sum(losses.roi_losses({**o, "organ_weights": w}, cfg)["roi_cls"]))(
        jnp.asarray(o["organ_weights"]))
    assert bool(np.any(np.asarray(g) != 0)) == (not stop)


def test_embedding_identity_keys():
    n = 1 << 16
    lid = np.array([[5, -1, -1], [5, -1, -1], [-1, -1, -1], [9, -1, -1]], np.int32)
    gt = np.array([[0, 1, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]], np.int32)
    ds = np.array([0, 0, 0, 2], np.int32)
    sid = np.array([3, 4, -1, 3], np.int32)
    key = np.array([True, True, True, False])
    r = np.asarray(losses.embedding_identity(lid, ds, sid, gt, key, n))
    assert r.dtype == np.int32 and r.shape == (4, 3)
    assert r[0, 0] == r[1, 0]                       # the same known lesion id in two samples
    assert r[3, 0] >= 0 and r[3, 0] != r[0, 0]      # another known id, even on a non-key slice
    assert np.all(r[2] == -1)                       # a padding sample (sample id -1) has none
    assert np.all(r[3, 1:] == -1)                   # non-key slice, no lesion id: none
    # key-slice annotations without an id: one identity per (dataset, sample, box)
    ann = [r[0, 1], r[0, 2], r[1, 1], r[1, 2]]      # (s3, box 1), (s3, box 0), (s4, 0), (s4, 1)
    assert min(ann) >= 0 and len(set(ann + [r[0, 0], r[3, 0]])) == 6
    two_views = np.asarray(losses.embedding_identity(-np.ones((2, 1), np.int32), ds[:2] * 0,
                                                     np.array([3, 3], np.int32),
                                                     np.ones((2, 1), np.int32), key[:2], n))
    assert two_views[0, 0] == two_views[1, 0] == r[0, 1]
    again = np.asarray(losses.embedding_identity(lid[::-1], ds[::-1], sid[::-1], gt[::-1],
                                                 key[::-1], n))[::-1]
    np.testing.assert_array_equal(again, r)         # a function of the keys, not the batch row
    assert np.all((r == -1) | ((r >= 1) & (r < n)))  # row 0 is the background's
    # distinct key-slice annotations spread over the table like random draws: at least the
    # birthday expectation of distinct rows (k keys in n rows: n (1 - exp(-k / n)), 1970 here)
    b = 500
    rr = np.asarray(losses.embedding_identity(-np.ones((b, 4), np.int32), np.zeros(b, np.int32),
                                              np.arange(b, dtype=np.int32),
                                              np.tile(np.arange(4, dtype=np.int32), (b, 1)),
                                              np.ones(b, bool), n))
    assert len(np.unique(rr)) >= n * (1 - np.exp(-b * 4 / n)) - 20


def test_proxy_term_matches_numpy():
    cfg = model_config("tiny")
    o = _outputs()
    rng = np.random.default_rng(3)
    n = 7
    logits = rng.normal(size=(2, 3, n)).astype(np.float32)
    # sample 0 is a key slice (every slot has an identity); sample 1 is not, so only its slot with
    # a lesion id (5) has one. The identity rows come from embedding_identity (tested above).
    o = dict(o, sample_id=np.array([11, 12], np.int32))
    with_p = dict(o, proxy_logits=logits, is_key_slice=np.array([True, False]))
    ident = np.asarray(losses.embedding_identity(o["emb_lesion_id"], o["dataset_id"],
                                                 o["sample_id"], o["emb_gt_index"],
                                                 with_p["is_key_slice"], n))
    assert np.all(ident[0] >= 1) and ident[1, 0] == ident[0, 0] and np.all(ident[1, 1:] == -1)
    got = np.asarray(losses.embedding_loss(with_p, cfg)) - np.asarray(losses.embedding_loss(o, cfg))
    # reference: mean over slots that are valid positives with an identity of -log softmax
    expect = []
    for b in range(2):
        ce = [np.log(np.sum(np.exp(logits[b, p]))) - logits[b, p, ident[b, p]]
              for p in range(3) if o["emb_valid"][b, p] and ident[b, p] >= 0]
        expect.append(np.mean(ce) if ce else 0.0)
    np.testing.assert_allclose(got, np.asarray(expect) * cfg.embedding.proxy_weight, rtol=1e-5,
                               atol=1e-6)
    # a sampled background ROI (slot (0, 2), not a positive) is classified to row 0
    bg = np.zeros((2, 3), bool)
    bg[0, 2] = True
    with_bg = dict(with_p, emb_background=bg)
    got_bg = np.asarray(losses.embedding_loss(with_bg, cfg)) - np.asarray(
        losses.embedding_loss(dict(o, emb_background=bg), cfg))
    ce0 = [np.log(np.sum(np.exp(logits[0, p]))) - logits[0, p, ident[0, p]] for p in (0, 1)]
    ce0.append(np.log(np.sum(np.exp(logits[0, 2]))) - logits[0, 2, 0])
    np.testing.assert_allclose(got_bg, [np.mean(ce0) * cfg.embedding.proxy_weight, got[1]],
                               rtol=1e-5, atol=1e-6)
    # slots without an identity add nothing
    no_id = -np.ones_like(o["emb_lesion_id"])
    none = dict(with_p, is_key_slice=np.array([False, False]), emb_lesion_id=no_id)
    np.testing.assert_allclose(losses.embedding_loss(none, cfg),
                               losses.embedding_loss(dict(o, emb_lesion_id=no_id), cfg))
