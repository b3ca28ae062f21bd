"""Build and loader throughput of the slice datasets, each against a baseline measured in the same run.

    python benchmarks/bench_input_pipeline.py [--geometries tiny,paper] [--workers 0,1,2]
        [--cases 6] [--slices 24] [--batches 10] [--step-rate SAMPLES_PER_S | --step-fn MOD:FN]

* build: ``data_prep.build`` on synthetic Cases (noisy HU, so compression costs what it costs on CT)
  in slices/s, against the plain ``encode_slice`` rate of the same slices (the codec alone).
* loader: the grain pipeline (9-slice context, windowing, augmentation, masks, batching) in
  samples/s with 0, 1, 2 worker processes, against the decode-only rate (reading and decoding the
  9 context slices of each sample from the slice store, nothing else). Without workers the rate
  per CPU-second of the process is printed too: on a shared machine it is the number that does
  not depend on the other load (read threads make it slightly optimistic).
* train step (hook): ``--step-rate`` (samples/s measured elsewhere) or ``--step-fn module:function``
  (called as ``function(variant) -> samples/s``, e.g. once ``uld_jax.train`` exists) prints the
  loader / step ratio; the goal is >= 3 so that input never limits training.

Geometries: tiny = 176 x 176 slices at 2 mm into a 160 x 160 canvas; paper = 512 x 512 slices at
0.8 mm into 512 x 512.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from data_prep import build as build_lib  # noqa: E402
from data_prep import case_factory as cf  # noqa: E402
from uld_jax import input_pipeline as ip  # noqa: E402
from uld_jax import slice_data as sd  # noqa: E402

GEOMETRIES = {
    # name: (slice side, pixel mm, canvas side)
    "tiny": (176, 2.0, 160),
    "paper": (512, 0.8, 512),
}


def _cases(geometry: str, n_cases: int, n_slices: int):
    side, pixel_mm, _ = GEOMETRIES[geometry]
    out = []
    for k in range(n_cases):
        les = (n_slices // 3, 2 * n_slices // 3)
        s = side // 8
        boxes = [[s * 2, s * 3, s * 3, s * 4], [s * 4, s * 2, s * 5, s * 4]]
        out.append(cf.make_case("luna16", k, num_slices=n_slices, height=side, width=side,
                                lesion_slices=les, boxes=boxes, negatives=(1, n_slices - 2),
                                pixel_mm=pixel_mm, noise_hu=25.0))
    return out


def bench_build(geometry: str, root: str, n_cases: int, n_slices: int) -> tuple[str, dict]:
    cases = _cases(geometry, n_cases, n_slices)
    n = sum(c.slices.shape[0] for c in cases)
    sd.slice_features(), sd.sample_features(), sd.case_features()   # imports excluded from timing
    t0 = time.perf_counter()
    for c in cases:
        for z in range(c.slices.shape[0]):
            sd.encode_slice(c.slices[z])
    enc = n / (time.perf_counter() - t0)
    out = os.path.join(root, geometry)
    t0 = time.perf_counter()
    build_lib.build("/synthetic", out, ["luna16"], pixel_mm=GEOMETRIES[geometry][1],
                    reader_lookup=lambda name: cf.ListReader(cases), progress=False)
    rate = n / (time.perf_counter() - t0)
    raw = sum(c.slices.nbytes for c in cases)
    disk = sum(os.path.getsize(os.path.join(dp, f))
               for dp, _, fs in os.walk(os.path.join(out, "luna16", "uld_luna16_slices")) for f in fs)
    return out, {"slices": n, "build": rate, "encode_only": enc, "raw_mb": raw / 2**20,
                 "store_mb": disk / 2**20}


def _config(data_dir: str, geometry: str, workers: int):
    side, pixel_mm, canvas = GEOMETRIES[geometry]
    c = ip.default_input_config("tiny" if geometry == "tiny" else "paper")
    c.data_dir = data_dir
    c.datasets = ("luna16",)
    c.pixel_mm = pixel_mm
    c.image_size = (canvas, canvas)
    c.num_workers = workers
    c.global_batch_size = 4
    c.slice_cache = 0        # the benchmark's few cases would fit in the cache; real sets do not
    return c


def bench_decode_only(data_dir: str, geometry: str, n_samples: int) -> float:
    c = _config(data_dir, geometry, 0)
    tables, stores = ip.load_tables(c)
    loader = ip.SampleLoader(tables, stores, c)
    rows = np.random.default_rng(0).permutation(len(tables[0]))   # shuffled, like training
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n_samples):
        loader.read_context(0, int(rows[i % len(rows)]))
    return n_samples / (time.perf_counter() - t0), n_samples / (time.process_time() - c0)


def bench_loader(data_dir: str, geometry: str, workers: int, n_batches: int) -> float:
    c = _config(data_dir, geometry, workers)
    it = iter(ip.make_dataset(c, process_index=0, process_count=1))
    try:
        next(it)                                     # worker start-up and first fill excluded
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            next(it)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if hasattr(it, "close"):
            it.close()
    n = n_batches * c.global_batch_size
    return n / dt, n / dc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometries", default="tiny,paper")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--step-rate", type=float, default=None,
                   help="model train-step consumption rate (samples/s) to compare with")
    p.add_argument("--step-fn", default=None, help="module:function(variant) -> samples/s")
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench_input_")
    print(f"CPU cores: {os.cpu_count()}; data in {root}")
    try:
        for g in a.geometries.split(","):
            data_dir, b = bench_build(g, root, a.cases, a.slices)
            print(f"[{g}] build: {b['build']:.1f} slices/s  vs encode-only {b['encode_only']:.1f} "
                  f"slices/s  (ratio {b['build'] / b['encode_only']:.2f}); {b['slices']} slices, "
                  f"raw int16 {b['raw_mb']:.1f} MiB -> slice store {b['store_mb']:.1f} MiB "
                  f"({b['raw_mb'] / b['store_mb']:.2f}x)")
            base, base_cpu = bench_decode_only(data_dir, g, 4 * a.batches)
            print(f"[{g}] decode-only baseline: {base:.1f} samples/s (9 slices read + decoded; "
                  f"{base_cpu:.1f} per CPU-second of this process)")
            step = a.step_rate
            if a.step_fn:
                mod, fn = a.step_fn.split(":")
                step = getattr(importlib.import_module(mod), fn)(g)
            for w in [int(v) for v in a.workers.split(",")]:
                r, r_cpu = bench_loader(data_dir, g, w, a.batches)
                line = (f"[{g}] loader, {w} worker(s): {r:.1f} samples/s  "
                        f"(ratio to decode-only {r / base:.2f})")
                if w == 0:
                    line += (f"; {r_cpu:.1f} per CPU-second (ratio {r_cpu / base_cpu:.2f}; "
                             f"independent of other load)")
                if step:
                    line += f"; train step {step:.1f} samples/s -> loader/step {r / step:.2f} (goal >= 3)"
                print(line, flush=True)
            if not step:
                print(f"[{g}] train-step rate: not given (--step-rate / --step-fn once uld_jax.train exists)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
