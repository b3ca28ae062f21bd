"""The sharded train step equals the single-device step; the schedule and metric pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import train_helpers as th
from uld_jax import train


@pytest.mark.multidevice
def test_sharded_step_equals_single_device_step():
    assert jax.device_count() == 8, "conftest forces 8 host devices"
    cfg = th.tiny_config()
    task = th.make_task()
    data = th.make_data(64, 8)
    tx, sched = train.make_optimizer(cfg.optimizer, data.steps_per_epoch)
    it = data.train_iter(0, 1)
    batches = [next(it) for _ in range(3)]

    results = {}
    for n in (1, 8):
        mesh = train.make_mesh(n)
        repl = NamedSharding(mesh, P())
        state = train.init_state(task, tx, th.global_batch(batches[0], mesh), jax.random.key(0),
                                 repl)
        init_params = jax.device_get(state["params"])
        step = train.make_train_step(task, tx, sched, mesh)
        rng = jax.device_put(jax.random.key(1), repl)
        losses = []
        for b in batches:
            gb = th.global_batch(b, mesh)
            assert gb["image"].sharding.num_devices == n
            state, metrics, loss = step(state, gb, rng)
            losses.append(float(loss))
        assert state["params"]["Dense_0"]["kernel"].sharding.is_fully_replicated
        results[n] = (losses, jax.device_get(state), train.compute_collection(metrics))
        # the update moved the parameters (so the comparisons below are not vacuous)
        assert not th.tree_allclose(results[n][1]["params"], init_params)

    (l1, s1, m1), (l8, s8, m8) = results[1], results[8]
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
    assert int(s1["step"]) == int(s8["step"]) == 3
    assert th.tree_allclose(s8["params"], s1["params"])
    assert th.tree_allclose(s8["other"], s1["other"])       # BatchNorm stats over the global batch
    assert th.tree_allclose(s8["opt_state"], s1["opt_state"])
    assert set(m8) >= {"loss", "loss/mse", "loss/mse/ds0", "loss/mse/ds1", "norm/grad",
                       "norm/param", "lr"}
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6)


def test_lr_schedule_piecewise_by_epochs():
    cfg = th.tiny_config()
    cfg.optimizer.lr = 1e-4
    cfg.optimizer.decay_epochs = (4, 6)
    sched = train.make_lr_schedule(cfg.optimizer, steps_per_epoch=10)
    got = [float(sched(s)) for s in (0, 39, 40, 59, 60, 79)]
    np.testing.assert_allclose(got, [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6], rtol=1e-6)


def test_metric_pairs_pool_by_weight_and_skip_empty():
    a = train.make_collection({"x": 2.0, "d0": (jnp.array([1.0, 3.0]), jnp.array([1.0, 0.0])),
                               "d1": (jnp.array([5.0, 7.0]), jnp.array([0.0, 0.0]))})
    b = train.make_collection({"x": 4.0, "d0": (jnp.array([5.0, 9.0]), jnp.array([1.0, 1.0])),
                               "d1": (jnp.array([5.0, 7.0]), jnp.array([0.0, 0.0]))})
    out = train.compute_collection(train._merge(a, b))
    assert out["x"] == pytest.approx(3.0)
    assert out["d0"] == pytest.approx((1 + 5 + 9) / 3)       # pooled over samples, not steps
    assert "d1" not in out                                   # no sample of that dataset: no value
