"""Shared pytest fixtures.

The real reference files live in ``../shared/data/real`` next to the checkout; tests that need them
use the ``real_data`` fixture and skip with a clear message where the folder is absent.
Multi-device tests run on 8 forced host (CPU) devices; the flag must be set before jax is imported.
The session's processes (the xdist workers and the CLIs that tests start) share one persistent
compilation cache in a temporary folder, removed at the end, so that a program compiled by one test
is loaded by the next (unless ``JAX_COMPILATION_CACHE_DIR`` is set already: then that one).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the xdist workers inherit the controller's
    _OWN_CACHE = tempfile.mkdtemp(prefix="uld_jax_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_DATA = pathlib.Path(os.environ.get("ULD_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "real"))


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
    monkeypatch.setattr(qs.Quickstart, "step", lambda self, name, cmds=(), fn=None, info=None:
                        calls.append((str(self.out), name, [list(c) for c in cmds], fn)))
    monkeypatch.setattr(qs.Quickstart, "write_labels", lambda self: None)
    return calls
