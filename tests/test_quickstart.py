"""The quick start's chain end to end on the `tiny` world, a few steps per stage (minutes: slow)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, *extra):
    # as a user runs it: on the machine's own devices, not the 8 host devices that conftest forces
    # for the multi-device tests (the smoke recipe's batch of 2 does not divide 8), and with the
    # quick start's own compilation cache (OUT/jax_cache), not the test session's
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    return subprocess.run([sys.executable, "-m", "uld_jax.quickstart", "--recipe", "smoke",
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env=env)


@pytest.mark.slow
def test_quickstart_smoke_chain_and_resume(tmp_path):
    out = tmp_path / "qs"
    p = _run(out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # every step finished and recorded its wall time
    steps = ["world", "check", "build", "baseline", "meld", "mine", "report", "ft_mam", "ft_nrm",
             "ft_both", "eval_baseline", "eval_meld", "eval_ft_mam", "eval_ft_nrm", "eval_ft_both",
             "table", "overlays"]
    for s in steps:
        info = json.loads((out / "state" / f"{s}.json").read_text(encoding="utf-8"))
        assert info["wall_s"] >= 0
    # the table has both hit rules and the five rows, read from the evaluation reports
    t = json.loads((out / "table1.json").read_text(encoding="utf-8"))
    assert set(t["rules"]) == {"released", "paper"}
    for rule, rows in t["rules"].items():
        assert list(rows) == ["baseline", "meld", "ft_mam", "ft_nrm", "ft_both"]
        for run, row in rows.items():
            ev = json.loads((out / "eval" / run / "results.json").read_text(encoding="utf-8"))
            assert row["mean"] == ev["tables"][rule]["mean"] or (row["mean"] != row["mean"])
    md = (out / "table1.md").read_text(encoding="utf-8")
    assert "MELD + MAM + NRM" in md and "| method |" in md
    assert "Table 1" in p.stdout
    for run in t["rules"]["released"]:
        assert (out / "eval" / run / "froc_volumetric.png").stat().st_size > 0
    pngs = sorted((out / "overlays").glob("*.png"))
    assert pngs and pngs[0].read_bytes()[:4] == b"\x89PNG"
    # the MAM-only / NRM-only overlays are subsets of the mined table
    import numpy as np

    from uld_jax.overlay import read_overlay
    full, _ = read_overlay(str(out / "runs" / "meld" / "mined.npz"))
    mam, _ = read_overlay(str(out / "runs" / "meld" / "mined_mam.npz"))
    nrm, _ = read_overlay(str(out / "runs" / "meld" / "mined_nrm.npz"))
    assert not np.isin(mam["kind"], [2]).any() and not np.isin(nrm["kind"], [1]).any()
    assert len(mam["kind"]) + len(nrm["kind"]) - int((full["kind"] == 3).sum()) == len(full["kind"])

    # the steps shared one compilation cache: the finetunes' train step was compiled once, so the
    # cache holds one train step per architecture and recipe (baseline, MELD, the finetunes)
    steps_cached = sorted((out / "jax_cache").glob("jit_train_step-*"))
    assert 1 <= len(steps_cached) <= 3, steps_cached
    assert "persistent compilation cache: " + str(out / "jax_cache") in (
        out / "logs" / "ft_mam.log").read_text(encoding="utf-8")
    # a finetune whose table held an earlier one's rows is that run: a link, the same evaluation
    for run in ("ft_nrm", "ft_both"):
        twin = json.loads((out / "state" / f"{run}.json").read_text(encoding="utf-8")).get("same_as")
        if twin:
            assert os.readlink(out / "runs" / run) == twin
            ev, ev_twin = (json.loads((out / "eval" / r / "results.json").read_text(encoding="utf-8"))
                           for r in (run, twin))
            assert ev["tables"] == ev_twin["tables"]
            assert f"`runs/{run}` is that run" in md

    # resume: a second run skips every finished step; a removed step is redone alone
    (out / "state" / "table.json").unlink()
    p2 = _run(out)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert p2.stdout.count("done before, skipped") == len(steps) - 1
    assert "table: running" in p2.stdout
