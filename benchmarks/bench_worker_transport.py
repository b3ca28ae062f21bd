"""How fast grain's worker processes hand batches to the training process, by batch layout, against
the same batches made in process (the baseline, measured in the same run).

The batches are made of constant arrays, so making them costs almost nothing: what the worker rows
measure is the hand-over (each batch's arrays copied out of a worker into the main process). Two
layouts of the two big arrays at the paper's size (batch 4, 512 x 512, 9 context slices, 16 boxes):

* ``whole``: the pipeline's earlier batch, a float32 image and whole-image uint8 masks (55 MB);
* ``crops``: the pipeline's batch (``uld_jax.input_pipeline``), an int16 fixed-point image and a
  56 x 56 uint8 mask crop per box over its ``mask_boxes`` row (19 MB).

    python benchmarks/bench_worker_transport.py                  # workers 0,1,2
    python benchmarks/bench_worker_transport.py --workers 0,4,8 --batches 80

For each layout and worker count it prints batches/s and samples/s, the ratio of each worker
count to in-process, and each layout's rate against ``whole`` at the same worker count. On 2 CPU
cores (docs/scaling.md) the whole-image layout's hand-over capped the loader near 45-65 samples/s
whatever the workers did.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grain
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from uld_jax.input_pipeline import IMAGE_DTYPE, default_input_config, worker_prefetch  # noqa: E402

BATCH, SIDE, CONTEXT, BOXES = 4, 512, 9, 16
CROP = int(default_input_config("paper").mask_crop)

LAYOUTS = {
    # name: {key: (shape, dtype)}
    "whole": {"image": ((BATCH, SIDE, SIDE, CONTEXT), np.float32),
              "masks": ((BATCH, BOXES, SIDE, SIDE), np.uint8)},
    "crops": {"image": ((BATCH, SIDE, SIDE, CONTEXT), IMAGE_DTYPE),
              "masks": ((BATCH, BOXES, CROP, CROP), np.uint8),
              "mask_boxes": ((BATCH, BOXES, 4), np.float32)},
}


class _MakeBatch(grain.transforms.Map):
    """Element i -> one batch of ``layout``, every array filled with i (cheap to make)."""

    def __init__(self, layout: str):
        self.layout = layout

    def map(self, i):
        return {k: np.full(shape, i % 100, dtype) for k, (shape, dtype) in LAYOUTS[self.layout].items()}


def batch_mb(layout: str) -> float:
    return sum(np.prod(s) * np.dtype(d).itemsize for s, d in LAYOUTS[layout].values()) / 1e6


def rate(layout: str, workers: int, batches: int) -> float:
    """Batches per second read from the iterator, after its first batch (start-up excluded)."""
    ds = grain.MapDataset.range(10**9).map(_MakeBatch(layout)).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if workers:
        ds = worker_prefetch(ds, workers, 2)        # the pipeline's own worker set-up
    it = iter(ds)
    try:
        next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches / (time.perf_counter() - t)
    finally:
        if hasattr(it, "close"):
            it.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0: in process)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--layouts", default="whole,crops")
    a = p.parse_args(argv)
    workers = sorted({int(w) for w in a.workers.split(",") if w.strip()} | {0})
    layouts = [x.strip() for x in a.layouts.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        p.error(f"--layouts: unknown {unknown}; expected some of {sorted(LAYOUTS)}")
    print("| layout | MB a batch | workers | batches/s | samples/s | against in process | "
          f"against {layouts[0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    first: dict[int, float] = {}
    for layout in layouts:
        base = None
        for w in workers:
            r = rate(layout, w, a.batches)
            base = r if w == 0 else base
            first.setdefault(w, r)
            print(f"| {layout} | {batch_mb(layout):.1f} | {w} | {r:.1f} | {r * BATCH:.1f} | "
                  f"{r / base:.2f} | {r / first[w]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
