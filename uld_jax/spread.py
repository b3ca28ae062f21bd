"""``python -m uld_jax.spread``: is the seeds' spread on the held-out world the test lesions' luck?

The paper's ordering is checked per seed on one held-out world (``reproduce --heldout N``): a check
holds when every seed's difference is positive and their mean exceeds their sd. That sd mixes two
things: runs that really differ (initialisation, data order), and the finite test set, on which
two detectors that find different lesions differ by chance. This module separates them:

1. a second, larger held-out world (``OUT/heldout_<P>``: ``P`` patients, the next seed of the same
   generator, every patient in test);
2. every chosen run of every seed evaluated on both worlds with its detections saved
   (``seed_<s>/spread/<world>/<run>/pred_2d.npz``, ``python -m uld_jax.evaluate --save-pred``);
3. for every ordering check between two of those runs, on each world and hit rule: each seed's
   difference, the sd of that difference over a paired patient-level bootstrap of the world's test
   patients (:mod:`uld_jax.evaluate.bootstrap`: what redrawing the test set alone does), and the
   sd across seeds. Where the first is about the second, the spread is the test set's; then the
   larger world must shrink the sd across seeds by about the square root of the patient ratio.

Command::

    python -m uld_jax.spread --out OUT --recipe equal --seeds 0,1,2,3 --patients 96
        --runs meld,meld_yield_mam,... [--samples 2000] [--results PAGE.md] [--worlds heldout,...]

``OUT`` is a ``python -m uld_jax.reproduce`` output whose runs are trained (and, for the first
world, whose ``--heldout`` world is built). Steps are resumable like reproduce's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from uld_jax import quickstart as qs
from uld_jax import reproduce as rp

SUB = "spread"
PRED = "pred_2d.npz"
# every ordering check the reproduce pages read on the held-out world
ALL_CHECKS = (*rp.HELDOUT_CHECKS, *rp.SCRATCH_CHECKS, *rp.LONG_CHECKS)


def worlds(out: str, recipe: qs.Recipe, seeds: Sequence[int], patients: int) -> dict[str, qs.Quickstart]:
    """The held-out worlds: reproduce's ``OUT/heldout`` (when built) and ``OUT/heldout_<patients>``."""
    w = {}
    h = rp.heldout_quickstart(out, recipe, seeds)
    if h.done("build"):
        w["heldout"] = h
    name = f"heldout_{patients}"
    w[name] = rp.heldout_quickstart(out, recipe, seeds, patients, name=name, offset=1)
    return w


def pred_path(q: qs.Quickstart, world: str, run: str) -> str:
    return os.path.join(q.out, SUB, world, run, PRED)


def run(out: str, recipe: qs.Recipe, seeds: Sequence[int], patients: int, runs: Sequence[str],
        only: Sequence[str] | None = None) -> None:
    """The larger world synthesized, checked and built; every finished run of ``runs`` of every
    seed evaluated on every world (``only``: those worlds) with its detections saved."""
    for name, h in worlds(out, recipe, seeds, patients).items():
        if only and name not in only:
            continue
        h.do_world()
        h.do_check_build(datasets=("deeplesion",))
        h.write_labels()
        for q in rp._seed_quickstarts(out, recipe, seeds):
            for r in runs:
                if not q.done(r):
                    continue
                p = pred_path(q, name, r)
                q.step(f"{SUB}_{name}_{r}", [q.eval_cmd(r, on=h, out=os.path.dirname(p))
                                             + ["--save-pred", p, "--no-plot"]])
