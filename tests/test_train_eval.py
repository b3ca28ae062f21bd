"""Detection metrics during training (``uld_jax/evaluate/periodic.py``, MELD's ``Task.extra_eval``).

The fast test trains the real MELD parameters with a cheap surrogate loss (an L2 pull on the
parameters: MELD's own train step takes minutes to compile on 2 CPU cores, see
``test_train_meld.py``), so that the loop, the hook that ``tasks.build_task`` attaches, the
TensorBoard tags, the compile-once property and the agreement with ``python -m uld_jax.evaluate
--workdir`` are checked in well under a minute. The slow test runs MELD's real loss.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import baseline, meld
from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import core, slice_data, tasks, train
from uld_jax.evaluate import __main__ as ev_main
from uld_jax.evaluate import from_workdir, periodic

RATE_TAGS = ("sens@0.5fp", "sens@1fp", "sens@2fp", "sens@4fp", "froc_mean")


def _cases(dataset: str, split: str, first: int, n: int):
    """Cases of 48 x 40 px (0.8 mm) with large lesions (so that even an untrained detector's top
    boxes hit some: the FROC numbers are not all 0) on two key slices, and one lesion-free sample
    slice each (not evaluated: key slices only)."""
    out = []
    for k in range(first, first + n):
        y, x = 6 + k % 5, 4 + (2 * k) % 7
        boxes = [[y, x, y + 26, x + 24], [y + 4, x + 2, y + 24, x + 20]]
        out.append(cf.make_case(dataset, k, num_slices=8, height=48, width=40, split=split,
                                lesion_slices=(2, 5), boxes=boxes, negatives=(7,)))
    return out


def _build(root, datasets=("deeplesion",), n_val: int = 3) -> str:
    data = os.path.join(str(root), "data")
    for name in datasets:
        cases = _cases(name, "train", 0, 2) + _cases(name, "val", 50, n_val)
        build_lib.build("/raw", data, [name], reader_lookup=lambda n, c=cases: cf.ListReader(c),
                        chunk_slices=64, progress=False)
    return data


def _config(cfg, data_dir: str, total_steps: int = 4):
    cfg.data.data_dir = data_dir
    cfg.data.image_size = (64, 64)
    cfg.data.pixel_mm = 1.6
    cfg.model.image_size = 64
    cfg.batch_size = 8                   # the tests' 8 forced host devices
    cfg.total_steps = total_steps
    cfg.steps_per_epoch = total_steps    # the 2 train cases give less than one batch per epoch
    cfg.log_every_steps = 2
    cfg.eval_every_steps = 2
    cfg.checkpoint.every_steps = total_steps
    cfg.mesh.data = 1                    # one device: the state of 8 costs compile and save time
    cfg.checkpoint.async_save = False
    cfg.detection_eval.max_samples = -1  # the whole val split: comparable with the CLI
    cfg.detection_eval.batch_size = 4
    return cfg


def _surrogate_task(cfg) -> tuple[train.Task, periodic.DetectionEvaluator]:
    """MELD's task from ``tasks.build_task`` (init and the detection hook as training uses them),
    with the loss replaced by a cheap one that still moves every parameter."""
    task = tasks.build_task(cfg)
    assert isinstance(task.extra_eval, periodic.DetectionEvaluator)

    def loss_fn(params, other, batch, rng, is_train):
        del batch, rng, is_train
        sq = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
        return 1e-4 * sq, (other, {"loss/l2": sq})

    cfg.optimizer.name = "sgd"           # compiles faster than RAdam over MELD's 300 arrays
    return dataclasses.replace(task, loss_fn=loss_fn, eval_fn=None), task.extra_eval


def _tb_scalars(workdir: str) -> dict[str, dict[int, float]]:
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["tensors"]:
        for ev in acc.Tensors(tag):
            v = tensor_util.make_ndarray(ev.tensor_proto)
            if v.ndim == 0 and v.dtype.kind == "f":
                out.setdefault(tag, {})[int(ev.step)] = float(v)
    return out


def test_training_logs_keyslice_froc_equal_to_the_cli(tmp_path):
    data = _build(tmp_path)
    cfg = _config(baseline.get_config("tiny"), data)
    task, evaluator = _surrogate_task(cfg)
    run = str(tmp_path / "run")
    out = train.train_and_evaluate(cfg, run, task=task, data=tasks.build_data(cfg))
    assert out["step"] == 4

    # TensorBoard: the detection tags at both evaluations, finite, in [0, 1].
    tb = _tb_scalars(run)
    for name in RATE_TAGS:
        tag = f"val/deeplesion/{name}"
        assert tag in tb, f"missing {tag}; have {sorted(t for t in tb if t.startswith('val/'))}"
        assert sorted(tb[tag]) == [2, 4], tb[tag]
        assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in tb[tag].values()), tb[tag]
    vals = [tb[f"val/deeplesion/{n}"][4] for n in RATE_TAGS[:4]]
    np.testing.assert_allclose(tb["val/deeplesion/froc_mean"][4], np.mean(vals), rtol=1e-6)
    last = out["eval"]
    for name in RATE_TAGS:
        np.testing.assert_allclose(tb[f"val/deeplesion/{name}"][4], last[f"deeplesion/{name}"],
                                   rtol=1e-6)   # TensorBoard stores float32

    # Compiled once: one Predictor, traced and compiled once across the two evaluations.
    assert list(evaluator._predictors) == ["deeplesion"]
    pred = evaluator._predictors["deeplesion"]
    assert pred.num_traces == 1 and pred._fn._cache_size() == 1
    assert evaluator.loaded.variables is None            # no reference to the donated state kept

    # The CLI on the step-4 checkpoint (restored from disk, its own predictor) gives the same numbers.
    ev_dir = tmp_path / "ev"
    rc = ev_main.main(["--checkpoint", os.path.join(run, "checkpoints", "4"), "--data", data,
                       "--split", "val", "--protocol", "keyslice", "--batch-size", "4",
                       "--out", str(ev_dir), "--no-plot"])
    assert rc == 0
    res = json.load(open(ev_dir / "results.json", encoding="utf-8"))
    t = res["tables"]["keyslice"]
    cli = dict(zip(t["fp_rates"], t["sensitivity"]))
    for r, name in zip((0.5, 1.0, 2.0, 4.0), RATE_TAGS):
        assert last[f"deeplesion/{name}"] == cli[r], (name, last, cli)
    assert last["deeplesion/froc_mean"] == pytest.approx(t["extra"]["mean_first4"], rel=1e-12, abs=0)
    # the same images, lesions and detections; and a test that could fail: some lesions are hit
    reps = evaluator.reports(4, _restored_variables(run, 4))
    assert res["info"]["counts"] == reps[0].info["counts"]
    assert res["info"]["counts"]["images"] == 3 * 2 and res["info"]["counts"]["truths"] == 3 * 2
    assert max(cli.values()) > 0, cli
    assert pred.num_traces == 1 and pred._fn._cache_size() == 1


def _restored_variables(run: str, step: int) -> dict:
    _, state = train.load_checkpoint_state(run, step)
    return {"params": state["params"], **state["other"]}


def test_keyslice_split_caps_evenly_and_keeps_the_lesions(tmp_path):
    data = _build(tmp_path, n_val=5)
    cfg = _config(baseline.get_config("tiny"), data)
    ev = periodic.DetectionEvaluator(cfg, max_samples=4)
    (si,) = ev.splits()
    full = slice_data.load_sample_table(data, "deeplesion", "val")
    keys = np.flatnonzero(full.is_key_slice)
    assert len(full) == 15 and len(keys) == 10               # 5 cases x (2 key + 1 lesion-free)
    t = si.table
    assert len(t) == 4 and t.is_key_slice.all()
    want = keys[[0, 3, 6, 9]]                                 # evenly spaced over the key slices
    for i, r in enumerate(want):
        assert t.case_id[t.case_row[i]] == full.case_id[full.case_row[r]]
        assert t.slice_index[i] == full.slice_index[r]
        a, b = t.sample_lesions(i), full.sample_lesions(int(r))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # -1: every key slice, none of the lesion-free samples
    (si_all,) = periodic.DetectionEvaluator(cfg, max_samples=-1).splits()
    assert len(si_all.table) == 10 and si_all.table.is_key_slice.all()
    assert si_all.config.global_batch_size == 4 and not si_all.config.augment


def test_detection_eval_switches(tmp_path):
    cfg = baseline.get_config("tiny")
    assert tasks.build_task(cfg).extra_eval is None           # no data_dir
    cfg.data.data_dir = str(tmp_path)
    assert isinstance(tasks.build_task(cfg).extra_eval, periodic.DetectionEvaluator)
    cfg.detection_eval.enabled = False
    assert tasks.build_task(cfg).extra_eval is None
    cfg.detection_eval.enabled = True
    cfg.data.val_split = ""
    assert tasks.build_task(cfg).extra_eval is None
    # a missing split is skipped (with a warning), not an error that stops training
    cfg.data.val_split = "val"
    ev = periodic.DetectionEvaluator(cfg)
    assert ev.splits() == [] and ev(3, {"params": {}}) == {}


def test_each_dataset_is_evaluated_by_its_own_expert(tmp_path):
    cfg = meld.get_config("tiny")
    cfg.data.data_dir = str(tmp_path)
    ev = tasks.build_task(cfg).extra_eval
    assert ev.loaded.expert_names == core.DATASETS
    assert [from_workdir.expert_for(ev.loaded, d) for d in core.DATASETS] == list(core.DATASETS)
    cfg = baseline.get_config("tiny")
    cfg.data.data_dir = str(tmp_path)
    ev = tasks.build_task(cfg).extra_eval
    assert from_workdir.expert_for(ev.loaded, "luna16") == "deeplesion"   # the universal expert


@pytest.mark.slow
def test_meld_tiny_training_logs_detection_metrics_per_dataset(tmp_path):
    """MELD's real loss, two datasets (two experts), the default sample cap."""
    data = _build(tmp_path, datasets=("deeplesion", "luna16"))
    cfg = meld.get_config("tiny")
    cfg.data.datasets = ("deeplesion", "luna16")
    cfg.model.num_datasets = 2
    cfg = _config(cfg, data, total_steps=2)
    cfg.detection_eval.max_samples = 4
    out = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    tb = _tb_scalars(str(tmp_path / "run"))
    for ds in ("deeplesion", "luna16"):
        for name in RATE_TAGS:
            v = tb[f"val/{ds}/{name}"][2]
            assert np.isfinite(v) and 0.0 <= v <= 1.0
            assert out["eval"][f"{ds}/{name}"] == pytest.approx(v, rel=1e-6)


def test_replicated_and_host_variables_reach_the_predictor_alike():
    """The state of an 8-device mesh and a restored (host) copy are passed on the same device and
    sharding, so the compiled predict function is reused, not compiled again."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = train.make_mesh(-1)
    assert mesh.size == 8                                     # conftest's forced host devices
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    repl = jax.device_put(host, NamedSharding(mesh, P()))
    a, b = periodic._local_replica(repl), periodic._local_replica(host)
    assert a.sharding == b.sharding and a.committed and b.committed
    assert a.sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(np.asarray(a), host)
    f = jax.jit(lambda x: x * 2)
    f(a), f(b)
    assert f._cache_size() == 1
