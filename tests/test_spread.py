"""python -m uld_jax.spread: its steps (recorded, not run) and its analysis and page on saved
detections whose sensitivities are worked out by hand."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from uld_jax import quickstart as qs
from uld_jax import spread

BOX = [0, 0, 1, 9, 9, 5]          # x1, y1, z1, x2, y2, z2 (release slice numbers 1..5)


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("{}")


def test_steps_and_commands(tmp_path, recorded_steps):
    out = str(tmp_path)
    r = qs.RECIPES["smoke"]
    _touch(f"{out}/heldout/state/build.json")        # reproduce's held-out world is built
    for s in (3, 4):
        for run in ("meld", "baseline"):
            _touch(f"{out}/seed_{s}/state/{run}.json")
    spread.run(out, r, [3, 4], 50, ["meld", "baseline", "ft_mam"])
    names = [(os.path.basename(o), n) for o, n, _, _ in recorded_steps]
    world_steps = [("heldout", n) for n in ("world", "check", "build")] + [
        ("heldout_50", n) for n in ("world", "check", "build")]
    assert [x for x in names if x[0].startswith("heldout")] == world_steps
    # every finished run (ft_mam is not) of every seed on both worlds
    assert [x for x in names if x[0].startswith("seed")] == [
        (f"seed_{s}", f"spread_{w}_{run}") for w in ("heldout", "heldout_50") for s in (3, 4)
        for run in ("meld", "baseline")]
    cmds = {(os.path.basename(o), n): c for o, n, c, _ in recorded_steps}
    (world,) = cmds["heldout_50", "world"]
    # the larger world: the next seed of the generator, every patient in test, DeepLesion only
    assert world[world.index("--seed") + 1] == "1004" and world[world.index("--dl-patients") + 1] == "50"
    assert world[world.index("--dl-split") + 1] == "0,1"
    (ev,) = cmds["seed_4", "spread_heldout_50_meld"]
    pred = f"{out}/seed_4/spread/heldout_50/meld/pred_2d.npz"
    assert ev[1:3] == ["-m", "uld_jax.evaluate"] and ev[-3:] == ["--save-pred", pred, "--no-plot"]
    assert ev[ev.index("--workdir") + 1] == f"{out}/seed_4/runs/meld"
    assert ev[ev.index("--data") + 1] == f"{out}/heldout_50/data"
    assert ev[ev.index("--out") + 1] == os.path.dirname(pred)
    assert ev[ev.index("--truth") + 1] == f"{out}/heldout_50/world/truth/deeplesion_volumetric_truth.pkl"
    # without reproduce's held-out world, only the larger one
    recorded_steps.clear()
    os.remove(f"{out}/heldout/state/build.json")
    spread.run(out, r, [3, 4], 50, ["meld"])
    assert {os.path.basename(o) for o, *_ in recorded_steps} == {"heldout_50", "seed_3", "seed_4"}


def _write(tmp_path, found):
    """A 4-patient world, one lesion each; ``found[seed][run]``: the patients whose lesion the run
    detects (score 0.9, no false positive)."""
    names = [f"{p:06d}_01_01_001-010" for p in range(1, 5)]
    w = tmp_path / "heldout_4" / "world" / "truth"
    w.mkdir(parents=True)
    with open(w / "deeplesion_volumetric_truth.pkl", "wb") as f:
        pickle.dump({"test": {n: np.array([BOX], float) for n in names}}, f)
    for s, runs in found.items():
        for run, pats in runs.items():
            det = {}
            for p, n in enumerate(names, start=1):
                det[n] = (np.array([[z, 0, 0, 9, 9, 0.9] for z in range(1, 6)], float) if p in pats
                          else np.zeros((0, 6)))
            d = tmp_path / f"seed_{s}" / "spread" / "heldout_4" / run
            d.mkdir(parents=True)
            np.savez(d / "pred_2d.npz", **det)


def test_analysis_and_page(tmp_path):
    # MELD finds 3 of 4 (seed 0) and 4 of 4 (seed 1); the baseline 2 of 4 on both
    _write(tmp_path, {0: {"meld": (1, 2, 3), "baseline": (1, 2)}, 1: {"meld": (1, 2, 3, 4), "baseline": (1, 2)}})
    res = spread.analyse(str(tmp_path), qs.RECIPES["smoke"], [0, 1], 4, ["meld", "baseline"], samples=4000)
    wr = res["worlds"]["heldout_4"]
    assert list(res["worlds"]) == ["heldout_4"] and not (tmp_path / "heldout").exists()
    assert (wr["patients"], wr["volumes"], wr["truths"]) == (4, 4, 4)
    for rule in ("released", "paper"):
        # no false positive: every FP rate reads the last sensitivity
        assert wr["runs"]["meld"][rule]["observed"] == pytest.approx({0: 0.75, 1: 1.0})
        c = wr["checks"]["MELD > baseline"][rule]
        assert c["observed"] == pytest.approx({0: 0.25, 1: 0.5})
        # seed 1: MELD finds every lesion, the baseline those of patients 1 and 2, so a resample's
        # difference is the share of drawn patients that are 3 or 4: sd sqrt(0.25 / 4) = 0.25
        assert c["boot_sd"][1] == pytest.approx(0.25, abs=0.03)
        assert 0 < c["boot_sd_mean"] <= max(c["boot_sd"].values())
        # the seeds' moves differ by patient 4's draws alone (MELD of seed 1 finds it, nothing
        # else does): var_s = (n4 / 4 - 1/4)^2 / 2 with n4 ~ Binomial(4, 1/4) -> 0.75 / 16 / 2
        assert c["noise_var"] == pytest.approx(0.75 / 32, rel=0.1)
    text = "\n".join(spread.page_lines(res, ["--out", "X"]))
    row = next(x for x in text.splitlines() if x.startswith("| MELD > baseline | heldout_4 | released |"))
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells[3] == "+25.0, +50.0" and cells[4] == "+37.5 ± 17.7" and cells[8] == "yes"
    nv = wr["checks"]["MELD > baseline"]["released"]["noise_var"]
    # observed variance across the two seeds: (0.5 - 0.25)^2 / 2
    assert cells[6] == f"{100 * np.sqrt(nv):.1f} ({nv / (0.25 ** 2 / 2):.2f})"
    assert "| heldout_4 | 1001 | 4 | 4 | 4 |" in text          # seed: 1000 + first seed + 1
    assert "| meld | heldout_4 | released | 87.5 ± 17.7 |" in text
    # the summary: both rules' rows, sd 17.7 each, the pooled share of the variance
    pooled = np.mean([wr["checks"]["MELD > baseline"][r]["noise_var"] for r in ("released", "paper")]) / (0.25 ** 2 / 2)
    assert f"| heldout_4 | 2 | 17.7 .. 17.7 | {pooled:.2f} |  |" in text


def test_cli(tmp_path, capsys):
    _write(tmp_path, {0: {"meld": (1,), "baseline": (1, 2)}})
    page = tmp_path / "page.md"
    rc = spread.main(["--out", str(tmp_path), "--recipe", "smoke", "--seeds", "0", "--patients", "4",
                      "--runs", "meld,baseline", "--results-only", "--samples", "50",
                      "--results", str(page)])
    assert rc == 0
    text = page.read_text(encoding="utf-8")
    assert "| MELD > baseline | heldout_4 | released | -25.0 | -25.0 |" in text
    assert "| n/a |" in text                    # one seed: no spread across seeds to split
    # a world variant's runs read the same way (the variant names the recipe the runs were made by)
    assert spread.main(["--out", str(tmp_path), "--recipe", "smoke", "--variant", "dense", "--seeds",
                        "0", "--patients", "4", "--runs", "meld,baseline", "--results-only",
                        "--samples", "50", "--results", str(tmp_path / "dense.md")]) == 0
    assert "| MELD > baseline | heldout_4 | released | -25.0 | -25.0 |" in (
        tmp_path / "dense.md").read_text(encoding="utf-8")
    res = json.load(open(tmp_path / "spread.json", encoding="utf-8"))
    assert res["samples"] == 50 and "heldout_4" in res["worlds"]
    # Fig. 5's runs are known by their pattern (this one has no detections: no row)
    assert spread.main(["--out", str(tmp_path), "--recipe", "smoke", "--seeds", "0", "--patients",
                        "4", "--runs", "meld,ft_both_added2", "--results-only", "--samples", "50",
                        "--results", str(tmp_path / "page2.md")]) == 0
    for argv, msg in ((["--runs", "meld,nope"], "unknown run"), (["--runs", "ft_both_added"], "unknown run"),
                      (["--runs", "meld", "--samples", "1"], "--samples"),
                      (["--runs", "meld", "--seeds", "x"], "seeds"),
                      (["--runs", "meld", "--variant", "sparse"],
                       "--variant: marking_bias: unknown variant 'sparse'")):
        with pytest.raises(SystemExit):
            spread.main(["--out", str(tmp_path), *argv])
        assert msg in capsys.readouterr().err


def test_checks_of_the_added_slices_sweep():
    # the Fig. 5 runs named in --runs bring their checks: against MELD, against the default
    # ratio's control, and MAM + NRM against the control at the same ratio
    runs = ["meld", "ft_none", "ft_both", "ft_none_added2", "ft_both_added2", "ft_none_added0p25"]
    checks = spread.checks_of(runs)
    assert ("control > MELD", "ft_none", "meld") in checks
    assert ("MAM+NRM > control (added_ratio 2)", "ft_both_added2", "ft_none_added2") in checks
    assert ("control (added_ratio 2) > control (added_ratio 0.5)", "ft_none_added2",
            "ft_none") in checks
    assert ("control (added_ratio 0.25) > MELD", "ft_none_added0p25", "meld") in checks
    # a pair with a run not given is left out; the default's pair is named once
    assert not any(b == "ft_none_added0p25" for _, _, b in checks)
    assert len({n for n, _, _ in checks}) == len(checks)
    assert not any("added_ratio 0.5) > MELD" in n for n, _, _ in checks)


def test_calibrated_nrm_runs_are_held_out_runs_with_their_checks():
    # reproduce --calibrated-nrm's two runs can be named in --runs; they bring their own checks
    # (against MELD, MELD + MAM and each other), and keep their rows' names without renaming the
    # paper-rule NRM run
    from uld_jax import reproduce as rp
    runs = ["meld", "ft_mam", "ft_nrm", "ft_nrm_cal", "ft_both_cal"]
    checks = spread.checks_of(runs)
    assert ("NRM (precision) > MELD", "ft_nrm_cal", "meld") in checks
    assert ("MAM+NRM (precision) > MAM", "ft_both_cal", "ft_mam") in checks
    assert ("MAM+NRM (precision) > NRM (precision)", "ft_both_cal", "ft_nrm_cal") in checks
    rows = dict(rp.HELDOUT_ROWS)
    assert rows["ft_nrm_cal"] == "MELD + NRM (sigma: precision 0.5)"
    assert rows["ft_nrm"] == qs.ROW_NAMES["ft_nrm"]
    assert all("precision" not in n for n, _, _ in spread.checks_of(["meld", "ft_mam"]))
