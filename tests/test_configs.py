"""Experiment configs: variants, the paper's constants, locked keys through the CLI."""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from uld_jax import core, train

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("baseline", "meld", "finetune")


def _get(name: str, arg: str):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["tiny", "paper"])
def test_every_config_builds_with_the_same_keys(name, arg):
    c = _get(name, arg)
    ref = _get("meld", "tiny")
    assert set(_flat(c.to_dict())) == set(_flat(ref.to_dict())), "configs must share one key set"
    assert c.variant == arg


@pytest.mark.parametrize("name", ("baseline", "meld"))
def test_paper_variant_has_the_papers_constants(name):
    c = _get(name, "paper")
    assert c.optimizer.name == "radam" and c.optimizer.lr == 1e-4
    assert tuple(c.optimizer.decay_epochs) == (4, 6) and c.optimizer.decay_factor == 0.1
    assert c.num_epochs == 8 and c.batch_size == 4
    assert tuple(c.model.backbone.block_layers) == (6, 12, 24) and c.model.backbone.growth_rate == 32
    assert tuple(c.data.image_size) == (512, 512) and c.model.image_size == 512
    assert c.model.roi.box_loss_weight == 10.0 and c.data.pixel_mm == core.TARGET_PIXEL_MM
    assert tuple(c.model.anchors.sizes) == (16, 24, 32, 48, 96)
    sched = train.make_lr_schedule(c.optimizer, steps_per_epoch=100)
    assert [float(sched(s)) for s in (399, 400, 599, 600)] == pytest.approx([1e-4, 1e-5, 1e-5, 1e-6])


def test_baseline_is_mulan_like_and_meld_has_four_experts_and_the_gate():
    b, m = _get("baseline", "paper"), _get("meld", "paper")
    assert b.model.num_datasets == 1 and tuple(b.data.datasets) == ("deeplesion",)
    assert b.model.num_organ_heads == 1 and not b.model.use_gate
    assert m.model.num_datasets == 4 and tuple(m.data.datasets) == core.DATASETS
    assert m.model.num_organ_heads == len(core.ORGAN_HEADS) and m.model.use_gate


def test_finetune_recipe():
    f = _get("finetune", "paper")
    assert f.init_from.epoch == 4 and f.num_epochs == 4
    assert f.data.added_ratio == 0.5 and f.mine.theta == 0.15 and f.mine.sigma == 0.5
    sched = train.make_lr_schedule(f.optimizer, steps_per_epoch=10)
    assert [float(sched(s)) for s in (0, 19, 20, 39)] == pytest.approx([1e-5, 1e-5, 1e-6, 1e-6])


def test_finetune_without_source_checkpoint_is_a_clear_error(tmp_path):
    c = _get("finetune", "tiny")
    with pytest.raises(ValueError, match="init_from.workdir"):
        train.train_and_evaluate(c, str(tmp_path), task=object(), data=object())


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        _get("meld", "huge")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "uld_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag,expect", [
    ("--config.optimizer.lrr=0.1", ["'config.optimizer.lrr'", 'Did you mean "lr"']),
    ("--config.optimizr.lr=0.1", ["'config.optimizr.lr'", 'Did you mean "optimizer"']),
    ("--config.no_such_key=1", ["'config.no_such_key'"]),
    ("--config.optimizer.lr=fast", ["--config.optimizer.lr=fast", "could not convert"]),
])
def test_cli_bad_override_is_a_one_line_error_naming_the_key(tmp_path, flag, expect):
    r = _run_cli("--config", "configs/meld.py:tiny", f"--workdir={tmp_path}", flag)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for e in expect:
        assert e in lines[0], lines[0]
    assert not (tmp_path / "checkpoints").exists()


def test_cli_unknown_variant_is_a_one_line_error(tmp_path):
    r = _run_cli("--config", "configs/baseline.py:huge", f"--workdir={tmp_path}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config variant 'huge'" in lines[0], r.stderr


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_cli_config_that_cannot_run_is_a_one_line_error(tmp_path):
    # 8 forced host devices (conftest) cannot share a global batch of 6.
    r = _run_cli("--config", "configs/meld.py:tiny", f"--workdir={tmp_path}",
                 "--config.task.name=toy", "--config.data.name=toy", "--config.batch_size=6")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "batch_size=6" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
