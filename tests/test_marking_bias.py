"""python -m uld_jax.marking_bias: its steps and commands (recorded, not run), the label policy's
gap against a hand-worked case, and its page against hand-computed differences."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from uld_jax import marking_bias as mb
from uld_jax import quickstart as qs
from uld_jax import reproduce as rp
from uld_jax import train

RATES = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def test_steps_and_commands(tmp_path, recorded_steps, monkeypatch):
    monkeypatch.setattr(train, "checkpoint_steps", lambda d: [60, 120])
    r = qs.RECIPES["smoke"]
    mb.run(str(tmp_path), r, [3, 4])
    s3 = {n: c for o, n, c, _ in recorded_steps if o.endswith("seed_3")}
    s4 = {n: c for o, n, c, _ in recorded_steps if o.endswith("seed_4")}
    assert list(s3) == ["world", "check", "build", "baseline_long", "eval_baseline_long",
                        "mine_slices", "mine_oracle_nrm_key", "baseline_long_nrm_key",
                        "eval_baseline_long_nrm_key", "exposure_baseline_long"]
    # the second seed trains on the first seed's world, with the first seed's table
    assert list(s4) == ["baseline_long", "eval_baseline_long", "baseline_long_nrm_key",
                        "eval_baseline_long_nrm_key", "exposure_baseline_long"]
    (world,) = s3["world"]
    assert world[world.index("--preset") + 1] == "tiny" and world.count("--unbiased-marks") == 1
    (plain,), (nrm,) = s3["baseline_long"], s3["baseline_long_nrm_key"]
    assert "configs/baseline.py:tiny" in plain and f"--config.num_epochs={4 * r.epochs}" in plain
    d3 = os.path.join(str(tmp_path), "seed_3")
    table = f"{d3}/runs/slices/mined_oracle_nrm_key.npz"
    assert nrm == [a.replace("runs/baseline_long", "runs/baseline_long_nrm_key") for a in plain] + [
        f"--config.data.overlays=('{table}',)", "--config.data.added_ratio=0.0"]
    assert s4["baseline_long_nrm_key"][0][-2] == f"--config.data.overlays=('{table}',)"
    assert f"--config.seed=4" in s4["baseline_long"][0]
    # the slice table: the first seed's plain run at its first checkpoint, no NRM expert
    (mine,) = s3["mine_slices"]
    assert mine[1:3] == ["-m", "uld_jax.mine"] and mine[mine.index("--step") + 1] == "60"
    assert mine[mine.index("--workdir") + 1] == f"{d3}/runs/baseline_long"
    assert mine[mine.index("--nrm_experts") + 1] == ""
    assert mine[mine.index("--out") + 1] == f"{d3}/runs/slices/mined.npz"
    (oracle,) = s3["mine_oracle_nrm_key"]
    assert oracle[1:3] == ["-m", "uld_jax.mine.oracle"]
    assert oracle[oracle.index("--mined") + 1] == f"{d3}/runs/slices/mined.npz"
    assert oracle[oracle.index("--as") + 1] == "ignore" and "--without_added" in oracle
    assert oracle[-2:] == ["--out", table]
    (exp,) = s4["exposure_baseline_long"]
    assert exp[exp.index("--workdir") + 1] == f"{tmp_path}/seed_4/runs/baseline_long"
    assert exp[exp.index("--overlay") + 1] == table
    # the same runs, commands and exposure as `reproduce --baseline-nrm key` on a default world,
    # but for the world's flag and the table's source
    recorded_steps.clear()
    reproduce_dir = tmp_path / "r"
    rp.run_baseline_nrm(str(reproduce_dir), r, [3, 4], ["key"])
    ref = {n: c for o, n, c, _ in recorded_steps if o.endswith("seed_3")}
    assert list(ref) == ["baseline_long", "eval_baseline_long", "mine_oracle_nrm_scratch",
                         "baseline_long_nrm_key", "eval_baseline_long_nrm_key",
                         "exposure_baseline_long"]
    meld_table = f"{reproduce_dir}/seed_3/runs/meld/mined_oracle_nrm_scratch.npz"
    for name in ("baseline_long", "baseline_long_nrm_key", "exposure_baseline_long"):
        assert [a.replace(meld_table, table).replace(str(reproduce_dir), str(tmp_path))
                for a in ref[name][0]] == s3[name][0], name
    # the recipe: the flag once, whatever it starts from
    u = mb.variant_recipe(qs.RECIPES["quick"], "unbiased")
    assert u.epochs == qs.RECIPES["quick"].epochs and u.world_args.count("--unbiased-marks") == 1
    assert mb.variant_recipe(u, "unbiased").world_args.count("--unbiased-marks") == 1
    with pytest.raises(ValueError, match="only 'ignore_key'"):
        mb.table_step(qs.Quickstart(str(tmp_path / "x"), u, quiet=True), "ignore_added")


def test_dense_variant(tmp_path, recorded_steps, monkeypatch):
    """--variant dense: the same steps and commands on a world with --extra-lesions 40 (only the
    world's command differs), and its own page heading."""
    monkeypatch.setattr(train, "checkpoint_steps", lambda d: [60, 120])
    r = qs.RECIPES["smoke"]
    mb.run(str(tmp_path / "u"), r, [3])
    unbiased = {n: c for o, n, c, _ in recorded_steps}
    recorded_steps.clear()
    mb.run(str(tmp_path / "d"), r, [3], variant="dense")
    dense = {n: c for o, n, c, _ in recorded_steps}
    assert list(dense) == list(unbiased)
    (world,) = dense["world"]
    assert world[-2:] == ["--extra-lesions", "40"] and "--unbiased-marks" not in world
    for name in dense:
        if name != "world":
            assert [[a.replace(str(tmp_path / "u"), str(tmp_path / "d")) for a in c]
                    for c in unbiased[name]] == dense[name], name
    d = mb.variant_recipe(qs.RECIPES["quick"], "dense")
    assert d.name == "quick_dense" and mb.variant_recipe(d, "dense") == d
    assert d.world_args == (*qs.RECIPES["quick"].world_args, "--extra-lesions", "40")
    with pytest.raises(ValueError, match="unknown variant 'sparse'; choose one of unbiased, dense"):
        mb.variant_recipe(d, "sparse")
    other = dataclasses.replace(d, world_args=(*qs.RECIPES["quick"].world_args,
                                               "--extra-lesions", "20"))
    with pytest.raises(ValueError, match="already sets --extra-lesions otherwise than the dense "
                       "variant"):
        mb.variant_recipe(other, "dense")
    page = tmp_path / "p.md"
    assert mb.main(["--variant", "dense", "--out", str(tmp_path / "empty"), "--results-only",
                    "--results", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# A world with more unmarked lesions")
    assert "marking_bias --variant dense --recipe quick" in text
    assert "world `small` with `--dl-patients 36 --luna 8 --lits 4 --nihln 4 --extra-lesions 40`" \
        in text and "## More unmarked lesions (`--extra-lesions 40`)" in text


def test_no_checkpoint_to_mine_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "checkpoint_steps", lambda d: [])
    q0 = qs.Quickstart(str(tmp_path / "seed_0"), mb.variant_recipe(qs.RECIPES["smoke"], "unbiased"),
                       quiet=True)
    with pytest.raises(SystemExit, match="no checkpoint to mine the slice table"):
        mb.table_step(q0)


def _truth(world, rows):
    d = world / "truth"
    d.mkdir(parents=True)
    head = "subvolume,lesion_id,split,lesion_type,long_diameter_mm,marked\n"
    (d / "deeplesion_lesions.csv").write_text(head + "".join(
        f"sv{i},{i},{sp},{t},{mm},{m}\n" for i, (sp, t, mm, m) in enumerate(rows)))


def test_marking_gap_hand_worked(tmp_path):
    # training split: a marked liver tumour of 10 mm; unmarked a liver tumour and a bone lesion of
    # 10 mm (conspicuity 1.0 and 0.6). The diameters cancel: gap = ln 1 - (ln 1 + ln 0.6) / 2.
    _truth(tmp_path / "w", [("train", "liver_tumour", 10, 1), ("train", "liver_tumour", 10, 0),
                            ("train", "bone_lesion", 10, 0), ("val", "lung_nodule", 30, 1)])
    g = mb.marking_gap(str(tmp_path / "w"))
    assert g["lesions"] == 3 and g["marked_fraction"] == pytest.approx(1 / 3)
    assert g["log_weight_gap"] == pytest.approx(-0.5 * math.log(0.6))
    assert g["marked_mm"] == g["unmarked_mm"] == 10
    _truth(tmp_path / "all", [("train", "liver_tumour", 10, 1)])
    with pytest.raises(ValueError, match="needs marked and unmarked lesions"):
        mb.marking_gap(str(tmp_path / "all"))
    _truth(tmp_path / "odd", [("train", "liver_tumour", 10, 1), ("train", "gill_cyst", 10, 0)])
    with pytest.raises(ValueError, match="odd/truth/deeplesion_lesions.csv: unknown lesion_type "
                       "'gill_cyst'"):
        mb.marking_gap(str(tmp_path / "odd"))


def _eval(seed_dir, sub, run, level):
    d = seed_dir / sub / run
    d.mkdir(parents=True, exist_ok=True)
    tables = {rule: {"title": rule, "fp_rates": RATES, "sensitivity": [level] * 7, "mean": level,
                     "extra": {}} for rule in ("released", "paper")}
    (d / "results.json").write_text(json.dumps({"protocol": "volumetric", "tables": tables,
                                                "strata": {}}))


def _suppression(seed_dir, run, found):
    d = seed_dir / "suppression"
    d.mkdir(parents=True, exist_ok=True)
    groups = {g: {"n": 10, "found": [f], "found_mean": f, "median_score": 0.0}
              for g, f in zip(("key_marked", "key_unmarked", "other_marked", "other_unmarked"),
                              found)}
    (d / f"{run}.json").write_text(json.dumps({run: {"rates": [1.0], "groups": groups,
                                                     "checkpoint_step": 40}}))


def test_page(tmp_path):
    out, ref = tmp_path / "u", tmp_path / "d"
    for root, lv in ((out, {0: (0.10, 0.15), 1: (0.20, 0.22)}),
                     (ref, {0: (0.30, 0.25), 1: (0.20, 0.21)})):
        _truth(root / "seed_0" / "world", [("train", "liver_tumour", 10, 1),
                                           ("train", "bone_lesion", 10, 0)])
        for s, (a, b) in lv.items():
            for sub in ("eval", "eval_heldout"):
                _eval(root / f"seed_{s}", sub, "baseline_long", a)
                _eval(root / f"seed_{s}", sub, "baseline_long_nrm_key", b)
            # the checkpoint before the last: the plain run 0.1 lower, the NRM run unchanged
            _eval(root / f"seed_{s}", "eval_heldout_steps", "baseline_long/1860", a - 0.1)
            _eval(root / f"seed_{s}", "eval_heldout_steps", "baseline_long_nrm_key/1860", b)
            _suppression(root / f"seed_{s}", "baseline_long", (0.5, 0.1, 0.4, 0.3))
            _suppression(root / f"seed_{s}", "baseline_long_nrm_key", (0.5, 0.3, 0.4, 0.3))
        # a run of the default world's page that this page leaves out
        _suppression(root / "seed_0", "meld", (0.2, 0.2, 0.2, 0.2))
    text = "\n".join(mb.results_lines(str(out), [0, 1], qs.RECIPES["quick"], str(ref),
                                      checkpoints=2))
    check = "| perfect NRM on key slices > baseline (4x epochs) | released |"
    # unbiased world: +5.0 and +2.0 points, mean 3.5 ± 2.1 (sd of 5 and 2), every seed positive
    assert f"{check} +5.0, +2.0 | +3.5 ± 2.1 | yes |" in text
    # default world: -5.0, +1.0
    assert f"{check} -5.0, +1.0 | -2.0 ± 4.2 | no |" in text
    # over the last 2 checkpoints the plain run averages 0.05 lower: +10.0, +7.0 points
    assert f"{check} +10.0, +7.0 | +8.5 ± 2.1 | yes |" in text
    assert "(steps 1860 and the last)" in text
    assert text.count(check) == 6    # two worlds x (held-out, its last 2 checkpoints, test split)
    assert text.count("- Baseline, 4x the recipe's epochs: key slices, unmarked | +20.0, "
                      "+20.0 | +20.0 ± 0.0 |") == 2
    assert "MELD" not in text
    # liver 10 mm marked, bone 10 mm unmarked: gap ln 1 - ln 0.6
    assert f"minus the unmarked lesions': {-math.log(0.6):+.2f}" in text
    assert "## Unbiased marks" in text and "## Default marks" in text
    assert "\n## The training world's own test split" not in text   # a subsection here


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mb.main(["--seeds", "0,0", "--results-only"])
    assert "--seeds: '0,0': give one or more distinct seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mb.main(["--compare", str(tmp_path / "nowhere"), "--results-only"])
    assert "not a folder" in capsys.readouterr().err
    page = tmp_path / "p.md"
    assert mb.main(["--out", str(tmp_path / "empty"), "--results-only", "--results",
                    str(page), "--note", "a note"]) == 0
    assert "- a note" in page.read_text() and page.read_text().startswith("# A world without")
    assert rp.LONG_RUNS[0] == mb.PLAIN


def test_reproduce_runs_a_variant(tmp_path, monkeypatch):
    """reproduce --variant dense: Table 1's chain on the dense world's recipe, and its own page."""
    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rp, "run_seeds", lambda out, r, seeds: seen.update(run=(out, r, seeds)))
    monkeypatch.setattr(rp, "run_control", lambda out, r, seeds: seen.update(control=r))
    monkeypatch.setattr(rp, "write_results", lambda out, r, seeds, path, argv, **k:
                        seen.update(page=(r, path)) or "")
    assert rp.main(["--out", str(tmp_path), "--variant", "dense", "--seeds", "0,1",
                    "--control"]) == 0
    dense = seen["run"][1]          # read against the quick recipe itself, not variant_recipe
    assert dense.name == "quick_dense" and seen["control"] == dense
    assert dense.world_args == (*qs.RECIPES["quick"].world_args, "--extra-lesions", "40")
    assert dense == dataclasses.replace(qs.RECIPES["quick"], name="quick_dense",
                                        world_args=dense.world_args)
    assert seen["run"][0::2] == (str(tmp_path), [0, 1])
    assert seen["page"] == (dense, str(tmp_path / "docs" / "results_quick_dense.md"))
    seen.clear()
    monkeypatch.chdir(tmp_path)                        # main moved to the repository
    assert rp.main(["--out", str(tmp_path), "--recipe", "equal", "--seeds", "0"]) == 0
    assert seen["run"][1] == qs.RECIPES["equal"]
    assert seen["page"] == (qs.RECIPES["equal"], str(tmp_path / "docs" / "results_equal.md"))
