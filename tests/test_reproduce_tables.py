"""docs/results.md's Tables 2 and 4 and Fig. 5's added-slices sweep (``python -m uld_jax.reproduce
--table2 --table4 --unlabeled``): the page from fabricated run outputs, the organ labels from the
world's truth, the mined-table split, the commands and the argument checks (fast)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from uld_jax import quickstart as qs
from uld_jax import reproduce
from uld_jax.evaluate.boxes import EvaluationInputError

RATES = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def _eval(seed_dir, run, level, strata=True, sub="eval"):
    d = seed_dir / sub / run
    d.mkdir(parents=True, exist_ok=True)
    tables = {rule: {"title": rule, "fp_rates": RATES, "sensitivity": [level] * 7, "mean": level,
                     "extra": {}} for rule in ("released", "paper")}
    st = {}
    if strata:
        for k, (s, n) in {"lung": (level + 0.1, 4), "liver": (float("nan"), 0),
                          "lymph_node": (level - 0.1, 3), "overall": (level, 12)}.items():
            st[k] = {"released": s, "paper": s, "num_truths": n}
    (d / "results.json").write_text(json.dumps({"protocol": "volumetric", "tables": tables,
                                                "strata": st, "info": {"counts": {"truths": 12}}}))


def _eval_runs(root, runs, levels):
    """``_eval`` of each of ``runs`` on each seed: ``levels`` {seed: one level per run}."""
    for s, lv in levels.items():
        for run, level in zip(runs, lv):
            _eval(root / f"seed_{s}", run, level)


def test_page_has_tables_2_and_4_and_the_added_slices_sweep(tmp_path):
    s0, s1 = tmp_path / "seed_0", tmp_path / "seed_1"
    for sd, shift in ((s0, 0.0), (s1, 0.1)):
        for run, lv in zip(qs.RUNS, (0.1, 0.2, 0.3, 0.25, 0.4)):
            _eval(sd, run, lv + shift)
    _eval(s0, "ft_nrm_luna16", 0.5)
    _eval(s0, "concat", 0.15)
    _eval(s0, "ft_both_added2", 0.45)
    mix = s0 / "runs" / "ft_both_added2"
    mix.mkdir(parents=True)
    (mix / "epoch_mix.json").write_text(json.dumps({
        "added_ratio": 2.0, "added_per_epoch": 12, "added_pool": 30, "epoch_length": 40,
        "expected_added_trained": 4.8}))
    (s0 / "state").mkdir()
    for name, wall in (("meld", 60.0), ("concat", 50.0), ("mine_nrm_luna16", 3.0)):
        (s0 / "state" / f"{name}.json").write_text(json.dumps({"wall_s": wall}))
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["--x"],
                                   unlabeled=[0.0, 2.0])
    t2 = text[text.index("## Table 2"):text.index("## Table 4")]
    # MELD over both seeds: lung 30 and 40 -> 35.0 ± 7.1; a stratum without truths -> n/a
    assert "| MELD | 2 | 35.0 ± 7.1 | n/a | 15.0 ± 7.1 | 25.0 ± 7.1 |" in t2
    assert "| MELD + NRM, LUNA16 expert only | 1 | 60.0 | n/a | 40.0 | 50.0 |" in t2
    assert "| MELD + NRM, LiTS expert only | 0 | not run | not run | not run | not run |" in t2
    assert "seed 0 only" in t2 and "lung 4, liver 0, lymph node 3, overall 12" in t2
    t4 = text[text.index("## Table 4"):text.index("## Fig. 5 analog")]
    assert "| Dataset concatenation (one expert, four datasets) | 1 | 15.0 |" in t4
    assert "| Multi-task (an expert per dataset, no organ heads or gate) | 0 | not run |" in t4
    assert "| MELD | 2 | 25.0 ± 7.1 |" in t4 and "**25.0 ± 7.1**" in t4
    assert "| MELD + NRM, suspicious regions as positives | 0 | not run |" in t4
    f5 = text[text.index("## Fig. 5 analog"):text.index("## Wall time")]
    assert "| 2 | 12 (30) | 40 | 1 | 45.0 | 45.0 | 4.8 |" in f5
    assert "| 0 | not run | not run | 0 | not run | not run | not run |" in f5
    assert "With the finetuning control" not in f5                   # no control run: no table
    assert "concat 50, mine_nrm_luna16 3" in text and "## Missing" not in text


def test_the_added_slices_sweep_with_its_control_on_the_page(tmp_path):
    # MELD 20/30 (seeds 0/1); the default ratio's control and MAM + NRM from Table 1's runs; at
    # ratio 2 the control gains 10 points on both seeds and MAM + NRM 1 and 3 more
    for s, shift in ((0, 0.0), (1, 0.1)):
        sd = tmp_path / f"seed_{s}"
        for run, lv in (("meld", 0.2), ("ft_none", 0.25), ("ft_both", 0.25), ("ft_none_added2", 0.3),
                        ("ft_both_added2", 0.31 + 0.02 * s)):
            _eval(sd, run, lv + shift)
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", [],
                                   unlabeled=[2.0])
    f5 = text[text.index("## Fig. 5 analog"):text.index("## Wall time")]
    _has_lines(f5, "| 0.5 | not run | not run | 2 | 30.0 ± 7.1 | 30.0 ± 7.1 | not run |",
               "| 2 | not run | not run | 2 | 37.0 ± 8.5 | 37.0 ± 8.5 | not run |",
               "### With the finetuning control at each ratio (`--unlabeled ... --control`)",
               "| control (nothing mined), added_ratio 2 | 2 |",
               "| control (added_ratio 2) > MELD | released | +10.0, +10.0 | +10.0 ± 0.0 | yes |",
               "| control (added_ratio 2) > control (added_ratio 0.5) | paper | +5.0, +5.0 | "
               "+5.0 ± 0.0 | yes |",
               "| MAM+NRM > control (added_ratio 2) | released | +1.0, +3.0 | +2.0 ± 1.4 | yes |",
               "| MAM+NRM > control (added_ratio 0.5) | released | +0.0, +0.0 | +0.0 ± 0.0 | no |")


def test_page_without_the_extra_runs_says_not_run(tmp_path):
    for run, lv in zip(qs.RUNS, (0.1, 0.2, 0.3, 0.25, 0.4)):
        _eval(tmp_path / "seed_0", run, lv, strata=False)
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0], "", [])
    assert "| MELD + NRM, NIH-LN expert only | 0 | not run |" in text
    assert "| MELD | 0 | not run | not run | not run | not run |" in text   # no strata yet
    assert "| Concatenation, single-type datasets positive-only | 0 | not run |" in text
    assert "Not run (`--unlabeled R1,R2,...`)." in text


def test_labels_from_the_world_truth(tiny_world, tmp_path):
    from uld_jax.evaluate.inputs import load_volume_dict
    from uld_jax.evaluate.organs import organ_labels_from_world_truth

    truth = load_volume_dict(str(tiny_world / "truth" / "deeplesion_volumetric_truth.pkl"), split="test")
    csv_path = tiny_world / "truth" / "deeplesion_lesions.csv"
    lab = organ_labels_from_world_truth(truth, csv_path)
    assert set(lab) == set(truth)
    assert all(len(lab[k]) == len(np.asarray(truth[k]).reshape(-1, 6)) for k in truth)
    assert {x for v in lab.values() for x in v} <= {"lung", "liver", "lymph_node", "other"}
    # the labels are the csv's organs (other organs -> 'other')
    import csv
    with open(csv_path, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["subvolume"] in truth]
    want = [r["organ"] if r["organ"] in ("lung", "liver", "lymph_node") else "other" for r in rows]
    assert sorted(want) == sorted(x for v in lab.values() for x in v)
    # the quick start writes them once, as the evaluation's --labels file
    q = qs.Quickstart(str(tmp_path / "qs"), qs.RECIPES["smoke"], quiet=True)
    q.world = str(tiny_world)
    q.write_labels()
    with open(q.labels, encoding="utf-8") as f:
        assert json.load(f) == lab
    cmd = q.eval_cmd("meld")
    assert cmd[cmd.index("--labels") + 1] == q.labels
    # a truth that is not this world's is refused
    name = next(k for k in truth if len(np.asarray(truth[k]).reshape(-1, 6)))
    bad = dict(truth, **{name: np.asarray(truth[name], float).reshape(-1, 6) + 1})
    with pytest.raises(EvaluationInputError, match="do not match"):
        organ_labels_from_world_truth(bad, csv_path)


def test_split_mined_keeps_mam_nrm_both_or_no_rows_and_the_added_slices(tmp_path):
    from data_prep import build as build_lib
    from data_prep import case_factory as cf
    from uld_jax.overlay import read_overlay, write_overlay

    cases = [cf.make_case("deeplesion", k, num_slices=6, lesion_slices=(2,), negatives=())
             for k in range(2)]
    build_lib.build("/raw", str(tmp_path), ["deeplesion"],
                    reader_lookup=lambda n: cf.ListReader(cases), progress=False)
    cid = [c.case_id for c in cases]
    box = [2.0, 2.0, 10.0, 10.0]
    # MAM positive (universal expert), NRM as positive (luna16), NRM ignore (lits), added slice
    rows = {"dataset": ["deeplesion"] * 4, "case_id": [cid[0], cid[0], cid[1], cid[1]],
            "slice_index": [1, 3, 1, 4], "kind": [1, 1, 2, 3], "box": [box, box, box, [0] * 4],
            "expert": [0, 1, 2, -1]}
    src = str(tmp_path / "mined.npz")
    write_overlay(src, rows, {}, data_dir=str(tmp_path))
    got = {}
    for part in ("mam", "nrm", "none"):
        counts = qs.split_mined(src, part, str(tmp_path / f"{part}.npz"), str(tmp_path))
        cols, _ = read_overlay(str(tmp_path / f"{part}.npz"))
        got[part] = sorted(zip(cols["kind"].tolist(), cols["expert"].tolist()))
        assert counts["added"] == 1
    assert got["mam"] == [(1, 0), (3, -1)]
    assert got["nrm"] == [(1, 1), (2, 2), (3, -1)]
    assert got["none"] == [(3, -1)]
    # both parts without the bare added slice: the mined rows only, each keeping its own slice
    counts = qs.split_mined(src, "both", str(tmp_path / "both.npz"), str(tmp_path), added=False)
    cols, _ = read_overlay(str(tmp_path / "both.npz"))
    assert counts == {"mined": 2, "ignore": 1, "added": 0}
    assert sorted(zip(cols["kind"].tolist(), cols["expert"].tolist(),
                      cols["slice_index"].tolist())) == [(1, 0, 1), (1, 1, 3), (2, 2, 1)]
    with pytest.raises(ValueError, match="expected 'mam', 'nrm', 'both' or 'none'"):
        qs.split_mined(src, "all", str(tmp_path / "x.npz"), str(tmp_path))


def _steps_of(calls, seed):
    return {n: c for o, n, c, _ in calls if o.endswith(f"seed_{seed}")}


def _has_lines(text: str, *lines: str) -> None:
    """Each of ``lines`` is in ``text`` (named in the failure)."""
    missing = [ln for ln in lines if ln not in text]
    assert not missing, missing


def test_commands_of_the_variants(tmp_path, recorded_steps):
    calls = recorded_steps
    r = qs.RECIPES["smoke"]
    reproduce.run_table2(str(tmp_path), r, [3, 4])
    reproduce.run_table4(str(tmp_path), r, [3, 4])
    n_first = len(calls)
    reproduce.run_unlabeled(str(tmp_path), r, [3, 4], [2.0])
    unlabeled_calls = calls[n_first:]
    steps = _steps_of(calls, 3)
    meld = os.path.join(str(tmp_path), "seed_3", "runs", "meld")
    for e in ("luna16", "lits", "nihln"):
        (mine,) = steps[f"mine_nrm_{e}"]
        assert mine[mine.index("--nrm_experts") + 1] == e and mine[mine.index("--workdir") + 1] == meld
        (ft,) = steps[f"ft_nrm_{e}"]
        assert f"--config.data.overlays=('{meld}/mined_nrm_{e}.npz',)" in ft
        assert f"--config.init_from.workdir={meld}" in ft and "configs/finetune.py:tiny" in ft
        assert f"eval_ft_nrm_{e}" in steps
    (concat,) = steps["concat"]
    assert "--config.data.merge_datasets=True" in concat and "--config.model.num_datasets=1" in concat
    assert f"--config.num_epochs={r.epochs}" in concat and "configs/meld.py:tiny" in concat
    (pos,) = steps["concat_pos"]
    assert "--config.data.positive_only=('luna16', 'lits', 'nihln')" in pos
    (mt,) = steps["multitask"]
    assert "--config.model.use_gate=False" in mt and not any("num_datasets" in a for a in mt)
    (mine,) = steps["mine_nrm_pos"]
    assert "--nrm_as_positive" in mine
    # the default ratio (always in the sweep) is Table 1's MELD + MAM + NRM: the quick start's own
    # step and command (done before: skipped); another one finetunes anew
    (ft,) = steps["ft_both"]
    assert ft == qs.Quickstart(os.path.join(str(tmp_path), "seed_3"), r, seed=3).finetune_cmd(
        "ft_both", f"{meld}/mined.npz") and "mix_ft_both" in steps
    (ft,) = steps["ft_both_added2"]
    assert "--config.data.added_ratio=2.0" in ft and f"--config.data.overlays=('{meld}/mined.npz',)" in ft
    assert all(o.endswith("seed_3") for o, *_ in calls[:n_first])     # Tables 2 and 4: first seed
    # Fig. 5 runs on every seed, and without --control no control run
    assert {n for o, n, *_ in unlabeled_calls if o.endswith("seed_4")} == {
        n for o, n, *_ in unlabeled_calls if o.endswith("seed_3")} == {
        "ft_both_added2", "eval_ft_both_added2", "mix_ft_both_added2",
        "ft_both", "eval_ft_both", "mix_ft_both"}


def test_the_added_slices_sweep_with_its_control(tmp_path, recorded_steps):
    reproduce.run_unlabeled(str(tmp_path), qs.RECIPES["smoke"], [3, 4], [0.0, 2.0], control=True)
    for seed in (3, 4):
        steps = _steps_of(recorded_steps, seed)
        meld = os.path.join(str(tmp_path), f"seed_{seed}", "runs", "meld")
        # the control's overlay: MELD's table with nothing mined, the added slices kept
        assert "mine_none" in steps
        for ratio, tag in ((0.0, "0"), (2.0, "2")):
            (ft,) = steps[f"ft_none_added{tag}"]
            assert f"--config.data.added_ratio={ratio}" in ft
            assert f"--config.data.overlays=('{meld}/mined_none.npz',)" in ft
            (ft,) = steps[f"ft_both_added{tag}"]
            assert f"--config.data.overlays=('{meld}/mined.npz',)" in ft
            assert {f"eval_ft_none_added{tag}", f"mix_ft_none_added{tag}"} <= set(steps)
        # the default ratio is the control's own run: the same step and command as --control's
        assert {"mix_ft_none", "mix_ft_both"} <= set(steps)
        assert "--config.data.added_ratio" not in " ".join(steps["ft_none"][0])
    n = len(recorded_steps)
    reproduce.run_control(str(tmp_path), qs.RECIPES["smoke"], [3, 4])
    control = {(o, name): c for o, name, c, _ in recorded_steps[n:]}
    sweep = {(o, name): c for o, name, c, _ in recorded_steps[:n]}
    assert {k for k in control if k[1] == "ft_none"} == {k for k in sweep if k[1] == "ft_none"}
    assert all(sweep[k] == c for k, c in control.items())


def test_names_of_the_sweeps_runs_round_trip():
    for ratio in (0.0, 0.25, 1.0, 2.0, 1e-05):
        for control in (False, True):
            run = reproduce.unlabeled_run(ratio, control)
            assert reproduce.unlabeled_ratio_of(run) == ratio, run
    # the default ratio's runs are Table 1's and the control's; names no sweep makes are not runs
    for name in ("ft_both", "ft_none", "ft_both_added0.5", "ft_both_added0p50", "ft_both_added",
                 "ft_both_addedx", "ft_mam_added2", "ft_both_added2_x"):
        assert reproduce.unlabeled_ratio_of(name) is None, name
    assert reproduce.unlabeled_ratios(["ft_none_added2", "meld", "ft_both_added0p25",
                                       "ft_both_added2"]) == [0.25, 2.0]


@pytest.mark.parametrize("args, msg", [
    (["--unlabeled", "0,x"], "not a comma-separated list"),
    (["--unlabeled", "-1"], "must be >= 0"),
    (["--unlabeled", "1,1"], "repeats"),
    (["--thetas", "0"], "must be > 0"),
    (["--seeds", "0,0"], "distinct"),
    (["--heldout-checkpoints", "0"], "give 1 or more"),
    (["--resume", "none,all"], "--resume: unknown arm(s) ['all']; expected some of none, mined"),
    (["--mined-scratch", "mam,all"], "--mined-scratch: unknown part(s) ['all']"),
    (["--mined-scratch", ","], "--mined-scratch: ',': no part given"),
    (["--baseline-nrm", "key,ignore"], "--baseline-nrm: unknown arm(s) ['ignore']; expected some "
     "of key, added"),
    (["--variant", "sparse"], "--variant: marking_bias: unknown variant 'sparse'; choose one of "
     "unbiased, dense"),
])
def test_bad_arguments_are_one_line_errors(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--results-only", "--results", "", *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_calibrated_nrm_commands_and_page(tmp_path, recorded_steps):
    reproduce.run_calibrated(str(tmp_path), qs.RECIPES["smoke"], [3, 4])
    for s in (3, 4):                                   # every seed, each on its own MELD
        steps = _steps_of(recorded_steps, s)
        meld = os.path.join(str(tmp_path), f"seed_{s}", "runs", "meld")
        (mine,) = steps["mine_cal"]
        assert mine[mine.index("--sigma_from") + 1] == "precision"
        assert mine[mine.index("--workdir") + 1] == meld
        assert mine[mine.index("--out") + 1] == f"{meld}/mined_cal.npz"
        (rep,) = steps["report_cal"]
        assert rep[rep.index("--overlay") + 1] == f"{meld}/mined_cal.npz"
        (ft,) = steps["ft_nrm_cal"]
        assert f"--config.data.overlays=('{meld}/mined_nrm_cal.npz',)" in ft
        (ft,) = steps["ft_both_cal"]
        assert f"--config.data.overlays=('{meld}/mined_cal.npz',)" in ft
        assert "eval_ft_nrm_cal" in steps and "eval_ft_both_cal" in steps

    # the page: the section appears once a calibrated run has results, with its ordering checks
    # and the thresholds of each seed's mining report
    assert "## NRM with sigma as a precision level" not in reproduce.write_results(
        str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    for s, shift in ((0, 0.0), (1, 0.05)):
        sd = tmp_path / f"seed_{s}"
        for run, lv in (("meld", 0.2), ("ft_mam", 0.3), ("ft_nrm", 0.2), ("ft_both", 0.3),
                        ("ft_nrm_cal", 0.25), ("ft_both_cal", 0.35)):
            _eval(sd, run, lv + shift * (run == "ft_both_cal"))
    rep = tmp_path / "seed_0" / "runs" / "meld"
    rep.mkdir(parents=True)
    (rep / "mining_report_cal.json").write_text(json.dumps({
        "provenance": {"sigma_calibration": {
            "luna16": {"sigma": 0.123, "kept": 5, "detections": 40},
            "lits": {"sigma": None, "kept": 0, "detections": 7}}},
        "quality": {"n_suspicious": 9, "suspicious_true_fraction": 0.5}}))
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    sec = text[text.index("## NRM with sigma as a precision level"):]
    row = next(ln for ln in sec.splitlines() if ln.startswith("| MELD + NRM (sigma: precision 0.5) |"))
    assert row.endswith("| **25.0 ± 0.0** |")
    assert "| NRM (precision) > MELD | released | +5.0, +5.0 | +5.0 ± 0.0 | yes |" in sec
    assert "| MAM+NRM (precision) > MAM | released | +5.0, +10.0 | +7.5 ± 3.5 | yes |" in sec
    assert "| 0 | luna16: 0.123 (5 of 40); lits: none (0 of 7) | 9 | 50.0 |" in sec


def test_control_commands_and_page(tmp_path, monkeypatch, recorded_steps):
    splits = []
    monkeypatch.setattr(qs, "split_mined", lambda *a, **k: splits.append((a, k)))
    reproduce.run_control(str(tmp_path), qs.RECIPES["smoke"], [3, 4])
    for s in (3, 4):                                   # every seed, from its own MELD's mined table
        steps = _steps_of(recorded_steps, s)
        meld = os.path.join(str(tmp_path), f"seed_{s}", "runs", "meld")
        assert steps["mine_none"] == []                # a split of mined.npz: no mining again
        fn = next(f for o, n, _, f in recorded_steps if n == "mine_none" and o.endswith(f"_{s}"))
        fn()
        (src, part, dst, _), kw = splits[-1]
        assert (src, part, dst) == (f"{meld}/mined.npz", "none", f"{meld}/mined_none.npz")
        assert kw == {"added": True}                  # the control keeps the added slices
        (ft,) = steps["ft_none"]
        assert f"--config.data.overlays=('{meld}/mined_none.npz',)" in ft
        assert f"--config.init_from.workdir={meld}" in ft and "configs/finetune.py:tiny" in ft
        assert "eval_ft_none" in steps

    assert "## The finetuning control" not in reproduce.write_results(
        str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    for s, shift in ((0, 0.0), (1, 0.1)):
        for run, lv in (("meld", 0.2), ("ft_none", 0.1), ("ft_mam", 0.3), ("ft_nrm", 0.15),
                        ("ft_both", 0.3)):
            _eval(tmp_path / f"seed_{s}", run, lv + shift * (run == "ft_nrm"))
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    sec = text[text.index("## The finetuning control"):]
    row = next(ln for ln in sec.splitlines() if ln.startswith("| MELD + finetuning, nothing mined"))
    assert row.endswith("| **10.0 ± 0.0** |")
    assert "| control > MELD | released | -10.0, -10.0 | -10.0 ± 0.0 | no |" in sec
    assert "| MAM > control | paper | +20.0, +20.0 | +20.0 ± 0.0 | yes |" in sec
    assert "| NRM > control | released | +5.0, +15.0 | +10.0 ± 7.1 | yes |" in sec


def test_oracle_commands_and_page(tmp_path, recorded_steps):
    reproduce.run_oracle(str(tmp_path), qs.RECIPES["smoke"], [3, 4])
    for s in (3, 4):                                   # every seed, with its control
        steps = _steps_of(recorded_steps, s)
        meld = os.path.join(str(tmp_path), f"seed_{s}", "runs", "meld")
        assert {"mine_none", "ft_none", "eval_ft_none"} <= set(steps)
        for step, run, name, opts in (
                ("mine_oracle", "ft_oracle", "mined_oracle", ["--as", "positive"]),
                ("mine_oracle_nrm", "ft_oracle_nrm", "mined_oracle_nrm", ["--as", "ignore"])):
            (cmd,) = steps[step]
            assert cmd[1:3] == ["-m", "uld_jax.mine.oracle"]
            assert cmd[cmd.index("--data_dir") + 2:-2] == opts
            args = dict(zip(cmd[3:9:2], cmd[4:9:2])) | dict(zip(cmd[-2::2], cmd[-1::2]))
            assert args["--mined"] == f"{meld}/mined.npz"
            assert args["--out"] == f"{meld}/{name}.npz"
            # the first seed's world and build (the other seeds reuse them)
            assert args["--truth"] == os.path.join(str(tmp_path), "seed_3", "world", "truth")
            assert args["--data_dir"] == os.path.join(str(tmp_path), "seed_3", "data")
            (ft,) = steps[run]
            assert f"--config.data.overlays=('{meld}/{name}.npz',)" in ft
            assert f"--config.init_from.workdir={meld}" in ft and f"eval_{run}" in steps

    assert "## The oracle" not in reproduce.write_results(
        str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    for s, shift in ((0, 0.0), (1, 0.2)):
        for run, lv in (("meld", 0.2), ("ft_none", 0.25), ("ft_mam", 0.3), ("ft_oracle", 0.3),
                        ("ft_nrm", 0.25), ("ft_oracle_nrm", 0.2)):
            _eval(tmp_path / f"seed_{s}", run, lv + shift * (run == "ft_oracle"))
        meld = tmp_path / f"seed_{s}" / "runs" / "meld"
        meld.mkdir(parents=True)
        (meld / "mined_oracle.json").write_text(json.dumps({
            "mam_positives": 7 + s, "oracle_boxes": 700 + s, "oracle_on_unmarked": 300,
            "oracle_lesions": 240, "reach": {"unmarked": 142, "unmarked_marked_elsewhere": 20,
                                             "unmarked_same_type_marked": 127,
                                             "unmarked_no_marked_like": 15 - s}}))
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    sec = text[text.index("## The oracle"):]
    assert "| 0 | 7 | 700 | 300 | 240 | 142 | 20 | 127 | 15 |" in sec
    assert "| 1 | 8 | 701 | 300 | 240 | 142 | 20 | 127 | 14 |" in sec
    row = next(ln for ln in sec.splitlines() if ln.startswith("| MELD + oracle MAM"))
    assert row.endswith("| **40.0 ± 14.1** |")
    assert "| oracle MAM > control | paper | +5.0, +25.0 | +15.0 ± 14.1 | yes |" in sec
    assert "| oracle MAM > MAM | released | +0.0, +20.0 | +10.0 ± 14.1 | no |" in sec
    assert "| oracle NRM > NRM | paper | -5.0, -5.0 | -5.0 ± 0.0 | no |" in sec


def test_heldout_commands_and_page(tmp_path, monkeypatch, recorded_steps):
    # seed 3 has finished baseline and MELD, seed 4 only MELD: only finished runs are evaluated
    for s, runs in ((3, ("baseline", "meld")), (4, ("meld",))):
        st = tmp_path / f"seed_{s}" / "state"
        st.mkdir(parents=True)
        for r in runs:
            (st / f"{r}.json").write_text("{}")
    written = []
    monkeypatch.setattr(qs.Quickstart, "write_labels", lambda self: written.append(self.out))
    reproduce.run_heldout(str(tmp_path), qs.RECIPES["smoke"], [3, 4], 24)
    held = os.path.join(str(tmp_path), "heldout")
    hsteps = {n: c for o, n, c, _ in recorded_steps if o == held}
    s3, s4 = _steps_of(recorded_steps, 3), _steps_of(recorded_steps, 4)
    (world,) = hsteps["world"]
    assert world[1:3] == ["-m", "data_prep.synthesize"]
    assert "--stats" in world
    rest = [x for x in world[3:] if x != "--stats"]
    assert dict(zip(rest[::2], rest[1::2])) == {
        "--preset": "tiny", "--seed": "1003", "--out": f"{held}/world", "--dl-patients": "24",
        "--luna": "0", "--lits": "0", "--nihln": "0", "--dl-split": "0,1"}
    for step in ("check", "build"):         # DeepLesion only: the world has no single-type data
        (cmd,) = hsteps[step]
        assert cmd[cmd.index("--datasets") + 1] == "deeplesion" and f"{held}/world" in cmd
    assert hsteps["build"][0][hsteps["build"][0].index("--out") + 1] == f"{held}/data"
    assert written == [held]                 # the held-out world's organ labels
    assert sorted(k for k in s3 if k.startswith("heldout_")) == ["heldout_baseline",
                                                                 "heldout_meld"]
    assert [k for k in s4 if k.startswith("heldout_")] == ["heldout_meld"]
    (ev,) = s4["heldout_meld"]
    a = dict(zip(ev[3::2], ev[4::2]))
    assert a["--workdir"] == os.path.join(str(tmp_path), "seed_4", "runs", "meld")
    assert a["--data"] == f"{held}/data" and a["--split"] == "test"
    assert a["--out"] == os.path.join(str(tmp_path), "seed_4", "eval_heldout", "meld")
    assert a["--truth"] == f"{held}/world/truth/deeplesion_volumetric_truth.pkl"
    assert a["--dl-info"] == f"{held}/world/DeepLesion/DL_info.csv"
    assert a["--labels"] == f"{held}/{qs.LABELS_FILE}" and a["--rule"] == "both"

    assert "## Table 1 on a held-out" not in reproduce.write_results(
        str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    for s, shift in ((0, 0.0), (1, 0.1)):
        for run, lv in (("baseline", 0.1), ("meld", 0.2), ("ft_none", 0.25), ("ft_mam", 0.3)):
            _eval(tmp_path / f"seed_{s}", run, lv)                  # the world's own test split
            d = tmp_path / f"seed_{s}" / "eval_heldout"
            _eval(d.parent / "h", run, lv + shift)
            (d / run).mkdir(parents=True)
            os.replace(d.parent / "h" / "eval" / run / "results.json", d / run / "results.json")
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    sec = text[text.index("## Table 1 on a held-out"):]
    row = next(ln for ln in sec.splitlines() if ln.startswith("| MELD + MAM |"))
    assert row.endswith("| **35.0 ± 7.1** |")
    assert "| MAM > control | paper | +5.0, +5.0 | +5.0 ± 0.0 | yes |" in sec
    assert "| MELD > baseline | released | +10.0, +10.0 | +10.0 ± 0.0 | yes |" in sec
    assert "| MELD + oracle NRM (the same boxes as ignore regions) | not run |" in sec


def test_oracle_scratch_commands_and_page(tmp_path, recorded_steps):
    reproduce.run_oracle_scratch(str(tmp_path), qs.RECIPES["smoke"], [3, 4])
    for s in (3, 4):
        steps = _steps_of(recorded_steps, s)
        meld = os.path.join(str(tmp_path), f"seed_{s}", "runs", "meld")
        (cmd,) = steps["mine_oracle_scratch"]
        assert cmd[1:3] == ["-m", "uld_jax.mine.oracle"] and "--without_added" in cmd
        assert cmd[-1] == f"{meld}/mined_oracle_scratch.npz"
        (tr,) = steps["meld_oracle"]                  # MELD's own command, plus the labels
        assert "configs/meld.py:tiny" in tr and "--config.init_from.workdir" not in " ".join(tr)
        assert tr[-1] == f"--config.data.overlays=('{meld}/mined_oracle_scratch.npz',)"
        assert "eval_meld_oracle" in steps
    # page: only the seeds that have the run are compared
    for s in (0, 1):
        _eval(tmp_path / f"seed_{s}", "meld", 0.2)
        _eval(tmp_path / f"seed_{s}", "ft_oracle", 0.25)
    _eval(tmp_path / "seed_0", "meld_oracle", 0.3)
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    sec = text[text.index("## Labels trained in from scratch"):]
    assert "| MELD trained with the oracle's positives (complete labels on the mined slices) | 1 |" in sec
    assert ("| complete labels > MELD | released | +10.0 | +10.0 | undecided (one seed: no spread) |"
            in sec)


def test_oracle_scratch_ignore_commands_and_page(tmp_path, recorded_steps):
    reproduce.run_oracle_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["positive", "ignore"])
    steps = _steps_of(recorded_steps, 3)
    assert list(steps) == ["mine_oracle_scratch", "meld_oracle", "eval_meld_oracle",
                           "mine_oracle_nrm_scratch", "meld_oracle_nrm", "eval_meld_oracle_nrm"]
    meld = os.path.join(str(tmp_path), "seed_3", "runs", "meld")
    (cmd,) = steps["mine_oracle_nrm_scratch"]
    assert cmd[cmd.index("--as") + 1] == "ignore" and "--without_added" in cmd
    assert cmd[-1] == f"{meld}/mined_oracle_nrm_scratch.npz"
    (tr,) = steps["meld_oracle_nrm"]
    assert "configs/meld.py:tiny" in tr and "--config.init_from.workdir" not in " ".join(tr)
    assert tr[-1] == f"--config.data.overlays=('{meld}/mined_oracle_nrm_scratch.npz',)"
    recorded_steps.clear()
    reproduce.run_oracle_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["ignore_key"])
    steps = _steps_of(recorded_steps, 3)
    assert steps["mine_oracle_nrm_scratch"] == [cmd]       # the table step shared with 'ignore'
    (key,) = steps["meld_oracle_nrm_key"]
    assert key[-2:] == [f"--config.data.overlays=('{meld}/mined_oracle_nrm_scratch.npz',)",
                        "--config.data.added_ratio=0.0"]
    assert key[:-1] == [a.replace("runs/meld_oracle_nrm", "runs/meld_oracle_nrm_key") for a in tr]
    with pytest.raises(ValueError, match="--oracle-scratch: unknown use.*'both'"):
        reproduce.run_oracle_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["both"])
    # page: the perfect NRM against MELD, NRM's own regions and the complete labels
    _eval_runs(tmp_path, ("meld", "meld_nrm", "meld_oracle_nrm", "meld_oracle",
                          "meld_oracle_nrm_key"),
               {0: (0.2, 0.15, 0.25, 0.4, 0.1), 1: (0.3, 0.3, 0.2, 0.35, 0.35)})
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    sec = text[text.index("## Labels trained in from scratch"):]
    _has_lines(sec, "| MELD trained with the oracle's boxes as ignore regions (a perfect NRM) | 2 |",
               "| perfect NRM > MELD | paper | +5.0, -10.0 | -2.5 ± 10.6 | no |",
               "| perfect NRM > NRM table | released | +10.0, -10.0 | +0.0 ± 14.1 | no |",
               "| complete labels > perfect NRM | paper | +15.0, +15.0 | +15.0 ± 0.0 | yes |",
               "| perfect NRM on key slices > MELD | released | -10.0, +5.0 | -2.5 ± 10.6 | no |",
               "| perfect NRM on key slices > perfect NRM | paper | -15.0, +15.0 | +0.0 ± 21.2 "
               "| no |")
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(tmp_path), "--oracle-scratch", "both", "--results", ""])


def test_added_slices_arms_commands_exposure_and_page(tmp_path, recorded_steps, monkeypatch):
    """--mined-scratch added (the mining run's added slices, nothing mined) and --oracle-scratch
    ignore_added (the perfect NRM with those slices), the exposure step, their page rows, checks
    and the exposure table."""
    splits = []
    monkeypatch.setattr(qs, "split_mined", lambda *a, **k: splits.append((a, k)))
    reproduce.run_mined_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["added"])
    reproduce.run_oracle_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["ignore_added"])
    steps = _steps_of(recorded_steps, 3)
    assert list(steps) == ["mine_added_scratch", "meld_added", "eval_meld_added",
                           "mine_oracle_nrm_added", "exposure", "meld_oracle_nrm_added",
                           "eval_meld_oracle_nrm_added"]
    meld = os.path.join(str(tmp_path), "seed_3", "runs", "meld")
    fn = next(f for o, n, _, f in recorded_steps if n == "mine_added_scratch")
    fn()
    ((src, part, dst, _), kw), = splits
    assert (src, part, dst) == (f"{meld}/mined.npz", "none", f"{meld}/mined_added_scratch.npz")
    assert kw.get("added", True) is True                  # the added slices kept
    (added,) = steps["meld_added"]
    assert added[-1] == f"--config.data.overlays=('{meld}/mined_added_scratch.npz',)"
    (cmd,) = steps["mine_oracle_nrm_added"]
    assert cmd[cmd.index("--as") + 1] == "ignore" and "--without_added" not in cmd
    assert cmd[-1] == f"{meld}/mined_oracle_nrm_added.npz"
    (exp,) = steps["exposure"]
    assert exp[1:3] == ["-m", "uld_jax.mine.exposure"]
    assert exp[exp.index("--workdir") + 1] == meld and exp[exp.index("--seed") + 1] == "3"
    assert exp[exp.index("--overlay") + 1] == f"{meld}/mined_oracle_nrm_added.npz"
    assert exp[-1] == f"{meld}/exposure.json"
    (tr,) = steps["meld_oracle_nrm_added"]
    assert tr == [a.replace("runs/meld_added", "runs/meld_oracle_nrm_added").replace(
        "mined_added_scratch", "mined_oracle_nrm_added") for a in added]
    assert {"meld_added", "meld_oracle_nrm_added"} <= set(reproduce.HELDOUT_RUNS)
    # page: the checks, and the exposure table from each seed's exposure.json
    _eval_runs(tmp_path, ("meld", "meld_added", "meld_oracle_nrm_added"),
               {0: (0.2, 0.1, 0.25), 1: (0.3, 0.2, 0.35)})
    counts = {"key": {"slices": 10, "slices_with_regions": 4, "ignore_regions": 5,
                      "roi_positives": 12, "roi_negatives": 40, "roi_negatives_in_region": 2,
                      "roi_negatives_covering": 1, "regions_covered": 1, "anchor_positives": 6,
                      "anchor_negatives": 400, "anchor_negatives_in_region": 3,
                      "roi_negative_loss": 8.0, "roi_negative_loss_in_region": 2.0,
                      "anchor_negative_loss": 40.0, "anchor_negative_loss_in_region": 0.5},
              "added": {"slices": 5, "slices_with_regions": 3, "ignore_regions": 4,
                        "roi_positives": 0, "roi_negatives": 20, "roi_negatives_in_region": 5,
                        "roi_negatives_covering": 2, "regions_covered": 2, "anchor_positives": 0,
                        "anchor_negatives": 200, "anchor_negatives_in_region": 8,
                        "roi_negative_loss": 4.0, "roi_negative_loss_in_region": 0.0,
                        "anchor_negative_loss": 20.0, "anchor_negative_loss_in_region": 5.0}}
    (tmp_path / "seed_0" / "runs" / "meld").mkdir(parents=True)
    with open(tmp_path / "seed_0" / "runs" / "meld" / "exposure.json", "w") as f:
        json.dump({"counts": counts, "overlay": f"{meld}/mined_oracle_nrm_added.npz",
                   "batches": 100}, f)
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    sec = text[text.index("## Labels trained in from scratch"):]
    _has_lines(sec, "| added slices > MELD | released | -10.0, -10.0 | -10.0 ± 0.0 | no |",
               "| perfect NRM with added slices > added slices | paper | +15.0, +15.0 | "
               "+15.0 ± 0.0 | yes |",
               "| perfect NRM with added slices > MELD | released | +5.0, +5.0 | +5.0 ± 0.0 | yes |")
    exp_sec = text[text.index("## What a perfect NRM keeps out"):]
    _has_lines(exp_sec, "--overlay mined_oracle_nrm_added.npz --batches 100`",
               "| 0 | key | 10 | 4 | 5 | 12 | 40 | 5.0 | 2.5 | 1 | 25.0 | 0.8 | 1.2 |",
               "| 0 | added | 5 | 3 | 4 | 0 | 20 | 25.0 | 10.0 | 2 | 0.0 | 4.0 | 25.0 |")
    table_rows = [ln for ln in exp_sec.split("\n## ")[0].splitlines() if ln.startswith("| ")]
    assert [r.split(" | ")[0] for r in table_rows[1:]] == ["| 0", "| 0"]   # no exposure.json: seed 1


def test_mined_scratch_commands_and_page(tmp_path, recorded_steps, monkeypatch):
    splits = []
    monkeypatch.setattr(qs, "split_mined", lambda *a, **k: splits.append((a, k)))
    reproduce.run_mined_scratch(str(tmp_path), qs.RECIPES["smoke"], [3, 4])
    for s in (3, 4):
        calls = [(n, c, fn) for o, n, c, fn in recorded_steps if o.endswith(f"seed_{s}")]
        meld = os.path.join(str(tmp_path), f"seed_{s}", "runs", "meld")
        (name, cmds, fn), (tname, (tr,), _), (ename, _, _) = calls
        assert (name, cmds, tname, ename) == ("mine_both_scratch", [], "meld_mined",
                                               "eval_meld_mined")
        fn()                                          # the table is split in-process
        (src, part, dst, _), kw = splits[-1]
        assert (src, part, dst, kw) == (f"{meld}/mined.npz", "both",
                                        f"{meld}/mined_both_scratch.npz", {"added": False})
        assert "configs/meld.py:tiny" in tr and "--config.init_from.workdir" not in " ".join(tr)
        assert tr[-1] == f"--config.data.overlays=('{meld}/mined_both_scratch.npz',)"
    # page: each check pairs the seeds that have both of its runs
    for s, mined in ((0, 0.35), (1, 0.15), (2, 0.3)):
        _eval(tmp_path / f"seed_{s}", "meld", 0.2)
        _eval(tmp_path / f"seed_{s}", "ft_both", 0.25)
        _eval(tmp_path / f"seed_{s}", "meld_mined", mined)
    _eval(tmp_path / "seed_1", "meld_oracle", 0.4)
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1, 2], "", ["x"])
    sec = text[text.index("## Labels trained in from scratch"):]
    row = next(ln for ln in sec.splitlines() if ln.startswith("| MELD trained with its own mined"))
    assert row.startswith("| MELD trained with its own mined table (MAM + NRM) | 3 | 26.7 ± 10.4 |")
    assert "| mined table > MELD | paper | +15.0, -5.0, +10.0 | +6.7 ± 10.4 | no |" in sec
    assert "| mined table > finetuned MAM + NRM | released | +10.0, -10.0, +5.0 | +1.7 ± 10.4 | no |" in sec
    assert ("| complete labels > mined table | paper | +25.0 | +25.0 | undecided (one seed: no "
            "spread) |" in sec)
    assert "| complete labels > MELD | paper | +20.0 | +20.0 |" in sec


def test_mined_scratch_parts_commands_and_page(tmp_path, recorded_steps, monkeypatch):
    """--mined-scratch mam,nrm,both: one from-scratch run per part of the mined table, in that
    order, and Table 1's ordering among them on the page."""
    splits = []
    monkeypatch.setattr(qs, "split_mined", lambda *a, **k: splits.append((a, k)))
    reproduce.run_mined_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["mam", "nrm", "both"])
    meld = os.path.join(str(tmp_path), "seed_3", "runs", "meld")
    calls = [(n, c, fn) for o, n, c, fn in recorded_steps if o.endswith("seed_3")]
    assert [n for n, _, _ in calls] == ["mine_mam_scratch", "meld_mam", "eval_meld_mam",
                                        "mine_nrm_scratch", "meld_nrm", "eval_meld_nrm",
                                        "mine_both_scratch", "meld_mined", "eval_meld_mined"]
    for (name, _, fn), (run, (tr,), _), part in zip(calls[0::3], calls[1::3], ("mam", "nrm", "both")):
        fn()
        (src, p, dst, _), kw = splits[-1]
        assert (src, p, dst, kw) == (f"{meld}/mined.npz", part, f"{meld}/mined_{part}_scratch.npz",
                                     {"added": False})
        assert "configs/meld.py:tiny" in tr and f"{run}" in " ".join(tr)
        assert tr[-1] == f"--config.data.overlays=('{meld}/mined_{part}_scratch.npz',)"
    with pytest.raises(ValueError, match="unknown part"):
        reproduce.run_mined_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["mam", "all"])
    # page: MAM alone and NRM alone against MELD, both against each (hand-computed differences)
    _eval_runs(tmp_path, ("meld", "meld_mam", "meld_nrm", "meld_mined"),
               {0: (0.2, 0.25, 0.15, 0.30), 1: (0.2, 0.30, 0.25, 0.20)})
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    _has_lines(text[text.index("## Labels trained in from scratch"):],
               "| MELD trained with its own MAM positives | 2 | 27.5 ± 3.5 |",
               "| MELD trained with its own NRM ignore regions | 2 | 20.0 ± 7.1 |",
               "| MAM table > MELD | released | +5.0, +10.0 | +7.5 ± 3.5 | yes |",
               "| NRM table > MELD | paper | -5.0, +5.0 | +0.0 ± 7.1 | no |",
               "| mined table > MAM table | released | +5.0, -10.0 | -2.5 ± 10.6 | no |",
               "| mined table > NRM table | paper | +15.0, -5.0 | +5.0 ± 14.1 | no |")


def test_ordering_checks_pair_runs_by_seed(tmp_path):
    """A check compares the two runs on the seeds both have, seed by seed: MELD on seeds 1 and 2,
    the control on seeds 0 and 1 -> one difference, seed 1's (not seed 0's control against seed
    1's MELD, as two equally long lists taken in order would give)."""
    for s, level in ((1, 0.20), (2, 0.50)):
        _eval(tmp_path / f"seed_{s}", "meld", level)
    for s, level in ((0, 0.10), (1, 0.30)):
        _eval(tmp_path / f"seed_{s}", "ft_none", level)
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1, 2], "", ["x"])
    sec = text[text.index("## The finetuning control"):]
    assert "| control > MELD | released | +10.0 | +10.0 | undecided (one seed: no spread) |" in sec
    assert "| MAM > control |" not in sec                    # no seed has MELD + MAM


def test_heldout_checkpoints_commands_and_page(tmp_path, monkeypatch, recorded_steps):
    """``--heldout-checkpoints K``: each finished run's K - 1 checkpoints before its last are
    evaluated on the held-out world (none for K = 1, fewer when fewer were saved); the page reads
    the spread between a run's last K checkpoints and the ordering on their per-seed mean."""
    from uld_jax import train

    saved = {"meld": [10, 20, 30], "baseline": [30]}
    monkeypatch.setattr(train, "checkpoint_steps", lambda d: saved[os.path.basename(d)])
    st = tmp_path / "seed_3" / "state"
    st.mkdir(parents=True)
    for r in saved:
        (st / f"{r}.json").write_text("{}")
    reproduce.run_heldout(str(tmp_path), qs.RECIPES["smoke"], [3], 24)
    assert sorted(k for k in _steps_of(recorded_steps, 3) if k.startswith("heldout_")) == [
        "heldout_baseline", "heldout_meld"]
    recorded_steps.clear()
    reproduce.run_heldout(str(tmp_path), qs.RECIPES["smoke"], [3], 24, checkpoints=3)
    s3 = _steps_of(recorded_steps, 3)
    assert sorted(k for k in s3 if k.startswith("heldout_")) == [
        "heldout_baseline", "heldout_meld", "heldout_meld_10", "heldout_meld_20"]
    (ev,) = s3["heldout_meld_20"]
    a = dict(zip(ev[3::2], ev[4::2]))
    run = os.path.join(str(tmp_path), "seed_3", "runs", "meld")
    assert "--workdir" not in ev and a["--checkpoint"] == os.path.join(run, "checkpoints", "20")
    assert a["--out"] == os.path.join(str(tmp_path), "seed_3", reproduce.STEPS_SUB, "meld", "20")
    assert a["--data"] == os.path.join(str(tmp_path), "heldout", "data")

    # the page: K = 2 reads step 20 and the last (step 10 is older: ignored)
    for s, lv in ((0, {"meld": (0.90, 0.10, 0.30), "baseline": (0.0, 0.05, 0.15)}),
                  (1, {"meld": (0.90, 0.20, 0.20), "baseline": (0.0, 0.10, 0.10)})):
        for r, (a10, a20, last) in lv.items():
            _eval(tmp_path / f"seed_{s}", r, last, sub="eval_heldout")
            _eval(tmp_path / f"seed_{s}", f"{r}/10", a10, sub=reproduce.STEPS_SUB)
            _eval(tmp_path / f"seed_{s}", f"{r}/20", a20, sub=reproduce.STEPS_SUB)
    _eval(tmp_path / "seed_0", "ft_mam", 0.5, sub="eval_heldout")     # no earlier checkpoint
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    assert "### The last" not in text                                  # K = 1: no section
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"],
                                   checkpoints=2)
    sec = text[text.index("### The last 2 checkpoints"):]
    sec = sec[:sec.index("#### paper")]
    # MELD: seed 0 (0.10, 0.30) sd 14.1, seed 1 (0.20, 0.20) sd 0 -> 7.1 between its last 2; means
    # 0.20 and 0.20; last 30.0 and 20.0
    assert "| MELD | 20 | 2 | 25.0 ± 7.1 | 7.1 | 20.0 ± 0.0 |" in sec
    assert "| Baseline" in sec and "MELD + MAM" not in sec
    # on the means of the last 2: MELD 0.20, 0.20 against the baseline's 0.10, 0.10
    assert "| MELD > baseline | released | +10.0, +10.0 | +10.0 ± 0.0 | yes |" in text[
        text.index("#### Ordering on the mean of the last 2"):]
    # on the last checkpoint alone (the held-out table's checks): +15.0 and +10.0
    assert "| MELD > baseline | released | +15.0, +10.0 | +12.5 ± 3.5 | yes |" in text


def test_resume_commands_and_page(tmp_path, recorded_steps, monkeypatch):
    """--resume: MELD's second half again from its checkpoint at half its epochs, with nothing, its
    mined table (the from-scratch split) or the oracle's positives; the checks pair each against
    the control on the page (hand-computed differences)."""
    splits = []
    monkeypatch.setattr(qs, "split_mined", lambda *a, **k: splits.append((a, k)))
    reproduce.run_resume(str(tmp_path), qs.RECIPES["smoke"], [3])
    meld = os.path.join(str(tmp_path), "seed_3", "runs", "meld")
    calls = {n: (c, fn) for o, n, c, fn in recorded_steps if o.endswith("seed_3")}
    assert list(calls) == ["resume_none", "eval_resume_none", "mine_both_scratch", "resume_mined",
                           "eval_resume_mined", "mine_oracle_scratch", "resume_oracle",
                           "eval_resume_oracle"]
    calls["mine_both_scratch"][1]()
    assert splits == [((f"{meld}/mined.npz", "both", f"{meld}/mined_both_scratch.npz",
                        os.path.join(str(tmp_path), "seed_3", "data")), {"added": False})]
    ((oracle,), _) = calls["mine_oracle_scratch"]
    assert oracle[oracle.index("--out") + 1] == f"{meld}/mined_oracle_scratch.npz"
    assert "--without_added" in oracle
    r = qs.RECIPES["smoke"]                          # 2 epochs, mining at 1: the second epoch again
    for run, table in (("resume_none", None), ("resume_mined", "mined_both_scratch"),
                       ("resume_oracle", "mined_oracle_scratch")):
        ((cmd,), _) = calls[run]
        assert "configs/meld.py:tiny" in cmd and "--config.seed=3" in cmd
        assert f"--config.init_from.workdir={meld}" in cmd
        assert "--config.init_from.epoch=1" in cmd and "--config.num_epochs=1" in cmd
        assert "--config.optimizer.decay_epochs=(1,)" in cmd
        assert f"--config.steps_per_epoch={r.steps_per_epoch}" in cmd
        over = [a for a in cmd if a.startswith("--config.data.overlays=")]
        assert over == ([] if table is None else
                        [f"--config.data.overlays=('{meld}/{table}.npz',)"])
    # the equal recipe: from epoch 4 of 8, decays after 2 and 3 more epochs (MELD's 6 and 7)
    q = qs.Quickstart(str(tmp_path / "eq"), qs.RECIPES["equal"], seed=1)
    monkeypatch.setattr(q, "steps_per_epoch", lambda config: 343)
    cmd = q.resume_cmd("resume_none")
    assert {"--config.init_from.epoch=4", "--config.num_epochs=4",
            "--config.optimizer.decay_epochs=(2,3)", "--config.steps_per_epoch=343"} <= set(cmd)
    with pytest.raises(ValueError, match="unknown arm"):
        reproduce.run_resume(str(tmp_path), r, [3], ["none", "all"])

    _eval_runs(tmp_path, ("meld", "resume_none", "resume_mined", "resume_oracle"),
               {0: (0.2, 0.20, 0.25, 0.40), 1: (0.2, 0.30, 0.30, 0.45)})
    text = reproduce.write_results(str(tmp_path), r, [0, 1], "", ["x"])
    sec = text[text.index("## Labels trained in over MELD's second half"):]
    assert "| MELD's second half again, nothing added (control) | 2 | 25.0 ± 7.1 |" in sec
    assert "| second half: mined table > control | released | +5.0, +0.0 | +2.5 ± 3.5 | no |" in sec
    assert ("| second half: complete labels > control | paper | +20.0, +15.0 | +17.5 ± 3.5 | yes |"
            in sec)
    assert "| second half: control > MELD | released | +0.0, +10.0 | +5.0 ± 7.1 | no |" in sec


def test_mined_scratch_yield_commands_and_page(tmp_path, recorded_steps, monkeypatch):
    """--mined-scratch yield: MELD mined again with MAM at the paper's yield (reusing its chunk
    store), its report, the table without added slices, MELD from scratch with it; the page's
    checks and its mining-quality table."""
    splits = []
    monkeypatch.setattr(qs, "split_mined", lambda *a, **k: splits.append((a, k)))
    reproduce.run_mined_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["yield"])
    meld = os.path.join(str(tmp_path), "seed_3", "runs", "meld")
    calls = [(n, c, fn) for o, n, c, fn in recorded_steps if o.endswith("seed_3")]
    assert [n for n, _, _ in calls] == ["mine_yield", "report_yield", "mine_yield_scratch",
                                        "meld_yield", "eval_meld_yield"]
    (mine,) = calls[0][1]
    assert mine[1:3] == ["-m", "uld_jax.mine"] and mine[mine.index("--workdir") + 1] == meld
    assert mine[-4:] == ["--theta_from", "paper_yield", "--out", f"{meld}/mined_yield.npz"]
    assert "--epoch" in mine                           # MELD's mining checkpoint, as the default's
    (rep,) = calls[1][1]
    assert rep[1:3] == ["-m", "uld_jax.mine.report"]
    assert rep[rep.index("--overlay") + 1] == f"{meld}/mined_yield.npz"
    assert rep[rep.index("--out") + 1] == f"{meld}/mining_report_yield"
    calls[2][2]()
    assert splits[-1] == ((f"{meld}/mined_yield.npz", "both", f"{meld}/mined_yield_scratch.npz",
                           reproduce.qs.Quickstart(os.path.join(str(tmp_path), "seed_3"),
                                                   qs.RECIPES["smoke"], 3).data), {"added": False})
    (tr,) = calls[3][1]
    assert "configs/meld.py:tiny" in tr and "--config.init_from.workdir" not in " ".join(tr)
    assert tr[-1] == f"--config.data.overlays=('{meld}/mined_yield_scratch.npz',)"
    # yield_mam: the same mining and report steps (skipped when done), that table's MAM part
    recorded_steps.clear()
    reproduce.run_mined_scratch(str(tmp_path), qs.RECIPES["smoke"], [3], ["yield_mam"])
    calls = [(n, c, fn) for o, n, c, fn in recorded_steps if o.endswith("seed_3")]
    assert [n for n, _, _ in calls] == ["mine_yield", "report_yield", "mine_yield_mam_scratch",
                                        "meld_yield_mam", "eval_meld_yield_mam"]
    assert calls[0][1][0] == mine
    calls[2][2]()
    assert splits[-1][0][:3] == (f"{meld}/mined_yield.npz", "mam",
                                 f"{meld}/mined_yield_mam_scratch.npz")
    assert splits[-1][1] == {"added": False}
    assert calls[3][1][0][-1] == f"--config.data.overlays=('{meld}/mined_yield_mam_scratch.npz',)"
    # page: the checks against MELD and the default table, and the mining quality of both tables
    _eval_runs(tmp_path, ("meld", "meld_mined", "meld_yield", "meld_oracle", "meld_yield_mam",
                          "meld_nrm"),
               {0: (0.2, 0.25, 0.30, 0.4, 0.25, 0.2), 1: (0.2, 0.15, 0.30, 0.3, 0.15, 0.1)})
    for s, (n0, th, reached) in ((0, (40, 0.4123, True)), (1, (50, 0.9, False))):
        d = tmp_path / f"seed_{s}" / "runs" / "meld"
        d.mkdir(parents=True, exist_ok=True)
        (d / "mining_report.json").write_text(json.dumps(
            {"provenance": {"theta": 0.15}, "counts": {}, "quality": {
                "n_mined": 5 + s, "precision": 0.8, "n_mined_on_unmarked": 0,
                "recall_unmarked": 0.0, "n_unmarked_visible": 9, "n_suspicious": 7,
                "suspicious_true_fraction": 0.25}}))
        (d / "mining_report_yield.json").write_text(json.dumps(
            {"provenance": {"theta": th, "theta_calibration": {
                "theta": th, "paper_theta": 0.15, "paper_mined": n0, "mined": 30 + s,
                "reached": reached}},
             "quality": {"n_mined": 30 + s, "precision": 0.6, "n_mined_on_unmarked": 4 - s,
                         "n_suspicious": 7}}))
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], "", ["x"])
    _has_lines(text[text.index("## Labels trained in from scratch"):],
               "| MELD trained with its own mined table, MAM at the paper's yield (MAM + NRM) | 2 | "
               "30.0 ± 0.0 |",
               "| yield table > MELD | released | +10.0, +10.0 | +10.0 ± 0.0 | yes |",
               "| yield table > mined table | paper | +5.0, +15.0 | +10.0 ± 7.1 | yes |",
               "| complete labels > yield table | released | +10.0, +0.0 | +5.0 ± 7.1 | no |",
               "| yield MAM table > MELD | paper | +5.0, -5.0 | +0.0 ± 7.1 | no |",
               "| yield table > yield MAM table | released | +5.0, +15.0 | +10.0 ± 7.1 | yes |",
               "| yield table > NRM table | paper | +10.0, +20.0 | +15.0 ± 7.1 | yes |")
    q = text[text.index("## MAM at the paper's yield"):]
    assert "| 0 | 40 | 5 (80.0) | 0.412 | 30 | 60.0 | 4 | 7 |" in q
    assert "| 1 | 50 | 6 (80.0) | 0.900 (not reached) | 31 | 60.0 | 3 | 7 |" in q


def test_baseline_nrm_and_suppression_commands_and_page(tmp_path, recorded_steps, monkeypatch):
    """--baseline-nrm (the baseline 4x as long, plain and with the perfect NRM on its key slices)
    and --suppression (each finished run mined at its last checkpoint and measured), their
    commands, and their page rows and differences against hand-computed values."""
    from uld_jax import train
    r = qs.RECIPES["smoke"]
    reproduce.run_baseline_nrm(str(tmp_path), r, [3])
    steps = _steps_of(recorded_steps, 3)
    assert list(steps) == ["baseline_long", "eval_baseline_long", "mine_oracle_nrm_scratch",
                           "baseline_long_nrm_key", "eval_baseline_long_nrm_key",
                           "exposure_baseline_long", "mine_added_scratch", "baseline_long_added",
                           "eval_baseline_long_added", "mine_oracle_nrm_added",
                           "baseline_long_nrm_added", "eval_baseline_long_nrm_added",
                           "exposure_baseline_long_added"]
    meld = os.path.join(str(tmp_path), "seed_3", "runs", "meld")
    (exp,) = steps["exposure_baseline_long"]   # its perfect NRM vs its negatives
    bl = os.path.join(str(tmp_path), "seed_3", "runs", "baseline_long")
    assert exp[1:3] == ["-m", "uld_jax.mine.exposure"] and exp[exp.index("--workdir") + 1] == bl
    assert exp[exp.index("--overlay") + 1] == f"{meld}/mined_oracle_nrm_scratch.npz"
    assert exp[-1] == f"{bl}/exposure.json" and exp[exp.index("--seed") + 1] == "3"
    (plain,), (nrm,) = steps["baseline_long"], steps["baseline_long_nrm_key"]
    assert "configs/baseline.py:tiny" in plain
    assert f"--config.num_epochs={4 * r.epochs}" in plain          # 4x the recipe's epochs
    assert f"--config.steps_per_epoch={r.steps_per_epoch}" in plain
    assert nrm == [a.replace("runs/baseline_long", "runs/baseline_long_nrm_key") for a in plain] + [
        f"--config.data.overlays=('{meld}/mined_oracle_nrm_scratch.npz',)",
        "--config.data.added_ratio=0.0"]
    # with the added unlabeled slices: --mined-scratch added's table (every added slice of MELD's
    # mining run, nothing mined) and --oracle-scratch ignore_added's, at the config's added_ratio
    (added,), (nrm_added,) = steps["baseline_long_added"], steps["baseline_long_nrm_added"]
    assert added == [a.replace("runs/baseline_long", "runs/baseline_long_added") for a in plain] + [
        f"--config.data.overlays=('{meld}/mined_added_scratch.npz',)"]
    assert nrm_added == [a.replace("runs/baseline_long", "runs/baseline_long_nrm_added")
                         for a in plain] + [
        f"--config.data.overlays=('{meld}/mined_oracle_nrm_added.npz',)"]
    (exp,) = steps["exposure_baseline_long_added"]      # that perfect NRM vs the added run's
    bla = os.path.join(str(tmp_path), "seed_3", "runs", "baseline_long_added")
    assert exp[exp.index("--workdir") + 1] == bla and exp[-1] == f"{bla}/exposure.json"
    assert exp[exp.index("--overlay") + 1] == f"{meld}/mined_oracle_nrm_added.npz"
    # WHERE 'added' alone: the plain run and the added pair, nothing of the key-slice NRM
    recorded_steps.clear()
    reproduce.run_baseline_nrm(str(tmp_path / "w"), r, [3], ["added"])
    assert list(_steps_of(recorded_steps, 3)) == [
        "baseline_long", "eval_baseline_long", "mine_added_scratch", "baseline_long_added",
        "eval_baseline_long_added", "mine_oracle_nrm_added", "baseline_long_nrm_added",
        "eval_baseline_long_nrm_added", "exposure_baseline_long_added"]
    # the tables are --oracle-scratch ignore_key's and --mined-scratch added's, made by the same
    # steps
    recorded_steps.clear()
    reproduce.run_oracle_scratch(str(tmp_path), r, [3], ["ignore_key"])
    assert [n for _, n, _, _ in recorded_steps][0] == "mine_oracle_nrm_scratch"
    recorded_steps.clear()
    reproduce.run_mined_scratch(str(tmp_path), r, [3], ["added"])
    reproduce.run_oracle_scratch(str(tmp_path), r, [3], ["ignore_added"])
    names = [n for _, n, _, _ in recorded_steps]
    assert names[0] == "mine_added_scratch" and "mine_oracle_nrm_added" in names
    assert set(reproduce.LONG_RUNS) <= set(reproduce.HELDOUT_RUNS)
    # --suppression: only finished runs, each mined at its last checkpoint
    recorded_steps.clear()
    (tmp_path / "seed_3" / "state").mkdir(parents=True, exist_ok=True)
    for run in ("meld", "baseline_long"):
        (tmp_path / "seed_3" / "state" / f"{run}.json").write_text("{}")
    monkeypatch.setattr(train, "checkpoint_steps", lambda d: [10, 20] if d.endswith("meld")
                        else [30, 40])
    reproduce.run_suppression(str(tmp_path), r, [3])
    steps = _steps_of(recorded_steps, 3)
    assert list(steps) == ["suppression_meld", "suppression_baseline_long"]
    sup = os.path.join(str(tmp_path), "seed_3", "suppression", "baseline_long")
    mine, measure = steps["suppression_baseline_long"]
    assert mine[1:3] == ["-m", "uld_jax.mine"] and mine[mine.index("--step") + 1] == "40"
    assert mine[mine.index("--workdir") + 1].endswith("seed_3/runs/baseline_long")
    assert mine[mine.index("--store_dir") + 1] == f"{sup}/store"
    assert mine[mine.index("--out") + 1] == f"{sup}/mined.npz"          # not MELD's mined.npz
    assert mine[mine.index("--nrm_experts") + 1] == ""        # the baseline has no NRM expert
    assert measure[1:3] == ["-m", "uld_jax.mine.suppression"]
    assert measure[measure.index("--store") + 1] == f"baseline_long={sup}/store"
    assert measure[-1] == f"{sup}.json"
    assert steps["suppression_meld"][0][steps["suppression_meld"][0].index("--step") + 1] == "20"
    # page: the runs' checks and the suppression table and differences
    _eval_runs(tmp_path, ("baseline_long", "baseline_long_nrm_key"),
               {0: (0.2, 0.25), 1: (0.3, 0.2)})
    _eval_runs(tmp_path, ("baseline_long_added", "baseline_long_nrm_added"),
               {0: (0.22, 0.3), 1: (0.26, 0.25)})

    def sup_json(seed, run, found):     # found: key_marked, key_unmarked, other_marked, other_un.
        d = tmp_path / f"seed_{seed}" / "suppression"
        d.mkdir(parents=True, exist_ok=True)
        groups = {g: {"n": 10 + i, "found": [f], "found_mean": f, "median_score": 0.0}
                  for i, (g, f) in enumerate(zip(("key_marked", "key_unmarked", "other_marked",
                                                  "other_unmarked"), found))}
        (d / f"{run}.json").write_text(json.dumps({run: {"rates": [1.0], "groups": groups,
                                                         "checkpoint_step": 40}}))

    sup_json(0, "baseline_long", (0.6, 0.1, 0.5, 0.3))
    sup_json(0, "baseline_long_nrm_key", (0.6, 0.35, 0.5, 0.3))
    sup_json(1, "baseline_long", (0.5, 0.2, 0.4, 0.3))
    sup_json(1, "baseline_long_nrm_key", (0.5, 0.3, 0.4, 0.3))
    sup_json(1, "meld", (0.2, 0.1, 0.2, 0.1))
    sup_json(0, "baseline_long_added", (0.6, 0.3, 0.5, 0.1))
    sup_json(0, "baseline_long_nrm_added", (0.6, 0.3, 0.5, 0.25))
    sup_json(1, "baseline_long_added", (0.5, 0.2, 0.4, 0.2))
    sup_json(1, "baseline_long_nrm_added", (0.5, 0.2, 0.4, 0.3))
    text = reproduce.write_results(str(tmp_path), r, [0, 1], "", ["x"])
    fit = text[text.index("## A perfect NRM on a detector trained 4x as long"):]
    _has_lines(fit, "| perfect NRM on key slices > baseline (4x epochs) | released | +5.0, -10.0 | "
               "-2.5 ± 10.6 | no |",
               "| perfect NRM with added slices > added slices (4x epochs) | released | +8.0, "
               "-1.0 | +3.5 ± 6.4 | no |",
               "| added slices > baseline (4x epochs) | released | +2.0, -4.0 | -1.0 ± 4.2 | no |")
    sec = text[text.index("## Which lesions a run finds"):]
    sec = sec[:sec.index("\n## ")]
    _has_lines(sec, "at which it makes 1 detections per slice on no lesion",
               "| 0 | Baseline, 4x the recipe's epochs | 40 | 60.0 (10) | 10.0 (11) | 50.0 (12) | "
               "30.0 (13) |",
               "| 1 | MELD | 40 | 20.0 (10) | 10.0 (11) | 20.0 (12) | 10.0 (13) |",
               "| MELD: unmarked, key slices - other slices | +0.0 | +0.0 |",
               "| Baseline, 4x the recipe's epochs: unmarked, key slices - other slices | -20.0, "
               "-10.0 | -15.0 ± 7.1 |",
               "| Baseline, 4x the recipe's epochs, with the oracle's boxes as ignore regions on its "
               "key slices (a perfect NRM) - Baseline, 4x the recipe's epochs: key slices, unmarked "
               "| +25.0, +10.0 | +17.5 ± 10.6 |",
               "| Baseline, 4x the recipe's epochs, with the added unlabeled slices, nothing mined: "
               "unmarked, key slices - other slices | +20.0, +0.0 | +10.0 ± 14.1 |",
               "| Baseline, 4x the recipe's epochs, with the added unlabeled slices and the "
               "oracle's boxes as ignore regions on every slice (a perfect NRM) - Baseline, 4x the "
               "recipe's epochs, with the added unlabeled slices, nothing mined: other slices, "
               "unmarked | +15.0, +10.0 | +12.5 ± 3.5 |")
    # no seed has both MELD and the perfect NRM on its key slices: no difference row for them
    assert ("MELD trained with the oracle's boxes as ignore regions, key slices only (a perfect "
            "NRM, no added slice drawn) - MELD") not in sec
    # the baseline's exposure: its own table under MELD's section (no MELD exposure here)
    counts = {k: {"slices": 10, "slices_with_regions": 4, "ignore_regions": 5, "roi_positives": 12,
                  "roi_negatives": 40, "roi_negatives_in_region": 2, "roi_negatives_covering": 1,
                  "regions_covered": 1, "anchor_positives": 6, "anchor_negatives": 400,
                  "anchor_negatives_in_region": 3, "roi_negative_loss": 8.0,
                  "roi_negative_loss_in_region": 2.0, "anchor_negative_loss": 40.0,
                  "anchor_negative_loss_in_region": 0.5} for k in ("key", "added")}
    (tmp_path / "seed_1" / "runs" / "baseline_long").mkdir(parents=True)
    with open(tmp_path / "seed_1" / "runs" / "baseline_long" / "exposure.json", "w") as f:
        json.dump({"counts": counts, "overlay": f"{meld}/mined_oracle_nrm_scratch.npz",
                   "batches": 100}, f)
    (tmp_path / "seed_0" / "runs" / "baseline_long_added").mkdir(parents=True)
    with open(tmp_path / "seed_0" / "runs" / "baseline_long_added" / "exposure.json", "w") as f:
        json.dump({"counts": {**counts, "added": {**counts["added"], "roi_negatives_in_region": 8,
                                                  "roi_negative_loss_in_region": 4.0}},
                   "overlay": f"{meld}/mined_oracle_nrm_added.npz", "batches": 100}, f)
    text = reproduce.write_results(str(tmp_path), r, [0, 1], "", ["x"])
    exp_sec = text[text.index("## What a perfect NRM keeps out"):]
    exp_sec = exp_sec[:exp_sec.index("\n## ")]
    _has_lines(exp_sec, "`python -m uld_jax.mine.exposure --workdir runs/baseline_long --overlay "
               "mined_oracle_nrm_scratch.npz --batches 100`",
               "| 1 | key | 10 | 4 | 5 | 12 | 40 | 5.0 | 2.5 | 1 | 25.0 | 0.8 | 1.2 |")
    added_sec = exp_sec[exp_sec.index("(`baseline_long_added`)"):]
    _has_lines(added_sec, "`python -m uld_jax.mine.exposure --workdir runs/baseline_long_added "
               "--overlay mined_oracle_nrm_added.npz --batches 100`",
               "| 0 | key | 10 | 4 | 5 | 12 | 40 | 5.0 | 2.5 | 1 | 25.0 | 0.8 | 1.2 |",
               "| 0 | added | 10 | 4 | 5 | 12 | 40 | 20.0 | 2.5 | 1 | 50.0 | 0.8 | 1.2 |")
    assert not [ln for ln in added_sec.splitlines() if ln.startswith("| 1 |")]   # seed 0 only
    assert "MELD's last checkpoint" not in exp_sec
    # the held-out section lists them in their own subsection, not in the main table
    for s, lv in ((0, (0.2, 0.25)), (1, (0.3, 0.2))):
        for run, level in zip(("baseline_long", "baseline_long_nrm_key"), lv):
            _eval(tmp_path / f"seed_{s}", run, level, sub="eval_heldout")
    text = reproduce.write_results(str(tmp_path), r, [0, 1], "", ["x"])
    held = text[text.index("## Table 1 on a held-out"):]
    main_table = held[:held.index("### Ordering on the held-out world")]
    assert "Baseline, 4x" not in main_table
    _has_lines(held[held.index("### A perfect NRM on a detector trained 4x"):],
               "| perfect NRM on key slices > baseline (4x epochs) | paper | +5.0, -10.0 | "
               "-2.5 ± 10.6 | no |")


def test_epoch_mix_counts_the_finetunings_own_steps(tmp_path, monkeypatch):
    # under equal_passes the finetuning's steps per epoch are the recipe's scaled by the mixing
    # epoch's length; the samples it trains on (and the added slices expected among them) follow
    from uld_jax import input_pipeline as ip

    comp = {"deeplesion": {"positive": 10, "negative": 0, "added": 20, "added_pool": 50},
            "lits": {"positive": 10, "negative": 10, "added": 0, "added_pool": 0}}
    monkeypatch.setattr(ip, "epoch_composition", lambda config: comp)
    r = qs.RECIPES["equal"]
    q = qs.Quickstart(str(tmp_path / "seed_0"), r, seed=0)
    steps = {"finetune": 3 * r.steps_per_epoch + 1}
    monkeypatch.setattr(qs.Quickstart, "steps_per_epoch", lambda self, config: steps[config])
    info = reproduce.write_epoch_mix(q, "ft_both_added2", str(tmp_path / "mined.npz"), 2.0)
    # the reference: the steps, batch and epochs the finetuning's own command trains with
    cmd = q.finetune_cmd("ft_both_added2", str(tmp_path / "mined.npz"))
    flag = {a.split("=")[0]: a.split("=", 1)[1] for a in cmd if a.startswith("--config.")}
    trained = (int(flag["--config.steps_per_epoch"]) * int(flag["--config.batch_size"])
               * int(flag["--config.num_epochs"]))
    assert trained != r.steps_per_epoch * r.batch_size * (r.epochs - r.mine_epoch)
    assert info["training_samples"] == trained and info["epoch_length"] == 50
    assert info["expected_added_trained"] == round(trained * 20 / 50, 1)
    on_disk = json.loads((tmp_path / "seed_0" / "runs" / "ft_both_added2" / "epoch_mix.json").read_text())
    assert on_disk == info
