"""``--precise-bn``: BatchNorm statistics recomputed from a run's training batches
(``uld_jax.evaluate.precise_bn``), against numpy statistics of the first BatchNorm's input and
against the statistics the run's own layers store after one training step."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detect_helpers
from uld_jax import core, inference, input_pipeline as ip
from uld_jax.evaluate import __main__ as ev_main
from uld_jax.evaluate import precise_bn
from uld_jax.evaluate.boxes import EvaluationInputError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return detect_helpers.shared_workdir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """DeepLesion cases in the train and test splits (lesions on some slices)."""
    out = tmp_path_factory.mktemp("built_precise_bn")
    detect_helpers.build_deeplesion(str(out), ["train"] * 3 + ["test"] * 2)
    return str(out)


@pytest.fixture(scope="module")
def loaded(workdir):
    return inference.load_model(workdir)


def _batches(loaded, data, n):
    """The first ``n`` training batches precise_bn draws (its own config of the pipeline)."""
    it = iter(ip.make_dataset(precise_bn._training_input(loaded, data, ["deeplesion"]),
                              process_index=0, process_count=1))
    return [next(it)[core.Keys.IMAGE] for _ in range(n)]


def _train_forward(loaded):
    """The run's own model (its momentum) in one jitted training-mode backbone pass:
    ``image -> (updated statistics, conv0's output)`` (conv0 feeds the first BatchNorm, norm0)."""

    @jax.jit
    def forward(variables, x):
        _, upd = loaded.model.apply(variables, x, mutable=["batch_stats", "intermediates"],
                                    method=lambda m, y: m.backbone(y, train=True),
                                    capture_intermediates=lambda mdl, name: mdl.name == "conv0")
        return upd

    return lambda image: forward(loaded.variables, jnp.asarray(image))


def _conv0_out(upd):
    found = []

    def walk(d):
        for k, v in d.items():
            if k == "conv0":
                found.append(np.asarray(v["__call__"][0], np.float64))
            elif isinstance(v, dict):
                walk(v)

    walk(upd["intermediates"])
    assert len(found) == 1
    return found[0]


def _norm0(stats):
    return stats["backbone"]["backbone"]["norm0"]


def test_statistics_against_numpy_and_the_models_own_update(loaded, built):
    """Over 3 training batches:

    * norm0 (the first BatchNorm): the mean over the batches of numpy's per-channel mean and
      (biased) variance of conv0's output, every image and pixel of a batch;
    * every BatchNorm layer: with momentum m the model stores m * old + (1 - m) * batch after a
      training step; the batch statistics solved from that, averaged over the batches (the
      function itself runs the layers with momentum 0 instead).
    """
    m = float(loaded.model_config.backbone.bn_momentum)
    assert 0 < m < 1
    old = loaded.variables["batch_stats"]
    means, variances, per_batch = [], [], []
    forward = _train_forward(loaded)
    for im in _batches(loaded, built, 3):
        upd = forward(im)
        x = _conv0_out(upd)
        means.append(x.mean(axis=(0, 1, 2)))
        variances.append(x.var(axis=(0, 1, 2)))
        per_batch.append(jax.tree.map(lambda n, o: (np.asarray(n, np.float64) - m * np.asarray(o)) / (1 - m),
                                      upd["batch_stats"], old))
    got = precise_bn.precise_batch_stats(loaded, 3, data_dir=built, datasets=["deeplesion"])

    np.testing.assert_allclose(np.asarray(_norm0(got)["mean"]), np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_norm0(got)["var"]), np.mean(variances, axis=0), rtol=1e-3, atol=1e-5)
    assert not np.allclose(np.asarray(_norm0(got)["mean"]), np.asarray(_norm0(old)["mean"]))

    want = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *per_batch)
    flat_w = jax.tree_util.tree_flatten_with_path(want)[0]
    flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    assert len(flat_w) == len(flat_g) > 10
    for path, w in flat_w:
        np.testing.assert_allclose(np.asarray(flat_g[path]), w, rtol=2e-3, atol=2e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_with_precise_bn_leaves_the_loaded_model_alone(loaded, built):
    before = jax.tree.map(np.asarray, loaded.variables["batch_stats"])
    new = precise_bn.with_precise_bn(loaded, 1, data_dir=built, datasets=["deeplesion"])
    assert "BatchNorm statistics of 1 training batches of deeplesion (the stored averages differ " \
        "from them by: mean " in new.source
    assert new.variables["params"] is loaded.variables["params"]
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, loaded.variables["batch_stats"]))


def test_loaded_data_config_is_the_pipeline_the_trainer_ran(loaded, built, workdir):
    """The trainer runs the pipeline with the experiment's batch_size and seed, and the stored data
    section keeps those keys' defaults: the loaded data config takes the experiment's values, and
    the recomputation draws batches of that size."""
    from uld_jax import train

    d = inference.configs_from_saved({"model": {}, "data": {"global_batch_size": 2, "seed": 0},
                                      "batch_size": 6, "seed": 3})[1]
    assert (d.global_batch_size, d.seed) == (6, 3)
    assert inference.configs_from_saved({"model": {}, "data": {"seed": 4}})[1].seed == 4
    saved = train.load_checkpoint_config(workdir)
    assert saved["batch_size"] != saved["data"]["global_batch_size"]
    assert loaded.data_config.global_batch_size == saved["batch_size"]
    assert _batches(loaded, built, 1)[0].shape[0] == saved["batch_size"]


def test_stored_vs_recomputed_by_hand():
    stored = {"a": {"mean": np.array([1.0, 2.0]), "var": np.array([1.0, 1.0]), "scale": np.ones(2)},
              "b": {"mean": np.array([0.0, 4.0]), "var": np.array([2.0, 2.0])}}
    recomputed = {"a": {"mean": np.array([1.0, 1.0]), "var": np.array([1.0, 1.0]), "scale": np.zeros(2)},
                  "b": {"mean": np.array([0.0, 2.0]), "var": np.array([1.0, 1.0])}}
    # a: mean |diff| 0.5 / mean |new| 1.0; b: 1.0 / 1.0; variances 0 and 1; 'scale' is no statistic
    assert precise_bn.stored_vs_recomputed(stored, recomputed) == {"mean": (0.75, 1.0),
                                                                   "var": (0.5, 1.0)}


def test_refusals_name_the_problem(loaded, built, tmp_path):
    with pytest.raises(EvaluationInputError, match=">= 1"):
        precise_bn.precise_batch_stats(loaded, 0, data_dir=built)
    with pytest.raises(EvaluationInputError, match=r"\['luna'\] not among the run's datasets"):
        precise_bn.precise_batch_stats(loaded, 1, data_dir=built, datasets=["luna"])
    frozen = inference.LoadedModel(loaded.model, loaded.variables, loaded.model_config.copy_and_resolve_references(),
                                   loaded.data_config, loaded.step, "RUN/checkpoints/7")
    frozen.model_config.backbone.bn_mode = "frozen"
    with pytest.raises(EvaluationInputError, match="RUN/checkpoints/7: backbone.bn_mode is 'frozen'"):
        precise_bn.precise_batch_stats(frozen, 1, data_dir=built)
    # the training data must hold the run's training split: a test-only world is refused
    test_only = tmp_path / "test_only"
    detect_helpers.build_deeplesion(str(test_only), ["test"])
    with pytest.raises(EvaluationInputError, match=f"cannot read the run's training data in {test_only}"):
        precise_bn.precise_batch_stats(loaded, 1, data_dir=str(test_only), datasets=["deeplesion"])
    # without a folder, the one the run's config records; none recorded here
    assert not loaded.data_config.get("data_dir")
    with pytest.raises(EvaluationInputError, match="records no training data folder; give --precise-bn-data"):
        precise_bn.precise_batch_stats(loaded, 1)


def test_cli(workdir, built, tmp_path, capsys):
    """Key-slice evaluation of the test split with recomputed statistics: the report names them;
    misuse exits with status 2 and says why."""
    out = tmp_path / "precise"
    rc = ev_main.main(["--workdir", workdir, "--data", built, "--split", "test", "--datasets",
                       "deeplesion", "--out", str(out), "--no-plot", "--precise-bn", "2",
                       "--precise-bn-datasets", "deeplesion", "--precise-bn-data", built])
    assert rc == 0, capsys.readouterr().err
    info = json.loads((out / "results.json").read_text())["info"]
    assert "BatchNorm statistics of 2 training batches of deeplesion" in json.dumps(info)

    rc = ev_main.main(["--pred", "p.pkl", "--truth", "t.pkl", "--precise-bn", "4"])
    assert rc == 2 and "--precise-bn needs --workdir" in capsys.readouterr().err
    rc = ev_main.main(["--workdir", workdir, "--data", built, "--precise-bn-datasets", "deeplesion"])
    assert rc == 2 and "--precise-bn-datasets needs --precise-bn N" in capsys.readouterr().err
    rc = ev_main.main(["--workdir", workdir, "--data", built, "--precise-bn-data", built])
    assert rc == 2 and "--precise-bn-data needs --precise-bn N" in capsys.readouterr().err
    rc = ev_main.main(["--workdir", workdir, "--data", built, "--split", "test", "--datasets",
                       "deeplesion", "--precise-bn", "1", "--precise-bn-datasets", "kits",
                       "--precise-bn-data", built])
    assert rc == 2 and "['kits'] not among the run's datasets" in capsys.readouterr().err
