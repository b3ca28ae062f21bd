"""Mining throughput (slices/s) of ``python -m uld_jax.mine`` end to end: loader + jitted
all-experts inference + box embeddings + chunk store, then MAM + NRM, on a built dataset of
synthetic Cases (``data_prep.case_factory``) with a randomly initialised MELD saved as a real orbax
checkpoint.

    python benchmarks/bench_mine_driver.py [--variant tiny|paper] [--cases 8] [--slices 40]
        [--image 128] [--devices N]

Prints the driver's summary (inference slices/s excludes the first call's compilation, measured
separately as a warm-up run over one chunk) and the time of the MAM + NRM + write stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="tiny", choices=("tiny", "paper"))
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--slices", type=int, default=40, help="slices per case (2 mm)")
    p.add_argument("--image", type=int, default=128, help="model input side (px)")
    p.add_argument("--devices", type=int, default=0, help="forced host devices (CPU)")
    p.add_argument("--chunk", type=int, default=32)
    a = p.parse_args()
    if a.devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np
    import orbax.checkpoint as ocp
    from configs import meld as meld_config
    from data_prep import build as build_lib
    from data_prep import case_factory as cf
    from uld_jax import train
    from uld_jax.mine import driver
    from uld_jax.models import meld

    root = tempfile.mkdtemp(prefix="bench_mine_")
    side = max(48, int(a.image * 0.8))          # slices of 0.8 mm pixels fill 80% of the canvas
    cases = [cf.make_case("deeplesion", k, num_slices=a.slices, height=side, width=side,
                          lesion_slices=(a.slices // 2,), negatives=(), patient=f"{k // 2:06d}",
                          noise_hu=20.0) for k in range(a.cases)]
    build_lib.build("/raw", os.path.join(root, "data"), ["deeplesion"],
                    reader_lookup=lambda n: cf.ListReader(cases), progress=False)
    c = meld_config.get_config(a.variant)
    c.data.data_dir = os.path.join(root, "data")
    c.data.datasets = ("deeplesion",)
    c.data.image_size = (a.image, a.image)
    c.data.pixel_mm = 0.8
    c.model.image_size = a.image
    c.checkpoint.async_save = False
    model = meld.MELD(c.model)
    v = meld.init_variables(model, seed=0)
    tx, _ = train.make_optimizer(c.optimizer, 1)
    cfg = json.loads(c.to_json_best_effort())
    cfg["_derived"] = {"steps_per_epoch": 1}
    mngr = train.make_checkpoint_manager(os.path.join(root, "run"), c.checkpoint, 1)
    state = {"step": np.int32(4), "params": v["params"],
             "other": {k: x for k, x in v.items() if k != "params"}, "opt_state": tx.init(v["params"])}
    mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data_iter=train.IteratorStateSave({}),
                                         config=ocp.args.JsonSave(cfg)))
    mngr.wait_until_finished()
    mngr.close()
    run_dir = os.path.join(root, "run")
    # Warm-up (compiles) on a throw-away store, then the measured run.
    t = time.perf_counter()
    driver.mine(run_dir, driver.DriverOptions(chunk_slices=a.chunk, max_chunks=1, progress=False,
                                              store_dir=os.path.join(root, "warm")))
    warm = time.perf_counter() - t
    s = driver.mine(run_dir, driver.DriverOptions(chunk_slices=a.chunk, progress=False))
    import jax
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; variant {a.variant}, "
          f"{a.image}x{a.image} input, {a.cases} cases x {a.slices} slices")
    print(f"warm-up (compile + 1 chunk): {warm:.1f} s")
    print(f"mined {s['slices']} slices: {s['slices_per_s']:.2f} slices/s inference "
          f"({s['inference_s']:.1f} s); whole call {s['seconds']:.1f} s; counts {s['counts']}")


if __name__ == "__main__":
    main()
