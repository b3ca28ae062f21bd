"""uld_jax.ops: detection geometry as pure, jit-able, shape-static functions (vmap over the batch).

Modules
-------
boxes       area, pairwise IoU / IoBB, encode/decode deltas, clipping, validity, centre/size.
anchors     MULAN anchors (stride 4, sizes 16/24/32/48/96, ratios 0.5/1/2) in conv-head order.
roi_align   ROIAlign (aligned=True) by separable interpolation matrices + einsum; GT-mask crops
            (28x28 targets) and pasting predicted masks back onto the image.
nms         tiled greedy NMS with a fixed-size output + validity mask; pre-NMS top-k.
matching    IoU matching with POSITIVE (1) / NEGATIVE (0) / IGNORE (-1) labels, low-quality
            matches, ignore regions (IoBB), per-GT flags.
sampling    fixed-count, foreground-first balanced sampling via random keys + top_k.
proposals   RPN outputs -> fixed-size proposals (top-k, decode, clip, min size, NMS, top-k).
targets     RPN targets (dense per anchor) and ROI targets (sampled ROIs, box/mask targets).
detections  box-head outputs -> fixed-size detections per image.

Conventions: boxes ``[y1, x1, y2, x2]`` in continuous input-pixel coordinates (``uld_jax.core``);
deltas ``[dy, dx, dh, dw]``; every variable-length set is padded and carries a bool validity mask;
padded or degenerate boxes have IoU 0 with everything and are never matched, kept or sampled.
"""
