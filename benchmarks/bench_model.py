"""MELD speed and memory on this machine: forward (inference, every dataset expert) and train step
(forward + targets + loss + backward + Adam) per sample, for the tiny and (behind ``--paper``) the
paper config.

For each it prints: compile time, wall time per sample, XLA's FLOP count (``cost_analysis`` of the
compiled step), the achieved FLOP/s, and that as a ratio to this machine's matmul peak measured in
the same run (a large f32 ``jnp.dot``), plus the compiled peak memory (``memory_analysis``:
arguments + outputs + temporaries - aliased).

Caveat: XLA's cost analysis counts a while-loop body once, so the tiled NMS is under-counted; its
share of the FLOPs is small next to the convolutions.

    python benchmarks/bench_model.py                 # tiny only (about a minute on 2 cores)
    python benchmarks/bench_model.py --paper         # + paper config at 512 px (a few minutes)
    python benchmarks/bench_model.py --paper --paper-size 256 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from uld_jax import losses  # noqa: E402
from uld_jax.models.config import model_config  # noqa: E402
from uld_jax.models.fake_batch import synthetic_batch  # noqa: E402
from uld_jax.models.meld import MELD, init_variables  # noqa: E402


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` f32 FLOP/s of an n x n x n matmul (2 n^3 FLOPs)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def _peak_bytes(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)


def _time(fn, args, steps: int) -> float:
    """Median wall seconds of ``steps`` calls (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench(variant: str, batch_size: int, steps: int, image_size: int | None, peak: float) -> list:
    cfg = model_config(variant)
    if image_size:
        cfg.unlock()
        cfg.image_size = image_size
        cfg.lock()
    model = MELD(cfg)
    t = time.perf_counter()
    variables = init_variables(model, seed=0)
    jax.block_until_ready(variables)
    t_init = time.perf_counter() - t
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(
        batch_size, cfg.image_size, max_boxes=4, num_datasets=cfg.num_datasets, seed=0).items()}
    opt = optax.adam(1e-4)
    opt_state = opt.init(variables["params"])

    def train_step(variables, opt_state, batch, key):
        def f(p):
            out, upd = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, batch,
                                   train=True, rngs={"sample": key}, mutable=["batch_stats"])
            total, logs = losses.meld_loss(out, batch, cfg)
            return total, (logs, upd["batch_stats"])

        (_, (logs, stats)), g = jax.value_and_grad(f, has_aux=True)(variables["params"])
        u, opt_state = opt.update(g, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], u), "batch_stats": stats}, \
            opt_state, logs

    def forward(variables, batch):
        return model.apply(variables, batch, train=False)

    rows = []
    key = jax.random.PRNGKey(0)
    for name, fn, args in (("forward", forward, (variables, batch)),
                           ("train_step", train_step, (variables, opt_state, batch, key))):
        t = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        t_compile = time.perf_counter() - t
        sec = _time(compiled, args, steps)
        flops = _flops(compiled)
        rows.append({
            "variant": variant, "image": cfg.image_size, "batch": batch_size, "what": name,
            "init_s": round(t_init, 1), "compile_s": round(t_compile, 1),
            "s_per_sample": sec / batch_size, "gflop_per_sample": flops / batch_size / 1e9,
            "gflops_achieved": flops / sec / 1e9, "ratio_to_peak": flops / sec / peak,
            "peak_mem_mib": _peak_bytes(compiled) / 2 ** 20,
            "params_m": sum(x.size for x in jax.tree_util.tree_leaves(variables["params"])) / 1e6,
        })
        print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['variant']:>6} {r['image']:>4}px b{r['batch']} {r['what']:<10} "
            f"compile {r['compile_s']:6.1f}s  {r['s_per_sample'] * 1e3:9.1f} ms/sample  "
            f"{r['gflop_per_sample']:8.2f} GFLOP/sample  {r['gflops_achieved']:7.1f} GFLOP/s  "
            f"ratio to matmul peak {r['ratio_to_peak']:.3f}  peak mem {r['peak_mem_mib']:8.1f} MiB  "
            f"({r['params_m']:.1f}M params)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--batch", type=int, default=2, help="tiny-config batch size")
    ap.add_argument("--paper", action="store_true", help="also measure the paper config (slow)")
    ap.add_argument("--paper-batch", type=int, default=1)
    ap.add_argument("--paper-size", type=int, default=None, help="override 512 px")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--json", type=str, default=None, help="write the rows here")
    a = ap.parse_args(argv)
    # Shared CPUs: measure the peak before and after and keep the best (the machine's capability).
    peak = matmul_peak()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
          f"matmul peak (f32 2048^3 jnp.dot): {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = [] if a.skip_tiny else bench("tiny", a.batch, a.steps, None, peak)
    if a.paper:
        rows += bench("paper", a.paper_batch, max(1, min(a.steps, 2)), a.paper_size, peak)
    peak2 = matmul_peak()
    if peak2 > peak:
        print(f"matmul peak re-measured after the runs: {peak2 / 1e9:.1f} GFLOP/s; ratios against "
              f"it:", flush=True)
        for r in rows:
            r["ratio_to_peak"] *= peak / peak2
            print(_fmt(r))
        peak = peak2
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"matmul_peak_gflops": peak / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
