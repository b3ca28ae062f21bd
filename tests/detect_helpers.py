"""A tiny MELD saved as a real orbax checkpoint in the training system's layout, for the detect and
evaluate-from-workdir tests (randomly initialised: the tests check geometry, formats and
compilation, not accuracy)."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from configs import meld
from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import train
from uld_jax.models.meld import MELD, init_variables

IMAGE_SIZE = 64      # pixels; the tiny config at 64 x 64 compiles in seconds on 2 CPU cores
PIXEL_MM = 3.0       # model-input pixels of the tiny canvas (192 mm field of view)


def tiny_config():
    c = meld.get_config("tiny")
    c.data.image_size = (IMAGE_SIZE, IMAGE_SIZE)
    c.data.pixel_mm = PIXEL_MM
    c.model.image_size = IMAGE_SIZE
    c.checkpoint.async_save = False
    return c


def save_workdir(workdir: str, step: int = 7, seed: int = 0) -> str:
    """Writes ``workdir/checkpoints/<step>`` (state, data_iter, config) as ``uld_jax.train`` does."""
    c = tiny_config()
    variables = init_variables(MELD(c.model), seed=seed)
    params, other = train.split_variables(variables)
    tx, _ = train.make_optimizer(c.optimizer, 10)
    state = {"step": jnp.asarray(step, jnp.int32), "params": params, "other": other,
             "opt_state": tx.init(params)}
    derived = {"steps_per_epoch": 10, "total_steps": 40, "mesh_devices": 1, "process_count": 1}
    mngr = train.make_checkpoint_manager(workdir, c.checkpoint, 10)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=train.IteratorStateSave({"pos": 0}),
        config=ocp.args.JsonSave(train._config_json(c, derived))))
    mngr.wait_until_finished()
    mngr.close()
    return workdir


@functools.lru_cache(maxsize=1)
def shared_workdir(root: str) -> str:
    """One checkpointed workdir per test session (``root``: a session temporary folder)."""
    return save_workdir(os.path.join(root, "run"))


def build_deeplesion(out: str, splits: Sequence[str]) -> list:
    """Builds one small DeepLesion case per entry of ``splits`` (in that split; lesions on slice 3
    of odd cases, on slices 2 and 5 of even ones) into the data folder ``out``; returns the cases."""
    cases = [cf.make_case("deeplesion", k, num_slices=8, height=40, width=44, split=split,
                          lesion_slices=(3,) if k % 2 else (2, 5), negatives=())
             for k, split in enumerate(splits)]
    build_lib.build("/raw", str(out), ["deeplesion"], reader_lookup=lambda n: cf.ListReader(cases),
                    progress=False)
    return cases
