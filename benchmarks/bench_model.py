"""MELD speed and memory on this machine: forward (inference, every dataset expert) and train step
(forward + targets + loss + backward + Adam) per sample, for the tiny and (behind ``--paper``) the
paper config.

For each it prints: compile time, wall time per sample, XLA's FLOP count (``cost_analysis`` of the
lowered step, the same on every backend), the achieved FLOP/s, and that as a ratio to this
machine's matmul peak measured in the same run (a large ``jnp.dot`` in the step's compute dtype),
plus the compiled peak memory (``memory_analysis``: arguments + outputs + temporaries - aliased).
With several ``--dtypes`` it also prints each one's speed-up over the first, and with several
``--layer-impls`` (``model.layer_impl``: how convolutions and max pooling are written,
uld_jax/models/layers.py) each one's speed-up over the first, in the same run.

Caveat: XLA's cost analysis counts a while-loop body once, so the tiled NMS is under-counted; its
share of the FLOPs is small next to the convolutions.

    python benchmarks/bench_model.py                 # tiny only (about a minute on 2 cores)
    python benchmarks/bench_model.py --paper         # + paper config at 512 px (a few minutes)
    python benchmarks/bench_model.py --paper --paper-size 256 --steps 2
    python benchmarks/bench_model.py --paper --skip-tiny --paper-batch 4 --paper-steps 10 \
        --dtypes float32,bfloat16 --json bench.json       # on a GPU / TPU
    python benchmarks/bench_model.py --layer-impls xla,cpu   # XLA's ops vs the CPU formulations
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from uld_jax import losses  # noqa: E402
from uld_jax.io.atomic import atomic_write_json  # noqa: E402
from uld_jax.models.config import model_config  # noqa: E402
from uld_jax.models.fake_batch import synthetic_batch  # noqa: E402
from uld_jax.models.layers import IMPLS, resolve_impl  # noqa: E402
from uld_jax.models.meld import MELD, init_variables  # noqa: E402


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def parse_dtypes(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """``--dtypes`` (comma-separated compute dtypes) as a list; an unknown one is a usage error."""
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    for d in dtypes:
        if d not in COMPUTE_DTYPES:
            parser.error(f"--dtypes: unknown dtype {d!r} ({', '.join(COMPUTE_DTYPES)})")
    return dtypes


def matmul_peak(n: int | None = None, reps: int = 10, dtype: str = "float32") -> float:
    """Best-of-``reps`` FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in ``dtype``; n defaults to
    2048 on CPU and 8192 on accelerators (a smaller product leaves a GPU's units idle)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def _count(analysis) -> float:
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def _flops(fn, args, lowered, compiled) -> tuple[float, str]:
    """XLA's FLOP count of the step and where it came from.

    The lowered (not yet compiled) HLO gives the same count on every backend. A GPU-compiled
    program's own count leaves out the convolutions and matmuls handed to cuDNN / cuBLAS (it read
    12.9 instead of 874 GFLOP/sample for the paper forward on an H200), so where a backend has no
    count for the lowered HLO, the step is lowered for the CPU and counted there; the compiled
    program's count is the last resort, except on a GPU, where it is known to be short: there the
    count is NaN (``flops_source`` says so; the count of the same step on CPU holds, since it does
    not depend on the backend)."""
    n = _count(lowered.cost_analysis())
    if n == n:
        return n, "lowered"
    try:
        n = _count(jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).cost_analysis())
        if n == n:
            return n, "lowered_for_cpu"
        print("(the CPU lowering gave no FLOP count)", flush=True)
    except Exception as e:  # noqa: BLE001 - an API this JAX lacks: fall back, say so
        print(f"(no CPU lowering for the FLOP count: {type(e).__name__}: {e})", flush=True)
    if jax.default_backend() == "gpu":
        # Seen on an H200 (JAX 0.11.2): neither lowered count exists, and the compiled one read
        # 12.6 GFLOP/sample for a forward of 874.
        return float("nan"), "none: the GPU-compiled count leaves out cuDNN/cuBLAS"
    return _count(compiled.cost_analysis()), "compiled"


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


def bench(variant: str, batch_size: int, steps: int, image_size: int | None, peak: float,
          dtype: str = "float32", layer_impl: str = "auto") -> list:
    cfg = model_config(variant)
    cfg.unlock()
    if image_size:
        cfg.image_size = image_size
    cfg.dtype = dtype
    cfg.layer_impl = layer_impl
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
        lowered = jax.jit(fn).lower(*args)
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t
        sec = _time(compiled, args, steps)
        flops, flops_source = _flops(fn, args, lowered, compiled)
        rows.append({
            "variant": variant, "image": cfg.image_size, "batch": batch_size, "what": name,
            "dtype": dtype, "layer_impl": resolve_impl(layer_impl), "flops_source": flops_source,
            "init_s": round(t_init, 1), "compile_s": round(t_compile, 1),
            "s_per_sample": sec / batch_size, "gflop_per_sample": flops / batch_size / 1e9,
            "gflops_achieved": flops / sec / 1e9, "ratio_to_peak": flops / sec / peak,
            "peak_mem_mib": _peak_bytes(compiled) / 2 ** 20,
            "params_m": sum(x.size for x in jax.tree_util.tree_leaves(variables["params"])) / 1e6,
        })
        print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['variant']:>6} {r['image']:>4}px b{r['batch']} {r['dtype']:<8} "
            f"{r['layer_impl']:<3} {r['what']:<10} "
            f"compile {r['compile_s']:6.1f}s  {r['s_per_sample'] * 1e3:9.1f} ms/sample  "
            f"{r['gflop_per_sample']:8.2f} GFLOP/sample  {r['gflops_achieved']:7.1f} GFLOP/s  "
            f"ratio to matmul peak {r['ratio_to_peak']:.3f}  peak mem {r['peak_mem_mib']:8.1f} MiB  "
            f"({r['params_m']:.1f}M params)")


def _speedups(rows: list, field: str, first: str) -> None:
    """For each row whose ``field`` (dtype or layer_impl) is not ``first``: its speed-up over the
    row with ``first`` and every other setting equal, stored as ``speedup_vs_<first>`` and printed
    with both rows' time, peak memory and compile time."""
    settings = [k for k in ("variant", "image", "batch", "what", "dtype", "layer_impl")
                if k != field]
    base = {tuple(r[k] for k in settings): r for r in rows if r[field] == first}
    for r in rows:
        b = base.get(tuple(r[k] for k in settings))
        if b is None or r is b:
            continue
        r[f"speedup_vs_{first}"] = b["s_per_sample"] / r["s_per_sample"]
        print(f"{r['variant']:>6} {r['what']:<10} {r['dtype']} {r['layer_impl']}: {field} "
              f"{r[field]} vs {first}: "
              f"{b['s_per_sample'] * 1e3:.2f} -> {r['s_per_sample'] * 1e3:.2f} ms/sample, "
              f"x{r[f'speedup_vs_{first}']:.2f}; peak mem {b['peak_mem_mib']:.0f} -> "
              f"{r['peak_mem_mib']:.0f} MiB; compile {b['compile_s']:.1f} -> {r['compile_s']:.1f} s",
              flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--batch", type=int, default=2, help="tiny-config batch size")
    ap.add_argument("--paper", action="store_true", help="also measure the paper config (slow)")
    ap.add_argument("--paper-batch", type=int, default=1)
    ap.add_argument("--paper-size", type=int, default=None, help="override 512 px")
    ap.add_argument("--paper-steps", type=int, default=2,
                    help="timed calls of the paper config (more on an accelerator)")
    ap.add_argument("--dtypes", type=str, default="float32",
                    help="comma-separated compute dtypes, e.g. float32,bfloat16; each is measured "
                         "against the matmul peak of its own dtype")
    ap.add_argument("--layer-impls", type=str, default="auto",
                    help="comma-separated model.layer_impl values (auto, xla, cpu); each is "
                         "measured, and timed against the first")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--json", type=str, default=None,
                    help="write the rows here (rewritten after each row, so a cut-off run keeps "
                         "what it measured)")
    a = ap.parse_args(argv)
    dtypes = parse_dtypes(ap, a.dtypes)
    impls = [v.strip() for v in a.layer_impls.split(",") if v.strip()]
    for v in impls:
        if v not in IMPLS:
            ap.error(f"--layer-impls: unknown value {v!r} ({', '.join(IMPLS)})")
    # Shared CPUs: measure the peak before and after and keep the best (the machine's capability).
    peaks = {d: matmul_peak(dtype=d) for d in dtypes}
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  matmul peak (jnp.dot): "
          + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()), flush=True)
    rows: list = []

    def dump():
        if a.json:
            atomic_write_json(a.json, {"device": jax.devices()[0].device_kind,
                                       "matmul_peak_gflops": {d: p / 1e9 for d, p in peaks.items()},
                                       "rows": rows}, indent=1)

    for d in dtypes:
        for impl in impls:
            if not a.skip_tiny:
                rows += bench("tiny", a.batch, a.steps, None, peaks[d], d, impl)
                dump()
            if a.paper:
                rows += bench("paper", a.paper_batch, max(1, a.paper_steps), a.paper_size,
                              peaks[d], d, impl)
                dump()
    for d in dtypes:
        p2 = matmul_peak(dtype=d)
        if p2 > peaks[d]:
            print(f"{d} matmul peak re-measured after the runs: {p2 / 1e9:.1f} GFLOP/s; ratios "
                  f"against it:", flush=True)
            for r in rows:
                if r["dtype"] == d:
                    r["ratio_to_peak"] *= peaks[d] / p2
                    print(_fmt(r))
            peaks[d] = p2
    _speedups(rows, "dtype", dtypes[0])
    _speedups(rows, "layer_impl", resolve_impl(impls[0]))
    dump()


if __name__ == "__main__":
    main()
