"""Cost of the detection metrics logged during training (``uld_jax/evaluate/periodic.py``).

Builds a small world (``data_prep.case_factory`` cases, ``--key-slices`` key slices per dataset in
the val split), then calls MELD's ``Task.extra_eval`` (what ``tasks.build_task`` attaches) on
randomly initialised variables ``--evals`` times and prints, per call, the wall time and whether
the predict functions were compiled again. The first call includes reading the split and one
compilation per expert; later calls are what each periodic evaluation costs.

    python benchmarks/bench_train_eval.py                       # meld tiny (160 px, 4 experts)
    python benchmarks/bench_train_eval.py --config baseline      # one expert
    python benchmarks/bench_train_eval.py --max-samples 64 --key-slices 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from configs import baseline, meld  # noqa: E402
from data_prep import build as build_lib  # noqa: E402
from data_prep import case_factory as cf  # noqa: E402
from uld_jax import tasks  # noqa: E402
from uld_jax.models.meld import MELD, init_variables  # noqa: E402


def build_world(root: str, datasets, key_slices: int) -> str:
    data = os.path.join(root, "data")
    per_case = 2
    for d, name in enumerate(datasets):
        cases = [cf.make_case(name, k, num_slices=12, height=160, width=140, split="val",
                              lesion_slices=(3, 8), negatives=(10,))
                 for k in range(-(-key_slices // per_case))]
        build_lib.build("/raw", data, [name], reader_lookup=lambda n, c=cases: cf.ListReader(c),
                        chunk_slices=64, progress=False)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("meld", "baseline"), default="meld")
    p.add_argument("--variant", default="tiny")
    p.add_argument("--max-samples", type=int, default=None, help="detection_eval.max_samples (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="detection_eval.batch_size (default: the config's)")
    p.add_argument("--key-slices", type=int, default=32,
                   help="lesion slices per dataset in the built val split (DeepLesion's key slices; "
                        "the other datasets have no key slices, so all their samples count)")
    p.add_argument("--evals", type=int, default=3)
    a = p.parse_args(argv)
    cfg = (meld if a.config == "meld" else baseline).get_config(a.variant)
    if a.max_samples is not None:
        cfg.detection_eval.max_samples = a.max_samples
    if a.batch_size is not None:
        cfg.detection_eval.batch_size = a.batch_size
    with tempfile.TemporaryDirectory() as root:
        cfg.data.data_dir = build_world(root, tuple(cfg.data.datasets), a.key_slices)
        ev = tasks.build_task(cfg).extra_eval
        variables = jax.device_put(init_variables(MELD(cfg.model), 0))
        print(f"{a.config}:{a.variant}, {cfg.data.image_size[0]} px, experts {ev.loaded.expert_names}, "
              f"max_samples {ev.max_samples}, batch {ev.batch_size}, device {jax.devices()[0].platform}")
        for i in range(a.evals):
            t0 = time.perf_counter()
            m = ev(i, variables)
            dt = time.perf_counter() - t0
            n = sum(len(si.table) for si in ev.splits())
            traces = {k: (v.num_traces, v._fn._cache_size()) for k, v in ev._predictors.items()}
            print(f"eval {i}: {dt:.2f} s, {n} slices ({n / dt:.1f} slices/s), "
                  f"(traces, compiled) per expert {traces}, "
                  f"froc_mean {[round(v, 3) for k, v in sorted(m.items()) if k.endswith('froc_mean')]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
