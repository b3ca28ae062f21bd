"""The quick start's recipes: their config overrides exist, apply, and build a model."""

import ast
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uld_jax import quickstart as qs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name: str, args):
    """``configs/<name>.py:tiny`` locked, with ``--config.KEY=VALUE`` overrides applied the way the
    training CLI's config flag does (an unknown key or a wrong type raises)."""
    c = importlib.import_module(f"configs.{name}").get_config("tiny")
    c.lock()
    for a in args:
        assert a.startswith("--config."), a
        key, val = a[len("--config."):].split("=", 1)
        *path, leaf = key.split(".")
        node = c
        for k in path:
            node = node[k]
        node[leaf] = ast.literal_eval(val)
    return c


@pytest.mark.parametrize("recipe", sorted(qs.RECIPES))
@pytest.mark.parametrize("name", ["baseline", "meld", "finetune"])
def test_recipe_overrides_exist_and_change_every_training_config(recipe, name):
    """Every override names an existing key of a value type the locked config accepts (else
    ``_config`` raises) and changes the config's default (an override equal to it is dead)."""
    r = qs.RECIPES[recipe]
    default = importlib.import_module(f"configs.{name}").get_config("tiny")
    c = _config(name, r.train_args)
    for a in r.train_args:
        key = a[len("--config."):].split("=", 1)[0]
        got, base = c, default
        for k in key.split("."):
            got, base = got[k], base[k]
        assert tuple(np.atleast_1d(got)) != tuple(np.atleast_1d(base)), (recipe, name, key)


def test_quick_recipe_model_builds_and_keeps_anchors_in_mm():
    r = qs.RECIPES["quick"]
    assert r.mine_epoch < r.epochs and r.epochs - r.mine_epoch >= 1
    c = _config("meld", r.train_args)
    # The paper's anchors at its 0.8 mm pixels, rescaled to the recipe's pixels, within 25%.
    paper_mm = np.array([16, 24, 32, 48, 96]) * 0.8
    quick_mm = np.array(c.model.anchors.sizes) * r.pixel_mm
    assert np.all(np.abs(quick_mm / paper_mm - 1) <= 0.25)

    from uld_jax.models.meld import MELD

    size = int(c.data.image_size[0])
    model = MELD(c.model)
    images = jnp.zeros((1, size, size, 9), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0, impl="rbg")}, images,
                                               method=MELD.init_all))
    # the widened DenseNet: 3 / 4 / 6 layers of growth 16 after a 32-channel stem
    bb = shapes["params"]["backbone"]
    n_layers = sum(1 for k in jax.tree_util.tree_flatten_with_path(bb)[0]
                   if "conv2" in jax.tree_util.keystr(k[0]) and "kernel" in jax.tree_util.keystr(k[0]))
    assert n_layers == 3 + 4 + 6, jax.tree_util.tree_structure(bb)


def test_equal_passes_scales_the_multi_dataset_runs(tmp_path, monkeypatch):
    """With ``equal_passes``, MELD-type runs take (MELD's mixing epoch / the baseline's epoch) x the
    recipe's steps per epoch; the baseline keeps the recipe's."""
    from uld_jax import input_pipeline as ip

    def composition(cfg, tables=None):
        sizes = {"deeplesion": {"positive": 95, "negative": 0, "added": 0, "added_pool": 7}}
        if len(cfg.datasets) > 1:              # MELD's four datasets: 543 samples per epoch
            sizes.update(luna16={"positive": 26, "negative": 26, "added": 0, "added_pool": 0},
                         lits={"positive": 76, "negative": 76, "added": 0, "added_pool": 0},
                         nihln={"positive": 122, "negative": 122, "added": 0, "added_pool": 0})
        return sizes

    monkeypatch.setattr(ip, "epoch_composition", composition)
    r = qs.RECIPES["equal"]
    q = qs.Quickstart(str(tmp_path), r, quiet=True)

    def steps(cmd):
        (a,) = [x for x in cmd if x.startswith("--config.steps_per_epoch=")]
        return int(a.split("=")[1])

    assert steps(q.scratch_cmd("baseline", "baseline")) == 60
    assert steps(q.scratch_cmd("meld", "meld")) == round(60 * 543 / 95) == 343
    assert steps(q.finetune_cmd("ft_mam", "x.npz")) == 343
    # the quick recipe: every run 60 steps an epoch
    q = qs.Quickstart(str(tmp_path / "q"), qs.RECIPES["quick"], quiet=True)
    assert steps(q.scratch_cmd("meld", "meld")) == 60


def _step_sees(tmp_path, name: str) -> str:
    """What a quick-start step's subprocess finds in JAX_COMPILATION_CACHE_DIR ('' when unset)."""
    q = qs.Quickstart(str(tmp_path / "qs"), qs.RECIPES["smoke"], quiet=True)
    seen = tmp_path / f"{name}.txt"
    code = (f"import os; open({str(seen)!r}, 'w').write(os.environ.get({qs.CACHE_ENV!r}, ''))")
    q.step(name, [[sys.executable, "-c", code]])
    return seen.read_text()


def test_compile_cache_reaches_the_steps(tmp_path, monkeypatch):
    monkeypatch.delenv(qs.CACHE_ENV, raising=False)
    out = str(tmp_path / "qs")
    # default: OUT/jax_cache, created, and inherited by every step's process
    path = qs.use_compile_cache(out)
    assert path == os.path.join(out, "jax_cache") and os.path.isdir(path)
    assert _step_sees(tmp_path, "a") == path
    # a cache the user set in the environment is kept
    mine = str(tmp_path / "shared_cache")
    monkeypatch.setenv(qs.CACHE_ENV, mine)
    assert qs.use_compile_cache(out) == mine and _step_sees(tmp_path, "b") == mine
    # an explicit folder wins over the environment; relative paths are made absolute
    monkeypatch.chdir(tmp_path)
    assert qs.use_compile_cache(out, "rel_cache") == str(tmp_path / "rel_cache")
    assert _step_sees(tmp_path, "c") == str(tmp_path / "rel_cache")
    # 'off': the steps see no cache at all
    assert qs.use_compile_cache(out, "off") is None
    assert _step_sees(tmp_path, "d") == ""


def test_compile_cache_flag_in_both_drivers(capsys):
    from uld_jax import reproduce
    with pytest.raises(SystemExit) as e:
        qs.main(["--help"])
    assert e.value.code == 0 and "--compile-cache DIR" in capsys.readouterr().out
    # both command lines take the flag ('--config-table' prints and returns before any run)
    assert reproduce.main(["--compile-cache", "off", "--config-table"]) == 0
    assert "| key |" in capsys.readouterr().out
