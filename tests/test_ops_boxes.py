"""uld_jax.ops.boxes and uld_jax.ops.anchors against loop-based NumPy references and golden cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from uld_jax.ops import anchors as anchors_lib
from uld_jax.ops import boxes as B


def _np_iou(a, b, va, vb, iobb=False):
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            ya1, xa1, ya2, xa2 = a[i]
            yb1, xb1, yb2, xb2 = b[j]
            if not (va[i] and vb[j]) or ya2 <= ya1 or xa2 <= xa1 or yb2 <= yb1 or xb2 <= xb1:
                continue
            ih = max(0.0, min(ya2, yb2) - max(ya1, yb1))
            iw = max(0.0, min(xa2, xb2) - max(xa1, xb1))
            inter = ih * iw
            aa = (ya2 - ya1) * (xa2 - xa1)
            ab = (yb2 - yb1) * (xb2 - xb1)
            out[i, j] = inter / aa if iobb else inter / (aa + ab - inter)
    return out


def _random_boxes(rng, n, size=100.0):
    y = rng.uniform(-10, size, (n, 2))
    x = rng.uniform(-10, size, (n, 2))
    return np.stack([y.min(1), x.min(1), y.max(1), x.max(1)], 1).astype(np.float32)


def test_area_and_golden_iou():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 0, 10], [3, 3, 1, 1]], np.float32)
    np.testing.assert_allclose(B.area(a), [100, 100, 0, 0])
    iou = np.asarray(B.pairwise_iou(a, a))
    # Two 10x10 squares overlapping by 5x5: 25 / 175.
    np.testing.assert_allclose(iou[0, 1], 25 / 175, rtol=1e-6)
    np.testing.assert_allclose(iou[0, 0], 1.0)
    # Degenerate (zero-height, inverted) boxes have IoU 0 with everything, themselves included.
    assert np.all(iou[2:] == 0) and np.all(iou[:, 2:] == 0)
    iobb = np.asarray(B.pairwise_iobb(a[:1], np.array([[0, 0, 5, 20]], np.float32)))
    np.testing.assert_allclose(iobb, [[0.5]])


def test_iou_iobb_match_reference_with_padding():
    rng = np.random.default_rng(0)
    a = _random_boxes(rng, 17)
    b = _random_boxes(rng, 9)
    b[3] = [5, 5, 5, 9]  # degenerate
    va = rng.random(17) > 0.2
    vb = rng.random(9) > 0.3
    np.testing.assert_allclose(B.pairwise_iou(a, b, va, vb), _np_iou(a, b, va, vb), atol=1e-6)
    np.testing.assert_allclose(
        B.pairwise_iobb(a, b, va, vb), _np_iou(a, b, va, vb, iobb=True), atol=1e-6
    )
    # Batched leading dims and jit.
    ab = np.stack([a, a[::-1]])
    got = jax.jit(B.pairwise_iou)(ab, b[None].repeat(2, 0))
    np.testing.assert_allclose(got[1], _np_iou(a[::-1], b, np.ones(17), np.ones(9)), atol=1e-6)


def test_nan_boxes_are_invalid():
    a = np.array([[np.nan, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    np.testing.assert_array_equal(B.is_valid_box(a), [False, True])
    iou = np.asarray(B.pairwise_iou(a, a))
    assert np.all(np.isfinite(iou)) and iou[0, 0] == 0 and iou[1, 1] == 1
    np.testing.assert_array_equal(B.is_valid_box(np.array([[0, 0, 2, 2.0]]), min_size=2.0), [False])


def test_center_size_and_clip():
    b = np.array([[2, 4, 6, 10]], np.float32)
    np.testing.assert_allclose(B.boxes_to_center_size(b), [[4, 7, 4, 6]])
    np.testing.assert_allclose(B.center_size_to_boxes(B.boxes_to_center_size(b)), b)
    c = B.clip_boxes(np.array([[-5, 3, 20, 40], [30, 30, 40, 40]], np.float32), 16.0, 32.0)
    np.testing.assert_allclose(c, [[0, 3, 16, 32], [16, 30, 16, 32]])
    assert not bool(B.is_valid_box(c)[1])  # fully outside -> degenerate after clipping
    # Per-image sizes broadcast over a batch.
    cb = B.clip_boxes(np.full((2, 1, 4), 50.0, np.float32) * [0, 0, 1, 1], jnp.array([[10.0], [20.0]]),
                      jnp.array([[30.0], [40.0]]))
    np.testing.assert_allclose(cb[:, 0], [[0, 0, 10, 30], [0, 0, 20, 40]])


def test_encode_golden_and_round_trip():
    anchor = np.array([0, 0, 10, 20], np.float32)  # cy 5, cx 10, h 10, w 20
    box = np.array([2, 4, 22, 24], np.float32)  # cy 12, cx 14, h 20, w 20
    d = np.asarray(B.encode_boxes(box, anchor, (10, 10, 5, 5)))
    np.testing.assert_allclose(d, [10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2), 0.0], rtol=1e-6)
    rng = np.random.default_rng(1)
    anchors = _random_boxes(rng, 50) + [0, 0, 1, 1]
    targets = _random_boxes(rng, 50) + [0, 0, 1, 1]
    for w in (B.RPN_BOX_WEIGHTS, B.ROI_BOX_WEIGHTS):
        deltas = jax.jit(lambda t, a: B.encode_boxes(t, a, w))(targets, anchors)
        np.testing.assert_allclose(B.decode_boxes(deltas, anchors, w), targets, rtol=1e-4, atol=1e-3)


def test_decode_clamps_scale():
    anchor = np.array([0, 0, 16, 16], np.float32)
    big = np.asarray(B.decode_boxes(np.array([0, 0, 100.0, 100.0], np.float32), anchor))
    np.testing.assert_allclose(big[2] - big[0], 1000.0, rtol=1e-4)
    assert np.all(np.isfinite(big))
    # Encoding a degenerate target stays finite.
    assert np.all(np.isfinite(B.encode_boxes(np.array([5, 5, 5, 5.0]), anchor)))


def test_anchor_count_order_centres_and_sizes():
    hf, wf = 3, 5
    a = anchors_lib.grid_anchors((hf, wf))
    n_a = anchors_lib.num_anchors_per_cell()
    assert n_a == 15 and a.shape == (hf * wf * 15, 4) and a.dtype == np.float32
    cs = np.asarray(B.boxes_to_center_size(a)).reshape(hf, wf, n_a, 4)
    for i in range(hf):
        for j in range(wf):
            np.testing.assert_allclose(cs[i, j, :, 0], 4 * i + 2)
            np.testing.assert_allclose(cs[i, j, :, 1], 4 * j + 2)
            for si, s in enumerate((16, 24, 32, 48, 96)):
                for ri, r in enumerate((0.5, 1, 2)):
                    h, w = cs[i, j, si * 3 + ri, 2:]
                    np.testing.assert_allclose([h * w, h / w], [s * s, r], rtol=1e-5)
    # The order is that of a conv head output [Hf, Wf, A * 4] reshaped to [N, 4].
    head = np.arange(hf * wf * n_a * 4).reshape(hf, wf, n_a * 4)
    flat = head.reshape(-1, 4)
    n = (2 * wf + 3) * n_a + 7
    np.testing.assert_array_equal(flat[n], head[2, 3, 7 * 4: 8 * 4])


def test_anchors_inside():
    a = np.array([[-1, 0, 8, 8], [0, 0, 16, 16], [0, 0, 17, 16]], np.float32)
    np.testing.assert_array_equal(anchors_lib.anchors_inside(a, 16, 16), [False, True, False])
    np.testing.assert_array_equal(anchors_lib.anchors_inside(a, 16, 16, straddle=1), [True, True, True])
    assert bool(jnp.all(anchors_lib.anchors_inside(a, 16, 16, straddle=-1)))
