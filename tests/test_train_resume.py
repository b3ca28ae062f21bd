"""Kill -9 mid-run and rerun: the result equals an uninterrupted run; SIGTERM: a checkpoint at the
stop step and exit code 75 (all through the CLI)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from uld_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 24      # toy task: 96 samples, batch 8 -> 12 steps per epoch, 2 epochs


def _cmd(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "uld_jax.main", "--config", "configs/meld.py:tiny",
            f"--workdir={workdir}", "--config.task.name=toy", "--config.data.name=toy",
            "--config.toy.num_train=96", "--config.toy.num_eval=16", "--config.num_epochs=2",
            "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=2",
            "--config.log_every_steps=3", "--config.debug.sleep_per_step_s=0.1"]


def _env(cache: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    # The resumed run reuses the compilations of the first two (same programs, same flags).
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    # LLVM's optimisation of the unrolled threefry costs seconds per compile on 2 loaded cores;
    # every run here uses the same flags, so they remain comparable.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _steps(workdir: pathlib.Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    ref_dir, killed_dir, term_dir = (tmp_path / n for n in ("uninterrupted", "killed", "term"))
    logs = {n: open(tmp_path / f"{n}.log", "w", encoding="utf-8") for n in ("ref", "killed", "resumed", "term")}
    kw = dict(cwd=REPO, env=_env(tmp_path / "jax_cache"), stderr=subprocess.STDOUT)
    ref = subprocess.Popen(_cmd(ref_dir), stdout=logs["ref"], **kw)
    victim = subprocess.Popen(_cmd(killed_dir), stdout=logs["killed"], **kw)
    term = subprocess.Popen(_cmd(term_dir), stdout=logs["term"], **kw)
    try:
        deadline = time.monotonic() + 120
        while not _steps(killed_dir):             # the first checkpoint (step 4) exists: kill

            assert victim.poll() is None, (tmp_path / "killed.log").read_text(encoding="utf-8")[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
        at_kill = _steps(killed_dir)
        assert max(at_kill) < TOTAL_STEPS, f"the run ended before the kill: {at_kill}"
        resumed = subprocess.Popen(_cmd(killed_dir), stdout=logs["resumed"], **kw)
        while not _steps(term_dir):
            assert term.poll() is None, (tmp_path / "term.log").read_text(encoding="utf-8")[-3000:]
            assert time.monotonic() < deadline + 60, "no checkpoint after 180 s"
            time.sleep(0.05)
        term.send_signal(signal.SIGTERM)           # a scheduler's notice: checkpoint, then stop
        assert term.wait(60) == 75, (tmp_path / "term.log").read_text(encoding="utf-8")[-3000:]
        assert resumed.wait(180) == 0, (tmp_path / "resumed.log").read_text(encoding="utf-8")[-3000:]
        assert ref.wait(180) == 0, (tmp_path / "ref.log").read_text(encoding="utf-8")[-3000:]
    finally:
        for p in (ref, victim, term, locals().get("resumed")):
            if p is not None and p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()
    assert f"resumed from {killed_dir}/checkpoints step {max(at_kill)}" in (
        tmp_path / "resumed.log").read_text(encoding="utf-8")

    term_log = (tmp_path / "term.log").read_text(encoding="utf-8")
    stop_step = max(_steps(term_dir))
    assert 4 < stop_step < TOTAL_STEPS
    assert f"stopped on SIGTERM at step {stop_step}" in term_log, term_log[-2000:]
    assert int(train.load_checkpoint_state(str(term_dir))[1]["step"]) == stop_step

    step_a, a = train.load_checkpoint_state(str(ref_dir))
    step_b, b = train.load_checkpoint_state(str(killed_dir))
    assert step_a == step_b == TOTAL_STEPS
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 10
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))    # bit-identical
