"""uld_jax.ops.roi_align against a per-sample-point NumPy loop (Detectron2's CPU algorithm) and ramps."""

import jax
import jax.numpy as jnp
import numpy as np

from uld_jax.ops import roi_align as R


def _bilinear(f, y, x):
    """Detectron2 ROIAlign's bilinear_interpolate, one point, f [H, W, C]."""
    hgt, wid = f.shape[:2]
    if y < -1.0 or y > hgt or x < -1.0 or x > wid:
        return np.zeros(f.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    if y0 >= hgt - 1:
        y0 = y1 = hgt - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= wid - 1:
        x0 = x1 = wid - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * f[y0, x0] + (1 - ly) * lx * f[y0, x1]
            + ly * (1 - lx) * f[y1, x0] + ly * lx * f[y1, x1])


def _np_roi_align(f, boxes, out, scale, sr, aligned=True):
    res = np.zeros((len(boxes), out, out, f.shape[2]))
    off = 0.5 if aligned else 0.0
    for k, (by1, bx1, by2, bx2) in enumerate(boxes):
        sy, sx = by1 * scale - off, bx1 * scale - off
        ey, ex = by2 * scale - off, bx2 * scale - off
        rh, rw = ey - sy, ex - sx
        if not aligned:
            rh, rw = max(rh, 1.0), max(rw, 1.0)
        bh, bw = rh / out, rw / out
        for i in range(out):
            for j in range(out):
                acc = np.zeros(f.shape[2])
                for iy in range(sr):
                    for ix in range(sr):
                        y = sy + i * bh + (iy + 0.5) * bh / sr
                        x = sx + j * bw + (ix + 0.5) * bw / sr
                        acc += _bilinear(f, y, x)
                res[k, i, j] = acc / (sr * sr)
    return res


_ROI_ALIGN = jax.jit(R.roi_align, static_argnames=("output_size", "sampling_ratio", "aligned"))


def test_linear_ramp_is_exact():
    hf, wf, scale = 16, 20, 0.25
    hh, ww = np.meshgrid(np.arange(hf) + 0.5, np.arange(wf) + 0.5, indexing="ij")
    feats = np.stack([hh, ww, 3 * hh - 2 * ww + 1], -1).astype(np.float32)
    boxes = np.array([[8, 12, 40, 60], [5.5, 3.25, 9.75, 70.0], [2, 2, 62, 78]], np.float32)
    out = np.asarray(_ROI_ALIGN(feats, boxes, output_size=7, spatial_scale=scale, sampling_ratio=2))
    for k, (y1, x1, y2, x2) in enumerate(boxes):
        cy = (y1 + (np.arange(7) + 0.5) * (y2 - y1) / 7) * scale
        cx = (x1 + (np.arange(7) + 0.5) * (x2 - x1) / 7) * scale
        np.testing.assert_allclose(out[k, :, :, 0], np.broadcast_to(cy[:, None], (7, 7)), atol=1e-4)
        np.testing.assert_allclose(out[k, :, :, 1], np.broadcast_to(cx[None, :], (7, 7)), atol=1e-4)
        np.testing.assert_allclose(out[k, :, :, 2], 3 * cy[:, None] - 2 * cx[None, :] + 1, atol=1e-3)


def test_matches_loop_reference_including_borders_and_padding():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(9, 11, 3)).astype(np.float32)
    boxes = np.array(
        [
            [0, 0, 36, 44],        # the whole image
            [-10, -6, 12, 20],     # partly outside (samples beyond -1 are zero)
            [30, 38, 60, 70],      # partly beyond the far border
            [5, 5, 5, 5],          # degenerate
            [0, 0, 0, 0],          # padded row
            [13.3, 2.7, 21.9, 30.1],
        ],
        np.float32,
    )
    for aligned in (True, False):
        for sr in (1, 2, 3):
            got = _ROI_ALIGN(feats, boxes, output_size=5, spatial_scale=0.25, sampling_ratio=sr,
                             aligned=aligned)
            want = _np_roi_align(feats, boxes, 5, 0.25, sr, aligned)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"aligned={aligned} sr={sr}")


def test_jit_batch_vmap_and_dtype():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    boxes = rng.uniform(0, 32, size=(2, 6, 4)).astype(np.float32)
    boxes = np.concatenate([np.minimum(boxes[..., :2], boxes[..., 2:]), np.maximum(boxes[..., :2], boxes[..., 2:])], -1)
    fn = jax.jit(lambda f, b: R.batch_roi_align(f, b, output_size=3))
    got = np.asarray(fn(feats, boxes))
    assert got.shape == (2, 6, 3, 3, 4)
    for b in range(2):
        np.testing.assert_allclose(got[b], R.roi_align(feats[b], boxes[b], output_size=3), atol=1e-5)
        np.testing.assert_allclose(got[b], _np_roi_align(feats[b], boxes[b], 3, 0.25, 2), atol=1e-5)
    half = R.roi_align(jnp.asarray(feats[0], jnp.bfloat16), boxes[0], output_size=3)
    assert half.dtype == jnp.bfloat16


def test_crop_masks_golden():
    masks = np.zeros((3, 40, 40), np.uint8)
    masks[1, 10:20, 8:28] = 1  # a 10 x 20 rectangle
    masks[2, :, :] = 1
    boxes = np.array([[10, 8, 20, 28], [5, 3, 25, 33], [0, 0, 40, 40]], np.float32)
    got = np.asarray(jax.jit(R.crop_masks, static_argnums=3)(masks, boxes, np.array([1, 1, 2]), 28))
    assert got.shape == (3, 28, 28)
    # Box exactly on the rectangle: ones inside; the outermost sample points interpolate with the
    # zero pixels just outside, but stay above 0.5, so the binary target is all ones.
    np.testing.assert_allclose(got[0, 2:-2, 2:-2], 1.0, atol=1e-6)
    assert np.all(got[0] >= 0.5)
    # A box twice as large (y 5..25 covers rows 10..20 in its middle half; x 3..33 likewise).
    binary = got[1] >= 0.5
    np.testing.assert_array_equal(binary.sum(0)[14], 14)
    np.testing.assert_array_equal(binary[:, 14].sum(), 14)
    np.testing.assert_allclose(got[2], 1.0, atol=1e-6)
    # Against the generic loop on float masks.
    want = _np_roi_align(masks[1][..., None].astype(float), boxes[1:2], 28, 1.0, 2)[0, ..., 0]
    np.testing.assert_allclose(got[1], want, atol=1e-5)
    bool_masks = masks.astype(bool)
    np.testing.assert_allclose(R.crop_masks(bool_masks, boxes, np.array([1, 1, 2])), got, atol=1e-6)


def test_crop_box_masks_equal_whole_image_masks():
    # Two ellipses on a 64 x 64 image, stored as crops over their mask rectangles (away from the
    # image's border). With one crop cell per pixel the crop is the image's mask exactly, so the
    # targets must be the whole-image ones: the zero ring stands for the pixels outside the rect.
    yy, xx = np.mgrid[:64, :64] + 0.5
    full = np.zeros((2, 64, 64), np.uint8)
    full[0] = ((yy - 24) / 9) ** 2 + ((xx - 30) / 13) ** 2 <= 1
    full[1] = ((yy - 44) / 6) ** 2 + ((xx - 20) / 6) ** 2 <= 1
    rects = np.array([[14, 16, 36, 44], [37, 13, 51, 27]], np.float32)      # 22 x 28, 14 x 14
    side = 28
    crops = np.zeros((2, side, side), np.uint8)
    boxes_c = rects.copy()
    for g, (y1, x1, y2, x2) in enumerate(rects.astype(int)):
        crops[g, : y2 - y1, : x2 - x1] = full[g, y1:y2, x1:x2]
        boxes_c[g, 2:] = boxes_c[g, :2] + side     # the grid covers side x side pixels from (y1, x1)
    rng = np.random.default_rng(0)
    centre = rng.uniform(12, 52, (40, 2))
    half = rng.uniform(3, 20, (40, 2))
    rois = np.concatenate([centre - half, centre + half], 1).astype(np.float32)
    which = rng.integers(0, 2, 40)
    fn = jax.jit(R.crop_box_masks, static_argnums=4)
    got = np.asarray(fn(crops, boxes_c, rois, which, 14))
    want = np.asarray(R.crop_masks(full, rois, which, 14))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Resampled crops (the pipeline's layout: M x M over the rectangle itself) give nearly the same
    # binary targets; a row without a mask (zero box) gives zeros, not NaN.
    from uld_jax import input_pipeline as ip
    crops2 = np.stack([ip.resize_mask(full[g, int(y1):int(y2), int(x1):int(x2)], 56)
                       for g, (y1, x1, y2, x2) in enumerate(rects)])
    got2 = np.asarray(fn(crops2, rects, rois, which, 14)) >= 0.5
    assert (got2 == (want >= 0.5)).mean() > 0.98
    np.testing.assert_array_equal(                 # pasted back onto the image: the ellipses
        np.asarray(R.paste_masks(crops2, rects, 64, 64)) >= 0.5, full.astype(bool))
    empty = np.asarray(fn(np.zeros((1, 8, 8), np.uint8), np.zeros((1, 4), np.float32), rois,
                          np.zeros(40, np.int32), 14))
    assert np.isfinite(empty).all() and not empty.any()


def test_roi_chunk_equals_unchunked_and_empty_masks():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(8, 8, 2)).astype(np.float32)
    c = rng.uniform(0, 32, (7, 2))
    boxes = np.concatenate([c - 5, c + 5], 1).astype(np.float32)
    full = _ROI_ALIGN(feats, boxes, output_size=3)
    chunked = jax.jit(lambda f, b: R.roi_align(f, b, output_size=3, roi_chunk=3))(feats, boxes)
    assert chunked.shape == (7, 3, 3, 2)
    np.testing.assert_allclose(chunked, full, atol=1e-6)
    empty = R.crop_masks(np.zeros((0, 16, 16), np.uint8), boxes, np.zeros(7, np.int32), 5)
    assert empty.shape == (7, 5, 5) and not np.asarray(empty).any()


def test_paste_masks_inverts_crop():
    # An all-ones mask pasted on a box recovers exactly the box's pixels after thresholding.
    boxes = np.array([[4, 6, 20, 30], [10.0, 0.0, 38.0, 28.0]], np.float32)
    ones = np.ones((2, 28, 28), np.float32)
    paste = jax.jit(R.paste_masks, static_argnums=(2, 3))
    pasted = np.asarray(paste(ones, boxes, 40, 36))
    assert pasted.shape == (2, 40, 36)
    want = np.zeros((40, 36), bool)
    want[4:20, 6:30] = True
    np.testing.assert_array_equal(pasted[0] >= 0.5, want)
    want = np.zeros((40, 36), bool)
    want[10:38, 0:28] = True
    np.testing.assert_array_equal(pasted[1] >= 0.5, want)
    # Crop then paste an ellipse: nearly the same mask.
    yy, xx = np.mgrid[:40, :36]
    ell = (((yy + 0.5 - 20) / 12) ** 2 + ((xx + 0.5 - 18) / 9) ** 2 <= 1).astype(np.uint8)
    box = np.array([[8, 9, 32, 27]], np.float32)
    crop = jax.jit(R.crop_masks, static_argnums=3)(ell[None], box, np.zeros(1, np.int32), 28)
    back = np.asarray(paste(crop, box, 40, 36))[0] >= 0.5
    inter, union = (back & (ell > 0)).sum(), (back | (ell > 0)).sum()
    assert inter / union > 0.95
