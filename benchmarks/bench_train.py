"""Training speed: steps/s and samples/s of the train step, end to end and alone, beside the input
pipeline's rate, on 1 vs N devices (forced host devices on CPU), each in its own subprocess.

    python benchmarks/bench_train.py                       # tiny config, 1 vs 8 host devices
    python benchmarks/bench_train.py --paper               # also the paper config (slow on CPU)
    python benchmarks/bench_train.py --devices 1,8 --steps 30 --task toy

Each measurement runs in a fresh process (XLA_FLAGS=--xla_force_host_platform_device_count=N
must be set before jax starts). Per row: compile time of the step, the step alone on one prefetched
global batch (steps/s, samples/s), the whole loop body (next batch + host->device + step), and the
data iterator alone (batches/s). Ratios printed: N devices vs 1, and pipeline rate / step rate
(>1: the pipeline keeps up). The task is MELD + the grain pipeline (on --data-dir, or a small world of
data_prep.case_factory cases built into a temporary folder) when uld_jax.models exists, else the
toy task (uld_jax/tasks.py); the output says which.
On a GPU/TPU host run it with --devices equal to the real device count (forced host devices then
only matter for CPU).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(args) -> dict:
    sys.path.insert(0, REPO)
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from uld_jax import tasks, train

    path, _, variant = args.config.partition(":")
    mod = importlib.import_module(path.replace("/", ".").removesuffix(".py"))
    config = mod.get_config(variant or "tiny")
    task_name = args.task
    if task_name == "auto":
        try:
            tasks.meld_task(config)
            task_name = "meld"
        except tasks.TaskUnavailableError:
            task_name = "toy"
    if task_name == "meld":
        config.data.data_dir = args.data_dir
        if args.image_size:
            config.data.image_size = (args.image_size, args.image_size)
            config.model.image_size = args.image_size
    if task_name == "toy":
        config.task.name, config.data.name = "toy", "toy"
        config.toy.num_train = max(config.toy.num_train, 2 * args.batch_size * (7 * args.steps + 10))
        config.toy.image_size = args.toy_size
        config.toy.width = args.toy_width
    config.batch_size = args.batch_size or config.batch_size
    task, data = tasks.build_task(config), tasks.build_data(config)

    mesh = train.make_mesh(-1)
    repl, bsh = NamedSharding(mesh, P()), NamedSharding(mesh, P(train.DATA_AXIS))
    tx, sched = train.make_optimizer(config.optimizer, data.steps_per_epoch)
    it = data.train_iter(0, 1)

    # The input pipeline alone.
    for _ in range(args.warmup):
        next(it)
    n_data = 5 * args.steps
    t = time.perf_counter()
    for _ in range(n_data):
        next(it)
    data_rate = n_data / (time.perf_counter() - t)

    batch = train.to_global_batch(next(it), bsh)
    state = train.init_state(task, tx, batch, jax.random.key(0), repl)
    step = train.make_train_step(task, tx, sched, mesh)
    rng = jax.device_put(jax.random.key(1), repl)
    t = time.perf_counter()
    state, _, loss = step(state, batch, rng)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):
        state, _, loss = step(state, batch, rng)
    jax.block_until_ready(loss)

    t = time.perf_counter()
    for _ in range(args.steps):
        state, _, loss = step(state, batch, rng)
    jax.block_until_ready(loss)
    step_rate = args.steps / (time.perf_counter() - t)

    t = time.perf_counter()
    for _ in range(args.steps):
        state, _, loss = step(state, train.to_global_batch(next(it), bsh), rng)
    jax.block_until_ready(loss)
    loop_rate = args.steps / (time.perf_counter() - t)
    assert np.isfinite(float(loss))
    return {"config": args.config, "task": task_name, "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "batch": int(config.batch_size),
            "compile_s": compile_s, "step_steps_per_s": step_rate,
            "step_samples_per_s": step_rate * config.batch_size,
            "loop_steps_per_s": loop_rate, "loop_samples_per_s": loop_rate * config.batch_size,
            "data_batches_per_s": data_rate, "data_samples_per_s": data_rate * config.batch_size}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/meld.py:tiny")
    p.add_argument("--paper", action="store_true", help="also measure the paper variant")
    p.add_argument("--devices", default="1,8", help="comma-separated device counts")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (0: the config's)")
    p.add_argument("--task", default="auto", choices=("auto", "meld", "toy"),
                   help="auto: MELD + the grain pipeline when uld_jax.models exists, else toy")
    p.add_argument("--data-dir", default="", help="built datasets for MELD (python -m "
                   "data_prep.build); default: a small world built into a temporary folder")
    p.add_argument("--image-size", type=int, default=0, help="MELD input side (0: the config's)")
    p.add_argument("--toy-size", type=int, default=64, help="toy task image side, pixels")
    p.add_argument("--toy-width", type=int, default=16)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return

    configs = [args.config] + ([args.config.split(":")[0] + ":paper"] if args.paper else [])
    tmp = None
    if args.task != "toy" and not args.data_dir:
        import tempfile
        sys.path.insert(0, REPO)
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import meld_data  # the small built world of the training tests
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_world_")
        args.data_dir = str(meld_data.build_small_world(pathlib.Path(tmp.name), 8))
    rows = []
    for cfg in configs:
        for n in (int(x) for x in args.devices.split(",")):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            if env.get("JAX_PLATFORMS", "cpu") == "cpu":
                env["JAX_PLATFORMS"] = "cpu"
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--config", cfg,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
                   str(args.batch_size), "--task", args.task, "--toy-size", str(args.toy_size),
                   "--toy-width", str(args.toy_width), "--data-dir", args.data_dir,
                   "--image-size", str(args.image_size)]
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"[{cfg} x{n}] failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[0][7:]))

    print(f"\n{'config':24s} {'task':5s} {'dev':>4s} {'batch':>5s} {'compile s':>9s} "
          f"{'step/s':>8s} {'samples/s':>9s} {'loop/s':>8s} {'data b/s':>9s} {'data/step':>9s}")
    for r in rows:
        print(f"{r['config']:24s} {r['task']:5s} {r['devices']:4d} {r['batch']:5d} "
              f"{r['compile_s']:9.2f} {r['step_steps_per_s']:8.2f} {r['step_samples_per_s']:9.1f} "
              f"{r['loop_steps_per_s']:8.2f} {r['data_batches_per_s']:9.1f} "
              f"{r['data_batches_per_s'] / r['step_steps_per_s']:9.2f}")
    by = {(r["config"], r["devices"]): r for r in rows}
    for cfg in configs:
        ns = sorted(n for c, n in by if c == cfg)
        for n in ns[1:]:
            a, b = by[(cfg, ns[0])], by[(cfg, n)]
            print(f"{cfg}: {n} vs {ns[0]} devices: step samples/s x"
                  f"{b['step_samples_per_s'] / a['step_samples_per_s']:.2f}, loop samples/s x"
                  f"{b['loop_samples_per_s'] / a['loop_samples_per_s']:.2f}")
    if rows and rows[0]["platform"] == "cpu":
        print("note: forced host devices share this machine's CPU cores; on CPU more devices split "
              "the same cores, so the ratio measures sharding overhead, not scale-out.")


if __name__ == "__main__":
    main()
