"""Missing annotation matching (MAM): mined positives from lesion-embedding distances within a patient.

DeepLesion marks only some lesions, and only on their key slice. The same lesion usually appears
unmarked on the neighbouring slices, in the patient's other series and at the patient's other time
points (studies). MAM (Yan et al., TMI 2020) compares, per patient, the embedding of every annotated
lesion with the embedding of every proposal of the universal expert on the patient's mined slices;
a proposal closer than ``theta`` (L2, default 0.15) to an annotated lesion becomes a *mined
positive* (classification only, never box regression; see :class:`uld_jax.core.Provenance`).

Inputs are flat arrays with a patient id per row (no per-patient Python objects): annotations
``ann_patient`` [NA], ``ann_emb`` [NA, D] and proposals ``prop_patient`` [NP], ``prop_emb`` [NP, D].
Embeddings are L2-normalised by the model (so distances lie in [0, 2]), but nothing here assumes it.

How it is computed (:func:`mam_match`)
--------------------------------------
1. Packing (:func:`plan_buckets`): each patient with at least one annotation *and* one proposal has
   its proposals cut into *tiles* of ``tile`` (64) proposals, each paired with all of the patient's
   annotated lesions. Tiles are sorted by their patient's lesion count and cut into at most
   ``max_buckets`` (4) *buckets* by an exact dynamic programme minimising the padded work
   ``sum(tiles * a_pad)``. A bucket has one static shape ``[batch, tile, a_pad]``: a run compiles at
   most ``max_buckets`` programs whatever the number of patients, proposal padding is below one
   tile per patient whatever the skew, and lesion padding stays small (1.2-1.6x real work at the
   paper's skew, against ~5x for padding each patient to its bucket's largest one).
2. Each bucket is processed in chunks of ``batch`` tiles, sized so that a chunk's buffers stay under
   ``chunk_bytes`` (64 MiB): memory is bounded at any scale and no ``P x A`` matrix larger than a
   chunk's ever exists. A chunk is gathered from the flat arrays into reused, 64-byte aligned host
   buffers (zero-copy on the CPU backend) with validity masks.
3. One jitted function (:func:`nearest_lesion`) computes, vmapped over the tiles of the chunk,
   the ``[tile, a_pad]`` L2 distance matrix by direct differences (no ``|a|^2 + |p|^2 - 2 a.p``
   expansion: it cancels catastrophically near small distances and would depend on the matmul
   precision of the accelerator, e.g. TF32), masks padded rows, and returns for each proposal its
   nearest annotated lesion, the distance and whether it matches. The ``[tile, A, D]`` difference is
   fused into the reduction by XLA and never materialised. With several devices the tile axis of a
   chunk is sharded over a 1-D :class:`jax.sharding.Mesh` (``NamedSharding``, axis ``"tiles"``);
   tiles are independent, so no communication is needed. Dispatch is asynchronous: the host
   packs chunk k+1 and scatters chunk k-1 while chunk k runs.

Threshold rule (the boundary, decided once)
-------------------------------------------
A proposal matches when its float32 distance to the nearest annotated lesion of its patient is
*strictly* below ``float32(theta)``; ``distance == theta`` does not match. The returned distance is
exactly the value compared, so ``matched == (distance < float32(theta))`` always holds, and a sweep
over theta (paper Fig. 5) is a re-threshold of the same distances. When several lesions are
equally near, the one listed first (lowest annotation row) wins. Patients with no annotation or no
proposal, and padded rows, never match (distance ``inf``, lesion ``-1``).

The plain NumPy reference :func:`mam_match_reference` (one patient at a time, float64, Gram
expansion) is an independent implementation used by the tests and the benchmark.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from uld_jax.mine import overlap

DEFAULT_THETA: float = 0.15
MESH_AXIS: str = "tiles"
# Threads compiling bucket programs concurrently (XLA compiles outside the GIL).
COMPILE_THREADS: int = max(1, min(4, (os.cpu_count() or 2) // 2))


class MamResult(NamedTuple):
    """Per-proposal outcome of MAM (all arrays [NP], in the caller's proposal order).

    Attributes:
      lesion: int64, row of the matched annotated lesion in the annotation arrays, -1 if none.
      distance: float32, L2 distance to the nearest annotated lesion of the same patient (embedding
        units), ``inf`` when the patient has no annotation.
      nearest: int64, row of the nearest annotated lesion whatever its distance, -1 if none.
    """

    lesion: np.ndarray
    distance: np.ndarray
    nearest: np.ndarray

    @property
    def matched(self) -> np.ndarray:
        """[NP] bool, True for mined-positive candidates."""
        return self.lesion >= 0

    def rethreshold(self, theta: float) -> "MamResult":
        """The result for another theta (same strict rule), without recomputing distances."""
        matched = self.distance < np.float32(theta)
        return MamResult(np.where(matched, self.nearest, -1), self.distance, self.nearest)


# --------------------------------------------------------------------------------------------------
# The jitted kernel.
# --------------------------------------------------------------------------------------------------
def _nearest_one_tile(ann_emb, ann_valid, prop_emb, prop_valid, theta):
    """One tile of one patient: ``ann_emb`` [A, D], ``ann_valid`` [A], ``prop_emb`` [P, D],
    ``prop_valid`` [P]."""
    diff = prop_emb[:, None, :] - ann_emb[None, :, :]                    # [P, A, D], fused away
    d2 = jnp.sum(diff * diff, axis=-1)                                   # [P, A]
    d2 = jnp.where(ann_valid[None, :], d2, jnp.inf)
    slot = jnp.argmin(d2, axis=-1).astype(jnp.int32)                     # first minimum wins ties
    dist = jnp.sqrt(jnp.min(d2, axis=-1))
    has = prop_valid & jnp.any(ann_valid)
    dist = jnp.where(has, dist, jnp.inf)
    slot = jnp.where(has, slot, -1)
    matched = dist < theta
    return slot, dist, matched


def nearest_lesion(ann_emb, ann_valid, prop_emb, prop_valid, theta):
    """Nearest annotated lesion of every proposal, for a batch of padded tiles.

    Row b pairs up to P proposals of one patient with that patient's annotated lesions; rows are
    independent (vmapped), so B can be sharded freely.

    Args:
      ann_emb: [B, A, D] float32 annotated-lesion embeddings (padded rows arbitrary).
      ann_valid: [B, A] bool, False on padded annotation rows.
      prop_emb: [B, P, D] float32 proposal embeddings.
      prop_valid: [B, P] bool, False on padded proposal rows.
      theta: scalar float32, the matching threshold (embedding units).

    Returns:
      slot: [B, P] int32, index into the A axis of the nearest valid lesion, -1 where none.
      distance: [B, P] float32 L2 distance to it, ``inf`` for padded proposals or no lesion.
      matched: [B, P] bool, ``distance < theta`` (strict).
    """
    return jax.vmap(_nearest_one_tile, in_axes=(0, 0, 0, 0, None))(
        ann_emb, ann_valid, prop_emb, prop_valid, theta
    )


@functools.lru_cache(maxsize=None)
def _compiled_kernel(devices: tuple[jax.Device, ...]):
    """``nearest_lesion`` jitted for a device set: the tile (batch) axis sharded over a 1-D mesh.

    Returns (jitted function, batch sharding, replicated sharding). One device gets a
    ``SingleDeviceSharding`` so that both cases go through the same code.
    """
    if len(devices) == 1:
        batch = replicated = SingleDeviceSharding(devices[0])
    else:
        mesh = Mesh(np.asarray(devices, dtype=object), (MESH_AXIS,))
        batch = NamedSharding(mesh, PartitionSpec(MESH_AXIS))
        replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(
        nearest_lesion,
        in_shardings=(batch, batch, batch, batch, replicated),
        out_shardings=(batch, batch, batch),
    )
    return fn, batch, replicated


@functools.lru_cache(maxsize=64)
def _executable(devices: tuple[jax.Device, ...], batch: int, a_pad: int, p_pad: int, dim: int):
    """Ahead-of-time compiled kernel for one bucket shape (cached across calls and sweeps)."""
    fn, bs, rep = _compiled_kernel(devices)
    f32, b8 = jnp.float32, jnp.bool_
    args = (
        jax.ShapeDtypeStruct((batch, a_pad, dim), f32, sharding=bs),
        jax.ShapeDtypeStruct((batch, a_pad), b8, sharding=bs),
        jax.ShapeDtypeStruct((batch, p_pad, dim), f32, sharding=bs),
        jax.ShapeDtypeStruct((batch, p_pad), b8, sharding=bs),
        jax.ShapeDtypeStruct((), f32, sharding=rep),
    )
    return fn.lower(*args).compile()


# --------------------------------------------------------------------------------------------------
# Bucketing.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Bucket:
    """Proposal tiles that share one static padded shape ``[batch, tile, a_pad]``.

    A *tile* is up to ``tile`` consecutive proposals of one patient, paired with all of that
    patient's annotated lesions (padded to ``a_pad``). Tiling bounds the proposal padding to less
    than one tile per patient whatever the skew, so only the lesion count varies between buckets.

    Attributes:
      tile_patient: [n] int64 dense patient index of each tile.
      tile_offset: [n] int64 index of the tile's first proposal among its patient's proposals.
      tile_count: [n] int64 proposals in the tile (1..tile).
      tile: proposals per tile (the static P axis).
      a_pad: padded number of annotated lesions (>= every tile patient's lesion count).
      batch: tiles per chunk (a multiple of the device count); the last chunk is padded with
        empty tiles.
    """

    tile_patient: np.ndarray
    tile_offset: np.ndarray
    tile_count: np.ndarray
    tile: int
    a_pad: int
    batch: int

    @property
    def num_chunks(self) -> int:
        return -(-len(self.tile_patient) // self.batch)

    @property
    def padded_work(self) -> int:
        """Distance evaluations including padding (``chunks * batch * tile * a_pad``)."""
        return self.num_chunks * self.batch * self.tile * self.a_pad


def _round_up(x: np.ndarray | int, m: int) -> np.ndarray:
    return -(-np.asarray(x, dtype=np.int64) // m) * m


def plan_buckets(
    n_ann: np.ndarray,
    n_prop: np.ndarray,
    *,
    dim: int,
    tile: int = 64,
    max_buckets: int = 4,
    ann_pad_multiple: int = 2,
    chunk_bytes: int = 64 << 20,
    num_devices: int = 1,
    candidate_cuts: int = 256,
    compile_cost_pairs: float = 8e6,
) -> list[Bucket]:
    """Splits every patient's proposals into tiles and groups the tiles into static shapes.

    Tiles are sorted by their patient's lesion count and cut into at most ``max_buckets`` runs by
    an exact dynamic programme over the distinct (rounded) counts, minimising the padded work
    ``sum(tiles * a_pad)``; so a run compiles at most ``max_buckets`` programs.

    Args:
      n_ann: [N] annotated lesions per patient (dense patient index).
      n_prop: [N] proposals per patient.
      dim: embedding size D (for the chunk memory budget).
      tile: proposals per tile (static P axis of the kernel).
      max_buckets: most distinct padded shapes (= compilations).
      ann_pad_multiple: a_pad is a multiple of this.
      chunk_bytes: budget of one chunk's float32 buffers (embeddings and [tile, a_pad] distances).
      num_devices: the batch is a multiple of it so that the tile axis shards evenly.
      candidate_cuts: most bucket boundaries searched (subsampled beyond this many distinct counts).
      compile_cost_pairs: the price of one more compiled program, in padded distance pairs (8M
        pairs ~ 0.3 s of kernel on 2 CPU cores ~ one XLA compilation); the number of buckets k
        (<= max_buckets) minimises ``padded_pairs + k * compile_cost_pairs``, so small inputs get
        one or two programs and the paper's scale three or four. 0: always ``max_buckets``.

    Returns:
      Buckets in increasing a_pad; patients with no annotation or no proposal are in none.
    """
    n_ann = np.asarray(n_ann, dtype=np.int64)
    n_prop = np.asarray(n_prop, dtype=np.int64)
    eligible = np.flatnonzero((n_ann > 0) & (n_prop > 0))
    if eligible.size == 0:
        return []
    pts = eligible[np.argsort(n_ann[eligible], kind="stable")]
    n_tiles = -(-n_prop[pts] // tile)
    tile_patient = np.repeat(pts, n_tiles)
    first = np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)
    tile_offset = (np.arange(tile_patient.size, dtype=np.int64) - first) * tile
    tile_count = np.minimum(tile, n_prop[tile_patient] - tile_offset)
    a_round = _round_up(n_ann[tile_patient], ann_pad_multiple)            # nondecreasing
    n = tile_patient.size
    # Candidate cuts: where the rounded lesion count changes (subsampled if too many), plus the end.
    change = np.flatnonzero(np.r_[True, a_round[1:] != a_round[:-1]])
    if change.size > candidate_cuts:
        change = change[np.unique(np.linspace(0, change.size - 1, candidate_cuts).astype(int))]
    cuts = np.r_[change, n]
    c = cuts.size
    a_end = a_round[np.maximum(cuts - 1, 0)]                                # max a in [.., cut)
    count = cuts[None, :] - cuts[:, None]
    cost = np.where(count > 0, count * a_end[None, :], np.inf).astype(np.float64)
    k_max = max(1, int(max_buckets))
    dp = np.full((k_max + 1, c), np.inf)
    arg = np.zeros((k_max + 1, c), dtype=np.int64)
    dp[0, 0] = 0.0
    for k in range(1, k_max + 1):
        tot = dp[k - 1][:, None] + cost                                    # [i, j]
        arg[k] = np.argmin(tot, axis=0)
        dp[k] = tot[arg[k], np.arange(c)]
    total = dp[1:, c - 1] * tile + compile_cost_pairs * np.arange(1, k_max + 1)
    k_best = int(np.argmin(total)) + 1
    bounds = []
    j = c - 1
    for k in range(k_best, 0, -1):
        i = int(arg[k, j])
        bounds.append((int(cuts[i]), int(cuts[j])))
        j = i
    buckets = []
    for lo, hi in reversed(bounds):
        a_pad = int(a_round[hi - 1])
        per_tile = 4 * (tile * dim + a_pad * dim + tile * a_pad)
        b_max = max(num_devices, (chunk_bytes // per_tile) // num_devices * num_devices)
        chunks = -(-(hi - lo) // b_max)
        batch = int(_round_up(-(-(hi - lo) // chunks), num_devices))
        buckets.append(Bucket(tile_patient[lo:hi], tile_offset[lo:hi], tile_count[lo:hi],
                              tile=int(tile), a_pad=a_pad, batch=batch))
    return buckets


# --------------------------------------------------------------------------------------------------
# Driver over flat arrays.
# --------------------------------------------------------------------------------------------------
def _dense_patients(ann_patient: np.ndarray, prop_patient: np.ndarray):
    """Patient ids -> dense 0..N-1 indices (in increasing id order) for both arrays."""
    both = np.concatenate([ann_patient, prop_patient])
    if both.dtype.kind in "iu" and both.size and both.min() >= 0 and both.max() < 4 * both.size:
        # Small non-negative ints (the usual case): a counting pass instead of a sort.
        present = np.bincount(both) > 0
        dense = np.cumsum(present) - 1
        inv = dense[both]
        n = int(present.sum())
    else:
        _, inv = np.unique(both, return_inverse=True)
        n = int(inv.max()) + 1 if inv.size else 0
    return n, inv[: ann_patient.size], inv[ann_patient.size:]


def _check_inputs(ann_patient, ann_emb, prop_patient, prop_emb):
    ann_patient = np.asarray(ann_patient).reshape(-1)
    prop_patient = np.asarray(prop_patient).reshape(-1)
    ann_emb = np.asarray(ann_emb)
    prop_emb = np.asarray(prop_emb)
    if ann_emb.ndim != 2 or prop_emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, D]; got {ann_emb.shape} and {prop_emb.shape}")
    if ann_emb.shape[1] != prop_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: annotations D={ann_emb.shape[1]}, "
                         f"proposals D={prop_emb.shape[1]}")
    if ann_emb.shape[0] != ann_patient.size or prop_emb.shape[0] != prop_patient.size:
        raise ValueError("one patient id per embedding row is required: "
                         f"{ann_patient.size} ids for {ann_emb.shape[0]} annotations, "
                         f"{prop_patient.size} ids for {prop_emb.shape[0]} proposals")
    for name, e in (("annotation", ann_emb), ("proposal", prop_emb)):
        if e.size and not np.all(np.isfinite(e)):
            raise ValueError(f"{name} embeddings contain NaN or inf")
    return ann_patient, ann_emb, prop_patient, prop_emb


def _aligned_empty(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
    """An uninitialised float32 array whose data starts on an ``align``-byte boundary."""
    n = int(np.prod(shape))
    raw = np.empty(n * 4 + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n * 4].view(np.float32).reshape(shape)


def mam_match(
    ann_patient: np.ndarray,
    ann_emb: np.ndarray,
    prop_patient: np.ndarray,
    prop_emb: np.ndarray,
    theta: float = DEFAULT_THETA,
    *,
    devices: Sequence[jax.Device] | None = None,
    tile: int = 64,
    max_buckets: int = 4,
    chunk_bytes: int = 64 << 20,
    compile_cost_pairs: float = 8e6,
    stats: dict | None = None,
) -> MamResult:
    """MAM over all patients: nearest annotated lesion of each proposal and the theta matches.

    Args:
      ann_patient: [NA] patient id (any integers) of each annotated lesion.
      ann_emb: [NA, D] annotated-lesion embeddings (cast to float32).
      prop_patient: [NP] patient id of each universal-expert proposal.
      prop_emb: [NP, D] proposal embeddings (cast to float32; no copy if already float32).
      theta: L2 matching threshold, strict (see the module docstring).
      devices: devices to shard the tile axis over; default all of ``jax.devices()``. (Multi-host:
        pass the local devices; patients are split between hosts by the caller.)
      tile, max_buckets, chunk_bytes, compile_cost_pairs: see :func:`plan_buckets`.
      stats: if a dict, filled with timings (seconds: ``plan_s``, ``compile_s`` (time spent waiting
        for compilation, which runs in background threads), ``pack_s``
        (gather + transfer), ``kernel_s`` (the jitted part alone), ``total_s``) and work counts
        (``real_pairs``, ``padded_pairs``, ``buckets``: list of (tiles, batch, tile, a_pad)).
        Timing blocks on each chunk, so a run with stats overlaps less host and device work.

    Returns:
      :class:`MamResult` with [NP] arrays in the order of ``prop_patient``.
    """
    ann_patient, ann_emb, prop_patient, prop_emb = _check_inputs(
        ann_patient, ann_emb, prop_patient, prop_emb)
    devices = tuple(jax.devices() if devices is None else devices)
    n_prop_rows, dim = prop_emb.shape
    lesion = np.full(n_prop_rows, -1, dtype=np.int64)
    nearest = np.full(n_prop_rows, -1, dtype=np.int64)
    distance = np.full(n_prop_rows, np.inf, dtype=np.float32)
    if n_prop_rows == 0 or ann_emb.shape[0] == 0:
        return MamResult(lesion, distance, nearest)

    t_start = time.perf_counter()
    n_pat, ann_dense, prop_dense = _dense_patients(ann_patient, prop_patient)
    n_ann = np.bincount(ann_dense, minlength=n_pat)
    n_prop = np.bincount(prop_dense, minlength=n_pat)
    ann_order = np.argsort(ann_dense, kind="stable")
    prop_order = np.argsort(prop_dense, kind="stable")
    ann_start = np.cumsum(n_ann) - n_ann
    prop_start = np.cumsum(n_prop) - n_prop
    buckets = plan_buckets(n_ann, n_prop, dim=dim, tile=tile, max_buckets=max_buckets,
                           chunk_bytes=chunk_bytes, num_devices=len(devices),
                           compile_cost_pairs=compile_cost_pairs)
    _, batch_sharding, replicated = _compiled_kernel(devices)
    theta_dev = jax.device_put(np.float32(theta), replicated)
    ann_emb32 = np.ascontiguousarray(ann_emb, dtype=np.float32)
    prop_emb32 = np.ascontiguousarray(prop_emb, dtype=np.float32)

    def rows_of(starts, order, first, count, pad):
        """[B, pad] rows into the flat arrays (-1 padded) and their validity."""
        ar = np.arange(pad, dtype=np.int64)
        valid = ar[None, :] < count[:, None]
        pos = np.minimum(starts[:, None] + first[:, None] + ar[None, :], order.size - 1)
        return np.where(valid, order[pos], -1), valid

    def finish(pending):
        (slot, dist, matched), p_rows, a_rows = pending
        slot = np.asarray(slot)
        dist = np.asarray(dist)
        matched = np.asarray(matched)
        ok = p_rows >= 0
        rows = p_rows[ok]
        s = slot[ok]
        has = s >= 0
        bidx = np.nonzero(ok)[0]
        near = np.full(rows.size, -1, dtype=np.int64)
        near[has] = a_rows[bidx[has], s[has]]
        nearest[rows] = near
        distance[rows] = dist[ok]
        lesion[rows] = np.where(matched[ok], near, -1)

    timing = {"plan_s": time.perf_counter() - t_start, "compile_s": 0.0, "pack_s": 0.0,
              "kernel_s": 0.0}
    # Every bucket's program is compiled up front in threads (XLA compiles outside the GIL), so
    # the later buckets' compilations overlap each other and the first buckets' work.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(COMPILE_THREADS, len(buckets))))
    futures = [pool.submit(_executable, devices, b.batch, b.a_pad, b.tile, dim) for b in buckets]
    pool.shutdown(wait=False)
    pending = None
    for bucket, future in zip(buckets, futures):
        t0 = time.perf_counter()
        exe = future.result()
        timing["compile_s"] += time.perf_counter() - t0
        # Two sets of host staging buffers per bucket, used alternately. They are 64-byte aligned
        # so that the CPU backend can use them without a copy (zero-copy device_put); a set is
        # refilled only after the chunk that last read it has finished.
        sets = [(_aligned_empty((bucket.batch, bucket.a_pad, dim)),
                 _aligned_empty((bucket.batch, bucket.tile, dim))) for _ in range(2)]
        last_out: list = [None, None]
        for c in range(bucket.num_chunks):
            t0 = time.perf_counter()
            a_buf, p_buf = sets[c % 2]
            if last_out[c % 2] is not None:
                jax.block_until_ready(last_out[c % 2])
            sl = slice(c * bucket.batch, (c + 1) * bucket.batch)
            tp = bucket.tile_patient[sl]
            pad = bucket.batch - tp.size
            zeros = np.zeros(pad, np.int64)
            tp_safe = np.concatenate([tp, zeros])
            first = np.concatenate([bucket.tile_offset[sl], zeros])
            p_count = np.concatenate([bucket.tile_count[sl], zeros])
            a_count = np.concatenate([n_ann[tp], zeros])
            a_rows, a_valid = rows_of(ann_start[tp_safe], ann_order, np.zeros_like(first),
                                      a_count, bucket.a_pad)
            p_rows, p_valid = rows_of(prop_start[tp_safe], prop_order, first, p_count, bucket.tile)
            np.take(ann_emb32, np.maximum(a_rows, 0).reshape(-1), axis=0,
                    out=a_buf.reshape(-1, dim))
            np.take(prop_emb32, np.maximum(p_rows, 0).reshape(-1), axis=0,
                    out=p_buf.reshape(-1, dim))
            args = tuple(jax.device_put(x, batch_sharding) for x in (a_buf, a_valid, p_buf, p_valid))
            if stats is not None:
                jax.block_until_ready(args)
            t1 = time.perf_counter()
            timing["pack_s"] += t1 - t0
            out = exe(*args, theta_dev)
            last_out[c % 2] = out
            if stats is not None:
                jax.block_until_ready(out)
                timing["kernel_s"] += time.perf_counter() - t1
            if pending is not None:
                finish(pending)      # host work overlaps the chunk just dispatched
            pending = (out, p_rows, a_rows)
    if pending is not None:
        finish(pending)
    if stats is not None:
        timing["total_s"] = time.perf_counter() - t_start
        stats.update(timing)
        stats["real_pairs"] = int(np.sum(n_ann * n_prop))
        stats["padded_pairs"] = int(sum(b.padded_work for b in buckets))
        stats["buckets"] = [(len(b.tile_patient), b.batch, b.tile, b.a_pad) for b in buckets]
    return MamResult(lesion, distance, nearest)


# --------------------------------------------------------------------------------------------------
# Independent NumPy reference.
# --------------------------------------------------------------------------------------------------
def mam_match_reference(
    ann_patient: np.ndarray,
    ann_emb: np.ndarray,
    prop_patient: np.ndarray,
    prop_emb: np.ndarray,
    theta: float = DEFAULT_THETA,
) -> MamResult:
    """Plain per-patient NumPy loop in float64 (Gram expansion). Same outputs as :func:`mam_match`.

    Distances are float64 (cast to float32 on return); matching compares the float64 distance with
    ``theta``, so results can differ from :func:`mam_match` only for pairs within float32 rounding
    (about 1e-6) of theta or of a tie; :func:`count_disagreements` tells those apart.
    """
    ann_patient, ann_emb, prop_patient, prop_emb = _check_inputs(
        ann_patient, ann_emb, prop_patient, prop_emb)
    n = prop_patient.size
    lesion = np.full(n, -1, dtype=np.int64)
    nearest = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, np.inf, dtype=np.float32)
    ann_by_patient: dict[int, list[int]] = {}
    for row, p in enumerate(ann_patient.tolist()):
        ann_by_patient.setdefault(p, []).append(row)
    prop_by_patient: dict[int, list[int]] = {}
    for row, p in enumerate(prop_patient.tolist()):
        prop_by_patient.setdefault(p, []).append(row)
    for patient, p_rows in prop_by_patient.items():
        a_rows = ann_by_patient.get(patient)
        if not a_rows:
            continue
        a = np.asarray(ann_emb[a_rows], dtype=np.float64)
        p = np.asarray(prop_emb[p_rows], dtype=np.float64)
        d2 = (p * p).sum(1)[:, None] + (a * a).sum(1)[None, :] - 2.0 * (p @ a.T)
        d = np.sqrt(np.maximum(d2, 0.0))
        j = np.argmin(d, axis=1)
        best = d[np.arange(len(p_rows)), j]
        near = np.asarray(a_rows, dtype=np.int64)[j]
        nearest[p_rows] = near
        distance[p_rows] = best.astype(np.float32)
        lesion[p_rows] = np.where(best < theta, near, -1)
    return MamResult(lesion, distance, nearest)


def count_disagreements(
    result: MamResult, reference: MamResult, theta: float, tol: float = 1e-5
) -> dict[str, int]:
    """Compares two MAM results proposal by proposal.

    Returns counts: ``mismatch`` (different match decision or matched lesion that no rounding
    explains: the failures), ``boundary`` (decision differs but the distance is within ``tol`` of
    theta), ``tie`` (different lesion at distances within ``tol``), ``max_distance_error`` (largest
    absolute distance difference on finite distances, in units of 1e-9).
    """
    d_a = result.distance.astype(np.float64)
    d_b = reference.distance.astype(np.float64)
    fin = np.isfinite(d_a) & np.isfinite(d_b)
    inf_mismatch = int(np.sum(np.isfinite(d_a) != np.isfinite(d_b)))
    dec_diff = result.matched != reference.matched
    near_theta = np.abs(d_b - theta) <= tol
    boundary = dec_diff & near_theta
    lesion_diff = (~dec_diff) & (result.lesion != reference.lesion)
    gap = np.abs(np.where(fin, d_a, 0.0) - np.where(fin, d_b, 0.0))
    near_tie = fin & (gap <= tol)
    tie = lesion_diff & near_tie
    mismatch = int(np.sum(dec_diff & ~near_theta) + np.sum(lesion_diff & ~near_tie)) + inf_mismatch
    max_err = float(np.max(gap[fin])) if np.any(fin) else 0.0
    return {
        "mismatch": mismatch,
        "boundary": int(boundary.sum()),
        "tie": int(tie.sum()),
        "max_distance_error_1e9": int(math.ceil(max_err * 1e9)),
    }


# --------------------------------------------------------------------------------------------------
# From matches to mined positives.
# --------------------------------------------------------------------------------------------------
def select_mined_positives(
    result: MamResult,
    *,
    prop_slice: np.ndarray,
    prop_box: np.ndarray,
    ann_slice: np.ndarray,
    ann_box: np.ndarray,
    theta: float | None = None,
    overlap_iou: float = 0.0,
    dedupe_iou: float = 0.5,
    prop_score: np.ndarray | None = None,
    min_score: float | None = None,
) -> np.ndarray:
    """Which matched proposals become mined positives.

    A matched proposal (distance < theta) is *not* a new positive when it overlaps an existing
    annotation on the same slice (IoU > ``overlap_iou``; default 0: any positive-area intersection,
    see :mod:`uld_jax.mine.overlap`): the lesion is already marked there. Among the remaining ones,
    proposals on the same slice that overlap each other (IoU > ``dedupe_iou``) are reduced to the one
    nearest to its lesion (greedy, by distance), so one unmarked lesion yields one mined box per slice.

    Args:
      result: from :func:`mam_match` (or the reference).
      prop_slice: [NP] int slice key of each proposal (row of the run's slice table).
      prop_box: [NP, 4] internal boxes (pixels of the preprocessed slice).
      ann_slice: [NA] slice key of each existing annotation; ann_box [NA, 4].
      theta: re-threshold ``result`` with this theta (strict rule); None keeps its matches.
      overlap_iou: overlap threshold against existing annotations.
      dedupe_iou: IoU above which two mined boxes on one slice are duplicates.
      prop_score, min_score: optionally keep only proposals with score > ``min_score``.

    Returns:
      [NP] bool, True for mined positives.
    """
    if theta is not None:
        result = result.rethreshold(theta)
    cand = result.matched.copy()
    if prop_score is not None and min_score is not None:
        cand &= np.asarray(prop_score) > min_score
    idx = np.flatnonzero(cand)
    if idx.size == 0:
        return cand
    prop_slice = np.asarray(prop_slice)
    prop_box = np.asarray(prop_box, dtype=np.float64)
    over = overlap.overlaps_same_key(prop_slice[idx], prop_box[idx], np.asarray(ann_slice),
                                     np.asarray(ann_box, dtype=np.float64), overlap_iou)
    idx = idx[~over]
    keep = overlap.greedy_dedupe_same_key(prop_slice[idx], prop_box[idx],
                                          result.distance[idx], dedupe_iou)
    out = np.zeros_like(cand)
    out[idx[keep]] = True
    return out
