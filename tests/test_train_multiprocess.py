"""Multi-host path on one machine: 2 processes x 4 CPU devices joined by jax.distributed equal
1 process x 8 devices (per-process data shards, per-process iterator checkpoints)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from uld_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/meld.py:tiny", "--config.task.name=toy", "--config.data.name=toy",
        "--config.toy.num_train=64", "--config.toy.num_eval=16", "--config.num_epochs=2",
        "--config.checkpoint.every_steps=4"]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0")
    return env


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    port = portpicker.pick_unused_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "uld_jax.main", *ARGS, f"--workdir={multi}"], cwd=REPO,
        env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i)),
        stdout=open(tmp_path / f"p{i}.log", "w", encoding="utf-8"), stderr=subprocess.STDOUT) for i in range(2)]
    one = subprocess.run([sys.executable, "-m", "uld_jax.main", *ARGS, f"--workdir={single}"],
                         cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=300)
    try:
        for i, p in enumerate(procs):
            assert p.wait(300) == 0, (tmp_path / f"p{i}.log").read_text(encoding="utf-8")[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert one.returncode == 0, one.stderr[-3000:]

    it_files = sorted(os.listdir(multi / "checkpoints" / "16" / "data_iter"))
    assert [f for f in it_files if f.endswith(".json")] == ["process_0-of-2.json",
                                                             "process_1-of-2.json"]
    assert train.load_checkpoint_config(str(multi))["_derived"]["process_count"] == 2
    _, a = train.load_checkpoint_state(str(multi))
    _, b = train.load_checkpoint_state(str(single))
    assert int(a["step"]) == int(b["step"]) == 16
    # Same global batches and rngs; only the cross-process all-reduce sums in another order.
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3)
