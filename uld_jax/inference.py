"""Shared inference core: a trained MELD from a workdir or checkpoint, one jitted batched predict
function per (model, batch size, expert), and the box mappings model input <-> stored slice <->
original scan voxels / world mm.

Used by ``python -m uld_jax.detect`` (a scan file), ``python -m uld_jax.evaluate --workdir`` (a built
TFDS split) and the mining driver::

    loaded = load_model(workdir="runs/meld")                 # latest orbax checkpoint + its config
    pred = Predictor(loaded, batch_size=4, expert="deeplesion")
    out = pred(images, image_valid, sample_valid)            # numpy dict, see Predictor.__call__

Checkpoints are the training system's (``uld_jax.train``): ``WORKDIR/checkpoints/<step>/`` with the
items ``state`` (params, other variables such as BatchNorm statistics, optimizer state, step) and
``config`` (the experiment config as JSON). ``--checkpoint PATH`` names one ``<step>`` folder.

Coordinate frames (boxes are internal ``[y1, x1, y2, x2]`` continuous pixels, see ``uld_jax.core``):

* model input: the ``config.data.image_size`` canvas the loader places a stored slice on;
* stored slice: the preprocessed slice (``data_prep.readers.common.preprocess_scan``: canonical
  orientation, body crop, ``pixel_mm`` pixels, ``slice_mm`` slices); model input -> stored slice is
  ``input_pipeline.image_boxes_to_slice`` with the unaugmented placement;
* scan: the original scan's voxel grid (SimpleITK index order i, j, k = column, row, slice) and its
  world coordinates (LPS mm), see :class:`ScanMapping`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from uld_jax import core
from uld_jax.core import Keys


class ModelLoadError(ValueError):
    """A workdir / checkpoint / config that cannot give a model; the message names the path."""


# ------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------
def _update_config(cfg: ml_collections.ConfigDict, saved: dict, where: str) -> None:
    """Overwrites the keys of ``cfg`` with the values of ``saved`` (JSON: lists where tuples were).
    Keys of ``saved`` that ``cfg`` lacks are ignored (a newer config may have added keys)."""
    for key, value in saved.items():
        if key not in cfg:
            continue
        cur = cfg[key]
        if isinstance(cur, ml_collections.ConfigDict):
            if isinstance(value, dict):
                _update_config(cur, value, f"{where}.{key}")
            continue
        if isinstance(cur, tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        try:
            cfg[key] = value
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{where}.{key}: stored value {value!r} does not fit ({e})") from None


def configs_from_saved(saved: dict) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The experiment config as a checkpoint stores it (JSON dict) -> (model config, data config).

    Defaults of ``saved['variant']`` (``tiny`` / ``paper``) first, then every stored value. The data
    config is the pipeline the trainer ran: its global batch and seed are the experiment's
    ``batch_size`` and ``seed`` (``tasks.build_data`` sets them so; the stored ``data`` section
    keeps those two keys' defaults)."""
    from uld_jax.input_pipeline import default_input_config
    from uld_jax.models.config import model_config

    if "model" not in saved:
        raise ModelLoadError("the stored config has no 'model' entry (not a MELD experiment config)")
    variant = saved.get("model", {}).get("variant", saved.get("variant", "tiny"))
    m = model_config(variant)
    _update_config(m, saved["model"], "model")
    d = default_input_config(variant)
    _update_config(d, saved.get("data", {}), "data")
    for key, data_key in (("batch_size", "global_batch_size"), ("seed", "seed")):
        if saved.get(key) is not None:
            d[data_key] = int(saved[key])
    return m, d


def load_config_file(spec: str) -> dict:
    """``'configs/meld.py:tiny'`` -> that config as a JSON-like dict (what a checkpoint stores)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: config file not found")
    modspec = importlib.util.spec_from_file_location(f"_uld_cfg_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(modspec)
    try:
        modspec.loader.exec_module(mod)
        cfg = mod.get_config(arg or None)
    except Exception as e:  # a config file is user code: name it with whatever it raised
        raise ModelLoadError(f"{spec}: cannot build the config ({type(e).__name__}: {e})") from None
    return json.loads(cfg.to_json_best_effort())


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class LoadedModel:
    """A MELD model with restored variables.

    ``variables``: ``{'params', 'batch_stats'?}`` on the default device; ``model_config`` /
    ``data_config``: the run's model and input-pipeline configs (image size, pixel mm, context);
    ``step``: checkpoint step; ``source``: the checkpoint folder.
    """

    model: Any
    variables: dict
    model_config: ml_collections.ConfigDict
    data_config: ml_collections.ConfigDict
    step: int
    source: str

    @property
    def expert_names(self) -> tuple[str, ...]:
        """Dataset experts of the model, indexed as the model's dataset columns."""
        return core.DATASETS[: int(self.model_config.num_datasets)]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.data_config.image_size)


def resolve_checkpoint(workdir: str | None, checkpoint: str | None,
                       step: int | None = None) -> tuple[str, int | None]:
    """(workdir, step) from ``--workdir`` (latest step unless ``step``) or ``--checkpoint``
    (``WORKDIR/checkpoints/<step>``)."""
    if (workdir is None) == (checkpoint is None):
        raise ModelLoadError("give exactly one of --workdir or --checkpoint")
    if workdir is not None:
        if not os.path.isdir(os.path.join(workdir, "checkpoints")):
            raise ModelLoadError(f"{workdir}: not a training workdir (no checkpoints/ folder)")
        return workdir, step
    ck = os.path.normpath(os.path.abspath(checkpoint))
    name, parent = os.path.basename(ck), os.path.dirname(ck)
    if not (os.path.isdir(ck) and name.isdigit() and os.path.basename(parent) == "checkpoints"
            and os.path.isdir(os.path.join(ck, "state"))):
        raise ModelLoadError(f"{checkpoint}: not a checkpoint folder WORKDIR/checkpoints/<step>/ "
                             "with a 'state' item")
    return os.path.dirname(parent), int(name)


def load_model(workdir: str | None = None, checkpoint: str | None = None, *,
               step: int | None = None, config: dict | str | None = None) -> LoadedModel:
    """Restores MELD from a training workdir (latest or ``step``) or one checkpoint folder.

    ``config``: a config dict or file spec (``configs/meld.py:tiny``) used instead of the one stored
    in the checkpoint (needed only for checkpoints saved without their config). Raises
    :class:`ModelLoadError` naming the path on any problem.
    """
    from uld_jax import train
    from uld_jax.models.meld import MELD

    wd, step = resolve_checkpoint(workdir, checkpoint, step)
    try:
        step, state = train.load_checkpoint_state(wd, step)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{wd}: cannot restore the checkpoint ({e})") from None
    if isinstance(config, str):
        saved = load_config_file(config)
    elif config is not None:
        saved = dict(config)
    else:
        try:
            saved = train.load_checkpoint_config(wd, step)
        except Exception as e:  # orbax raises several types for a missing item
            raise ModelLoadError(f"{wd}/checkpoints/{step}: no stored config ({type(e).__name__}); "
                                 "pass --config CONFIG.py:variant") from None
    mcfg, dcfg = configs_from_saved(saved)
    if int(mcfg.image_size) != int(dcfg.image_size[0]):
        mcfg.image_size = int(dcfg.image_size[0])
    if "params" not in state:
        raise ModelLoadError(f"{wd}/checkpoints/{step}: the state holds no 'params'")
    variables = {"params": state["params"], **dict(state.get("other") or {})}
    model = MELD(mcfg)
    _check_structure(model, variables, f"{wd}/checkpoints/{step}")
    return LoadedModel(model=model, variables=jax.device_put(variables), model_config=mcfg,
                       data_config=dcfg, step=int(step), source=os.path.join(wd, "checkpoints", str(step)))


def _check_structure(model, variables: dict, where: str) -> None:
    """Compares the restored parameter tree with the config's model (shapes only, no compile)."""
    from uld_jax.models.meld import MELD

    cfg = model.cfg
    image = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_slices), jnp.float32)
    want = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x,
                                               method=MELD.init_all), image)
    got_p = jax.tree.map(lambda a: tuple(np.shape(a)), variables["params"])
    want_p = jax.tree.map(lambda a: tuple(a.shape), want["params"])
    if got_p != want_p:
        flat_g = dict(jax.tree_util.tree_flatten_with_path(got_p)[0])
        flat_w = dict(jax.tree_util.tree_flatten_with_path(want_p)[0])
        diff = sorted(set(flat_g) ^ set(flat_w)) or sorted(
            k for k in flat_g if flat_g[k] != flat_w.get(k))
        name = jax.tree_util.keystr(diff[0]) if diff else "?"
        raise ModelLoadError(f"{where}: parameters do not match the stored config's model "
                             f"(first difference at {name}); wrong --config?")


# ------------------------------------------------------------------------------------------------
# The jitted predict function.
# ------------------------------------------------------------------------------------------------
def _rescore(module, feat, boxes):
    """Every expert's eq.-1 score of given boxes: feat [B, h, w, C], boxes [B, K, 4] (input
    pixels) -> [B, K, D] in [0, 1]."""
    from uld_jax.models.roi_heads import organ_weights

    cfg = module.cfg
    roi = module._roi_align(feat, boxes, cfg.roi.pool_size)          # [B, K, 7, 7, C]
    head = jax.nn.sigmoid(module.cls_heads(roi))                     # [B, K, H, D]
    w = organ_weights(module._gate_logits(roi), cfg.num_organ_heads, boxes.shape[:2])  # [B, K, H]
    return jnp.sum(w[..., None] * head, axis=-2) / jnp.sum(w, axis=-1)[..., None]


class Predictor:
    """One compiled inference function for a fixed batch: ``[B, H, W, 9]`` images -> the selected
    dataset expert's ``K = roi.detections_per_image`` detections per image.

    ``expert``: a dataset name (``deeplesion``: the universal expert, the default) or index.
    ``with_masks`` / ``with_embeddings``: also return the mask head's / embedding head's output for
    the selected expert's detections.
    ``num_traces`` counts how often the function was traced (1 after any number of calls with the
    fixed shapes and one kind of image: float, or the input pipeline's int16).
    """

    def __init__(self, loaded: LoadedModel, batch_size: int, expert: str | int = "deeplesion",
                 with_masks: bool = True, with_embeddings: bool = False):
        names = loaded.expert_names
        if isinstance(expert, str):
            if expert not in names:
                raise ModelLoadError(f"expert {expert!r}: this model has the experts {names}")
            expert = names.index(expert)
        if not 0 <= int(expert) < len(names):
            raise ModelLoadError(f"expert {expert}: this model has {len(names)} experts")
        self.loaded = loaded
        self.expert = int(expert)
        self.expert_name = names[self.expert]
        self.batch_size = int(batch_size)
        self.with_masks = bool(with_masks) and bool(loaded.model_config.use_mask)
        self.with_embeddings = bool(with_embeddings) and bool(loaded.model_config.use_embedding)
        self.num_traces = 0
        self._fn = jax.jit(self._predict)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.loaded.image_size

    def _predict(self, variables, images, image_valid, sample_valid):
        from uld_jax.models.fpn import DenseNetFPN

        self.num_traces += 1
        model, e = self.loaded.model, self.expert
        batch = {Keys.IMAGE: images, Keys.IMAGE_VALID: image_valid}
        # only the selected expert's proposals, NMS, ROI heads, masks and embeddings are computed
        out, inter = model.apply(
            variables, batch, train=False, experts=(e,), mutable=["intermediates"],
            capture_intermediates=lambda m, name: isinstance(m, DenseNetFPN) and name == "__call__")
        feat = inter["intermediates"]["backbone"]["__call__"][0]
        boxes = out["boxes"][:, 0]                                      # [B, K, 4]
        res = {
            "boxes": boxes,
            "scores": out["scores"][:, 0],
            "valid": out["valid"][:, 0] & sample_valid[:, None],
            "organ_weights": out["organ_weights"][:, 0],
            "head_scores": out["head_scores"][:, 0],
            "expert_scores": model.apply(variables, feat, boxes, method=_rescore),
        }
        if self.with_masks:
            res["masks"] = out["masks"][:, 0]
        if self.with_embeddings:
            res["embeddings"] = out["embeddings"][:, 0]
        return res

    def device_call(self, images: np.ndarray, image_valid: np.ndarray, sample_valid: np.ndarray):
        """Dispatches one batch (asynchronously); returns device arrays. The input pipeline's int16
        fixed-point images go to the device as they are (half the bytes; the model decodes them),
        float images as float32: the function is traced once per kind."""
        if not np.issubdtype(images.dtype, np.integer):
            images = jnp.asarray(images, jnp.float32)
        return self._fn(self.loaded.variables, jnp.asarray(images),
                        jnp.asarray(image_valid, bool), jnp.asarray(sample_valid, bool))

    def __call__(self, images: np.ndarray, image_valid: np.ndarray,
                 sample_valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Runs one batch.

        Args:
          images: [B, H, W, 9] the loader's windowed image (HU window -> [0, 255] - 50): float, or
            the batch's int16 fixed point (``core.decode_image``).
          image_valid: [B, H, W] bool, False on padding.
          sample_valid: [B] bool, False for padding samples of a last batch (their detections come
            back invalid).

        Returns numpy arrays (K detections of the selected expert, sorted by score): ``boxes``
        [B, K, 4] model-input pixels, ``scores`` [B, K] (eq. 1), ``valid`` [B, K], ``organ_weights``
        [B, K, H] (w0 = 1, then lung, liver, lymph node), ``head_scores`` [B, K, H] (each organ
        head's sigmoid score), ``expert_scores`` [B, K, D] (every expert's eq.-1 score re-computed on
        the final box), ``masks`` [B, K, 28, 28] mask probabilities in the box frame (with masks),
        ``embeddings`` [B, K, E] unit lesion embeddings (with embeddings; for MAM).
        """
        if images.shape[0] != self.batch_size:
            raise ValueError(f"batch of {images.shape[0]}; this predictor is compiled for "
                             f"{self.batch_size} (pad with pad_batch)")
        if sample_valid is None:
            sample_valid = np.ones(self.batch_size, bool)
        return jax.tree.map(np.asarray, self.device_call(images, image_valid, sample_valid))


def pad_batch(images: np.ndarray, image_valid: np.ndarray, batch_size: int):
    """Pads a short last batch to ``batch_size``: (images, image_valid, sample_valid)."""
    n = images.shape[0]
    sv = np.zeros(batch_size, bool)
    sv[:n] = True
    if n == batch_size:
        return images, image_valid, sv
    pad = batch_size - n
    from uld_jax.input_pipeline import PAD_CODE, PAD_VALUE

    fill = PAD_CODE if np.issubdtype(images.dtype, np.integer) else PAD_VALUE   # the same encoding
    images = np.concatenate([images, np.full((pad,) + images.shape[1:], fill, images.dtype)])
    image_valid = np.concatenate([image_valid, np.zeros((pad,) + image_valid.shape[1:], bool)])
    return images, image_valid, sv


def cached_model(workdir: str | None, checkpoint: str | None, step: int | None,
                 config: str | None) -> LoadedModel:
    """:func:`load_model` memoised per process and checkpoint (a driver that calls detect on many
    scans, tests): ``--workdir W`` and ``--checkpoint W/checkpoints/<latest>`` give the same object.
    A checkpoint written after the first call is not seen by later calls with ``step=None``."""
    wd, st = resolve_checkpoint(workdir, checkpoint, step)
    if st is None:
        ck = os.path.join(wd, "checkpoints")
        try:   # finished saves only (orbax marks them on local file systems)
            steps = [int(n) for n in os.listdir(ck)
                     if n.isdigit() and os.path.isfile(os.path.join(ck, n, "commit_success.txt"))]
        except OSError:
            steps = []
        st = max(steps) if steps else None     # None: load_model asks orbax for the latest
    return _cached_model(os.path.abspath(wd), st, config)


@functools.lru_cache(maxsize=4)
def _cached_model(workdir: str, step: int | None, config: str | None) -> LoadedModel:
    return load_model(workdir, None, step=step, config=config)


@functools.lru_cache(maxsize=8)
def cached_predictor(loaded: LoadedModel, batch_size: int, expert: str, with_masks: bool) -> Predictor:
    """One :class:`Predictor` (one compilation) per model, batch size, expert and mask flag."""
    return Predictor(loaded, batch_size, expert, with_masks)



# ------------------------------------------------------------------------------------------------
# Masks (host side).
# ------------------------------------------------------------------------------------------------
def sample_mask(mask: np.ndarray, box: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A box-frame mask [M, M] (probabilities) read at image points: the rule of
    ``uld_jax.ops.roi_align.paste_masks`` (bilinear, ``align_corners=False``, zero outside the grid).

    ``box``: [4] internal box (image pixels); ``ys`` [n], ``xs`` [m]: continuous image coordinates
    (a pixel centre is ``index + 0.5``). Returns [n, m] float32.
    """
    m = np.asarray(mask, np.float32)
    n = m.shape[-1]
    y1, x1, y2, x2 = (float(v) for v in box)

    def taps(u, lo, hi):
        c = (np.asarray(u, np.float64) - lo) / max(hi - lo, 1e-9) * n - 0.5
        i0 = np.floor(c).astype(np.int64)
        w1 = (c - i0).astype(np.float32)
        mat = np.zeros((len(c), n), np.float32)
        for i, w in ((i0, 1.0 - w1), (i0 + 1, w1)):
            ok = (i >= 0) & (i < n)
            mat[np.flatnonzero(ok), i[ok]] += w[ok]
        return mat

    return taps(ys, y1, y2) @ m @ taps(xs, x1, x2).T


def paste_mask(mask: np.ndarray, box: np.ndarray, height: int, width: int):
    """:func:`sample_mask` at the centres of the image pixels the box touches (clipped to the image).

    Returns ``(y0, x0, crop)``: crop [h, w] float32 covering image rows ``y0..y0+h-1`` and columns
    ``x0..x0+w-1``.
    """
    y1, x1, y2, x2 = (float(v) for v in box)
    r0, r1 = max(0, int(np.floor(y1))), min(height, int(np.ceil(y2)))
    c0, c1 = max(0, int(np.floor(x1))), min(width, int(np.ceil(x2)))
    if r1 <= r0 or c1 <= c0 or y2 <= y1 or x2 <= x1:
        return r0, c0, np.zeros((0, 0), np.float32)
    return r0, c0, sample_mask(mask, box, np.arange(r0, r1) + 0.5, np.arange(c0, c1) + 0.5)


# ------------------------------------------------------------------------------------------------
# Stored slice <-> original scan.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScanMapping:
    """Maps boxes on the preprocessed (stored) slices of a scan back to the scan as read.

    Built from the scan's original geometry (``shape_zyx``, ``spacing_zyx``, ``origin_xyz``,
    ``direction``: SimpleITK's, LPS), the in-plane part of the preprocessing plan (``crop_yx``,
    ``scale_yx``: stored pixels per canonical source pixel) and the stored slices' positions
    ``out_z`` (mm along the canonical slice axis) ``slice_mm`` apart. Continuous voxel indices
    follow ITK: voxel n is centred at n, its extent is ``n - 0.5 .. n + 0.5``.
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: np.ndarray
    crop_yx: tuple[float, float]
    scale_yx: tuple[float, float]
    out_z: np.ndarray
    slice_mm: float

    @classmethod
    def from_volume(cls, vol, plan) -> "ScanMapping":
        """From a Volume as read (``data_prep.readers.scan.read_scan``) and the plan
        ``preprocess_scan(vol)`` made for its canonical orientation."""
        return cls(tuple(int(v) for v in vol.hu.shape), tuple(float(v) for v in vol.spacing_zyx),
                   tuple(float(v) for v in vol.origin_xyz), np.asarray(vol.direction, np.float64),
                   tuple(float(v) for v in plan.crop_yx), tuple(float(v) for v in plan.scale_yx),
                   np.asarray(plan.out_z, np.float64), float(plan.slice_mm))

    @classmethod
    def from_header(cls, shape_zyx, spacing_zyx, origin_xyz, direction, *, crop_yx, pixel_mm: float,
                    z_mm, slice_mm: float) -> "ScanMapping":
        """From a scan header and a built case (``crop_yx``: the case table's ``source_crop_yx``,
        ``pixel_mm`` / ``z_mm`` / ``slice_mm``: its stored pixel size, slice positions and distance)."""
        from data_prep import preprocess

        _, sp_c, _, _ = preprocess.canonical_geometry(tuple(shape_zyx), spacing_zyx, origin_xyz,
                                                      direction)
        scale = (sp_c[1] / float(pixel_mm), sp_c[2] / float(pixel_mm))
        return cls(tuple(int(v) for v in shape_zyx), tuple(float(v) for v in spacing_zyx),
                   tuple(float(v) for v in origin_xyz), np.asarray(direction, np.float64).reshape(3, 3),
                   tuple(float(v) for v in crop_yx), scale, np.asarray(z_mm, np.float64), float(slice_mm))

    # --- canonical geometry ----------------------------------------------------------------------
    @functools.cached_property
    def _canon(self):
        from data_prep import preprocess

        src_axis, flip = preprocess.canonical_axes(self.direction)
        shape_c, sp_c, origin_c, _ = preprocess.canonical_geometry(
            self.shape_zyx, self.spacing_zyx, self.origin_xyz, self.direction)
        return src_axis, flip, shape_c, sp_c, origin_c

    def canonical_to_original_index(self, zyx: np.ndarray) -> np.ndarray:
        """[..., 3] continuous (z, y, x) index of the canonical volume -> the scan's (z, y, x)."""
        src_axis, flip, shape_c, _, _ = self._canon
        c = np.asarray(zyx, np.float64)
        out = np.empty_like(c)
        for w in range(3):                      # canonical axis w (x, y, z) = numpy axis 2 - w
            v = c[..., 2 - w]
            if flip[w]:
                v = (shape_c[2 - w] - 1) - v
            out[..., 2 - src_axis[w]] = v       # source index axis a = numpy axis 2 - a
        return out

    def index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """[..., 3] continuous (z, y, x) index of the scan -> world (x, y, z) mm (LPS)."""
        ijk = np.asarray(zyx, np.float64)[..., ::-1] * np.asarray(self.spacing_zyx[::-1])
        return ijk @ self.direction.T + np.asarray(self.origin_xyz)

    def stored_box_to_canonical(self, z_first: np.ndarray, z_last: np.ndarray,
                                boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """3D boxes on stored slices -> (lo, hi) [N, 3] continuous canonical (z, y, x) index edges.

        ``z_first`` / ``z_last``: [N] first and last stored slice (inclusive); ``boxes``: [N, 4]
        internal boxes in stored-slice pixels. A stored slice stands for the slab of
        ``slice_mm`` around its position, clipped to the scan's extent.
        """
        _, _, shape_c, sp_c, origin_c = self._canon
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        cy, cx = self.crop_yx
        sy, sx = self.scale_yx
        # stored continuous pixel u -> canonical continuous pixel u / s + crop -> index - 0.5
        y = b[:, [0, 2]] / sy + cy - 0.5
        x = b[:, [1, 3]] / sx + cx - 0.5
        half = 0.5 * self.slice_mm
        zf = (self.out_z[np.asarray(z_first, np.int64)] - half - origin_c[2]) / sp_c[0]
        zl = (self.out_z[np.asarray(z_last, np.int64)] + half - origin_c[2]) / sp_c[0]
        zf = np.clip(zf, -0.5, shape_c[0] - 0.5)
        zl = np.clip(zl, -0.5, shape_c[0] - 0.5)
        lo = np.stack([zf, y[:, 0], x[:, 0]], axis=-1)
        hi = np.stack([zl, y[:, 1], x[:, 1]], axis=-1)
        return lo, hi

    def boxes_to_scan(self, z_first, z_last, boxes) -> dict[str, np.ndarray]:
        """3D boxes on stored slices -> the scan's voxel and world coordinates.

        Returns (N boxes; index order (i, j, k) = (x, y, z) of SimpleITK):
        ``voxel_min`` / ``voxel_max`` [N, 3] int inclusive indices of the voxels whose centres lie
        in the box (at least the one nearest its centre), clipped to the scan;
        ``center_voxel`` [N, 3] continuous index of the box centre; ``center_world`` [N, 3] mm;
        ``world_min`` / ``world_max`` [N, 3] mm, the world extent of the box's 8 corners;
        ``size_mm`` [N, 3] the box's extent along the scan's i, j, k axes in mm;
        ``index_lo`` / ``index_hi`` [N, 3] its continuous index edges (unclipped to whole voxels).
        """
        lo_c, hi_c = self.stored_box_to_canonical(z_first, z_last, boxes)
        a, b = self.canonical_to_original_index(lo_c), self.canonical_to_original_index(hi_c)
        lo, hi = np.minimum(a, b), np.maximum(a, b)            # (z, y, x) continuous edges
        shape = np.asarray(self.shape_zyx)
        centre = 0.5 * (lo + hi)
        vmin = np.ceil(lo - 1e-9).astype(np.int64)
        vmax = np.ceil(hi - 1e-9).astype(np.int64) - 1
        near = np.clip(np.floor(centre + 0.5), 0, shape - 1).astype(np.int64)
        thin = vmax < vmin
        vmin = np.where(thin, near, np.clip(vmin, 0, shape - 1))
        vmax = np.where(thin, near, np.clip(vmax, 0, shape - 1))
        corners = np.stack([np.stack([(hi if (c >> 2) & 1 else lo)[:, 0],
                                      (hi if (c >> 1) & 1 else lo)[:, 1],
                                      (hi if c & 1 else lo)[:, 2]], axis=-1) for c in range(8)], 1)
        wc = self.index_to_world(corners)                        # [N, 8, 3]
        return {
            "voxel_min": vmin[:, ::-1], "voxel_max": vmax[:, ::-1],
            "center_voxel": centre[:, ::-1], "center_world": self.index_to_world(centre),
            "world_min": wc.min(axis=1), "world_max": wc.max(axis=1),
            "size_mm": (hi - lo)[:, ::-1] * np.asarray(self.spacing_zyx[::-1]),
            "index_lo": lo[:, ::-1], "index_hi": hi[:, ::-1],
        }
