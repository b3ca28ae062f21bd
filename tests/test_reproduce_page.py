"""The quick start's Table 1 and docs/results.md are written from the evaluation reports (fast)."""

import json
import os
import shlex

import pytest

from uld_jax import quickstart as qs
from uld_jax import reproduce
from uld_jax.quickstart_table import table1

RATES = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def _write_eval(root, run, level):
    d = root / "eval" / run
    d.mkdir(parents=True)
    tables = {rule: {"title": rule, "fp_rates": RATES, "sensitivity": [level + k * 0.01 for k in range(7)],
                     "mean": level + 0.03, "extra": {}} for rule in ("released", "paper")}
    (d / "results.json").write_text(json.dumps({"protocol": "volumetric", "fp_unit": "sub-volume",
                                                "tables": tables, "strata": {},
                                                "info": {"counts": {"volumes": 3, "truths": 7,
                                                                    "detections": 40 + len(run)}}}))


def _fake_seed(root, levels):
    for run, lv in zip(qs.RUNS, levels):
        _write_eval(root, run, lv)
    st = root / "state"
    st.mkdir()
    (st / "world.json").write_text(json.dumps({"wall_s": 12.5}))


def test_table1_reads_the_reports(tmp_path):
    _fake_seed(tmp_path, [0.1, 0.2, 0.3, 0.25, 0.4])
    md, js = table1(str(tmp_path), qs.RUNS, qs.ROW_NAMES, {"name": "x", "step_wall_s": {"world": 12.5}})
    assert abs(js["rules"]["released"]["ft_both"]["mean"] - 0.43) < 1e-9
    assert "| MELD + MAM + NRM | 40.0 | 41.0 |" in md and "**43.0**" in md
    assert "volumes 3, truths 7" in md and "world 12.5" in md


def test_results_page_mean_spread_and_ordering(tmp_path):
    _fake_seed(tmp_path / "seed_0", [0.1, 0.2, 0.3, 0.25, 0.4])
    _fake_seed(tmp_path / "seed_1", [0.1, 0.3, 0.2, 0.35, 0.5])
    page = tmp_path / "results.md"
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], str(page), ["--x"])
    assert page.read_text(encoding="utf-8") == text
    # MELD: 23 and 33 -> 28.0 ± 7.1
    assert "| MELD | " in text and "**28.0 ± 7.1**" in text
    # MELD > baseline in both seeds (+10, +20): holds; MAM > MELD (+10, -10): does not
    assert "| MELD > baseline | released | +10.0, +20.0 | +15.0 ± 7.1 | yes |" in text
    assert "| MAM > MELD | released | +10.0, -10.0 |" in text and text.count("| no |") >= 1
    assert "not run" in text  # mining reports absent
    # the split's counts, not one run's detection count standing for every run's
    assert "Test split: volumes 3, truths 7." in text and "truths 7, detections" not in text
    assert os.path.basename(str(page)) == "results.md"


def test_learning_check_section_reads_the_fit_and_test_key_slice_reports(tmp_path):
    _fake_seed(tmp_path / "seed_0", [0.1, 0.2, 0.3, 0.25, 0.4])
    for sub, run, mean in (("eval_keyslice_train", "baseline", 0.61), ("eval_keyslice", "baseline", 0.12),
                           ("eval_keyslice", "meld", 0.2)):
        d = tmp_path / "seed_0" / sub / run
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"protocol": "keyslice", "tables": {
            "key slices": {"fp_rates": [0.5, 1, 2, 4], "sensitivity": [mean] * 4, "mean": mean}}}))
    argv = ["--seeds", "0", "--note", "runs in /tmp/a b; seed 0's MELD"]
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0], "", argv)
    # the recorded command is quoted for a shell: pasted back, it gives the same arguments
    cmd = next(ln for ln in text.splitlines() if ln.startswith("- command: `"))[len("- command: `"):-1]
    assert shlex.split(cmd) == ["python", "-m", "uld_jax.reproduce", *argv]
    assert "## Learning check" in text
    assert "| 0 | Baseline (DeepLesion only, MULAN-like) | not logged | 61.0 | 12.0 |" in text
    assert "| 0 | MELD | not logged | not run | 20.0 |" in text
    assert "do not fit" not in text                 # MELD's fit was not measured: no verdict
    # nothing at all for a seed without any of the three: no section
    empty = reproduce.write_results(str(tmp_path / "none"), qs.RECIPES["smoke"], [0], "", ["x"])
    assert "## Learning check" not in empty


def test_page_figures_are_written_beside_the_page(tmp_path):
    from PIL import Image

    for s, lv in ((0, 0.1), (1, 0.2)):
        _fake_seed(tmp_path / f"seed_{s}", [lv, lv + 0.1, lv + 0.2, lv + 0.15, lv + 0.3])
    src = tmp_path / "seed_0" / "runs" / "meld"
    src.mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(src / "mining_report.png")
    page = tmp_path / "docs" / "results.md"
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0, 1], str(page), ["x"])
    assert "![Table 1 FROC curves](figures/table1_froc.png)" in text
    assert "(figures/mining_quality_seed0.png)" in text
    with Image.open(page.parent / "figures" / "table1_froc.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    with Image.open(page.parent / "figures" / "mining_quality_seed0.png") as im:
        assert im.size == (40, 20)
    assert not [f for f in os.listdir(page.parent / "figures") if ".tmp" in f]
    # a second page beside it (another recipe's runs) writes its own figures, leaving these alone
    before = (page.parent / "figures" / "table1_froc.png").read_bytes()
    other = page.parent / "results_long.md"
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["long"], [0], str(other), ["x"])
    assert "(figures/results_long_table1_froc.png)" in text
    assert "(figures/results_long_mining_quality_seed0.png)" in text
    assert "recipe `long` trains the `tiny` model for 32 epochs" in text
    assert (page.parent / "figures" / "results_long_table1_froc.png").is_file()
    assert (page.parent / "figures" / "table1_froc.png").read_bytes() == before


def test_learning_check_verdict_from_the_fit(tmp_path):
    _fake_seed(tmp_path / "seed_0", [0.1, 0.2, 0.3, 0.25, 0.4])
    for run, mean in (("baseline", 0.06), ("meld", 0.08)):
        d = tmp_path / "seed_0" / "eval_keyslice_train" / run
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"protocol": "keyslice", "tables": {
            "key slices": {"fp_rates": [0.5, 1, 2, 4], "sensitivity": [mean] * 4, "mean": mean}}}))
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0], "", ["x"])
    assert "key-slice FROC mean of 6.0% (Baseline" in text and "8.0% (MELD)" in text
    assert "they do not fit the lesions they were trained on" in text
    # one fits, the other does not: the verdict names each
    (tmp_path / "seed_0" / "eval_keyslice_train" / "baseline" / "results.json").write_text(json.dumps(
        {"protocol": "keyslice", "tables": {"key slices": {
            "fp_rates": [0.5, 1, 2, 4], "sensitivity": [0.6] * 4, "mean": 0.6}}}))
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0], "", ["x"])
    assert ("Baseline (DeepLesion only, MULAN-like) fits its training lesions (50% or more), MELD "
            "does not") in text


def test_page_shows_mams_inputs_from_the_mining_reports(tmp_path):
    _fake_seed(tmp_path / "seed_0", [0.1, 0.2, 0.3, 0.25, 0.4])
    meld = tmp_path / "seed_0" / "runs" / "meld"
    meld.mkdir(parents=True)
    q = {k: 0 for k in ("n_mined", "n_mined_on_unmarked", "n_unmarked_visible", "n_suspicious")}
    q.update(precision=0.2, recall_unmarked=0.1, suspicious_true_fraction=None)
    (meld / "mining_report.json").write_text(json.dumps({
        "quality": q, "counts": {"unlabeled_slices": 3}, "provenance": {"theta": 0.15},
        "inputs_check": {"n_universal": 100, "n_on_lesion": 14, "n_on_annotated_lesion": 9,
                         "p_own_closer_than_background": 0.51,
                         "by_score": [{"score": 0.1, "n": 80, "on_lesion_fraction": 0.125},
                                      {"score": 0.5, "n": 10, "on_lesion_fraction": 0.1}]}}))
    text = reproduce.write_results(str(tmp_path), qs.RECIPES["smoke"], [0], "", ["x"])
    assert "### MAM's inputs against the truth" in text
    assert "| 0 | 100 | 14 | 12.5 (80) | n/a | 10.0 (10) | n/a | 9 | 0.51 |" in text


def test_passes_over_deeplesion_from_the_epoch_composition(tmp_path, monkeypatch):
    from uld_jax import input_pipeline as ip

    def composition(cfg, tables=None):
        sizes = {"deeplesion": {"positive": 100, "negative": 0, "added": 0, "added_pool": 9}}
        if len(cfg.datasets) > 1:
            sizes["luna16"] = {"positive": 150, "negative": 150, "added": 0, "added_pool": 0}
        return sizes

    monkeypatch.setattr(ip, "epoch_composition", composition)
    # smoke: 2 epochs x 2 steps x batch 2 = 8 samples; baseline all DeepLesion -> 0.08 passes,
    # MELD a quarter of them -> 0.02
    q = qs.Quickstart(str(tmp_path / "seed_0"), qs.RECIPES["smoke"], quiet=True)
    p = reproduce.dl_passes(q)
    assert p["baseline"] == pytest.approx(0.08) and p["meld"] == pytest.approx(0.02)
    (line, _) = reproduce._passes_lines(str(tmp_path), [0], qs.RECIPES["smoke"])
    assert "baseline 0.1, MELD 0.0: MELD sees DeepLesion less often" in line
