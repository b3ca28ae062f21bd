"""Speed of the detection ops against plain references, measured side by side in one run.

* NMS: the tiled fixed-size NMS (``uld_jax.ops.nms``) against (a) a dense JAX NMS that builds the
  full [N, N] IoU matrix and walks the sorted boxes one by one, and (b) a NumPy greedy loop.
* ROIAlign: the separable-matrix einsum (``uld_jax.ops.roi_align``) against a JAX version that
  gathers the four neighbours of every sample point.
* Mask targets of a training batch: from the input pipeline's per-lesion mask crops
  (``roi_align.crop_box_masks``, ``--mask-crop`` cells a side) against whole-image masks
  (``roi_align.crop_masks``, the pipeline's earlier layout), vmapped over ``--mask-batch`` images
  of ``--mask-side`` pixels with ``--mask-boxes`` lesions and ``--mask-rois`` sampled ROIs each.

* Layer formulations (``uld_jax.models.layers``, ``model.layer_impl``): forward + backward of a 1x1
  convolution, the stem's 3x3/2 max pool and the per-sample RPN convolution, XLA's op ('xla')
  against the 'cpu' formulation, at the quick recipe's shapes (``--layer-batch`` samples of 160 px:
  3 images each, DenseNet growth 16, 64-wide FPN and RPN).

Prints milliseconds per call (best of ``--repeats`` after a warm-up/compile call) and the ratios.
Usage: ``python benchmarks/bench_ops.py [--n 2000] [--rois 300] [--channels 64] [--side 128]``
(the paper's training batch for the mask targets: ``--mask-batch 4 --mask-side 512 --mask-boxes 16
--mask-rois 64``, the defaults).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from uld_jax import input_pipeline as ip  # noqa: E402
from uld_jax.core import Keys  # noqa: E402
from uld_jax.models import layers  # noqa: E402
from uld_jax.models.fake_batch import synthetic_batch  # noqa: E402
from uld_jax.ops import boxes as box_ops  # noqa: E402
from uld_jax.ops import nms as nms_ops  # noqa: E402
from uld_jax.ops import roi_align as roi_ops  # noqa: E402


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def dense_nms(boxes, scores, iou_threshold, max_output):
    """Reference: full [N, N] IoU, then a sequential pass over the sorted boxes."""
    n = boxes.shape[0]
    order = jnp.argsort(-scores, stable=True)
    sb = boxes[order]
    iou = box_ops.pairwise_iou(sb, sb)

    def body(i, keep):
        sup = jnp.any(keep & (iou[:, i] > iou_threshold) & (jnp.arange(n) < i))
        return keep.at[i].set(keep[i] & ~sup)

    keep = jax.lax.fori_loop(0, n, body, jnp.ones((n,), bool))
    pos = jnp.where(keep, -jnp.arange(n, dtype=jnp.float32), -jnp.inf)
    _, p = jax.lax.top_k(pos, max_output)
    return order[p], keep[p]


def numpy_nms(boxes, scores, thr, max_output):
    order = np.lexsort((np.arange(len(scores)), -scores))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = []
    for i in order:
        if kept:
            k = np.asarray(kept)
            ih = np.clip(np.minimum(boxes[k, 2], boxes[i, 2]) - np.maximum(boxes[k, 0], boxes[i, 0]), 0, None)
            iw = np.clip(np.minimum(boxes[k, 3], boxes[i, 3]) - np.maximum(boxes[k, 1], boxes[i, 1]), 0, None)
            inter = ih * iw
            if np.any(inter / (area[k] + area[i] - inter) > thr):
                continue
        kept.append(i)
        if len(kept) == max_output:
            break
    return kept


def gather_roi_align(features, boxes, output_size=7, spatial_scale=0.25, sampling_ratio=2):
    """Reference ROIAlign (aligned=True) that gathers the 4 neighbours of every sample point."""
    h, w, _ = features.shape
    b = boxes * spatial_scale - 0.5
    t = (jnp.arange(output_size)[:, None] + (jnp.arange(sampling_ratio)[None, :] + 0.5) / sampling_ratio)
    ys = b[:, 0, None, None] + t[None] * ((b[:, 2] - b[:, 0]) / output_size)[:, None, None]  # [K, P, S]
    xs = b[:, 1, None, None] + t[None] * ((b[:, 3] - b[:, 1]) / output_size)[:, None, None]

    def axis(c, n):
        inside = (c >= -1) & (c <= n)
        c = jnp.clip(c, 0, n - 1)
        lo = jnp.floor(c).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, n - 1)
        frac = c - lo
        return lo, hi, jnp.where(inside, 1 - frac, 0.0), jnp.where(inside, frac, 0.0)

    y0, y1, wy0, wy1 = axis(ys, h)
    x0, x1, wx0, wx1 = axis(xs, w)
    # Every (i, sy, j, sx) sample: [K, P, S, P, S, C] after the gathers.
    def g(yi, xi):
        return features[yi[:, :, :, None, None], xi[:, None, None, :, :]]

    e = lambda a: a[:, :, :, None, None, None]
    f = lambda a: a[:, None, None, :, :, None]
    val = (e(wy0) * f(wx0) * g(y0, x0) + e(wy0) * f(wx1) * g(y0, x1)
           + e(wy1) * f(wx0) * g(y1, x0) + e(wy1) * f(wx1) * g(y1, x1))
    return val.mean(axis=(2, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="boxes into NMS")
    ap.add_argument("--max-output", type=int, default=300)
    ap.add_argument("--rois", type=int, default=300)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--side", type=int, default=128, help="feature map side (stride-4 of 4x input)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mask-batch", type=int, default=4)
    ap.add_argument("--mask-side", type=int, default=512)
    ap.add_argument("--mask-boxes", type=int, default=16)
    ap.add_argument("--mask-rois", type=int, default=64)
    ap.add_argument("--mask-crop", type=int, default=ip.MASK_CROP)
    ap.add_argument("--layer-batch", type=int, default=4, help="samples for the layer formulations")
    args = ap.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")

    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 512, (40, 2))
    c = centres[rng.integers(0, 40, args.n)] + rng.normal(0, 8, (args.n, 2))
    hw = rng.uniform(8, 64, (args.n, 2))
    boxes = np.concatenate([c - hw / 2, c + hw / 2], 1).astype(np.float32)
    scores = rng.random(args.n).astype(np.float32)

    tiled = jax.jit(lambda b, s: nms_ops.nms(b, s, 0.7, args.max_output, tile_size=256))
    dense = jax.jit(lambda b, s: dense_nms(b, s, 0.7, args.max_output))
    t_tiled = _time(tiled, boxes, scores, repeats=args.repeats)
    t_dense = _time(dense, boxes, scores, repeats=args.repeats)
    t0 = time.perf_counter()
    ref = numpy_nms(boxes, scores, 0.7, args.max_output)
    t_np = (time.perf_counter() - t0) * 1e3
    idx, ok = tiled(boxes, scores)
    agree = list(np.asarray(idx)[np.asarray(ok)]) == [int(i) for i in ref]
    print(f"NMS  N={args.n} -> {args.max_output}: tiled {t_tiled:.2f} ms | dense JAX {t_dense:.2f} ms "
          f"| numpy loop {t_np:.2f} ms | dense/tiled {t_dense / t_tiled:.2f}x, numpy/tiled "
          f"{t_np / t_tiled:.2f}x | IoU memory per step: tiled {256 * args.n} vs dense "
          f"{args.n * args.n} floats | same result as numpy: {agree}")

    feats = rng.normal(size=(args.side, args.side, args.channels)).astype(np.float32)
    c = rng.uniform(0, args.side * 4, (args.rois, 2))
    hw = rng.uniform(8, 96, (args.rois, 2))
    rois = np.concatenate([c - hw / 2, c + hw / 2], 1).astype(np.float32)
    sep = jax.jit(lambda f, b: roi_ops.roi_align(f, b, 7, 0.25, 2))
    gat = jax.jit(lambda f, b: gather_roi_align(f, b, 7, 0.25, 2))
    t_sep = _time(sep, feats, rois, repeats=args.repeats)
    t_gat = _time(gat, feats, rois, repeats=args.repeats)
    err = float(np.max(np.abs(np.asarray(sep(feats, rois)) - np.asarray(gat(feats, rois)))))
    print(f"ROIAlign K={args.rois} {args.side}x{args.side}x{args.channels} -> 7x7: separable einsum "
          f"{t_sep:.2f} ms | gather {t_gat:.2f} ms | gather/separable {t_gat / t_sep:.2f}x | "
          f"max |diff| {err:.2e}")

    mask_targets(args, rng)
    layer_formulations(args, rng)


def layer_formulations(args, rng) -> None:
    """Forward + backward (gradients of every input) of each op in both formulations on the same
    arrays; prints both times, their ratio and the largest gradient difference."""
    b = args.layer_batch
    x40 = rng.normal(size=(3 * b, 40, 40, 80)).astype(np.float32)       # dense block 1 at 160 px
    cases = {
        "1x1 conv 80->64": (
            lambda impl: functools.partial(
                layers.cpu_conv_general_dilated if impl == "cpu" else jax.lax.conv_general_dilated,
                window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
            (x40, rng.normal(size=(1, 1, 80, 64)).astype(np.float32))),
        "max pool 3x3/2": (
            lambda impl: (lambda x: layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl)),
            (np.maximum(rng.normal(size=(3 * b, 80, 80, 32)), 0).astype(np.float32),)),
        "per-sample 3x3 conv 64->64": (
            lambda impl: (lambda x, k: layers.per_sample_conv3x3(x, k, impl)),
            (rng.normal(size=(b, 40, 40, 64)).astype(np.float32),
             rng.normal(size=(b, 3, 3, 64, 64)).astype(np.float32) * 0.05)),
    }
    for name, (make, arrays) in cases.items():
        times, grads = {}, {}
        for impl in ("xla", "cpu"):
            f = make(impl)
            g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(arrays)))))
            times[impl] = _time(g, *arrays, repeats=args.repeats)
            grads[impl] = g(*arrays)
        err = max(float(jnp.max(jnp.abs(a - c)) / (jnp.max(jnp.abs(a)) + 1e-12))
                  for a, c in zip(grads["xla"], grads["cpu"]))
        print(f"layer {name} (batch {b}), forward + backward: xla {times['xla']:.2f} ms | cpu "
              f"{times['cpu']:.2f} ms | xla/cpu {times['xla'] / times['cpu']:.2f}x | max relative "
              f"gradient difference {err:.1e}")


def mask_targets(args, rng) -> None:
    """Whole-image masks against crops for the same lesions (``fake_batch``'s, their crops pasted
    onto the image for the whole-image layout) and ROIs (around the lesions), each jitted and
    vmapped over the batch; also the bytes each layout moves."""
    B, S, G, K, M = args.mask_batch, args.mask_side, args.mask_boxes, args.mask_rois, args.mask_crop
    batch = synthetic_batch(B, S, max_boxes=G, boxes_per_image=[G] * B, lesion_sizes=(8.0, 96.0),
                            mask_crop=M)
    crops, rects = batch[Keys.MASKS], batch[Keys.MASK_BOXES]
    whole = (np.asarray(jax.vmap(lambda m, b: roi_ops.paste_masks(m, b, S, S))(crops, rects))
             >= 0.5).astype(np.uint8)
    which = rng.integers(0, G, (B, K)).astype(np.int32)
    box = np.take_along_axis(rects, which[..., None], axis=1)            # [B, K, 4]
    size = np.concatenate([box[..., 2:] - box[..., :2]] * 2, axis=-1)
    rois = (box + rng.uniform(-0.15, 0.15, box.shape) * size).astype(np.float32)  # IoU ~0.5-1
    out = 28
    f_whole = jax.jit(jax.vmap(lambda m, r, i: roi_ops.crop_masks(m, r, i, out)))
    f_crops = jax.jit(jax.vmap(lambda m, mb, r, i: roi_ops.crop_box_masks(m, mb, r, i, out)))
    t_whole = _time(f_whole, whole, rois, which, repeats=args.repeats)
    t_crops = _time(f_crops, crops, rects, rois, which, repeats=args.repeats)
    a = np.asarray(f_whole(whole, rois, which)) >= 0.5
    c = np.asarray(f_crops(crops, rects, rois, which)) >= 0.5
    print(f"mask targets B={B} {S}x{S} G={G} K={K} -> {out}x{out}: whole-image masks "
          f"{t_whole:.2f} ms ({whole.nbytes / 1e6:.1f} MB) | {M}x{M} crops {t_crops:.2f} ms "
          f"({(crops.nbytes + rects.nbytes) / 1e6:.2f} MB) | whole/crops {t_whole / t_crops:.2f}x | "
          f"binary targets agree on {100 * (a == c).mean():.2f}% of cells")

if __name__ == "__main__":
    main()
