"""A small Flax model and in-memory grain datasets for the training-system tests."""

from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from configs import meld
from uld_jax import train
from uld_jax.core import Keys

NUM_DATASETS = 2


class TinyRegressor(nn.Module):
    """Image ``[B, 8, 8, 3]`` -> one value per sample ``[B]``; BatchNorm (a non-param collection)
    and dropout (uses the step rng) so that both reach the train step."""

    @nn.compact
    def __call__(self, image, train: bool):
        x = nn.Conv(4, (3, 3))(image)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], -1)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(1)(jnp.concatenate([x, image.mean(axis=(1, 2))], -1))[:, 0]


def make_task() -> train.Task:
    model = TinyRegressor()

    def init(rng, batch):
        return model.init({"params": rng}, batch[Keys.IMAGE], train=False)

    def loss_fn(params, other, batch, rng, is_train):
        variables = {"params": params, **other}
        if is_train:
            pred, new_other = model.apply(variables, batch[Keys.IMAGE], train=True,
                                          rngs={"dropout": rng}, mutable=["batch_stats"])
        else:
            pred, new_other = model.apply(variables, batch[Keys.IMAGE], train=False), other
        err = (pred - batch["target"]) ** 2
        m = {"loss/mse": err.mean()}
        for d in range(NUM_DATASETS):
            m[f"loss/mse/ds{d}"] = (err, (batch[Keys.DATASET_ID] == d).astype(jnp.float32))
        return err.mean(), (dict(new_other), m)

    return train.Task(init=init, loss_fn=loss_fn)


def records(n: int, seed: int, nan_ids: tuple[int, ...] = ()) -> list[dict[str, np.ndarray]]:
    """Images of noise; target = 0.5 * mean of channel 0 - mean of channel 2 (learnable)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.normal(0, 1, (8, 8, 3)).astype(np.float32) + rng.normal(0, 1, (1, 1, 3))
        target = np.float32(0.5 * img[..., 0].mean() - img[..., 2].mean())
        if i in nan_ids:
            img[0, 0, 0] = np.nan
        out.append({Keys.IMAGE: img.astype(np.float32), "target": target,
                    Keys.DATASET_ID: np.int32(i % NUM_DATASETS)})
    return out


def make_data(n: int, batch_size: int, seed: int = 0, shuffle: bool = True,
              nan_ids: tuple[int, ...] = ()) -> train.Data:
    recs = records(n, seed, nan_ids)
    eval_recs = records(32, seed + 1)

    def train_iter(pidx, pcount):
        ds = grain.MapDataset.source(recs)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat()[pidx::pcount].batch(batch_size // pcount, drop_remainder=True)
        return iter(ds.to_iter_dataset())

    def eval_iter(pidx, pcount):
        return iter(grain.MapDataset.source(eval_recs)[pidx::pcount]
                    .batch(batch_size // pcount, drop_remainder=True).to_iter_dataset())

    return train.Data(train_iter=train_iter, steps_per_epoch=n // batch_size, eval_iter=eval_iter)


def tiny_config(**overrides):
    """configs/meld.py:tiny with the loop knobs the tests use (sync checkpoints, fast logging)."""
    c = meld.get_config("tiny")
    c.batch_size = 8
    c.optimizer.lr = 5e-2
    c.optimizer.weight_decay = 0.0
    c.log_every_steps = 4
    c.checkpoint.async_save = False
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def global_batch(local: dict, mesh) -> dict:
    from jax.sharding import NamedSharding, PartitionSpec as P
    return train.to_global_batch(local, NamedSharding(mesh, P(train.DATA_AXIS)))


def tree_allclose(a, b, rtol=1e-5, atol=1e-6) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))
