"""Greedy non-maximum suppression with static shapes, tiled so memory stays O(tile * N).

Contract
--------
* Candidates are visited in descending score; equal scores are visited lower index first, so the
  result is deterministic.
* A candidate is suppressed by an already kept box when their IoU is *strictly* greater than
  ``iou_threshold`` (torchvision / Detectron rule).
* Padded rows (``valid`` False), degenerate boxes and non-finite scores are never kept and
  suppress nothing.
* The output is ``max_output`` indices into the input, in descending score order, plus a validity
  mask; unused slots hold index 0 and ``valid`` False.

Algorithm (the padded NMS of TF / fvlm, written here from the description): sort once, split the
sorted boxes into tiles of ``tile_size``; for tile t, (1) drop its boxes that overlap any box kept
in tiles < t -- one [tile, N] IoU block, never [N, N]; (2) resolve suppression inside the tile by
iterating ``alive_j = candidate_j & not any_{i<j} (alive_i & IoU_ij > thr)`` to its fixed point,
which is exactly the greedy result (entry j is final one iteration after entries < j are). The tile
loop is a ``while_loop`` that stops as soon as ``max_output`` boxes are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from uld_jax.ops import boxes as box_ops

Array = jnp.ndarray


def pad_slots(idx: Array, ok: Array, size: int) -> tuple[Array, Array]:
    """Pads ``(indices [k], valid [k])`` with invalid slots (index 0, False) to the static ``size``
    (no-op when ``k == size``)."""
    k = idx.shape[0]
    if k < size:
        idx = jnp.pad(idx, (0, size - k))
        ok = jnp.pad(ok, (0, size - k))
    return idx, ok


def top_k_by_score(
    scores: Array, k: int, valid: Array | None = None
) -> tuple[Array, Array]:
    """Class-agnostic top-k of one image (the pre-NMS cut), ties lower index first.

    Args:
      scores: [N] float.
      k: static count; may exceed N (the extra slots are invalid).
      valid: optional bool [N]; invalid rows (and non-finite scores) rank after every valid one.

    Returns:
      ``(indices [k] int32, valid [k] bool)``; invalid slots hold index 0.
    """
    scores = jnp.asarray(scores)
    n = scores.shape[0]
    ok = jnp.isfinite(scores)
    if valid is not None:
        ok = ok & jnp.asarray(valid, bool)
    kk = min(k, n)
    # Rank invalid rows last without letting a -inf score collide with them.
    # (+ 0.0 turns -0.0 into 0.0 so that the two zeros tie, as equal scores must.)
    key = jnp.where(ok, scores.astype(jnp.float32) + 0.0, -jnp.inf)
    _, idx = lax.top_k(key, kk)
    sel_ok = ok[idx]
    idx = jnp.where(sel_ok, idx, 0).astype(jnp.int32)
    return pad_slots(idx, sel_ok, k)


def _sort_candidates(scores: Array, ok: Array) -> Array:
    """Permutation visiting valid rows by descending score, ties by index, invalid rows last."""
    n = scores.shape[0]
    iota = jnp.arange(n, dtype=jnp.int32)
    neg = jnp.where(ok, -scores.astype(jnp.float32) + 0.0, 0.0)  # -0.0 and 0.0 tie
    _, _, order = lax.sort((jnp.logical_not(ok).astype(jnp.int32), neg, iota), num_keys=3)
    return order


def nms(
    boxes: Array,
    scores: Array,
    iou_threshold: float,
    max_output: int,
    valid: Array | None = None,
    tile_size: int = 256,
) -> tuple[Array, Array]:
    """Greedy NMS of one image with a fixed-size output.

    Args:
      boxes: [N, 4] ``[y1, x1, y2, x2]`` pixels.
      scores: [N] float.
      iou_threshold: suppress when IoU > this.
      max_output: static number of output slots.
      valid: optional bool [N]; padded rows are ignored.
      tile_size: static tile length; memory per step is ``tile_size * N`` IoUs.

    Returns:
      ``(indices [max_output] int32, valid [max_output] bool)``: kept rows in descending score.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores)
    n = boxes.shape[0]
    ok = box_ops.is_valid_box(boxes) & jnp.isfinite(scores)
    if valid is not None:
        ok = ok & jnp.asarray(valid, bool)
    tile = max(1, min(int(tile_size), n))
    num_tiles = -(-n // tile)
    padded = num_tiles * tile

    order = _sort_candidates(scores, ok)
    sboxes = jnp.pad(boxes[order], ((0, padded - n), (0, 0)))
    sok = jnp.pad(ok[order], (0, padded - n))
    positions = jnp.arange(padded, dtype=jnp.int32)
    thr = jnp.asarray(iou_threshold, jnp.float32)
    tri = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # i suppresses j only if i < j

    def cond(carry):
        t, _, count = carry
        return (t < num_tiles) & (count < max_output)

    def body(carry):
        t, keep, count = carry
        start = t * tile
        tboxes = lax.dynamic_slice_in_dim(sboxes, start, tile)
        cand = lax.dynamic_slice_in_dim(keep, start, tile)
        # (1) Suppression by boxes kept in earlier tiles.
        earlier = keep & (positions < start)
        iou_prev = box_ops.pairwise_iou(tboxes, sboxes, cand, earlier)  # [tile, padded]
        cand = cand & ~jnp.any(iou_prev > thr, axis=1)
        # (2) Greedy suppression inside the tile, by fixed-point iteration.
        over = (box_ops.pairwise_iou(tboxes, tboxes) > thr) & tri

        def inner_cond(state):
            alive, prev = state
            return jnp.any(alive != prev)

        def inner_body(state):
            alive, _ = state
            new = cand & ~jnp.any(over & alive[:, None], axis=0)
            return new, alive

        first = cand & ~jnp.any(over & cand[:, None], axis=0)
        alive, _ = lax.while_loop(inner_cond, inner_body, (first, cand))
        keep = lax.dynamic_update_slice_in_dim(keep, alive, start, axis=0)
        return t + 1, keep, count + jnp.sum(alive, dtype=jnp.int32)

    t_end, keep, _ = lax.while_loop(cond, body, (jnp.int32(0), sok, jnp.int32(0)))
    keep = keep & (positions < t_end * tile)  # tiles never visited (early stop) keep nothing

    k = min(max_output, padded)
    rank_key = jnp.where(keep, -positions.astype(jnp.float32), -jnp.inf)
    _, pos = lax.top_k(rank_key, k)
    out_ok = keep[pos]
    out_idx = jnp.where(out_ok, jnp.pad(order, (0, padded - n))[pos], 0).astype(jnp.int32)
    return pad_slots(out_idx, out_ok, max_output)


def batched_nms(
    boxes: Array,
    scores: Array,
    iou_threshold: float,
    max_output: int,
    valid: Array | None = None,
    tile_size: int = 256,
) -> tuple[Array, Array]:
    """:func:`nms` vmapped over images: [B, N, 4], [B, N], [B, N] -> ([B, max_output], [B, max_output])."""
    boxes = jnp.asarray(boxes)
    if valid is None:
        valid = jnp.ones(boxes.shape[:2], bool)
    fn = lambda b, s, v: nms(b, s, iou_threshold, max_output, v, tile_size)
    return jax.vmap(fn)(boxes, scores, valid)
