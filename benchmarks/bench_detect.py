"""Detection speed (slices per second) of ``python -m uld_jax.detect``'s loop, tiny and (behind
``--paper``) paper configs, against the model forward alone in the same run.

For each config (randomly initialised parameters; speed does not depend on their values):

* baseline: the jitted predict function alone (``uld_jax.inference.Predictor``), one prepared batch
  dispatched as many times as the scan needs, device results fetched (two batches in flight, as
  in the detect loop);
* detect loop: reading the scan, the training preprocessing (canonical orientation, crop,
  resampling, windowing, placement), building each batch's 9-slice contexts, the same predict
  function, mapping boxes back, stacking 2D -> 3D and mapping to voxels / world mm (no files written);

and prints slices/s of both and their ratio (detect loop / forward alone; 1.0 = no overhead).
Compilation is excluded from both and reported separately.

    python benchmarks/bench_detect.py                           # tiny (160 px), about a minute
    python benchmarks/bench_detect.py --paper --max-slices 16   # + paper (512 px, ~1 s / slice on CPU)
    python benchmarks/bench_detect.py --scan path/to/scan.nii.gz --batch-size 8
    python benchmarks/bench_detect.py --paper --skip-tiny --paper-max-slices 0 --batch-size 8 \
        --dtypes float32,bfloat16 --json detect.json        # on a GPU: the whole scan, both dtypes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import meld  # noqa: E402
from data_prep.readers.scan import read_scan  # noqa: E402
from data_prep.types import Volume  # noqa: E402
from uld_jax import detect, inference  # noqa: E402
from uld_jax.io.atomic import atomic_write_json  # noqa: E402
from uld_jax.models.meld import MELD, init_variables  # noqa: E402

from bench_model import parse_dtypes  # noqa: E402  (the script's own folder is on sys.path)

REAL_SCAN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                         "real", "ct", "example_ct.nii.gz")


def _loaded(variant: str, dtype: str = "float32") -> inference.LoadedModel:
    c = meld.get_config(variant)
    c.model.dtype = dtype
    model = MELD(c.model)
    return inference.LoadedModel(model=model, variables=init_variables(model, 0), model_config=c.model,
                                 data_config=c.data, step=0, source=f"random init ({variant}, {dtype})")


def _crop(vol: Volume, max_slices: int | None) -> Volume:
    if not max_slices or vol.hu.shape[0] <= max_slices:
        return vol
    # ~2 mm stored slices per source slice spacing: keep enough source slices for max_slices
    keep = max(2, int(np.ceil(max_slices * 2.0 / vol.spacing_zyx[0])) + 1)
    return Volume(vol.hu[:keep], vol.spacing_zyx, vol.origin_xyz, vol.direction, vol.source)


def bench(variant: str, scan_path: str, batch_size: int, max_slices: int | None, reps: int,
          dtype: str = "float32") -> dict:
    loaded = _loaded(variant, dtype)
    pred = inference.Predictor(loaded, batch_size, "deeplesion", with_masks=False)
    vol = _crop(read_scan(scan_path), max_slices)
    scan = detect.prepare_scan(vol, loaded.data_config)
    n = scan.num_slices
    img, val, sv = inference.pad_batch(*scan.images(range(min(batch_size, n))), batch_size)
    t = time.perf_counter()
    jax.block_until_ready(pred.device_call(img, val, sv))
    compile_s = time.perf_counter() - t
    nb = -(-n // batch_size)

    def forward_only():
        # the detect loop's pattern: dispatch batch b, then fetch batch b - 1 (two in flight)
        outs, pending = [], None
        for _ in range(nb):
            dev = pred.device_call(img, val, sv)
            if pending is not None:
                outs.append(jax.tree.map(np.asarray, pending))
            pending = dev
        outs.append(jax.tree.map(np.asarray, pending))
        return outs

    def whole_loop():
        v = _crop(read_scan(scan_path), max_slices)
        s = detect.prepare_scan(v, loaded.data_config)
        dets = detect.detect_slices(pred, s, 0.05, progress=False)
        f = detect.stack_findings(dets, s.mapping)
        return detect.finding_records(f, dets, pred.expert_name, loaded.expert_names)

    best = {}
    for name, fn in (("forward", forward_only), ("detect", whole_loop)):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best[name] = min(times)
    return {"variant": variant, "dtype": dtype, "image": loaded.image_size[0], "slices": n,
            "batch": batch_size,
            "compile_s": compile_s, "forward_sps": n / best["forward"], "detect_sps": n / best["detect"],
            "traces": pred.num_traces}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scan", default=REAL_SCAN, help="CT scan file or DICOM folder (default: the real "
                   "example_ct.nii.gz, 122 x 101 x 112 voxels at 3 mm -> 167 slices of 2 mm)")
    p.add_argument("--paper", action="store_true", help="also the paper config (512 px; slow on CPU)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-slices", type=int, default=None, help="limit the scan to about this many slices")
    p.add_argument("--paper-max-slices", type=int, default=16,
                   help="slice limit for the paper config (0: the whole scan)")
    p.add_argument("--reps", type=int, default=2, help="repetitions (best is reported)")
    p.add_argument("--paper-reps", type=int, default=1, help="repetitions for the paper config")
    p.add_argument("--paper-batch-size", type=int, default=None, help="paper batch (default --batch-size)")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated compute dtypes (config.model.dtype), e.g. float32,bfloat16")
    p.add_argument("--skip-tiny", action="store_true", help="only the paper config (with --paper)")
    p.add_argument("--json", default=None,
                   help="also write the rows here (rewritten after each row)")
    a = p.parse_args(argv)
    dtypes = parse_dtypes(p, a.dtypes)
    if a.skip_tiny and not a.paper:
        p.error("--skip-tiny leaves nothing to measure without --paper")
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}; {os.cpu_count()} CPUs); "
          f"scan {a.scan}")
    rows = []
    for d in dtypes:
        runs = [] if a.skip_tiny else [("tiny", a.batch_size, a.max_slices, a.reps)]
        if a.paper:
            runs.append(("paper", a.paper_batch_size or a.batch_size, a.paper_max_slices or None,
                         a.paper_reps))
        for variant, batch, max_slices, reps in runs:
            rows.append(bench(variant, a.scan, batch, max_slices, reps, d))
            print(f"measured: {rows[-1]}", flush=True)
            if a.json:          # after each row: a run cut off by a time limit keeps what it measured
                atomic_write_json(a.json, {"jax": jax.__version__, "platform": dev.platform,
                                           "device_kind": dev.device_kind, "cpus": os.cpu_count(),
                                           "scan": a.scan, "rows": rows}, indent=1)
    print()
    print("| config | dtype | input px | slices | batch | compile s | forward alone slices/s | "
          "detect loop slices/s | detect / forward | detect ms/slice | traces |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['dtype']} | {r['image']} | {r['slices']} | {r['batch']} | "
              f"{r['compile_s']:.1f} | {r['forward_sps']:.2f} | {r['detect_sps']:.2f} | "
              f"{r['detect_sps'] / r['forward_sps']:.2f} | {1000 / r['detect_sps']:.1f} | {r['traces']} |")
    if len(dtypes) > 1:
        for r in rows:
            base = next(b for b in rows if b["variant"] == r["variant"] and b["dtype"] == dtypes[0])
            if r is not base:
                print(f"{r['variant']} {r['dtype']} vs {dtypes[0]}: forward x"
                      f"{r['forward_sps'] / base['forward_sps']:.2f}, detect loop x"
                      f"{r['detect_sps'] / base['detect_sps']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
