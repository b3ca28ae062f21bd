"""The mining driver: ``python -m uld_jax.mine --workdir DIR [--config FILE[:variant]] [...]``.

Runs a trained MELD over the DeepLesion training slices sampled every 5 mm (plus the key slices,
whose annotations MAM needs), keeps every dataset expert's detections (boxes, fused scores) and the
universal expert's embeddings, embeds the annotated lesions (the ground-truth boxes on their key
slices, through the model's own backbone -> ROIAlign -> box head -> embedding head), then runs MAM
and NRM (:func:`uld_jax.mine.run.mine_overlay`) and writes one mined-annotation overlay
(docs/formats.md) atomically into the workdir, with provenance.

Steps
-----
1. Run: the config and parameters come from ``DIR/checkpoints`` (the config saved with the
   checkpoint, unless ``--config`` is given). Default checkpoint: the end of epoch ``--epoch`` (4,
   the paper's) when that checkpoint exists, else the latest; ``--step`` picks one explicitly.
2. Slices: the training split's sample table of DeepLesion plus every slice about ``every_mm`` apart
   (:func:`uld_jax.overlay.add_slices`), sorted by (case, slice) and cut into chunks of
   ``chunk_slices`` slices. Chunk ``c`` belongs to process ``c % process_count`` (multi-host: each
   process mines its own chunks on its local devices; no collective is needed until the end).
3. Inference: fixed-size batches (``batch_per_device`` x local devices), padded at the end of a
   chunk, through one jitted function with the batch sharded over a local ``('data',)`` mesh and the
   variables replicated. The images are the loader's unaugmented ones (``SampleLoader`` with
   ``augment=False``); boxes are mapped back to pixels of the stored slice.
4. Every finished chunk is saved through :class:`uld_jax.mine.store.ChunkStore` (atomic); a killed
   run restarted with the same arguments skips the saved chunks, and the table it writes equals an
   uninterrupted run's (rows are canonically ordered).
5. Process 0 loads all chunks, runs MAM + NRM and writes ``DIR/mined.npz`` (``--out``).

Annotated-lesion ids: the overlay's ``lesion_id`` of a mined row names the annotation it matched.
DeepLesion rows carry no lesion id (-1), so such an annotation gets ``ANNOTATION_ID_BASE + r``, ``r``
its row in the sample table's annotation pool (stable for one build).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uld_jax import input_pipeline as ip
from uld_jax import overlay as overlay_lib
from uld_jax import slice_data as sd
from uld_jax.core import DATASET_ID, SINGLE_TYPE_DATASETS, Keys, Provenance
from uld_jax.mine import calibrate, external, mam, nrm, run, store, table
from uld_jax.models.roi_heads import box_location

# MAM's location scale on the command line (run.MiningOptions.location_mm; the library's default, 0,
# is the paper's embedding-only rule): a displacement of theta x 64 mm, about 10 mm at theta 0.15 --
# a typical lesion's radius, within which its cross-sections on neighbouring mined slices lie --
# alone reaches theta. docs/mining.md has the measurements behind it.
DEFAULT_LOCATION_MM = 64.0

log = logging.getLogger(__name__)

MINED_DATASET = "deeplesion"
# Ids of annotations without a lesion id: kept below 2**31, since the batch's LESION_ID becomes
# int32 on devices without x64 (a larger id would wrap onto a real one).
ANNOTATION_ID_BASE = 1 << 30
DATA_AXIS = "data"
MIN_BOX_PX = 1.0          # detections thinner than this (slice pixels) after clipping are dropped


@dataclasses.dataclass
class DriverOptions:
    """What to mine and how (the CLI's flags).

    Attributes:
      step: checkpoint step; None: the end of ``epoch`` if saved, else the latest.
      epoch: the epoch whose end checkpoint is the default (paper: 4).
      config: a config file ``path[:variant]`` to use instead of the checkpoint's saved config.
      data_dir: the build's DATA_DIR (default: the config's ``data.data_dir``).
      every_mm: mining slice interval (mm; paper: 5).
      chunk_slices: slices per resumable chunk.
      batch_per_device: slices per device per jitted call.
      min_score: detections with a fused score below this are not kept (all experts).
      out: the overlay path (default ``<workdir>/mined.npz``).
      store_dir: where chunks go (default ``<workdir>/mining/step_<step>``).
      max_chunks: stop after mining this many chunks in this call (None: all); the overlay is
        written only when every chunk is there. For tests and time-sliced jobs.
      progress: show a progress bar (default: when stderr is a terminal).
      num_devices: use the first N local devices (None: all of them).
      mining: MAM / NRM options (theta, sigma, NRM experts, ...).
      sigma_from: ``'score'`` (the paper): NRM's sigma is a score threshold of every expert;
        ``'precision'``: sigma is a precision level, and each NRM expert gets the score threshold
        above which its detections on its own dataset's ``calibration_split`` are right at least
        that often (:mod:`uld_jax.mine.calibrate`).
      calibration_split: the single-type datasets' split used by ``sigma_from='precision'``.
      theta_from: ``'value'``: MAM's theta as given; ``'paper_yield'`` (needs the location term):
        theta raised until MAM with its location term mines as many positives as the paper's rule
        mines at the given theta (:func:`uld_jax.mine.run.yield_matched_theta`).
      embeddings: an external embeddings file for MAM in place of the model's
        (:mod:`uld_jax.mine.external`: exported targets of this run's store, embedded elsewhere).
    """

    step: int | None = None
    epoch: int = 4
    config: str | None = None
    data_dir: str | None = None
    every_mm: float = 5.0
    chunk_slices: int = 256
    batch_per_device: int = 1
    min_score: float = 0.05
    out: str | None = None
    store_dir: str | None = None
    max_chunks: int | None = None
    progress: bool | None = None
    num_devices: int | None = None
    debug_sleep_per_chunk_s: float = 0.0   # tests: slow the run down to kill it mid-way
    mining: run.MiningOptions = dataclasses.field(default_factory=run.MiningOptions)
    sigma_from: str = "score"
    calibration_split: str = "train"
    embeddings: str | None = None
    theta_from: str = "value"


# --------------------------------------------------------------------------------------------------
# The run: config, checkpoint step, variables.
# --------------------------------------------------------------------------------------------------
def choose_step(workdir: str, step: int | None, epoch: int) -> int:
    """The checkpoint to mine with: ``step`` if given (must exist), else the end of ``epoch`` if
    that checkpoint was saved, else the latest. Raises FileNotFoundError naming what exists."""
    from uld_jax import train  # pylint: disable=g-import-not-at-top
    steps = train.checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to mine with")
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"{workdir}/checkpoints: no step {step} (available: {steps})")
        return int(step)
    cfg = train.load_checkpoint_config(workdir, steps[-1])
    spe = int(cfg.get("_derived", {}).get("steps_per_epoch", 0) or 0)
    want = epoch * spe if spe > 0 and epoch > 0 else None
    if want in steps:
        return int(want)
    log.info("no epoch-%d checkpoint (step %s) in %s; using the latest, step %d", epoch, want,
             workdir, steps[-1])
    return int(steps[-1])


def load_run(workdir: str, step: int, config_spec: str | None = None):
    """(loaded model, provenance config hash) of a training run's checkpoint ``step``.

    Loading is :func:`uld_jax.inference.load_model` (the shared inference core: the stored config
    over the variant's defaults, a parameter-structure check). The hash is
    :func:`uld_jax.mine.table.config_hash` of the stored experiment config (without the
    ``_derived`` entry), or of ``config_spec``'s config when given.
    """
    from uld_jax import inference, train  # pylint: disable=g-import-not-at-top
    loaded = inference.load_model(workdir=workdir, step=step, config=config_spec)
    if config_spec:
        saved = inference.load_config_file(config_spec)
    else:
        saved = dict(train.load_checkpoint_config(workdir, step))
        saved.pop("_derived", None)
    return loaded, table.config_hash(saved)


# --------------------------------------------------------------------------------------------------
# Slices to mine.
# --------------------------------------------------------------------------------------------------
def input_config(data_config: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
    """The loader config for mining: the training run's geometry, unaugmented, DeepLesion only."""
    c = ml_collections.ConfigDict(data_config.to_dict())
    c.data_dir = data_dir
    c.datasets = (MINED_DATASET,)
    c.split = "train"
    c.samples_version = ""
    c.overlays = ()
    c.mix = False
    c.shuffle = False
    c.augment = False
    c.num_epochs = 1
    c.image_size = tuple(int(v) for v in c.image_size)
    return c


def mining_table(data_dir: str, every_mm: float) -> tuple[sd.SampleTable, np.ndarray]:
    """DeepLesion's training table plus every slice ``every_mm`` apart, and the mining order.

    Returns ``(table, rows)``: ``rows`` [S] the table rows to mine, sorted by (case, slice).
    """
    base = sd.load_sample_table(data_dir, MINED_DATASET, "train")
    ext = overlay_lib.add_slices(base, every_mm=every_mm)
    rows = np.lexsort((ext.slice_index, ext.case_row)).astype(np.int64)
    return ext, rows


def patient_numbers(case_patient: np.ndarray) -> np.ndarray:
    """[C] patient id strings -> [C] int64: the number itself for DeepLesion's ``PPPPPP``, else the
    rank among the sorted distinct ids (deterministic for one table)."""
    s = np.asarray(case_patient).astype(str)
    if s.size and all(v.isdigit() for v in s):
        return s.astype(np.int64)
    _, inv = np.unique(s, return_inverse=True)
    return inv.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# The jitted inference.
# --------------------------------------------------------------------------------------------------
def _mining_forward(module, image, image_valid, ann_boxes):
    """Inside ``MELD.apply``: every expert's detections + the embeddings of given boxes.

    image [B, H, W, 9], image_valid [B, H, W], ann_boxes [B, A, 4] (input pixels) ->
    boxes [B, D, K, 4], scores [B, D, K], valid [B, D, K], embeddings [B, K, E] (universal expert),
    ann_embeddings [B, A, E] (unit vectors; rows of padding boxes are meaningless).
    """
    det = module.inference_outputs({Keys.IMAGE: image, Keys.IMAGE_VALID: image_valid})
    cfg = module.cfg
    # The same features as the detections' (XLA shares the identical backbone computation).
    feat = module.backbone(image, train=False)
    roi = module._roi_align(feat, ann_boxes, cfg.roi.pool_size)  # pylint: disable=protected-access
    box_feat, _ = module.box_head(roi)
    ann_emb, _ = module.embed_head(box_feat, loc=box_location(ann_boxes, *image.shape[1:3]))
    uni = DATASET_ID[MINED_DATASET]
    return {"boxes": det["boxes"], "scores": det["scores"], "valid": det["valid"],
            "embeddings": det["embeddings"][:, uni], "ann_embeddings": ann_emb}


_PREDICT_CACHE: dict[tuple, Any] = {}


def make_predict(model, mesh: Mesh):
    """``predict(variables, image, image_valid, ann_boxes) -> dict`` jitted over ``mesh`` (batch
    on ``'data'``, variables replicated). Cached per (model config, devices), so repeated runs in
    one process (tests, sweeps) compile once."""
    key = (table.config_hash(model.cfg), tuple(d.id for d in mesh.devices.flat))
    if key not in _PREDICT_CACHE:
        _PREDICT_CACHE[key] = _make_predict(model, mesh)
    return _PREDICT_CACHE[key]


def _make_predict(model, mesh: Mesh):
    data = NamedSharding(mesh, P(DATA_AXIS))
    repl = NamedSharding(mesh, P())

    def predict(variables, image, image_valid, ann_boxes):
        return model.apply(variables, image, image_valid, ann_boxes, method=_mining_forward)

    return jax.jit(predict, in_shardings=(repl, data, data, data), out_shardings=data)


# --------------------------------------------------------------------------------------------------
# Chunks.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Batch:
    rows: np.ndarray                # [n] table rows (n <= batch size)
    image: np.ndarray               # [B, H, W, 9]
    image_valid: np.ndarray         # [B, H, W]
    ann_boxes: np.ndarray           # [B, A, 4] input pixels
    ann_rows: list                  # per sample: annotation-pool rows embedded (<= A)
    placements: list                # per sample: ip.Placement


class ChunkMiner:
    """Mines chunks of slices of one table with one model (see the module docstring)."""

    def __init__(self, model, variables, config: ml_collections.ConfigDict,
                 table_: sd.SampleTable, rows: np.ndarray, *, chunk_slices: int,
                 batch_per_device: int, min_score: float, devices: Sequence[jax.Device] | None = None):
        self.table = table_
        self.rows = np.asarray(rows, np.int64)
        self.config = config
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.asarray(self.devices), (DATA_AXIS,))
        self.batch = int(batch_per_device) * len(self.devices)
        self.chunk_slices = int(chunk_slices)
        self.min_score = float(min_score)
        self.max_ann = int(config.max_boxes)
        self.loader = ip.SampleLoader([table_], [sd.SliceStore(
            sd.dataset_dir_for(config.data_dir, MINED_DATASET), MINED_DATASET,
            cache_slices=max(64, int(config.slice_cache)))], config)
        self.predict = make_predict(model, self.mesh)
        self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
        self.patient = patient_numbers(table_.case_patient)
        self.image_size = tuple(int(v) for v in config.image_size)
        self._warned_ann = False

    @property
    def num_chunks(self) -> int:
        return max(1, math.ceil(len(self.rows) / self.chunk_slices)) if len(self.rows) else 0

    def chunk_rows(self, chunk_id: int) -> np.ndarray:
        return self.rows[chunk_id * self.chunk_slices:(chunk_id + 1) * self.chunk_slices]

    def _original(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Annotation-pool rows of the original boxes of sample ``row`` and their boxes [n, 4]."""
        a, b = int(self.table.lesion_ptr[row]), int(self.table.lesion_ptr[row + 1])
        prov = self.table.lesions["provenance"][a:b]
        idx = a + np.flatnonzero(prov == int(Provenance.ORIGINAL))
        return idx, self.table.lesions["boxes"][idx]

    def _load_batch(self, rows: np.ndarray) -> _Batch:
        B, A = self.batch, self.max_ann
        H, W = self.image_size
        image = np.full((B, H, W, int(self.config.context_slices)), ip.PAD_CODE, ip.IMAGE_DTYPE)
        valid = np.zeros((B, H, W), bool)
        ann = np.zeros((B, A, 4), np.float32)
        ann[..., 2:] = 1.0                      # padding boxes: a 1-pixel box, embedding ignored
        ann_rows, placements = [], []
        for i, r in enumerate(rows):
            ex = self.loader.map(np.array([0, int(r), 0], np.int64))
            image[i], valid[i] = ex[Keys.IMAGE], ex[Keys.IMAGE_VALID]
            p = ip.unaugmented_placement(self.table, int(r), self.config)
            placements.append(p)
            idx, boxes = self._original(int(r))
            if len(idx) > A:
                if not self._warned_ann:
                    log.warning("a slice has %d annotations, more than max_boxes=%d; the extra "
                                "ones are not embedded for MAM (raise data.max_boxes)", len(idx), A)
                    self._warned_ann = True
                idx, boxes = idx[:A], boxes[:A]
            ann[i, :len(idx)] = ip.slice_boxes_to_image(boxes, p)
            ann_rows.append(idx)
        return _Batch(np.asarray(rows, np.int64), image, valid, ann, ann_rows, placements)

    def _batches(self, rows: np.ndarray) -> Iterator[_Batch]:
        """Batches of ``rows`` loaded one ahead in a background thread."""
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def work():
            try:
                for k in range(0, len(rows), self.batch):
                    if stop.is_set():
                        return
                    q.put(self._load_batch(rows[k:k + self.batch]))
                q.put(None)
            except BaseException as e:  # pylint: disable=broad-except
                q.put(e)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass

    def mine_chunk(self, chunk_id: int, on_batch=None
                   ) -> tuple[run.SliceTable, run.Annotations, run.Proposals]:
        """Runs the model over one chunk; slice keys are local to the chunk."""
        rows = self.chunk_rows(chunk_id)
        key_of = {int(r): k for k, r in enumerate(rows)}
        t = self.table
        cr = t.case_row[rows]
        slices = run.SliceTable(
            dataset=np.full(len(rows), MINED_DATASET), case_id=t.case_id[cr].astype(str),
            slice_index=t.slice_index[rows].astype(np.int64), patient_id=self.patient[cr],
            pixel_mm=t.case_pixel_mm[cr].astype(np.float32),
            slice_mm=t.case_slice_mm[cr].astype(np.float32))
        a_parts: dict[str, list] = {"slice": [], "box": [], "lesion_id": [], "embedding": []}
        p_parts: dict[str, list] = {"slice": [], "box": [], "score": [], "expert": [],
                                    "embedding": []}
        for b in self._batches(rows):
            out = jax.device_get(self.predict(self.variables, b.image, b.image_valid, b.ann_boxes))
            for i, r in enumerate(b.rows):
                key = key_of[int(r)]
                h, w = (float(v) for v in t.case_hw[t.case_row[r]])
                # Annotations: their own slice-frame boxes, the model's embeddings.
                idx = b.ann_rows[i]
                if len(idx):
                    lid = t.lesions["lesion_id"][idx].astype(np.int64)
                    lid = np.where(lid >= 0, lid, ANNOTATION_ID_BASE + idx)
                    a_parts["slice"].append(np.full(len(idx), key))
                    a_parts["box"].append(t.lesions["boxes"][idx].astype(np.float32))
                    a_parts["lesion_id"].append(lid)
                    a_parts["embedding"].append(out["ann_embeddings"][i, :len(idx)])
                # Detections of every expert, back in slice pixels, clipped to the slice.
                boxes, _ = ip.image_boxes_in_slice(out["boxes"][i], b.placements[i], h, w)
                keep = (out["valid"][i] & (out["scores"][i] >= self.min_score)
                        & (boxes[..., 2] - boxes[..., 0] >= MIN_BOX_PX)
                        & (boxes[..., 3] - boxes[..., 1] >= MIN_BOX_PX))
                e_idx, k_idx = np.nonzero(keep)
                if e_idx.size:
                    p_parts["slice"].append(np.full(e_idx.size, key))
                    p_parts["box"].append(boxes[e_idx, k_idx])
                    p_parts["score"].append(out["scores"][i][e_idx, k_idx])
                    p_parts["expert"].append(e_idx)
                    emb = np.where((e_idx == DATASET_ID[MINED_DATASET])[:, None],
                                   out["embeddings"][i][k_idx], 0.0)
                    p_parts["embedding"].append(emb.astype(np.float32))
            if on_batch is not None:
                on_batch(len(b.rows))
        e_dim = int(np.asarray(out["embeddings"]).shape[-1]) if len(rows) else 0

        def cat(parts, k, shape):
            return np.concatenate(parts[k]) if parts[k] else np.zeros(shape)

        ann = run.Annotations(cat(a_parts, "slice", (0,)).astype(np.int64),
                              cat(a_parts, "box", (0, 4)), cat(a_parts, "lesion_id", (0,)),
                              cat(a_parts, "embedding", (0, e_dim)))
        props = run.Proposals(cat(p_parts, "slice", (0,)).astype(np.int64),
                              cat(p_parts, "box", (0, 4)), cat(p_parts, "score", (0,)),
                              cat(p_parts, "expert", (0,)).astype(np.int64),
                              cat(p_parts, "embedding", (0, e_dim)))
        return slices, ann, props


# --------------------------------------------------------------------------------------------------
# The whole run.
# --------------------------------------------------------------------------------------------------
def _progress_bar(total: int, enable: bool | None, desc: str):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    if enable is None:
        enable = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="slice", disable=not enable, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def mine(workdir: str, options: DriverOptions = DriverOptions()) -> dict[str, Any]:
    """Mines with a training run's checkpoint; returns a summary dict.

    Summary keys: ``step``, ``out`` (the overlay path, None until every chunk is mined),
    ``chunks_total``, ``chunks_done``, ``chunks_mined_now``, ``slices``, ``slices_mined_now``,
    ``seconds``, ``slices_per_s`` (this call's inference), ``counts`` (rows per kind, when written).
    """
    workdir = os.fspath(workdir)
    t_start = time.perf_counter()
    if options.sigma_from not in ("score", "precision"):
        raise ValueError(f"sigma_from {options.sigma_from!r}: expected 'score' or 'precision'")
    if options.sigma_from == "precision" and not 0.0 < options.mining.sigma <= 1.0:
        raise ValueError(f"sigma {options.mining.sigma}: with sigma_from='precision' it is a "
                         "precision level in (0, 1]")
    if options.theta_from not in ("value", "paper_yield"):
        raise ValueError(f"theta_from {options.theta_from!r}: expected 'value' or 'paper_yield'")
    if options.theta_from == "paper_yield" and not options.mining.location_mm > 0:
        raise ValueError("theta_from='paper_yield' needs MAM's location term (location_mm > 0): "
                         "with location_mm 0 MAM is the paper's rule and theta is used as given")
    if options.embeddings and not os.path.isfile(options.embeddings):
        # checked before inference: the file's contents can be checked only against a whole store
        raise FileNotFoundError(f"{options.embeddings}: no such embeddings file")
    step = choose_step(workdir, options.step, options.epoch)
    loaded, model_hash = load_run(workdir, step, options.config)
    data_dir = options.data_dir or str(loaded.data_config.data_dir)
    if not data_dir:
        raise ValueError("no data directory: pass --data_dir (the run's config has none)")
    icfg = input_config(loaded.data_config, data_dir)
    if not loaded.model_config.use_embedding:
        raise ValueError(f"{loaded.source}: the model has no embedding head (model.use_embedding "
                         "is False); MAM needs lesion embeddings")
    lacking = [e for e in options.mining.nrm_experts if e not in loaded.expert_names]
    if lacking:
        raise ValueError(f"{loaded.source}: the model's dataset experts are {loaded.expert_names}, "
                         f"so it has no NRM expert {lacking}; pass --nrm_experts with a subset of "
                         "the model's single-type experts ('' for MAM only)")
    if loaded.data_config.get("merge_datasets", False):
        log.warning("%s was trained with data.merge_datasets: its one expert learnt every dataset "
                    "as one, and MAM uses it in place of the universal (DeepLesion) expert",
                    loaded.source)
    ext, rows = mining_table(data_dir, options.every_mm)
    miner = ChunkMiner(loaded.model, loaded.variables, icfg, ext, rows,
                       chunk_slices=options.chunk_slices,
                       batch_per_device=options.batch_per_device, min_score=options.min_score,
                       devices=jax.local_devices()[:options.num_devices])
    settings = {"model_config": model_hash, "data_dir": os.path.abspath(data_dir),
                "every_mm": float(options.every_mm), "chunk_slices": int(options.chunk_slices),
                "min_score": float(options.min_score), "image_size": list(icfg.image_size),
                "pixel_mm": float(icfg.pixel_mm), "annotation_id_base": ANNOTATION_ID_BASE}
    store_hash = table.config_hash(settings)
    store_dir = options.store_dir or os.path.join(workdir, "mining", f"step_{step}")
    pidx, pcount = jax.process_index(), jax.process_count()

    def open_store():
        return store.ChunkStore(store_dir, checkpoint_step=step, config_hash=store_hash,
                                embedding_dim=int(loaded.model_config.embedding.dim))

    if pcount > 1:
        # Process 0 creates (or checks) store.json first, so that processes never race on it.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        st = open_store() if pidx == 0 else None
        multihost_utils.sync_global_devices("uld_jax.mine store")
        st = st or open_store()
    else:
        st = open_store()
    n_chunks = miner.num_chunks
    done = st.done()
    mine_ids = [c for c in range(n_chunks) if c % pcount == pidx and c not in done]
    if options.max_chunks is not None:
        mine_ids = mine_ids[:max(0, int(options.max_chunks))]
    todo_slices = sum(len(miner.chunk_rows(c)) for c in mine_ids)
    log.info("mining %d slices of %d (%d chunks of %d; %d already done) with step %d",
             todo_slices, len(rows), len(mine_ids), options.chunk_slices, len(done), step)
    bar = _progress_bar(todo_slices, options.progress, f"mine step {step}")
    t0 = time.perf_counter()
    try:
        for c in mine_ids:
            st.save(c, *miner.mine_chunk(c, on_batch=bar.update))
            if options.debug_sleep_per_chunk_s:
                time.sleep(options.debug_sleep_per_chunk_s)
    finally:
        bar.close()
    t_inf = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "step": step, "out": None, "chunks_total": n_chunks, "chunks_mined_now": len(mine_ids),
        "slices": int(len(rows)), "slices_mined_now": int(todo_slices),
        "inference_s": round(t_inf, 3),
        "slices_per_s": round(todo_slices / t_inf, 3) if todo_slices and t_inf > 0 else None}
    if pcount > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("uld_jax.mine chunks")
    summary["chunks_done"] = len(st.done())
    if summary["chunks_done"] < n_chunks or pidx != 0:
        summary["seconds"] = round(time.perf_counter() - t_start, 3)
        return summary
    slices, ann, props = st.load(expected_chunks=n_chunks)
    ext_info = None
    if options.embeddings:
        ann, props, ext_info = external.load_embeddings(options.embeddings, slices, ann, props)
        log.info("MAM on the external embeddings of %s (%d-D)", options.embeddings,
                 ext_info["dim"])
    extra = {"dataset": MINED_DATASET, "split": "train", "mining": settings,
             "store": os.path.abspath(store_dir), "workdir": os.path.abspath(workdir),
             "annotation_id_base": ANNOTATION_ID_BASE,
             "num_annotations": int(len(ann.slice)), "num_proposals": int(len(props.slice))}
    if ext_info:
        extra["external_embeddings"] = ext_info
    mining = options.mining
    if options.sigma_from == "precision" and mining.nrm_experts:
        cal = calibrate.expert_sigmas(loaded, data_dir, mining.nrm_experts, mining.sigma,
                                      split=options.calibration_split, min_score=options.min_score,
                                      progress=sys.stderr.isatty() if options.progress is None
                                      else options.progress)
        for e, c in cal.items():
            log.info("NRM sigma of %s: %.4g (precision >= %g on %d of its %d %s detections, %d "
                     "right; max score %s)", e, c["sigma"], mining.sigma, c["kept"],
                     c["detections"], options.calibration_split, c["right"], c["max_score"])
        mining = dataclasses.replace(mining,
                                     sigma_by_expert={e: c["sigma"] for e, c in cal.items()})
        extra["sigma_calibration"] = {
            e: dict(c, sigma=c["sigma"] if np.isfinite(c["sigma"]) else None)
            for e, c in cal.items()}
    if options.theta_from == "paper_yield":
        tm = run.yield_matched_theta(slices, ann, props, mining, devices=jax.local_devices())
        log.info("MAM theta %.4g: the location rule mines %d positives there, the paper's rule %d "
                 "at theta %g%s", tm["theta"], tm["mined"], tm["paper_mined"], tm["paper_theta"],
                 "" if tm["reached"] else " (not reached: every proposal near an annotation)")
        mining = dataclasses.replace(mining, theta=tm["theta"])
        extra["theta_calibration"] = dict(tm, theta_from="paper_yield")
    outcome = run.mine_overlay(slices, ann, props, options=mining, checkpoint_step=step,
                               config_hash=model_hash, devices=jax.local_devices(),
                               extra_meta=extra)
    out = options.out or os.path.join(workdir, "mined.npz")
    table.write_overlay(out, outcome.overlay)
    summary.update(out=out, counts=outcome.overlay.counts(),
                   seconds=round(time.perf_counter() - t_start, 3))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"checkpoint step {s['step']}: {s['slices']} slices in {s['chunks_total']} chunks "
             f"({s['chunks_done']} done; mined now: {s['slices_mined_now']} slices"
             + (f", {s['slices_per_s']:.2f} slices/s" if s.get("slices_per_s") else "") + ")"]
    if s.get("out"):
        c = s["counts"]
        lines.append(f"mined positives {c['mined']}, ignore regions {c['ignore']}, "
                     f"unlabeled slices {c['unlabeled_slices']} -> {s['out']}")
    else:
        lines.append("not all chunks are mined yet: run again to resume")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uld_jax.mine", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the MELD training run (its checkpoints/)")
    p.add_argument("--config", default=None, help="config file[:variant] instead of the saved one")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: epoch end)")
    p.add_argument("--epoch", type=int, default=4, help="default checkpoint: end of this epoch")
    p.add_argument("--data_dir", default=None, help="DATA_DIR of the build (default: config's)")
    p.add_argument("--out", default=None, help="overlay path (default WORKDIR/mined.npz)")
    p.add_argument("--store_dir", default=None, help="chunk store (default WORKDIR/mining/step_N)")
    p.add_argument("--every_mm", type=float, default=5.0)
    p.add_argument("--chunk_slices", type=int, default=256)
    p.add_argument("--batch_per_device", type=int, default=1)
    p.add_argument("--num_devices", type=int, default=None, help="first N local devices (all)")
    p.add_argument("--min_score", type=float, default=0.05)
    p.add_argument("--max_chunks", type=int, default=None)
    p.add_argument("--theta", type=float, default=mam.DEFAULT_THETA)
    p.add_argument("--sigma", type=float, default=nrm.DEFAULT_SIGMA)
    p.add_argument("--location_mm", type=float, default=DEFAULT_LOCATION_MM,
                   help="> 0: MAM matches on the embedding and the place in the volume (box centre "
                   "and slice position in mm / location_mm, within one Case); 0: on the embedding "
                   "alone, within a patient (the paper's rule)")
    p.add_argument("--nrm_experts", default=",".join(SINGLE_TYPE_DATASETS),
                   help="comma-separated single-type experts for NRM")
    p.add_argument("--sigma_from", choices=("score", "precision"), default="score",
                   help="score: sigma is every NRM expert's score threshold (the paper); "
                   "precision: sigma is a precision level, each expert's threshold taken from its "
                   "detections on its own dataset's --calibration_split")
    p.add_argument("--calibration_split", default="train")
    p.add_argument("--theta_from", choices=("value", "paper_yield"), default="value",
                   help="value: MAM's theta as given; paper_yield: theta raised until MAM with its "
                   "location term mines as many positives as the paper's rule (location_mm 0) "
                   "mines at --theta (the table records both)")
    p.add_argument("--nrm_as_positive", action="store_true",
                   help="suspicious regions become positives instead of ignore regions")
    p.add_argument("--embeddings", default=None,
                   help="MAM on these external embeddings instead of the model's (python -m "
                   "uld_jax.mine.external: export this run's targets, embed them, pass the file)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--debug_sleep_per_chunk_s", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    experts = tuple(e for e in a.nrm_experts.split(",") if e)
    opts = DriverOptions(
        step=a.step, epoch=a.epoch, config=a.config, data_dir=a.data_dir, every_mm=a.every_mm,
        chunk_slices=a.chunk_slices, batch_per_device=a.batch_per_device, min_score=a.min_score,
        out=a.out, store_dir=a.store_dir, max_chunks=a.max_chunks, num_devices=a.num_devices,
        progress={"auto": None, "on": True, "off": False}[a.progress],
        debug_sleep_per_chunk_s=a.debug_sleep_per_chunk_s,
        mining=run.MiningOptions(theta=a.theta, sigma=a.sigma, nrm_experts=experts,
                                 nrm_as_positive=a.nrm_as_positive, location_mm=a.location_mm),
        sigma_from=a.sigma_from, calibration_split=a.calibration_split, embeddings=a.embeddings,
        theta_from=a.theta_from)
    from uld_jax import train  # pylint: disable=g-import-not-at-top
    train.maybe_initialize_distributed()
    try:
        nrm.expert_ids(experts)
        s = mine(a.workdir, opts)
    except (FileNotFoundError, ValueError, store.StoreError, table.OverlayError) as e:
        # (inference.ModelLoadError, StoreError and OverlayError are ValueErrors)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(format_summary(s))
        print(json.dumps(s, sort_keys=True))
    return 0
