"""MELD model on the tiny config: static shapes, dataset-indexed gradients, no recompilation,
empty slices, mined positives, ignore regions, equation 1, jit == eager."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uld_jax import losses
from uld_jax.core import DATASET_ID, Keys, Provenance
from uld_jax.models import roi_heads
from uld_jax.models.config import model_config
from uld_jax.models.fake_batch import synthetic_batch
from uld_jax.models.meld import MELD, init_variables

B, G = 4, 4
LUNA = DATASET_ID["luna16"]


@pytest.fixture(scope="module")
def setup():
    cfg = model_config("tiny")
    model = MELD(cfg)
    variables = init_variables(model, seed=0)
    traces = []

    @jax.jit
    def loss_and_grads(variables, batch, key):
        traces.append(1)

        def f(params):
            out, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   batch, train=True, rngs={"sample": key}, mutable=["batch_stats"])
            total, logs = losses.meld_loss(out, batch, cfg)
            return total, (logs, out, upd["batch_stats"])

        (total, (logs, out, stats)), grads = jax.value_and_grad(f, has_aux=True)(
            variables["params"])
        return total, logs, out, grads, stats

    infer = jax.jit(lambda v, b: model.apply(v, b, train=False))
    return cfg, model, variables, loss_and_grads, infer, traces


def _batch(**kw):
    kw.setdefault("max_boxes", G)
    return synthetic_batch(B, model_config("tiny").image_size, **kw)


def test_train_outputs_and_no_recompile(setup):
    cfg, _, variables, step, _, traces = setup
    n0 = len(traces)
    for i, counts in enumerate(([1, 2, 3, 4], [0, 0, 0, 0], [4, 0, 1, 2])):
        total, logs, out, _, _ = step(variables, _batch(boxes_per_image=counts, seed=i),
                                   jax.random.PRNGKey(i))
        assert np.isfinite(float(total))
    assert len(traces) - n0 <= 1  # one trace for all numbers of valid boxes
    s, n, p = cfg.roi.batch_per_image, cfg.rpn.batch_per_image, cfg.mask.max_per_image
    n_anchors = (cfg.image_size // 4) ** 2 * 15
    assert out["rpn_logits"].shape == (B, n_anchors) and out["rpn_deltas"].shape == (B, n_anchors, 4)
    assert np.all(np.sum(out["rpn_labels"] >= 0, axis=1) <= n)
    assert out["roi_boxes"].shape == (B, s, 4)
    assert out["cls_logits"].shape == (B, s, cfg.num_organ_heads)
    assert out["cls_logits_all"].shape == (B, s, cfg.num_organ_heads, cfg.num_datasets)
    assert out["mask_logits"].shape == (B, p, 28, 28)
    assert out["embeddings"].shape == (B, p, cfg.embedding.dim)
    # the embedded slots: positives first (emb_valid), then sampled background ROIs (negatives of
    # the contrastive loss), the rest neither
    np.testing.assert_array_equal(out["emb_valid"], out["roi_labels"][:, :p] == 1)
    assert not cfg.embedding.background_negatives and not np.any(out["emb_background"])
    np.testing.assert_allclose(out["organ_weights"][..., 0], 1.0)  # w0 = 1


def test_embedding_background_slots_behind_the_switch(setup):
    cfg, _, variables, _, _, _ = setup
    on = cfg.copy_and_resolve_references()
    on.embedding.background_negatives = True
    out = jax.jit(lambda v, b, k: MELD(on).apply(v, b, train=True, rngs={"sample": k},
                                                 mutable=["batch_stats"])[0])(
        variables, _batch(boxes_per_image=[1, 2, 3, 4], seed=5), jax.random.PRNGKey(5))
    p = on.mask.max_per_image
    np.testing.assert_array_equal(out["emb_valid"], out["roi_labels"][:, :p] == 1)
    np.testing.assert_array_equal(out["emb_background"], out["roi_labels"][:, :p] == 0)
    assert np.any(out["emb_background"])


def test_inference_outputs_static_and_consistent(setup):
    cfg, _, variables, _, infer, _ = setup
    det = infer(variables, _batch(seed=3))
    d, k, h = cfg.num_datasets, cfg.roi.detections_per_image, cfg.num_organ_heads
    assert det["boxes"].shape == (B, d, k, 4)
    assert det["scores"].shape == det["valid"].shape == (B, d, k)
    assert det["valid"].dtype == jnp.bool_
    assert det["head_scores"].shape == det["organ_weights"].shape == (B, d, k, h)
    assert det["masks"].shape == (B, d, k, 28, 28)
    assert det["embeddings"].shape == (B, d, k, cfg.embedding.dim)
    v = np.asarray(det["valid"])
    assert v.any()
    w = np.asarray(det["organ_weights"])
    np.testing.assert_array_equal(w[..., 0], 1.0)  # the gate's w0 is 1
    assert np.all((w[..., 1:] >= 0) & (w[..., 1:] <= 1))
    # scores are equation 1 of the per-head scores and weights
    s = (w * np.asarray(det["head_scores"])).sum(-1) / w.sum(-1)
    np.testing.assert_allclose(np.asarray(det["scores"])[v], s[v], rtol=1e-5)
    assert np.all(np.asarray(det["scores"])[~v] == 0)
    sc = np.where(v, np.asarray(det["scores"]), -1)
    assert np.all(np.diff(sc, axis=-1)[v[..., 1:]] <= 1e-6)  # sorted within each expert
    bx = np.asarray(det["boxes"])[v]
    assert np.all(bx >= 0) and np.all(bx <= cfg.image_size)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(det["embeddings"])[v], axis=-1), 1.0,
                               rtol=1e-4)


def test_selected_experts_equal_the_full_forward(setup):
    """``experts=(e, ...)`` computes only those experts, with the same detections as the full
    forward's columns (the inference predictor runs one expert this way)."""
    cfg, model, variables, _, infer, _ = setup
    batch = _batch(seed=3)
    full = jax.tree.map(np.asarray, infer(variables, batch))
    for sel in ((2,), (3, 1)):          # one expert; two, out of order
        # jitted, as the predictor runs it (an eager forward takes far longer than its compile)
        part = jax.tree.map(np.asarray, jax.jit(
            lambda v, b, sel=sel: model.apply(v, b, train=False, experts=sel))(variables, batch))
        assert part["boxes"].shape[1] == len(sel)
        for key in ("boxes", "scores", "valid", "head_scores", "organ_weights", "masks",
                    "embeddings", "proposals", "proposal_valid"):
            np.testing.assert_allclose(part[key], full[key][:, list(sel)], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{key} of experts {sel}")
    with pytest.raises(ValueError, match="experts"):
        model.apply(variables, batch, train=False, experts=(cfg.num_datasets,))


def _zero_rows(tree, path, index):
    a = tree
    for k in path:
        a = a[k]
    return np.asarray(a)[index]


def test_gradients_reach_only_the_samples_dataset(setup):
    _, _, variables, step, _, _ = setup
    batch = _batch(dataset_ids=[LUNA] * B, boxes_per_image=[2, 1, 3, 2], seed=5)
    _, _, out, g, _ = step(variables, batch, jax.random.PRNGKey(0))
    assert int(np.sum(out["roi_labels"] == 1)) > 0 and float(np.sum(out["box_mask"])) > 0
    others = [d for d in range(4) if d != LUNA]
    dataset_axis0 = [("rpn", "conv_kernel"), ("rpn", "conv_bias"), ("rpn", "cls_kernel"),
                     ("rpn", "cls_bias"), ("rpn", "box_kernel"), ("rpn", "box_bias"),
                     ("box_head", "box_kernel"), ("box_head", "box_bias")]
    for path in dataset_axis0:
        assert np.all(_zero_rows(g, path, others) == 0), path
        assert np.any(_zero_rows(g, path, LUNA) != 0), path
    for path in (("cls_heads", "out_kernel"), ("cls_heads", "out_bias")):
        a = np.asarray(g[path[0]][path[1]])
        assert np.all(a[..., others] == 0), path
        assert np.any(a[..., LUNA] != 0), path
    # shared parts train from every dataset
    for name in ("backbone", "gate", "mask_head", "embed_head"):
        assert any(np.any(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves(g[name])), name


def test_empty_slices_are_finite(setup):
    _, _, variables, step, infer, _ = setup
    batch = _batch(boxes_per_image=[0] * B, seed=6)
    total, logs, out, g, _ = step(variables, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(total))
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g))
    assert not np.any(out["roi_labels"] == 1) and float(logs["roi_box"]) == 0.0
    det = infer(variables, batch)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(det))


def test_mined_positives_train_classification_only(setup):
    _, _, variables, step, _, _ = setup
    batch = _batch(boxes_per_image=[2, 2, 1, 3], seed=7)
    batch[Keys.PROVENANCE][:] = int(Provenance.MINED)
    total, logs, out, g, _ = step(variables, batch, jax.random.PRNGKey(2))
    assert np.sum(out["roi_labels"] == 1) > 0 and np.sum(out["rpn_labels"] == 1) > 0
    assert not np.any(out["box_mask"]) and not np.any(out["rpn_box_mask"])
    assert not np.any(out["mask_valid"])
    assert float(logs["roi_box"]) == 0.0 and float(logs["rpn_box"]) == 0.0
    for path in (("box_head", "box_kernel"), ("rpn", "box_kernel")):
        assert np.all(np.asarray(g[path[0]][path[1]]) == 0), path


def test_ignore_regions_are_never_sampled_as_negatives(setup):
    from uld_jax.ops.boxes import pairwise_iobb

    _, _, variables, step, _, _ = setup
    batch = _batch(boxes_per_image=[1, 1, 1, 1], seed=8)
    batch[Keys.IGNORE_BOXES][:, 0] = [0.0, 0.0, 64.0, 64.0]
    batch[Keys.IGNORE_VALID][:, 0] = True
    _, _, out, _, _ = step(variables, batch, jax.random.PRNGKey(3))
    ign = batch[Keys.IGNORE_BOXES][0, :1]
    for boxes_key, lab_key in (("roi_boxes", "roi_labels"),):
        for i in range(B):
            neg = np.asarray(out[lab_key][i]) == 0
            iobb = np.asarray(pairwise_iobb(out[boxes_key][i], ign))[:, 0]
            assert not np.any(iobb[neg] > model_config("tiny").roi.ignore_iobb)


def test_equation_1_worked_example_and_gate_w0():
    s = jnp.array([0.9, 0.2, 0.6, 0.1])
    w = jnp.array([1.0, 0.5, 0.0, 1.0])
    # (0.9*1 + 0.2*0.5 + 0.6*0 + 0.1*1) / (1 + 0.5 + 0 + 1) = 1.1 / 2.5
    np.testing.assert_allclose(roi_heads.fuse_scores(s, w), 0.44, rtol=1e-6)
    gl = jnp.array([[0.0, 100.0, -100.0]])
    ow = roi_heads.organ_weights(gl, 4, (1,))
    np.testing.assert_allclose(ow, [[1.0, 0.5, 1.0, 0.0]], atol=1e-6)
    # without a gate every head weighs 1 and eq. 1 is the mean
    ones = roi_heads.organ_weights(None, 4, (1,))
    np.testing.assert_allclose(roi_heads.fuse_scores(s[None], ones), [0.45], rtol=1e-6)


def test_jit_equals_eager(setup):
    """The heads (dataset RPNs, box head, organ heads, gate, eq. 1) and context fusion, eager vs jit
    (the full forward runs jitted in every other test)."""
    from uld_jax.models.fpn import ContextFusion

    cfg, model, variables, _, _, _ = setup
    rng = np.random.default_rng(0)
    feat = jnp.asarray(rng.normal(size=(2, 8, 8, cfg.fpn_dim)), jnp.float32)
    rois = jnp.asarray(rng.normal(size=(2, 3, 7, 7, cfg.fpn_dim)), jnp.float32)

    def heads(v, feat, rois):
        def f(m):
            lg, dl = m.rpn(feat)
            _, bd = m.box_head(rois)
            cls = jax.nn.sigmoid(m.cls_heads(rois))[..., 0]
            w = roi_heads.organ_weights(m.gate(rois), cfg.num_organ_heads, rois.shape[:2])
            return lg, dl, bd, roi_heads.fuse_scores(cls, w)
        return nn_apply(model, f, v)

    eager = heads(variables, feat, rois)
    jitted = jax.jit(heads)(variables, feat, rois)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    fuse = ContextFusion(3)
    x = jnp.asarray(rng.normal(size=(6, 4, 4, 5)), jnp.float32)
    fv = fuse.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(jax.jit(fuse.apply)(fv, x), fuse.apply(fv, x), rtol=1e-6)
    # identity initialisation: the fused map is the central image's map
    np.testing.assert_allclose(fuse.apply(fv, x), x.reshape(2, 3, 4, 4, 5)[:, 1], rtol=1e-6)


def nn_apply(model, fn, variables):
    """Runs ``fn(bound_module)`` on a bound MELD (submodules reachable as attributes)."""
    return model.apply(variables, method=lambda m: fn(m))


def test_baseline_config_same_code():
    cfg = model_config("tiny")
    cfg.unlock()
    cfg.num_datasets, cfg.num_organ_heads, cfg.use_gate = 1, 1, False
    cfg.use_mask = cfg.use_embedding = False
    model = MELD(cfg)
    v = jax.eval_shape(lambda: model.init({"params": jax.random.key(0, impl="rbg")},
                                          jnp.zeros((1, 32, 32, 9)), method=MELD.init_all))
    assert set(v["params"]) == {"backbone", "rpn", "box_head", "cls_heads"}
    assert v["params"]["cls_heads"]["out_kernel"].shape[0] == 1
    assert v["params"]["rpn"]["cls_kernel"].shape[0] == 1


# --------------------------------------------------------------------------------------------------
# Overfitting a handful of synthetic slices (bright 3D blobs at known positions).
# --------------------------------------------------------------------------------------------------
DETECTION_TERMS = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")


def _overfit(setup, steps: int):
    import optax

    from uld_jax.ops.boxes import pairwise_iou

    cfg, model, variables, step, infer, _ = setup
    batch = _batch(boxes_per_image=[1, 2, 1, 2], seed=11)
    batch[Keys.LESION_ID] = np.where(batch[Keys.BOX_VALID], np.arange(B * G).reshape(B, G), -1)
    batch[Keys.ORGAN_TARGET] = (batch[Keys.ORGAN_TARGET] > 0.5).astype(np.float32)  # hard targets
    opt = optax.adam(1e-3)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p))
    apply = jax.jit(optax.apply_updates)
    params, state = variables["params"], opt.init(variables["params"])
    bstats = variables["batch_stats"]
    hist = []
    for i in range(steps):
        v = {"params": params, "batch_stats": bstats}
        _, logs, _, g, bstats = step(v, batch, jax.random.PRNGKey(i))
        u, state = update(g, state, params)
        params = apply(params, u)
        hist.append({k: float(logs[k]) for k in (*DETECTION_TERMS, "total")})
    return cfg, model, params, bstats, batch, hist, infer, pairwise_iou


def _det_loss(h):
    return sum(h[k] for k in DETECTION_TERMS)


def test_overfit_short(setup):
    """A smoke-level check in 40 steps (means of the first 5 and last 10 steps): classification
    (RPN + ROI) halves, all detection terms fall by a third. The sampled ROIs change every step,
    so single steps are noisy this early; the slow test asks for 10x and the boxes."""
    _, _, _, _, _, hist, _, _ = _overfit(setup, 40)
    cls = lambda h: h["rpn_cls"] + h["roi_cls"]  # noqa: E731
    for f, factor in ((cls, 2.0), (_det_loss, 1.5)):
        first = np.mean([f(h) for h in hist[:5]])
        last = np.mean([f(h) for h in hist[-10:]])
        assert last < first / factor, (first, last)


@pytest.mark.slow
def test_overfit_finds_the_boxes(setup):
    cfg, model, params, bstats, batch, hist, infer, pairwise_iou = _overfit(setup, 200)
    first = _det_loss(hist[0])
    last = np.mean([_det_loss(h) for h in hist[-10:]])
    print("overfit detection loss", first, "->", last)
    assert last < first / 10, (first, last)
    assert np.mean([h["total"] for h in hist[-10:]]) < hist[0]["total"] / 5
    det = infer({"params": params, "batch_stats": bstats}, batch)
    for b in range(B):
        d = int(batch[Keys.DATASET_ID][b])
        gt = batch[Keys.BOXES][b][batch[Keys.BOX_VALID][b]]
        n = len(gt)
        top = np.asarray(det["boxes"][b, d, :n])
        assert np.all(np.asarray(det["valid"][b, d, :n]))
        assert np.all(np.asarray(det["scores"][b, d, :n]) > 0.5)
        iou = np.asarray(pairwise_iou(jnp.asarray(top), jnp.asarray(gt)))
        assert np.all(iou.max(axis=0) > 0.7), (b, iou)  # every lesion is among the top-n boxes


def test_training_rpn_equals_select_of_all():
    """The training path (each sample's own RPN, gathered) equals computing all D and selecting."""
    from uld_jax.models.rpn import DatasetRPN

    r = DatasetRPN(4, 15, 8)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 5, 7)), jnp.float32)
    shapes = jax.eval_shape(lambda: r.init(jax.random.PRNGKey(0), x))
    rng = np.random.default_rng(1)
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32),
                               shapes)
    ids = jnp.array([2, 0, 2])
    la, da = jax.jit(r.apply)(v, x)
    ls, ds = jax.jit(r.apply)(v, x, ids)
    np.testing.assert_allclose(ls, np.asarray(la)[np.arange(3), ids], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds, np.asarray(da)[np.arange(3), ids], rtol=1e-5, atol=1e-6)


def test_minimal_batch_traces(setup):
    """Only image, dataset id and boxes are required: the optional keys default (traced only)."""
    cfg, model, variables, _, _, _ = setup
    full = _batch(seed=9)
    batch = {k: full[k] for k in (Keys.IMAGE, Keys.DATASET_ID, Keys.BOXES, Keys.BOX_VALID)}
    out, _ = jax.eval_shape(lambda v, b: model.apply(v, b, train=True,
                                                     rngs={"sample": jax.random.PRNGKey(0)},
                                                     mutable=["batch_stats"]), variables, batch)
    total, _ = jax.eval_shape(lambda o: losses.meld_loss(o, batch, cfg), out)
    assert total.shape == ()
    det = jax.eval_shape(lambda v, b: model.apply(v, {Keys.IMAGE: b[Keys.IMAGE]}), variables, batch)
    assert det["boxes"].shape == (B, cfg.num_datasets, cfg.roi.detections_per_image, 4)


# an option off by default (embedding.num_proxies / location); about 70 s of compiles on 2 cores
@pytest.mark.slow
def test_lesion_proxies_and_location_behind_their_switches(setup):
    # one model with both embedding options on (one compilation for both)
    cfg, _, _, _, _, _ = setup
    on = cfg.copy_and_resolve_references()
    on.embedding.num_proxies = 64
    on.embedding.location = True
    model = MELD(on)
    variables = init_variables(model, seed=0)
    w = variables["params"]["embed_head"]["proxies"]
    assert w.shape == (64, on.embedding.dim)
    assert variables["params"]["embed_head"]["loc"]["kernel"].shape == (4, on.embedding.hidden)
    batch = _batch(boxes_per_image=[1, 2, 3, 4], seed=6)

    def f(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch,
                             train=True, rngs={"sample": jax.random.PRNGKey(6)},
                             mutable=["batch_stats"])
        return losses.meld_loss(out, batch, on)[0], out

    (total, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])
    assert np.isfinite(float(total))
    p = on.mask.max_per_image
    assert out["proxy_logits"].shape == (B, p, 64)
    assert out["embeddings"].shape == (B, p, on.embedding.dim)
    # cosine against the unit proxies over the temperature
    wn = np.asarray(w) / np.linalg.norm(np.asarray(w), axis=1, keepdims=True)
    np.testing.assert_allclose(out["proxy_logits"],
                               np.asarray(out["embeddings"]) @ wn.T / on.embedding.temperature,
                               rtol=1e-4, atol=1e-4)
    # the batch's key-slice flags reach the loss, which gives every embedded positive of these key
    # slices an identity
    np.testing.assert_array_equal(out["is_key_slice"], batch[Keys.IS_KEY_SLICE])
    ident = np.asarray(losses.embedding_identity(out["emb_lesion_id"], out["dataset_id"],
                                                 out["sample_id"], out["emb_gt_index"],
                                                 out["is_key_slice"], 64))
    valid = np.asarray(out["emb_valid"])
    assert valid.any() and np.all(ident[valid] >= 1)
    # the loss reaches the proxies of the batch's identities and the location map
    g = np.asarray(grads["embed_head"]["proxies"])
    assert np.all(np.abs(g[np.unique(ident[valid])]).sum(1) > 0)
    assert np.any(np.asarray(grads["embed_head"]["loc"]["kernel"]) != 0)
    # inference neither needs nor computes the proxies (traced, not compiled: only its outputs'
    # shapes are read; test_inference_outputs_static_and_consistent runs inference for values)
    inf = jax.eval_shape(lambda v, b: model.apply(v, b, train=False), variables, batch)
    assert "proxy_logits" not in inf and inf["embeddings"].shape[-1] == on.embedding.dim
    with pytest.raises(ValueError, match="num_proxies"):
        roi_heads.EmbeddingHead(4, 8, 3, 0.1).init(jax.random.PRNGKey(0), jnp.zeros((1, 5)),
                                                   proxies=True)


def test_box_location_worked_case():
    loc = np.asarray(roi_heads.box_location(jnp.asarray([[40.0, 20.0, 60.0, 100.0],
                                                         [10.0, 10.0, 10.0, 10.5]]), 80, 160))
    np.testing.assert_allclose(loc[0], [50 / 80 - 0.5, 60 / 160 - 0.5, np.log(20 / 80),
                                        np.log(80 / 160)], rtol=1e-6)
    np.testing.assert_allclose(loc[1, 2:], [np.log(1 / 80), np.log(1 / 160)], rtol=1e-6)


def test_embedding_head_reads_the_location():
    # one box feature at two places on the canvas: two embeddings; the head without the location
    # input refuses to run
    head = roi_heads.EmbeddingHead(16, 64, 9, 0.1, location=True)
    feat = jnp.ones((2, 8))
    loc = roi_heads.box_location(jnp.asarray([[10.0, 10, 20, 20], [100, 100, 110, 110]]), 160, 160)
    v = head.init(jax.random.PRNGKey(0), feat, loc=loc)
    e, _ = head.apply(v, feat, loc=loc)
    assert float(jnp.linalg.norm(e[0] - e[1])) > 1e-3
    with pytest.raises(ValueError, match="loc"):
        head.apply(v, feat)


# the accelerators' setting (model.dtype); about 70 s of compiles on 2 cores
@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(setup):
    """``model.dtype = 'bfloat16'`` (the accelerators' setting): the same float32 variables drive
    it, gradients come back float32 and finite, the losses that do not depend on sampled ROIs equal
    float32's to bfloat16 precision, and inference stays finite."""
    _, _, variables, step32, _, _ = setup
    cfg = model_config("tiny")
    cfg.unlock()
    cfg.dtype = "bfloat16"
    cfg.lock()
    model = MELD(cfg)
    batch, key = _batch(seed=1), jax.random.PRNGKey(0)

    def f(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch,
                             train=True, rngs={"sample": key}, mutable=["batch_stats"])
        return losses.meld_loss(out, batch, cfg)

    (t16, logs16), g16 = jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])
    t32, logs32, _, _, _ = step32(variables, batch, key)
    leaves = jax.tree_util.tree_leaves(g16)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert np.isfinite(float(t16)) and abs(float(t16) - float(t32)) < 0.25 * float(t32)
    for k in ("rpn_cls", "rpn_box"):        # anchors' targets do not depend on the model
        np.testing.assert_allclose(float(logs16[k]), float(logs32[k]), rtol=2e-2, err_msg=k)
    out = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
    scores = np.asarray(out["scores"], np.float32)
    assert np.all(np.isfinite(scores)) and scores.min() >= 0 and scores.max() <= 1
    assert np.all(np.isfinite(np.asarray(out["boxes"], np.float32)))
