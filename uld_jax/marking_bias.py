"""Does NRM's premise depend on the world's label policy? A diagnostic on the synthetic world.

    python -m uld_jax.marking_bias --out OUT [--variant unbiased|dense] [--recipe quick] \
        [--seeds 0,1,2,3] [--heldout 24] [--heldout-checkpoints 2] [--compare OUT_DEFAULT] \
        [--results docs/results_unbiased.md] [--results-only]

NRM keeps the lesions the annotations miss out of the negatives. It can only help if a detector
trained with them among its negatives learns them as background. On the default world a perfect NRM
(the world's truth as ignore regions) does not help. Two suspected reasons lie in how the world is
drawn, each tested by a world variant (:data:`VARIANTS`):

- ``unbiased`` (``--unbiased-marks``): the default world marks larger and more conspicuous lesions
  more often (DESIGN.md section 5), so the unmarked lesions are the harder ones; this world's marks
  are drawn regardless of size and conspicuity (same anatomy, lesions and images);
- ``dense`` (``--extra-lesions 40``): on the default world the unmarked lesions are a few percent
  of the negatives' loss (about one unmarked cross-section a key slice); this world draws 40
  lesions per patient beyond the marked ones instead of 10, with as many marks, so several times
  as many lesions go unmarked on every slice.

Each runs the same experiment as ``python -m uld_jax.reproduce --baseline-nrm key`` on its world:

1. the world (the recipe's preset and counts plus the variant's flags), checked and built;
2. every seed, by :func:`reproduce.run_baseline_nrm` with ``key``: the DeepLesion-only baseline
   for 4x the recipe's epochs (``baseline_long``), then the same with the perfect NRM's table and
   no added slice drawn (``baseline_long_nrm_key``, ``--oracle-scratch ignore_key``'s flags), and
   the negatives that table keeps out of the plain run's (``uld_jax.mine.exposure``);
3. the table (once, for every seed; :func:`table_step` in place of the reproduction's, which needs
   a MELD run): the first seed's plain run mined at a checkpoint (only its chunk store's slice
   table is used: the key slices and one slice every 5 mm), then ``python -m uld_jax.mine.oracle
   --as ignore --without_added`` on it (step ``mine_oracle_nrm_key``);
4. both evaluated on the world's test split and on the held-out world (``--heldout N`` patients:
   the reproduction's held-out world, synthesized with the default generator arguments, so every
   variant and the default world are read on the same lesions), and which lesions each run finds
   on its own training slices (``uld_jax.mine.suppression``).

Every step is recorded in ``OUT/seed_<s>/state`` and skipped when done, so an interrupted run
resumes. ``--results PAGE`` writes the tables (with ``--compare``: the same runs of a
``python -m uld_jax.reproduce --baseline-nrm key --suppression`` output on the default world beside
them). Cost on 2 CPU cores: ``unbiased``'s eight runs of four seeds took 70-74 minutes each, all
eight at once; ``dense``'s six runs of seeds 0-2 took 52-55 minutes each, six at once, and seed
3's two 18 minutes each, two at once.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

import numpy as np

from uld_jax import quickstart as qs
from uld_jax import reproduce as rp

PLAIN, NRM = rp.LONG_RUNS[0], "baseline_long_nrm_key"
RUNS = (PLAIN, NRM)
ROWS = tuple((r, n) for r, n in rp.LONG_ROWS if r in RUNS)
CHECKS = tuple(c for c in rp.LONG_CHECKS if c[1:] == (NRM, PLAIN))
SLICES_RUN = "slices"          # the first seed's mining store of the plain run (its slice table)
TABLE = "mined_oracle_nrm_key.npz"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A world variant: its ``data_prep.synthesize`` flags and its page's words."""
    flags: tuple[str, ...]
    title: str                 # the page's title
    section: str               # the heading of this world's tables
    question: str              # the page's paragraph: what it tests and what would show it
    default_section: str = "The default world, `python -m uld_jax.reproduce --baseline-nrm key`"


DEFAULT_VARIANT = "unbiased"   # the module's first experiment; its page's command omits --variant
VARIANTS = {
    "unbiased": Variant(
        ("--unbiased-marks",), "A world without the marking bias: does a perfect NRM help there?",
        "Unbiased marks (`--unbiased-marks`)",
        "on a world whose marks ignore lesion size and conspicuity, and (with a comparison folder) "
        "the same runs on the default world, whose radiologist marks larger, more conspicuous "
        "lesions more often. If the marking bias is what keeps NRM's premise from holding, the "
        "perfect NRM should gain on the unbiased world.",
        "Default marks (the radiologist's bias), `python -m uld_jax.reproduce --baseline-nrm key`"),
    "dense": Variant(
        ("--extra-lesions", "40"),
        "A world with more unmarked lesions: does a perfect NRM help there?",
        "More unmarked lesions (`--extra-lesions 40`)",
        "on a world with 40 lesions per patient beyond the marked ones instead of the default "
        "world's 10 (as many marks, so several times as many unmarked lesions on every slice), "
        "and (with a comparison folder) the same runs on the default world. If NRM's premise fails "
        "on the default world because its unmarked lesions are too few a share of the negatives, "
        "the perfect NRM should gain on the dense world."),
}


def variant_recipe(recipe: qs.Recipe, variant: str = DEFAULT_VARIANT) -> qs.Recipe:
    """``recipe`` on the world of ``variant`` (:data:`VARIANTS`; its flags added once, the name
    suffixed with the variant); :func:`reproduce.run_baseline_nrm` trains it
    :func:`reproduce.long_recipe`'s epochs."""
    if variant not in VARIANTS:
        raise ValueError(f"marking_bias: unknown variant {variant!r}; choose one of "
                         f"{', '.join(VARIANTS)}")
    flags, args = VARIANTS[variant].flags, recipe.world_args
    if any(args[i:i + len(flags)] == flags for i in range(len(args))):
        return recipe
    if flags[0] in args:
        raise ValueError(f"marking_bias: recipe {recipe.name!r} already sets {flags[0]} otherwise "
                         f"than the {variant} variant ({' '.join(flags)}): {' '.join(args)}")
    return dataclasses.replace(recipe, name=f"{recipe.name}_{variant}",
                               world_args=(*recipe.world_args, *flags))


def table_path(q0: qs.Quickstart) -> str:
    return os.path.join(q0.run_dir(SLICES_RUN), TABLE)


def table_step(q0: qs.Quickstart, as_: str = "ignore_key") -> str:
    """Steps ``mine_slices`` and ``mine_oracle_nrm_key`` on the first seed: the perfect NRM's table
    (``--oracle-scratch ignore_key``'s oracle options, the only ``as_`` this takes) on the slices
    a mining run looks at; returns its path. The plain run's earliest kept checkpoint is mined:
    every checkpoint gives the same slice table, and the table reads only that."""
    from uld_jax import train

    if as_ != "ignore_key":
        raise ValueError(f"marking_bias: no oracle table {as_!r} (only 'ignore_key')")
    d = q0.run_dir(SLICES_RUN)
    if not q0.done("mine_slices"):
        steps = train.checkpoint_steps(q0.run_dir(PLAIN))
        if not steps:
            raise SystemExit(f"[marking_bias] {q0.run_dir(PLAIN)}: no checkpoint to mine the slice "
                             "table with (train the first seed's plain run first)")
        q0.step("mine_slices", [q0.mine_cmd("--nrm_experts", "", "--store_dir",
                                            os.path.join(d, "store"), "--out",
                                            os.path.join(d, "mined.npz"), run=PLAIN,
                                            step=steps[0])])
    table = table_path(q0)
    q0.step("mine_oracle_nrm_key", [[
        sys.executable, "-m", "uld_jax.mine.oracle", "--mined", os.path.join(d, "mined.npz"),
        "--truth", os.path.join(q0.world, "truth"), "--data_dir", q0.data,
        *rp.ORACLE_SCRATCH[as_][2], "--out", table]])
    return table


def run(out: str, recipe: qs.Recipe, seeds: Sequence[int], heldout: int = 0,
        checkpoints: int = 1, variant: str = DEFAULT_VARIANT) -> None:
    """Steps 1-4 of the module docstring for ``seeds`` (the first seed's world and table serve
    every seed); ``recipe`` is the base recipe (:func:`variant_recipe` is applied here)."""
    r = variant_recipe(recipe, variant)
    q0 = rp._first_seed(out, r, seeds)
    q0.do_world()
    q0.do_check_build()
    rp.run_baseline_nrm(out, r, seeds, ["key"], oracle_table=lambda q, as_: table_step(q0, as_))
    if heldout:
        rp.run_heldout(out, r, seeds, heldout, checkpoints=checkpoints)
    rp.run_suppression(out, r, seeds)


def marking_gap(world: str, split: str = "train") -> dict[str, float]:
    """The label policy's bias in ``world``'s truth (``split``'s lesions): the marked lesions' mean
    log marking weight (1.3 log long diameter + log type conspicuity) minus the unmarked lesions',
    their mean long diameters (mm) and the fraction marked."""
    from data_prep.world.cohort import MARK_SIZE_POWER
    from data_prep.world.lesions import LESION_TYPES

    path = os.path.join(world, "truth", "deeplesion_lesions.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [x for x in csv.DictReader(f) if x["split"] == split]
    if not rows:
        raise ValueError(f"{path}: no lesion in the {split} split")
    bad = [x["lesion_type"] for x in rows if x["lesion_type"] not in LESION_TYPES]
    if bad:
        raise ValueError(f"{path}: unknown lesion_type {bad[0]!r}")
    d = np.array([float(x["long_diameter_mm"]) for x in rows])
    w = (MARK_SIZE_POWER * np.log(d)
         + np.log([LESION_TYPES[x["lesion_type"]].conspicuity for x in rows]))
    m = np.array([x["marked"] == "1" for x in rows])
    if m.all() or not m.any():
        raise ValueError(f"{path}: the {split} split needs marked and unmarked lesions")
    return {"lesions": int(m.size), "marked_fraction": float(m.mean()),
            "log_weight_gap": float(w[m].mean() - w[~m].mean()),
            "marked_mm": float(d[m].mean()), "unmarked_mm": float(d[~m].mean())}


def _wall(out: str, seeds: Sequence[int], step: str) -> str:
    ws = []
    for s in seeds:
        p = os.path.join(rp._seed_dir(out, s), "state", f"{step}.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                ws.append(float(json.load(f)["wall_s"]))
    return f"{min(ws):.0f}-{max(ws):.0f}" if ws else "not run"


def _checkpoint_lines(out: str, seeds: Sequence[int], k: int) -> list[str]:
    """The check on the held-out world with each run's mean sensitivity over its last ``k``
    checkpoints (``reproduce --heldout-checkpoints``), on the seeds that have them all."""
    if k < 2:
        return []
    vals, steps = rp._last_checkpoints(out, seeds, k)
    verdict = {rule: {r: v for r, v in per.items() if r in RUNS}
               for rule, per in rp.checkpoint_verdict(vals).items()}
    if not any(len(v) == len(RUNS) for v in verdict.values()):
        return []
    at = ", ".join(map(str, steps.get(PLAIN, [])))
    return [f"The same check with each run's mean over its last {k} checkpoints (steps {at} and "
            "the last), which takes out what one checkpoint's position adds to the spread:", "",
            *rp._order_lines(verdict, CHECKS)]


def _world_sections(out: str, seeds: Sequence[int], title: str, checkpoints: int = 1
                    ) -> list[str]:
    """One world's tables: held-out (and over its last ``checkpoints``) and test split, exposure,
    suppression."""
    L = [f"## {title}", ""]
    w = os.path.join(rp._seed_dir(out, seeds[0]), "world")
    if os.path.isdir(w):
        g = marking_gap(w)
        L += [f"World `{w}`: {g['lesions']} training-split lesions, {100 * g['marked_fraction']:.1f}% "
              f"marked; marked lesions {g['marked_mm']:.1f} mm long on average, unmarked "
              f"{g['unmarked_mm']:.1f} mm; the marked lesions' mean log marking weight (1.3 log "
              f"long diameter + log conspicuity) minus the unmarked lesions': "
              f"{g['log_weight_gap']:+.2f}.", ""]
    L += rp._runs_section(out, seeds, "eval_heldout", RUNS, "Held-out world",
                          "The reproduction's held-out world (every DeepLesion patient in its test "
                          "split, the default world's generator arguments; no run was trained, "
                          "tuned or selected on it). Seeds column: seeds with the run.", ROWS,
                          CHECKS)
    L += _checkpoint_lines(out, seeds, checkpoints)
    split = rp._runs_section(out, seeds, "eval", RUNS, "The training world's own test split",
                             "The world the runs were trained on, its test split.", ROWS, CHECKS)
    L += ["#" + x if x.startswith("## ") else x for x in split[:1]] + split[1:]
    rows, cmd = rp._exposure_rows(out, seeds, PLAIN)
    if rows:
        L += ["### What the perfect NRM keeps out of the plain run's negatives", "",
              f"{cmd}: the plain run's training batches and forward with the perfect NRM's "
              "ignore regions switched off (docs/mining.md, `uld_jax.mine.exposure`). Key slices "
              "are its training slices; the table's other mining slices, drawn here as added "
              "slices, were not in its training.", "", *rp.EXPOSURE_HEADER, *rows, ""]
    sup = rp._suppression_lines(out, seeds, RUNS, ((NRM, PLAIN),))
    if sup:
        L += ["### " + sup[0].lstrip("# ")] + sup[1:]
    L += [f"Training wall time (s, per run): plain {_wall(out, seeds, PLAIN)}, perfect NRM "
          f"{_wall(out, seeds, NRM)}.", ""]
    return L


def results_lines(out: str, seeds: Sequence[int], recipe: qs.Recipe,
                  compare: str | None = None, notes: Sequence[str] = (),
                  checkpoints: int = 1, variant: str = DEFAULT_VARIANT) -> list[str]:
    r = rp.long_recipe(variant_recipe(recipe, variant))
    v = VARIANTS[variant]
    flag = "" if variant == DEFAULT_VARIANT else f" --variant {variant}"
    L = [f"# {v.title}", "",
         f"Written by `python -m uld_jax.marking_bias{flag} --recipe {recipe.name} --out {out} "
         f"--seeds {','.join(map(str, seeds))}" + (f" --compare {compare}" if compare else "")
         + "` (numbers from the runs' files; module docstring: what it "
         f"runs). Recipe `{r.name}`: {r.epochs} epochs of {r.steps_per_epoch} steps of "
         f"{r.batch_size} samples, world `{r.preset}` with `{' '.join(r.world_args)}`.", "",
         "The DeepLesion-only baseline trained until it fits its labels, plain and with a perfect "
         "NRM on its key slices (the world's truth as ignore regions: every lesion the "
         "annotations miss kept out of its negatives, nothing else changed), " + v.question, ""]
    L += [f"- {n}" for n in notes] + ([""] if notes else [])
    L += _world_sections(out, seeds, v.section, checkpoints)
    if compare:
        L += _world_sections(compare, seeds, v.default_section, checkpoints)
    return L


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uld_jax.marking_bias", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/marking_bias")
    p.add_argument("--variant", choices=sorted(VARIANTS), default=DEFAULT_VARIANT,
                   help="the world: unbiased (--unbiased-marks) or dense (--extra-lesions 40); "
                   "the module docstring says what each tests")
    p.add_argument("--recipe", choices=sorted(qs.RECIPES), default="quick",
                   help="base recipe, trained 4x its epochs (quick: the `long` recipe's length)")
    p.add_argument("--seeds", type=rp.seeds_arg, default="0,1,2,3")
    p.add_argument("--heldout", type=int, default=24, metavar="N",
                   help="patients of the held-out world (0: none)")
    p.add_argument("--heldout-checkpoints", type=int, default=2, metavar="K")
    p.add_argument("--compare", default=None, metavar="DIR",
                   help="a `python -m uld_jax.reproduce --baseline-nrm key --suppression` output on "
                   "the default world, shown beside")
    p.add_argument("--results", default=None, metavar="PAGE", help="markdown page to write")
    p.add_argument("--results-only", action="store_true", help="write the page, run nothing")
    p.add_argument("--note", action="append", default=[], help="a line for the page's notes")
    a = p.parse_args(argv)
    if a.heldout < 0 or a.heldout_checkpoints < 1:
        p.error("--heldout must be >= 0 and --heldout-checkpoints >= 1")
    if a.compare and not os.path.isdir(a.compare):
        p.error(f"--compare {a.compare}: not a folder")
    recipe = qs.RECIPES[a.recipe]
    t = time.time()
    if not a.results_only:
        run(a.out, recipe, a.seeds, a.heldout, a.heldout_checkpoints, a.variant)
    lines = results_lines(a.out, a.seeds, recipe, a.compare, a.note, a.heldout_checkpoints,
                          a.variant)
    rp.write_or_print(a.results, lines, "marking_bias", f" ({math.ceil(time.time() - t)} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
