"""grain input pipeline: built slice datasets -> static-shape batches of ``uld_jax.core.Keys``.

Pipeline (one per process)::

    EpochMixDataset  (MapDataset of (table, sample row): the epoch's samples of every dataset,
        |             re-drawn and shuffled per epoch from the seed, this process's share only)
    .map(SampleLoader)          9-slice context from the slice store, windowing, augmentation,
        |                       padding; the augmentation RNG is seeded by (seed, global position
        |                       in the epoch sequence), so it does not depend on the process layout
    .batch(per-process batch)   before the worker split, so batches do not depend on the worker count
    .to_iter_dataset(ReadOptions) -> .mp_prefetch(MultiprocessingOptions)   worker processes

Everything is a function of (seed, element index), so the output is deterministic for a seed and
the iterator's ``get_state()`` / ``set_state()`` (JSON-able; ``grain.checkpoint.CheckpointHandler``
saves it in orbax checkpoints) restore it exactly.

Batch format (B = per-process batch, H x W = ``config.image_size``, G = ``config.max_boxes``,
R = ``config.max_ignore``), exactly the keys of :class:`uld_jax.core.Keys`:

=================  ===============  ========================================================
key                shape / dtype    meaning
=================  ===============  ========================================================
image              [B,H,W,9] int16  9 slices 2 mm apart (channel 4 = the sample slice),
                                    HU clipped to -1024..3071, scaled to [0, 255], minus 50;
                                    padding = -50 (air); in fixed point, x IMAGE_SCALE (64)
                                    and rounded (0.25 HU steps; ``core.decode_image``, which the
                                    model applies): half of float32's bytes to hand over
image_valid        [B,H,W] bool     False on padding
dataset_id         [B] int32        index into DATASETS (0 for every sample with
                                    ``merge_datasets``)
boxes              [B,G,4] f32      [y1, x1, y2, x2] pixels of ``image``; original (rows first)
                                    and mined positives; 0 where invalid
box_valid          [B,G] bool
masks              [B,G,M,M] uint8  the lesion's mask resampled (nearest) to an M x M grid
                                    laid over its ``mask_boxes`` row (M = ``mask_crop``);
                                    all-zero where no mask is known (mined rows, readers
                                    without masks). Whole-image masks would be B*G*H*W bytes
                                    (17 MB a paper batch) for the mask head's 28 x 28 targets
mask_boxes         [B,G,4] f32      image-pixel box the crop covers (the stored mask's
                                    rectangle, placed; may reach past the canvas); 0 if none
provenance         [B,G] int32      Provenance.ORIGINAL / MINED
lesion_type        [B,G] int32      coarse type (-1 unknown / padding)
lesion_id          [B,G] int64      (-1 unknown / padding)
organ_target       [B,G,3] f32      lung, liver, lymph node targets in [0, 1]
organ_valid        [B,G,3] bool
ignore_boxes       [B,R,4] f32      NRM ignore regions (Provenance.IGNORE rows), after any
                                    positives beyond G (logged), so that none becomes background;
                                    for a ``positive_only`` dataset first one region over the
                                    whole canvas (see below)
ignore_valid       [B,R] bool
sample_id          [B] int64        row of the dataset's sample table (-1: padding element
                                    of a final evaluation batch); unique with dataset_id
is_key_slice       [B] bool
pixel_mm           [B] f32          pixel size of ``image`` (mm), after scaling
=================  ===============  ========================================================

Epoch mixing (training): for every dataset, the *base positives* (key slices, or slices with an
original box, and with ``mined_as_base`` (default) every slice holding a mined positive) all appear
once per epoch; ``negative_ratio`` x as many lesion-free base samples and ``added_ratio`` x as many
of the other overlay-added slices (mining's unlabeled slices) are drawn anew each epoch without
replacement. Without ``mined_as_base`` a mined positive sits on an added slice among hundreds and is
trained about ``added_ratio x positives / added slices`` times per epoch (0.1 on the quick world),
so a precise, short list of mined lesions is almost never seen. The epoch is shuffled; process p
of P takes positions p, p + P, ... of it (the same count on every process), so the processes
partition each epoch.

Dataset variants (the paper's Table 4):

* ``merge_datasets``: every sample's ``dataset_id`` is 0, so a one-expert model
  (``model.num_datasets = 1``) learns all selected datasets as one ("dataset concatenation").
* ``positive_only``: datasets whose lesions are the only thing learnt from their slices. Each of
  their samples gets, ahead of its other ignore regions, one ignore region covering the canvas and
  a margin of one canvas on every side, so that no anchor or ROI of the slice can be a negative (the
  model excludes from negative sampling every anchor / ROI whose IoBB with an ignore region exceeds
  ``roi.ignore_iobb``, and keeps the positives of real boxes unless
  ``roi.ignore_overrides_positive``); and their lesion-free and overlay-added slices are not drawn
  in training mixing (nothing could be learnt from them). For single-type datasets, whose other
  regions may hold unmarked lesions of other types.

:func:`check_config` validates both against the dataset list and the model's expert count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from uld_jax import slice_data as sd
from uld_jax.core import (DATASET_ID, DATASETS, HU_WINDOW, IMAGE_SCALE, NUM_CONTEXT_SLICES,
                          PIXEL_MEAN, TARGET_PIXEL_MM, TARGET_SLICE_MM, Keys, Provenance)

PAD_VALUE = -PIXEL_MEAN   # windowed value of air (-1024 HU), used on padding
IMAGE_DTYPE = np.int16    # the batch's image: fixed point (encode_image / core.decode_image)
MASK_CROP = 56            # default side of each lesion's mask crop (2x the 28 x 28 mask targets)


def encode_image(x: np.ndarray) -> np.ndarray:
    """Window units (float) -> the batch's int16 fixed point, round(x * IMAGE_SCALE). Cheaper to
    make than float16 (about 4.5 against 15 ms for a 512 x 512 x 9 image) and finer (0.25 HU)."""
    y = np.multiply(x, np.float32(IMAGE_SCALE), dtype=np.float32)
    np.rint(y, out=y)
    return y.astype(IMAGE_DTYPE)


PAD_CODE = int(encode_image(np.float32([PAD_VALUE]))[0])   # the padding in the batch's image


def default_input_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """Input-pipeline config for ``variant`` in {'tiny', 'paper'}; compose into the train config.

    tiny: ~2 mm pixels, 160 x 160 canvas, G = R = 8, global batch 2, no worker processes (2 CPU
    cores). paper: 0.8 mm pixels, 512 x 512, G = R = 16, global batch 4 (per-device batch x devices
    on pods), 4 worker processes.
    """
    c = ml_collections.ConfigDict()
    c.data_dir = ""                      # the build's DATA_DIR
    c.datasets = DATASETS                # which built datasets to mix
    c.split = "train"
    c.samples_version = ""               # "" base tables, else a merged overlay table's name
    c.overlays = ()                      # overlay .npz files applied on top at load time
    c.mix = True                         # training mixing; False: every sample once, in order
    c.negative_ratio = 1.0               # lesion-free base samples per base positive, per epoch
    c.added_ratio = 0.5                  # overlay-added slices per base positive, per epoch
    c.shuffle = True
    c.num_epochs = -1                    # -1: endless
    c.seed = 0
    c.context_slices = NUM_CONTEXT_SLICES
    c.context_mm = TARGET_SLICE_MM       # distance between context slices
    c.augment = True
    c.scale_range = (0.8, 1.2)
    c.shift_px = 8.0
    # Key-slice z-jitter (training augmentation, 0: off): a key slice is read centred up to
    # z_jitter x (its smallest annotated lesion's short-axis radius) away, in whole slices, with its
    # boxes kept (the lesion's cross-section there is at least sqrt(1 - z_jitter^2) of its size).
    # DeepLesion marks only key slices; this shows the detector and the embedding the same lesion
    # on the neighbouring slices that mining and volumetric evaluation run on.
    c.z_jitter = 0.0
    c.merge_datasets = False             # True: every sample's dataset_id is 0 (one-expert model)
    c.positive_only = ()                 # datasets that teach positives only (whole-canvas ignore
                                         # region, lesion-free slices not drawn)
    c.mined_as_base = True               # slices holding a mined positive are drawn every epoch
    c.mask_crop = MASK_CROP              # side M of each lesion's mask crop (``mask_boxes``)
    if variant == "tiny":
        c.pixel_mm = 2.0
        c.image_size = (160, 160)
        c.max_boxes = 8
        c.max_ignore = 8
        c.global_batch_size = 2
        c.num_workers = 0
        c.read_threads = 1
    elif variant == "paper":
        c.pixel_mm = TARGET_PIXEL_MM
        c.image_size = (512, 512)
        c.max_boxes = 16
        c.max_ignore = 16
        c.global_batch_size = 4
        c.num_workers = 4
        c.read_threads = 2
    else:
        raise ValueError(f"unknown input config variant {variant!r}; expected 'tiny' or 'paper'")
    c.slice_cache = 32                   # decoded slices cached per process (in-order reads reuse them)
    c.worker_buffer_size = 2
    c.prefetch_buffer_size = 8
    return c


def check_config(config: ml_collections.ConfigDict, num_datasets: int | None = None) -> None:
    """Raises ValueError, naming the keys, when ``datasets`` / ``positive_only`` name unknown
    datasets or (``num_datasets``: the model's expert count) the dataset ids the pipeline
    emits have no expert in the model."""
    if int(config.get("mask_crop", MASK_CROP)) < 1:
        raise ValueError(f"config.mask_crop: {config.mask_crop}; expected a positive mask side")
    names = tuple(config.datasets)
    unknown = [d for d in names if d not in DATASET_ID]
    if unknown:
        raise ValueError(f"config.datasets: unknown dataset(s) {unknown}; expected some of {DATASETS}")
    stray = [d for d in config.get("positive_only", ()) if d not in DATASET_ID]
    if stray:
        raise ValueError(f"config.positive_only: unknown dataset(s) {stray}; expected some of "
                         f"{DATASETS} (those not in config.datasets have no effect)")
    if num_datasets is None or not names:
        return
    n = int(num_datasets)
    if config.get("merge_datasets", False):
        if n != 1:
            raise ValueError(f"data.merge_datasets=True gives every sample dataset id 0 (one expert), "
                             f"but model.num_datasets={n}; set model.num_datasets=1")
        return
    top = max(DATASET_ID[d] for d in names)
    if top >= n:
        raise ValueError(
            f"data.datasets {names} give dataset ids up to {top} ({DATASETS[top]}), but the model "
            f"has model.num_datasets={n} experts ({', '.join(DATASETS[:n])}); raise "
            "model.num_datasets, or set data.merge_datasets=True for one expert over all datasets")


# --------------------------------------------------------------------------------------------------
# Epoch mixing.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Pools:
    positive: np.ndarray   # sample rows, always in the epoch
    negative: np.ndarray   # lesion-free base samples, drawn per epoch
    added: np.ndarray      # overlay-added samples, drawn per epoch


def _pools(table: sd.SampleTable, mix: bool, positive_only: bool = False,
           mined_as_base: bool = True) -> _Pools:
    """``positive_only``: no lesion-free or added samples; ``mined_as_base``: slices holding a
    mined positive are base positives (see the module docstring)."""
    rows = np.arange(len(table))
    if not mix:
        return _Pools(rows, rows[:0], rows[:0])
    base_pos = (table.is_key_slice | table.has_original()) & ~table.added
    if mined_as_base:
        base_pos |= table.has_provenance(Provenance.MINED)
    if positive_only:
        return _Pools(rows[base_pos], rows[:0], rows[:0])
    return _Pools(rows[base_pos], rows[~base_pos & ~table.added], rows[table.added & ~base_pos])


class EpochMixDataset(grain.MapDataset):
    """Element ``i`` of this process -> ``np.array([table index, sample row, global position])``
    (table -1: padding). The global position ``epoch * epoch_length + position in the epoch`` seeds
    the sample's augmentation.

    Args:
      tables: the sample tables to mix (one per dataset).
      seed, shuffle, mix, negative_ratio, added_ratio: see the module docstring.
      positive_only: names of datasets whose lesion-free and added samples are not drawn.
      mined_as_base: slices holding a mined positive are base positives (drawn every epoch).
      num_epochs: None for endless (length ``sys.maxsize``).
      process_index, process_count: this process's share of every epoch.
      pad_to: pad each epoch's per-process length up to a multiple of this (evaluation; otherwise
        the remainder of an epoch that does not divide among the processes is dropped).
    """

    def __init__(self, tables: Sequence[sd.SampleTable], *, seed: int, shuffle: bool = True,
                 mix: bool = True, negative_ratio: float = 1.0, added_ratio: float = 0.5,
                 positive_only: Sequence[str] = (), num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1, pad_to: int | None = None,
                 mined_as_base: bool = True):
        super().__init__()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self._pools = [_pools(t, mix, t.dataset in tuple(positive_only), mined_as_base)
                       for t in tables]
        self._seed = int(seed)
        self._shuffle = shuffle
        self._neg = [min(len(p.negative), int(round(negative_ratio * len(p.positive))))
                     for p in self._pools]
        self._add = [min(len(p.added), int(round(added_ratio * len(p.positive)))) for p in self._pools]
        self.epoch_length = int(sum(len(p.positive) + n + a
                                    for p, n, a in zip(self._pools, self._neg, self._add)))
        if self.epoch_length == 0:
            raise ValueError("no samples to draw from: every selected sample table is empty")
        self._pi, self._pc = process_index, process_count
        if pad_to:
            per = -(-self.epoch_length // process_count)
            self.per_process = -(-per // pad_to) * pad_to
        else:
            self.per_process = self.epoch_length // process_count
            if self.per_process == 0:
                raise ValueError(f"epoch of {self.epoch_length} samples < {process_count} processes")
        self._num_epochs = num_epochs
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        if self._num_epochs is None:
            return sys.maxsize
        return self.per_process * self._num_epochs

    def epoch_elements(self, epoch: int) -> np.ndarray:
        """[epoch_length, 2] (table, row) of ``epoch``, all processes, in epoch order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self._seed, epoch, 0x51DE])
        parts = []
        for t, (p, n_neg, n_add) in enumerate(zip(self._pools, self._neg, self._add)):
            chosen = [p.positive]
            if n_neg:
                chosen.append(rng.choice(p.negative, n_neg, replace=False))
            if n_add:
                chosen.append(rng.choice(p.added, n_add, replace=False))
            rows = np.concatenate(chosen)
            parts.append(np.stack([np.full(rows.shape, t), rows], axis=1))
        el = np.concatenate(parts).astype(np.int64)
        if self._shuffle:
            el = el[rng.permutation(el.shape[0])]
        self._cache = (epoch, el)
        return el

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if self._num_epochs is not None and index >= len(self):
            raise IndexError(index)
        epoch, j = divmod(int(index), self.per_process)
        pos = j * self._pc + self._pi
        if pos >= self.epoch_length:
            return np.array([-1, -1, -1], np.int64)
        t, row = self.epoch_elements(epoch)[pos]
        return np.array([t, row, epoch * self.epoch_length + pos], np.int64)

    def composition(self) -> list[dict[str, int]]:
        """Per table: samples of each pool in one epoch (``positive``, ``negative``, ``added``) and
        the size of the added pool they are drawn from (``added_pool``)."""
        return [{"positive": len(p.positive), "negative": n, "added": a, "added_pool": len(p.added)}
                for p, n, a in zip(self._pools, self._neg, self._add)]

    def __str__(self) -> str:
        return f"EpochMixDataset(epoch_length={self.epoch_length}, per_process={self.per_process})"


# --------------------------------------------------------------------------------------------------
# Geometry (pure numpy).
# --------------------------------------------------------------------------------------------------
def window(hu: np.ndarray) -> np.ndarray:
    """HU -> float32 clipped to HU_WINDOW, scaled to [0, 255], minus PIXEL_MEAN."""
    lo, hi = HU_WINDOW
    x = (np.clip(hu.astype(np.float32), lo, hi) - lo) * np.float32(255.0 / (hi - lo))
    return x - np.float32(PIXEL_MEAN)


_WINDOW_LUT: np.ndarray | None = None


def window_lut(hu: np.ndarray) -> np.ndarray:
    """:func:`window` of int16 HU through a 65536-entry lookup table (one gather, same values)."""
    global _WINDOW_LUT
    if _WINDOW_LUT is None:
        _WINDOW_LUT = window(np.arange(-32768, 32768, dtype=np.int64).astype(np.int16))
    return _WINDOW_LUT[hu.view(np.uint16) ^ np.uint16(0x8000)]


def context_indices(z: int, num_slices: int, slice_mm: float, context: int = NUM_CONTEXT_SLICES,
                    context_mm: float = TARGET_SLICE_MM) -> np.ndarray:
    """[context] slice indices ``context_mm`` apart centred on ``z``; ends replicate the edge slice."""
    step = max(1, int(round(context_mm / slice_mm)))
    half = context // 2
    return np.clip(z + step * np.arange(-half, context - half), 0, num_slices - 1)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Output = ``scale`` * source + ``(ty, tx)`` in continuous pixel coordinates."""

    scale: float
    ty: float
    tx: float


def choose_placement(h: int, w: int, stored_pixel_mm: float, target_pixel_mm: float,
                     image_size: tuple[int, int], rng: np.random.Generator | None,
                     scale_range=(0.8, 1.2), shift_px: float = 8.0) -> Placement:
    """Rescales an h x w slice to ``target_pixel_mm`` (shrunk to fit the canvas if larger), centred,
    then (with ``rng``) a random scale in ``scale_range`` and shift in +-``shift_px``."""
    H, W = image_size
    base = stored_pixel_mm / target_pixel_mm
    if abs(base - 1.0) < 1e-5:      # the tables store pixel_mm as float32
        base = 1.0
    s = min(base, H / h, W / w)
    dy = dx = 0.0
    if rng is not None:
        s *= float(rng.uniform(scale_range[0], scale_range[1]))
        dy, dx = (float(v) for v in rng.uniform(-shift_px, shift_px, size=2))
    # Centring offsets are whole pixels, so that without augmentation at scale 1 the slice is
    # copied exactly (no half-pixel blur).
    return Placement(s, float(np.floor((H - h * s) / 2.0 + 1e-6)) + dy,
                     float(np.floor((W - w * s) / 2.0 + 1e-6)) + dx)


def _axis_map(n_out: int, n_src: int, scale: float, t: float):
    """Bilinear taps along one axis: (i0, i1, weight of i1, valid, nearest source index)."""
    c = (np.arange(n_out, dtype=np.float64) + 0.5 - t) / scale      # continuous source coordinate
    valid = (c >= 0) & (c < n_src)
    f = c - 0.5
    i0 = np.floor(f)
    wgt = (f - i0).astype(np.float32)
    i0 = i0.astype(np.int64)
    return (np.clip(i0, 0, n_src - 1), np.clip(i0 + 1, 0, n_src - 1), wgt, valid,
            np.floor(c).astype(np.int64))


def warp_image(img: np.ndarray, p: Placement, image_size: tuple[int, int]):
    """[h, w, C] float32 -> ([H, W, C] float32 bilinear, [H, W] bool valid); padding = PAD_VALUE.

    Separable: rows are gathered and blended, then columns; channels-last keeps each gather a
    copy of contiguous blocks (about 2x faster than channels-first at 512 x 512 x 9).
    """
    H, W = image_size
    h, w, _ = img.shape
    y0, y1, wy, vy, _ = _axis_map(H, h, p.scale, p.ty)
    x0, x1, wx, vx, _ = _axis_map(W, w, p.scale, p.tx)
    rows = img[y0]
    rows *= (1 - wy)[:, None, None]
    tmp = img[y1]
    tmp *= wy[:, None, None]
    rows += tmp
    out = rows[:, x0]
    out *= (1 - wx)[None, :, None]
    tmp = rows[:, x1]
    tmp *= wx[None, :, None]
    out += tmp
    valid = vy[:, None] & vx[None, :]
    out[~valid] = np.float32(PAD_VALUE)
    return out, valid


def warp_image_antialiased(img: np.ndarray, p: Placement, image_size: tuple[int, int]):
    """:func:`warp_image` that first averages f x f blocks when shrinking by more than 2x
    (f = floor(1 / scale)), so that bilinear sampling does not alias (e.g. 0.8 mm slices into the
    ~2.5 mm tiny canvas). Same geometry and validity as :func:`warp_image`."""
    f = int(np.floor(1.0 / p.scale + 1e-9)) if p.scale < 0.5 else 1
    if f <= 1:
        return warp_image(img, p, image_size)
    h, w, c = img.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    if (hp, wp) != (h, w):
        img = np.pad(img, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    small = img.reshape(hp // f, f, wp // f, f, c).mean(axis=(1, 3), dtype=np.float32)
    out, _ = warp_image(small, Placement(p.scale * f, p.ty, p.tx), image_size)
    H, W = image_size
    valid = _axis_map(H, h, p.scale, p.ty)[3][:, None] & _axis_map(W, w, p.scale, p.tx)[3][None, :]
    out[~valid] = np.float32(PAD_VALUE)
    return out, valid


def warp_boxes(boxes: np.ndarray, p: Placement, h: int, w: int, image_size: tuple[int, int]):
    """[N, 4] source boxes -> ([N, 4] canvas boxes clipped to the image's visible part, [N] keep).

    A box is kept if at least 1 pixel of height and width remains visible.
    """
    H, W = image_size
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * p.scale
    b += np.array([p.ty, p.tx, p.ty, p.tx])
    lo_y, lo_x = max(0.0, p.ty), max(0.0, p.tx)
    hi_y, hi_x = min(float(H), h * p.scale + p.ty), min(float(W), w * p.scale + p.tx)
    b[:, 0] = np.clip(b[:, 0], lo_y, hi_y)
    b[:, 2] = np.clip(b[:, 2], lo_y, hi_y)
    b[:, 1] = np.clip(b[:, 1], lo_x, hi_x)
    b[:, 3] = np.clip(b[:, 3], lo_x, hi_x)
    keep = ((b[:, 2] - b[:, 0]) >= 1.0) & ((b[:, 3] - b[:, 1]) >= 1.0)
    return b.astype(np.float32), keep


def resize_mask(crop: np.ndarray, side: int) -> np.ndarray:
    """[h, w] mask crop -> [side, side] uint8, nearest (cell j of an axis reads source pixel
    floor((j + 0.5) * n / side)); an empty crop gives zeros."""
    h, w = crop.shape[:2]
    if h == 0 or w == 0:
        return np.zeros((side, side), np.uint8)
    sy = np.minimum(((np.arange(side) + 0.5) * h / side).astype(np.int64), h - 1)
    sx = np.minimum(((np.arange(side) + 0.5) * w / side).astype(np.int64), w - 1)
    return (crop[np.ix_(sy, sx)] != 0).astype(np.uint8)


def unaugmented_placement(table: sd.SampleTable, row: int,
                          config: ml_collections.ConfigDict) -> Placement:
    """The placement the loader uses for sample ``row`` when ``config.augment`` is False."""
    c = int(table.case_row[row])
    h, w = (int(v) for v in table.case_hw[c])
    return choose_placement(h, w, float(table.case_pixel_mm[c]), float(config.pixel_mm),
                            tuple(int(v) for v in config.image_size), None)


def image_boxes_to_slice(boxes: np.ndarray, p: Placement) -> np.ndarray:
    """[..., 4] boxes in model-input pixels -> pixels of the stored (preprocessed) slice.

    For mining (overlay rows are in slice pixels) and evaluation: with ``p`` from
    :func:`unaugmented_placement`, detections on a batch map back to the sample table's frame.
    """
    b = np.asarray(boxes, np.float64)
    t = np.array([p.ty, p.tx, p.ty, p.tx])
    return ((b - t) / p.scale).astype(np.float32)


def image_boxes_in_slice(boxes: np.ndarray, p: Placement, height: int, width: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """[..., 4] model-input boxes -> stored-slice pixels clipped to the slice ``[0, height] x
    [0, width]``, and a bool [...] mask of the boxes left with a positive height and width. A box
    lying wholly in the canvas's padding (outside the stored slice) clips to an empty box, which is
    no detection of anything on the slice: evaluation, detection and mining drop those."""
    sb = image_boxes_to_slice(boxes, p)
    sb = np.clip(sb, 0.0, np.array([height, width, height, width], np.float32)).astype(np.float32)
    return sb, (sb[..., 2] > sb[..., 0]) & (sb[..., 3] > sb[..., 1])


def slice_boxes_to_image(boxes: np.ndarray, p: Placement) -> np.ndarray:
    """Inverse of :func:`image_boxes_to_slice` (no clipping)."""
    b = np.asarray(boxes, np.float64)
    return (b * p.scale + np.array([p.ty, p.tx, p.ty, p.tx])).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Sample loading.
# --------------------------------------------------------------------------------------------------
class SampleLoader(grain.transforms.Map):
    """(table, row, global position) -> one example of the batch format (without the batch axis)."""

    def __init__(self, tables: Sequence[sd.SampleTable], stores: Sequence[sd.SliceStore],
                 config: ml_collections.ConfigDict):
        self.tables = list(tables)
        self.stores = list(stores)
        self.image_size = tuple(int(v) for v in config.image_size)
        self.G = int(config.max_boxes)
        self.R = int(config.max_ignore)
        self.pixel_mm = float(config.pixel_mm)
        self.context = int(config.context_slices)
        self.context_mm = float(config.context_mm)
        self.augment = bool(config.augment)
        self.scale_range = tuple(float(v) for v in config.scale_range)
        self.shift_px = float(config.shift_px)
        self.z_jitter = float(config.get("z_jitter", 0.0))
        self.seed = int(config.seed)
        self.merge_datasets = bool(config.get("merge_datasets", False))
        self.positive_only = frozenset(config.get("positive_only", ()))
        self.mask_crop = int(config.get("mask_crop", MASK_CROP))   # configs saved before it

    def whole_canvas_region(self) -> np.ndarray:
        """[4] the ignore region of a ``positive_only`` sample: the canvas and a margin of one
        canvas on every side (border-straddling anchors lie inside it too)."""
        H, W = self.image_size
        return np.array([-H, -W, 2 * H, 2 * W], np.float32)

    def empty_example(self, image: bool = True) -> dict[str, np.ndarray]:
        """An all-invalid example (padding of a final evaluation batch); ``image=False`` leaves the
        image out (the caller sets it)."""
        H, W = self.image_size
        G, R = self.G, self.R
        return {
            **({Keys.IMAGE: np.full((H, W, self.context), PAD_CODE, IMAGE_DTYPE)} if image else {}),
            Keys.IMAGE_VALID: np.zeros((H, W), bool),
            Keys.DATASET_ID: np.int32(0),
            Keys.BOXES: np.zeros((G, 4), np.float32),
            Keys.BOX_VALID: np.zeros((G,), bool),
            Keys.MASKS: np.zeros((G, self.mask_crop, self.mask_crop), np.uint8),
            Keys.MASK_BOXES: np.zeros((G, 4), np.float32),
            Keys.PROVENANCE: np.zeros((G,), np.int32),
            Keys.LESION_TYPE: np.full((G,), -1, np.int32),
            Keys.LESION_ID: np.full((G,), -1, np.int64),
            Keys.ORGAN_TARGET: np.zeros((G, 3), np.float32),
            Keys.ORGAN_VALID: np.zeros((G, 3), bool),
            Keys.IGNORE_BOXES: np.zeros((R, 4), np.float32),
            Keys.IGNORE_VALID: np.zeros((R,), bool),
            Keys.SAMPLE_ID: np.int64(-1),
            Keys.IS_KEY_SLICE: np.bool_(False),
            Keys.PIXEL_MM: np.float32(0.0),
        }

    def read_context(self, t: int, row: int, shift: int = 0) -> np.ndarray:
        """[h, w, context] int16 HU around sample ``row`` of table ``t`` (channel k = slice
        ``z + (k - context // 2) * step``), the centre ``z`` moved by ``shift`` slices (kept in the
        sub-volume)."""
        table = self.tables[t]
        c = int(table.case_row[row])
        n = int(table.case_num_slices[c])
        z = min(max(int(table.slice_index[row]) + int(shift), 0), n - 1)
        idx = context_indices(z, n, float(table.case_slice_mm[c]), self.context, self.context_mm)
        uniq, inv = np.unique(idx, return_inverse=True)
        slices = self.stores[t].read(table.case_slice_start[c] + uniq, str(table.case_id[c]), uniq)
        return np.stack([slices[i] for i in inv], axis=-1)

    def z_shift(self, t: int, row: int, position: int, les: dict[str, np.ndarray]) -> int:
        """Slices by which training sample ``row`` of table ``t`` (at ``position`` of the epoch
        sequence; ``les`` its ``sample_lesions``) is re-centred: 0 unless augmenting with
        ``z_jitter`` > 0 on a key slice with an original box; else uniform over the whole slices
        within z_jitter x the smallest original box's short-axis radius (mm, from the stored pixel
        size and slice spacing). Its own random stream, so turning it on leaves the other
        augmentations' draws as they were."""
        table = self.tables[t]
        if not (self.augment and self.z_jitter > 0 and table.is_key_slice[row]):
            return 0
        orig = les["provenance"] == int(Provenance.ORIGINAL)
        if not orig.any():
            return 0
        b = np.asarray(les["boxes"], np.float64)[orig]
        c = int(table.case_row[row])
        radius_mm = 0.5 * float(np.min(np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))
        radius_mm *= float(table.case_pixel_mm[c])
        reach = int(np.floor(self.z_jitter * radius_mm / float(table.case_slice_mm[c]) + 1e-9))
        if reach <= 0:
            return 0
        rng = np.random.default_rng([self.seed, int(position), 0x21D])
        return int(rng.integers(-reach, reach + 1))

    def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
        t, row = int(element[0]), int(element[1])
        if t < 0:
            return self.empty_example()
        rng = np.random.default_rng([self.seed, int(element[2]), 0xA46])
        table = self.tables[t]
        c = int(table.case_row[row])
        les = table.sample_lesions(row)
        hu = self.read_context(t, row, self.z_shift(t, row, int(element[2]), les))
        h, w, _ = hu.shape
        p = choose_placement(h, w, float(table.case_pixel_mm[c]), self.pixel_mm, self.image_size,
                             rng if self.augment else None, self.scale_range, self.shift_px)
        image, valid = warp_image_antialiased(window_lut(hu), p, self.image_size)
        ex = self.empty_example(image=False)
        ex[Keys.IMAGE] = encode_image(image)
        ex[Keys.IMAGE_VALID] = valid
        ex[Keys.DATASET_ID] = np.int32(0 if self.merge_datasets else table.dataset_id)
        ex[Keys.SAMPLE_ID] = np.int64(row)
        ex[Keys.IS_KEY_SLICE] = np.bool_(table.is_key_slice[row])
        ex[Keys.PIXEL_MM] = np.float32(table.case_pixel_mm[c] / p.scale)
        prov = les["provenance"]
        boxes, keep = warp_boxes(les["boxes"], p, h, w, self.image_size)
        # Positives: original rows first, then mined. Positives beyond G become ignore regions
        # (a dropped lesion must not turn into background), ahead of the NRM ignore rows.
        pos_all = [int(i) for pv in (Provenance.ORIGINAL, Provenance.MINED)
                   for i in np.flatnonzero((prov == int(pv)) & keep)]
        pos, overflow = pos_all[: self.G], pos_all[self.G:]
        for g, i in enumerate(pos):
            ex[Keys.BOXES][g] = boxes[i]
            ex[Keys.BOX_VALID][g] = True
            ex[Keys.PROVENANCE][g] = prov[i]
            ex[Keys.LESION_TYPE][g] = les["lesion_type"][i]
            ex[Keys.LESION_ID][g] = les["lesion_id"][i]
            ex[Keys.ORGAN_TARGET][g] = les["organ_target"][i]
            ex[Keys.ORGAN_VALID][g] = les["organ_valid"][i]
            if len(les["mask"][i]):
                rect = les["mask_rect"][i]
                ex[Keys.MASKS][g] = resize_mask(sd.decode_mask(rect, les["mask"][i]), self.mask_crop)
                ex[Keys.MASK_BOXES][g] = slice_boxes_to_image(np.asarray(rect, np.float32), p)
        ign_all = overflow + [int(i) for i in np.flatnonzero((prov == int(Provenance.IGNORE)) & keep)]
        first = 0
        if table.dataset in self.positive_only:
            ex[Keys.IGNORE_BOXES][0] = self.whole_canvas_region()
            ex[Keys.IGNORE_VALID][0] = True
            first = 1
        ign = np.asarray(ign_all[: self.R - first], np.int64)
        ex[Keys.IGNORE_BOXES][first:first + len(ign)] = boxes[ign]
        ex[Keys.IGNORE_VALID][first:first + len(ign)] = True
        if overflow or len(ign_all) > self.R - first:
            self._warn_overflow(table, row, len(pos_all), len(ign_all) - len(overflow))
        return ex

    def _warn_overflow(self, table: sd.SampleTable, row: int, n_pos: int, n_ign: int) -> None:
        self._overflows = getattr(self, "_overflows", 0) + 1
        if self._overflows in (1, 10, 100, 1000):
            logging.warning(
                "%s %s slice %d: %d positives for max_boxes=%d (extra ones become ignore regions) and "
                "%d ignore regions for max_ignore=%d (extra ones dropped); %d such samples so far in "
                "this process. Raise config.max_boxes / max_ignore.", table.dataset,
                table.case_id[table.case_row[row]], int(table.slice_index[row]), n_pos, self.G,
                n_ign, self.R, self._overflows)


# --------------------------------------------------------------------------------------------------
# Public constructors.
# --------------------------------------------------------------------------------------------------
def load_tables(config: ml_collections.ConfigDict) -> tuple[list[sd.SampleTable], list[sd.SliceStore]]:
    """The sample tables (``config.split``, version, overlays) and slice stores of ``config.datasets``."""
    check_config(config)
    tables, stores = [], []
    for name in config.datasets:
        tables.append(sd.load_sample_table(config.data_dir, name, config.split,
                                           version=config.samples_version or None,
                                           overlays=tuple(config.overlays)))
        stores.append(sd.SliceStore(sd.dataset_dir_for(config.data_dir, name), name,
                                    cache_slices=int(config.slice_cache)))
    return tables, stores


def _process_index_count(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def _epoch_mix(config: ml_collections.ConfigDict, tables, **kw) -> EpochMixDataset:
    """The :class:`EpochMixDataset` of ``config``'s mixing keys over ``tables``."""
    return EpochMixDataset(tables, seed=config.seed, shuffle=config.shuffle, mix=config.mix,
                           negative_ratio=config.negative_ratio, added_ratio=config.added_ratio,
                           positive_only=tuple(config.get("positive_only", ())),
                           mined_as_base=bool(config.get("mined_as_base", True)), **kw)


def make_dataset(config: ml_collections.ConfigDict, *, tables=None, stores=None,
                 process_index: int | None = None, process_count: int | None = None,
                 pad_final_batch: bool | None = None) -> grain.IterDataset:
    """The grain pipeline of this process (an ``IterDataset`` of batches; iterate it for an iterator
    with ``get_state`` / ``set_state``).

    ``process_index`` / ``process_count`` default to ``jax.process_index()`` / ``jax.process_count()``.
    The per-process batch is ``global_batch_size // process_count``. ``pad_final_batch`` (default:
    when not mixing) pads the last batch of every epoch with ``sample_id = -1`` examples instead of
    dropping the remainder (evaluation).
    """
    pi, pc = _process_index_count(process_index, process_count)
    if config.global_batch_size % pc:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by "
                         f"{pc} processes")
    batch = config.global_batch_size // pc
    if tables is None or stores is None:
        tables, stores = load_tables(config)
    pad = (not config.mix) if pad_final_batch is None else pad_final_batch
    num_epochs = None if config.num_epochs is None or config.num_epochs < 0 else int(config.num_epochs)
    ds = _epoch_mix(config, tables, num_epochs=num_epochs, process_index=pi, process_count=pc,
                    pad_to=batch if pad else None)
    ds = ds.map(SampleLoader(tables, stores, config))
    ds = ds.batch(batch, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(config.read_threads),
                                                 prefetch_buffer_size=int(config.prefetch_buffer_size)))
    if config.num_workers > 0:
        it_ds = worker_prefetch(it_ds, int(config.num_workers), int(config.worker_buffer_size))
    return it_ds


def worker_prefetch(it_ds: grain.IterDataset, num_workers: int,
                    buffer_size: int) -> grain.IterDataset:
    """``it_ds`` made by ``num_workers`` worker processes (each holding up to ``buffer_size``
    elements), as the pipeline runs it."""
    # grain's worker start reads absl flags (--grain_enable_multiprocess_worker_profiling); a
    # program not started through absl.app has not parsed them, so take their defaults.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                          per_worker_buffer_size=buffer_size))


def steps_per_epoch(config: ml_collections.ConfigDict, tables=None,
                    process_count: int | None = None) -> int:
    """Number of global batches in one epoch of the mixing."""
    if tables is None:
        tables, _ = load_tables(config)
    _, pc = _process_index_count(0, process_count)
    ds = _epoch_mix(config, tables, process_count=pc)
    return ds.per_process // (config.global_batch_size // pc)


def epoch_composition(config: ml_collections.ConfigDict, tables=None) -> dict[str, dict[str, int]]:
    """``{dataset: EpochMixDataset.composition() row}``: what one epoch of ``config``'s mixing draws
    from each dataset (all processes together)."""
    if tables is None:
        tables, _ = load_tables(config)
    return {t.dataset: c for t, c in zip(tables, _epoch_mix(config, tables).composition())}


def drawn_per_epoch(row: dict[str, int]) -> int:
    """Samples one dataset's :func:`epoch_composition` row draws per epoch (every count but the
    ``added_pool`` it draws its added slices from)."""
    return sum(v for k, v in row.items() if k != "added_pool")


def epoch_length(composition: dict[str, dict[str, int]]) -> int:
    """Samples of one mixing epoch: :func:`drawn_per_epoch` summed over the datasets."""
    return sum(drawn_per_epoch(row) for row in composition.values())


def to_global_arrays(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """This process's batch -> global ``jax.Array`` s ([global_batch, ...]) laid out by ``sharding``.

    ``sharding``: e.g. ``NamedSharding(mesh, P('data'))`` over all processes' devices; each process
    passes its own per-process batch (``make_dataset`` gives each a disjoint share), as
    ``jax.make_array_from_process_local_data`` expects.
    """
    import jax  # pylint: disable=g-import-not-at-top
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def save_iterator_state(iterator, path: str) -> None:
    """Writes ``iterator.get_state()`` as JSON (atomic). Orbax users: ``grain.checkpoint.CheckpointSave``."""
    sd.atomic_write_json(path, iterator.get_state())


def restore_iterator_state(iterator, path: str) -> None:
    """Inverse of :func:`save_iterator_state`."""
    with open(path, encoding="utf-8") as f:
        iterator.set_state(json.load(f))
