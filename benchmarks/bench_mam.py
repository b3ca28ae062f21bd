"""MAM at the paper's scale: the bucketed, jitted MAM against a per-patient NumPy loop, same run.

Scale (Yan et al., TMI 2020, DeepLesion training split): 3,057 patients, 22.9K annotated lesions,
1.43M universal-expert proposals on 233K slices (every 5 mm), 256-D L2-normalised embeddings. The
embeddings are synthetic: random unit vectors, with a share of the proposals planted near one of
their patient's lesions (distances spread over [0, 2 theta], so a real fraction matches). Counts per
patient are skewed as in DeepLesion: slices per patient lognormal (some patients have one short
sub-volume, some dozens of studies), proposals per slice Poisson, lesions per patient growing
with the patient's slice count.

Prints: the wall time of the whole MAM (planning, packing, compilation, kernel, scatter), the time
of the jitted kernel alone, the NumPy loop's time and the ratio, the peak memory of each phase, and
asserts that both give identical matches (differences allowed only within float32 rounding of
theta or of a tie, and counted).

    python benchmarks/bench_mam.py                 # paper scale (about 1.5 GB of embeddings)
    python benchmarks/bench_mam.py --scale 0.05    # quick look

Measured 2026-11-25 on the 2-core shared build machine (load average 7-9, i.e. ~4x
oversubscribed), jax 0.10.2 CPU: whole MAM cold 8.69 s wall / 4.20 s CPU (3 buckets, padded work
1.78x real), jitted kernel alone 2.81 s, NumPy per-patient float64 loop 30.0 s wall / 14.4 s CPU,
identical matches (35,474 of 1.43M proposals), peak memory +349 MiB above the 1.4 GiB inputs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PATIENTS = 3057
ANNOTATIONS = 22_900
PROPOSALS = 1_430_000
SLICES = 233_000
DIM = 256


def _rss_peak_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_rss_peak() -> bool:
    """Resets the kernel's peak-RSS counter (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_world(scale: float, seed: int, theta: float, plant_fraction: float = 0.05):
    """Synthetic MAM inputs. Returns (ann_patient, ann_emb, prop_patient, prop_emb, prop_slice)."""
    rng = np.random.default_rng(seed)
    n_pat = max(8, int(round(PATIENTS * scale)))
    n_slices = int(round(SLICES * scale))
    n_ann = int(round(ANNOTATIONS * scale))
    n_prop = int(round(PROPOSALS * scale))
    # Slices per patient: lognormal weights (sigma 1: the largest patients have ~20x the median).
    w = rng.lognormal(0.0, 1.0, n_pat)
    slices_pp = 1 + rng.multinomial(n_slices - n_pat, w / w.sum())
    # Lesions per patient grow sub-linearly with the slice count; every patient has >= 1 except 2%.
    wa = slices_pp ** 0.7 * rng.lognormal(0.0, 0.5, n_pat)
    ann_pp = 1 + rng.multinomial(n_ann - n_pat, wa / wa.sum())
    ann_pp[rng.random(n_pat) < 0.02] = 0
    # Proposals: Poisson per slice, scaled to the target total.
    slice_patient = np.repeat(np.arange(n_pat), slices_pp)
    per_slice = rng.poisson(n_prop / slices_pp.sum(), slice_patient.size)
    prop_slice = np.repeat(np.arange(slice_patient.size), per_slice)
    prop_patient = slice_patient[prop_slice]
    ann_patient = np.repeat(np.arange(n_pat), ann_pp)
    # Arbitrary patient ids (not 0..N-1) and proposal order by slice, as a mining run produces.
    ids = rng.permutation(10 * n_pat)[:n_pat].astype(np.int64) + 1000
    ann_patient, prop_patient = ids[ann_patient], ids[prop_patient]

    def unit(n):
        x = rng.standard_normal((n, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    ann_emb = unit(ann_patient.size)
    prop_emb = unit(prop_patient.size)
    # Planted near-duplicates: pick proposals of annotated patients, move them to distance d of a
    # random lesion of their patient along a random orthogonal direction.
    order = np.argsort(ann_patient, kind="stable")
    uniq, start, count = np.unique(ann_patient[order], return_index=True, return_counts=True)
    pos = np.searchsorted(uniq, prop_patient)
    pos_c = np.minimum(pos, uniq.size - 1)
    has = (uniq[pos_c] == prop_patient)
    pick = np.flatnonzero(has & (rng.random(prop_patient.size) < plant_fraction))
    target_rows = order[start[pos_c[pick]] + (rng.random(pick.size) * count[pos_c[pick]]).astype(int)]
    target = ann_emb[target_rows]
    noise = rng.standard_normal((pick.size, DIM), dtype=np.float32)
    noise -= np.sum(noise * target, axis=1, keepdims=True) * target
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    d = rng.uniform(0.0, 2.0 * theta, pick.size).astype(np.float32)
    prop_emb[pick] = target + d[:, None] * noise
    prop_emb[pick] /= np.linalg.norm(prop_emb[pick], axis=1, keepdims=True)
    return ann_patient, ann_emb, prop_patient, prop_emb, prop_slice


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the paper's counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--theta", type=float, default=0.15)
    ap.add_argument("--max-buckets", type=int, default=4)
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--skip-numpy", action="store_true", help="skip the NumPy loop (no ratio)")
    args = ap.parse_args(argv)

    import jax

    from uld_jax.mine import mam

    t0 = time.perf_counter()
    ann_patient, ann_emb, prop_patient, prop_emb, prop_slice = make_world(
        args.scale, args.seed, args.theta)
    n_pat = np.unique(np.concatenate([ann_patient, prop_patient])).size
    per_patient = np.bincount(np.unique(prop_patient, return_inverse=True)[1])
    print(f"world: {n_pat} patients, {ann_patient.size} annotations, {prop_patient.size} proposals "
          f"on {np.unique(prop_slice).size} slices, D={DIM} "
          f"(proposals/patient median {int(np.median(per_patient))}, max {per_patient.max()}); "
          f"embeddings {(ann_emb.nbytes + prop_emb.nbytes) / 2**30:.2f} GiB; "
          f"built in {time.perf_counter() - t0:.1f} s")
    print(f"jax {jax.__version__}, devices: {jax.devices()}, cpu cores: {os.cpu_count()}, "
          f"load average before: {os.getloadavg()[0]:.1f} (a shared machine slows every number)")

    kw = dict(max_buckets=args.max_buckets, chunk_bytes=args.chunk_mb << 20)
    base_rss = _rss_mb()
    can_reset = _reset_rss_peak()
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    res = mam.mam_match(ann_patient, ann_emb, prop_patient, prop_emb, args.theta, **kw)
    t_jax, cpu_jax = time.perf_counter() - t0, time.process_time() - c0
    _, tm_peak_jax = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_jax = _rss_peak_mb() - base_rss if can_reset else float("nan")
    print(f"\nMAM (bucketed, jitted), whole, cold (planning, compilation, packing, kernel, "
          f"scatter): {t_jax:.2f} s wall, {cpu_jax:.2f} s CPU (all threads)")
    print(f"  peak memory above the inputs: RSS +{peak_jax:.0f} MiB, "
          f"NumPy allocations (tracemalloc) {tm_peak_jax / 2**20:.0f} MiB")
    n_slices = np.unique(prop_slice).size
    print(f"  MAM throughput: {n_slices / t_jax:,.0f} mined slices/s, "
          f"{prop_patient.size / t_jax:,.0f} proposals/s")
    print(f"  matched proposals: {int(res.matched.sum())} "
          f"({res.matched.mean() * 100:.2f}%), theta={args.theta}")

    # Host-side selection of mined positives (same-slice overlap with the original annotations,
    # de-duplication): random boxes, one key slice per annotation among its patient's slices.
    rng = np.random.default_rng(args.seed + 1)
    yx = rng.uniform(0, 400, (prop_patient.size, 2)).astype(np.float32)
    prop_box = np.concatenate([yx, yx + rng.uniform(8, 60, (prop_patient.size, 2))], 1)
    first = np.searchsorted(np.sort(prop_patient), ann_patient)
    ann_rows = np.argsort(prop_patient, kind="stable")[np.minimum(first, prop_patient.size - 1)]
    ann_slice = prop_slice[ann_rows]
    ann_box = prop_box[ann_rows]
    t0 = time.perf_counter()
    mined = mam.select_mined_positives(res, prop_slice=prop_slice, prop_box=prop_box,
                                       ann_slice=ann_slice, ann_box=ann_box)
    t_sel = time.perf_counter() - t0
    print(f"  selection of mined positives (overlap with annotations, de-duplication): "
          f"{t_sel:.2f} s -> {int(mined.sum())} mined positives; MAM + selection "
          f"{t_jax + t_sel:.2f} s")

    # Warm run with per-phase timing (blocks after each chunk, so phases do not overlap).
    stats: dict = {}
    res2 = mam.mam_match(ann_patient, ann_emb, prop_patient, prop_emb, args.theta, stats=stats,
                         **kw)
    assert all(np.array_equal(a, b) for a, b in zip(res, res2))
    print(f"MAM warm (compiled programs cached), phases: total {stats['total_s']:.2f} s = plan "
          f"{stats['plan_s']:.2f} + pack {stats['pack_s']:.2f} + jitted kernel alone "
          f"{stats['kernel_s']:.2f} + scatter/rest")
    print(f"  buckets (tiles, batch, tile, a_pad): {stats['buckets']}")
    print(f"  padded work / real work: {stats['padded_pairs'] / stats['real_pairs']:.2f} "
          f"({stats['real_pairs'] / 1e6:.1f}M real distance pairs)")
    # Compilation alone: clear the caches and compile the same programs one after the other.
    mam._executable.cache_clear()
    jax.clear_caches()
    devices = tuple(jax.devices())
    t0 = time.perf_counter()
    for _, batch, tile, a_pad in stats["buckets"]:
        mam._executable(devices, batch, a_pad, tile, DIM)
    print(f"  compilation of the {len(stats['buckets'])} programs, sequential: "
          f"{time.perf_counter() - t0:.2f} s (the cold run compiles them in background threads)")

    if args.skip_numpy:
        return 0
    _reset_rss_peak()
    base_rss = _rss_mb()
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    ref = mam.mam_match_reference(ann_patient, ann_emb, prop_patient, prop_emb, args.theta)
    t_np, cpu_np = time.perf_counter() - t0, time.process_time() - c0
    _, tm_peak_np = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_np = _rss_peak_mb() - base_rss if can_reset else float("nan")
    print(f"\nNumPy per-patient loop (float64): {t_np:.2f} s wall, {cpu_np:.2f} s CPU; peak memory above the inputs: "
          f"RSS +{peak_np:.0f} MiB, tracemalloc {tm_peak_np / 2**20:.0f} MiB")

    cmp = mam.count_disagreements(res, ref, args.theta)
    print(f"agreement: {cmp}")
    assert cmp["mismatch"] == 0, cmp
    print(f"\nspeed ratio NumPy loop / MAM whole (cold): {t_np / t_jax:.1f}x   "
          f"(/ jitted kernel alone: {t_np / stats['kernel_s']:.1f}x)")
    print(f"goal whole MAM < 10 s: {'met' if t_jax < 10 else 'NOT met'} ({t_jax:.2f} s; "
          f"load average now {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
