"""Shared pytest fixtures.

The real reference files live in ``../shared/data/real`` next to the checkout; tests that need them
use the ``real_data`` fixture and skip with a clear message where the folder is absent.
Multi-device tests run on 8 forced host (CPU) devices; the flag must be set before jax is imported.

The test run is dominated by XLA compiling tiny models, not by running them, so by default (each
setting only where the environment does not set it already):
* XLA's CPU backend compiles without LLVM optimisation (``--xla_backend_optimization_level=0``):
  about a quarter less compile time, the same results;
* one persistent compilation cache serves the whole session, subprocesses included (a temporary
  folder removed at exit): a program compiled by one test or CLI run is not compiled again by
  another.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="uld_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_DATA = pathlib.Path(os.environ.get("ULD_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> pathlib.Path:
    """Path of ../shared/data/real; skips the test when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real reference data not found at {REAL_DATA} (set ULD_REAL_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> pathlib.Path:
    """The synthetic `tiny` world (seed 0), generated once per test session."""
    from data_prep import synthesize

    out = tmp_path_factory.mktemp("world") / "tiny"
    synthesize.synthesize(preset="tiny", seed=0, out=out)
    return out


@pytest.fixture
def recorded_steps(monkeypatch):
    """The quick start's steps, recorded instead of run: [(seed dir, name, commands, fn)]."""
    from uld_jax import quickstart as qs

    calls = []
    monkeypatch.setattr(qs.Quickstart, "step", lambda self, name, cmds=(), fn=None:
                        calls.append((str(self.out), name, [list(c) for c in cmds], fn)))
    monkeypatch.setattr(qs.Quickstart, "write_labels", lambda self: None)
    return calls
