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

    python -m uld_jax.spread --out OUT --recipe equal [--variant dense] --seeds 0,1,2,3
        --patients 96 --runs meld,meld_yield_mam,... [--samples 2000] [--results PAGE.md] [--worlds heldout,...]

``OUT`` is a ``python -m uld_jax.reproduce`` output whose runs are trained (and, for the first
world, whose ``--heldout`` world is built). Steps are resumable like reproduce's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
    if os.path.isfile(qs.state_file(os.path.join(out, "heldout"), "build")):
        w["heldout"] = rp.heldout_quickstart(out, recipe, seeds)
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


def checks_of(runs: Sequence[str]) -> list[tuple[str, str, str]]:
    """The ordering checks (name, a, b: ``a`` should beat ``b``) between two of ``runs``."""
    seen, out = set(), []
    for name, a, b in (*ALL_CHECKS, *rp.unlabeled_checks(rp.unlabeled_ratios(runs))):
        if a in runs and b in runs and name not in seen:
            seen.add(name)
            out.append((name, a, b))
    return out


def analyse(out: str, recipe: qs.Recipe, seeds: Sequence[int], patients: int, runs: Sequence[str],
            samples: int = 2000, boot_seed: int = 0) -> dict:
    """Per world: its size, each run's and each check's per-seed observed value and bootstrap
    values (the same patient draws for every run and seed of a world), summarised."""
    from uld_jax.evaluate import bootstrap as bs
    from uld_jax.evaluate.froc import RULES
    from uld_jax.evaluate.inputs import load_volume_dict

    res: dict = {"samples": samples, "boot_seed": boot_seed, "worlds": {}}
    qs_ = list(rp._seed_quickstarts(out, recipe, seeds))
    for name, h in worlds(out, recipe, seeds, patients).items():
        if not os.path.isfile(h.truth):
            continue
        truth = load_volume_dict(h.truth, split="test")
        keys = list(truth)
        w = bs.resample_weights(keys, samples, boot_seed)
        vals: dict = {}
        for q in qs_:
            for r in runs:
                p = pred_path(q, name, r)
                if not os.path.isfile(p):
                    continue
                det = load_volume_dict(p)
                for rule in RULES:
                    vals[q.seed, r, rule] = bs.run_values(truth, det, w, rule=rule, source=p)
        wr: dict = {"patients": len({bs.patient_of(k) for k in keys}), "volumes": len(keys),
                    "truths": bs.count_truths(truth),
                    "seed": h.seed, "runs": {}, "checks": {}}
        for rule in RULES:
            for r in runs:
                ss = [s for s in seeds if (s, r, rule) in vals]
                if ss:
                    wr["runs"].setdefault(r, {})[rule] = {
                        "observed": {s: vals[s, r, rule][0] for s in ss},
                        "boot_sd": {s: float(np.nanstd(vals[s, r, rule][1], ddof=1)) for s in ss}}
            for cname, a, b in checks_of(runs):
                ss = [s for s in seeds if (s, a, rule) in vals and (s, b, rule) in vals]
                if not ss:
                    continue
                obs = {s: vals[s, a, rule][0] - vals[s, b, rule][0] for s in ss}
                diffs = np.stack([vals[s, a, rule][1] - vals[s, b, rule][1] for s in ss])   # [S, B]
                c = {"observed": obs,
                     "boot_sd": {s: float(np.nanstd(d, ddof=1)) for s, d in zip(ss, diffs)},
                     # the test set's sd of the seeds' mean difference (the same draws for all seeds)
                     "boot_sd_mean": float(np.nanstd(diffs.mean(axis=0), ddof=1))}
                if len(ss) > 1:
                    # what redrawing the test set adds to the variance across seeds: each seed's
                    # move from its observed difference, their variance across seeds, averaged
                    # over the draws (a move all seeds share changes the mean, not the spread)
                    dev = diffs - np.asarray([obs[s] for s in ss])[:, None]
                    c["noise_var"] = float(np.nanmean(np.var(dev, axis=0, ddof=1)))
                wr["checks"].setdefault(cname, {})[rule] = c
        res["worlds"][name] = wr
    return res


def _p(x: float) -> str:
    return f"{100 * x + 0.0:+.1f}"


def page_lines(res: dict, argv: Sequence[str], notes: Sequence[str] = ()) -> list[str]:
    import platform
    import time

    L = ["# Is the seeds' spread on the held-out world the test set's luck?", "",
         "Written by `python -m uld_jax.spread` from the runs' saved detections (module docstring: "
         "what it runs and reads); do not edit by hand.", "",
         f"- command: `python -m uld_jax.spread {shlex.join(argv)}`",
         f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
         f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
         f"{platform.python_version()}, no accelerator",
         f"- bootstrap: {res['samples']} resamples of each world's test patients (with replacement, "
         f"a patient's sub-volumes together), draw seed {res['boot_seed']}; the same draws for "
         "every run and training seed of a world, so differences are paired"]
    L += [f"- note: {n}" for n in notes] + ["", "## The held-out worlds", "",
                                            "| world | generator seed | patients | sub-volumes | lesions |",
                                            "|---|---:|---:|---:|---:|"]
    for name, wr in res["worlds"].items():
        L.append(f"| {name} | {wr['seed']} | {wr['patients']} | {wr['volumes']} | {wr['truths']} |")
    L += ["", "## Each run's mean sensitivity", "",
          "Per world and hit rule: the run's mean sensitivity (points) over seeds (mean ± sd "
          "across seeds), and the sd one run's value has over the test-set resamples (root mean "
          "square over seeds).", "", "| run | world | rule | seeds: mean ± sd | test-set sd of one run |",
          "|---|---|---|---:|---:|"]
    names = list(res["worlds"])
    runs = list(dict.fromkeys(r for wr in res["worlds"].values() for r in wr["runs"]))
    for r in runs:
        for name in names:
            for rule, v in res["worlds"][name]["runs"].get(r, {}).items():
                o = np.asarray(list(v["observed"].values()))
                sd = f" ± {100 * o.std(ddof=1):.1f}" if len(o) > 1 else ""
                b = np.asarray(list(v["boot_sd"].values()))
                L.append(f"| {r} | {name} | {rule} | {100 * o.mean():.1f}{sd} | "
                         f"{100 * np.sqrt(np.mean(b ** 2)):.1f} |")
    L += ["", "## The ordering checks", "",
          "Per check, world and hit rule: each seed's difference (points); their mean ± sd across "
          "seeds; the sd of one seed's difference over the test-set resamples (root mean square "
          "over seeds); the sd across seeds that redrawing the test set alone gives (each seed's "
          "move from its observed difference, their variance across seeds averaged over the "
          "resamples) and its share of the observed variance across seeds; the test-set sd of the "
          "seeds' mean difference; and whether the check holds (reproduce's rule: every seed "
          "positive and the mean above the sd).", "",
          "| check | world | rule | per-seed differences | mean ± sd | test-set sd, one seed | "
          "test-set sd across seeds (share of the variance) | test-set sd of the mean | holds |",
          "|---|---|---|---|---:|---:|---:|---:|---|"]
    cnames = list(dict.fromkeys(c for wr in res["worlds"].values() for c in wr["checks"]))
    for c in cnames:
        for name in names:
            for rule, v in res["worlds"][name]["checks"].get(c, {}).items():
                d = np.asarray(list(v["observed"].values()))
                bsd = np.asarray(list(v["boot_sd"].values()))
                sd = d.std(ddof=1) if len(d) > 1 else float("nan")
                holds = bool((d > 0).all() and len(d) > 1 and d.mean() > sd)
                noise = "n/a"
                if "noise_var" in v:
                    share = f"{v['noise_var'] / sd ** 2:.2f}" if sd > 0 else "n/a"
                    noise = f"{100 * np.sqrt(v['noise_var']):.1f} ({share})"
                L.append(f"| {c} | {name} | {rule} | {', '.join(_p(x) for x in d)} | {_p(d.mean())}"
                         + (f" ± {100 * sd:.1f}" if len(d) > 1 else "")
                         + f" | {100 * np.sqrt(np.mean(bsd ** 2)):.1f} | {noise} | "
                         + f"{100 * v['boot_sd_mean']:.1f} | {'yes' if holds else 'no'} |")
    return L + [""] + summary_lines(res)


def summary_lines(res: dict) -> list[str]:
    """Over every check and hit rule with several seeds, per world: the range of the sd across
    seeds, the test set's pooled share of the variance across seeds (sum of the test-set parts /
    sum of the observed variances), and each world's sd against the first world's (median ratio)."""
    per: dict[str, dict] = {}
    for name, wr in res["worlds"].items():
        for c, rules in wr["checks"].items():
            for rule, v in rules.items():
                if "noise_var" in v:
                    d = np.asarray(list(v["observed"].values()))
                    per.setdefault(name, {})[c, rule] = (float(d.var(ddof=1)), v["noise_var"])
    if not per:
        return []
    first = next(iter(per))
    L = ["## Over all checks", "",
         "Per world, over every check and hit rule above: the sd across seeds (range, points), the "
         "test set's pooled share of the variance across seeds (sum of the test-set parts over sum "
         f"of the observed variances), and the median ratio of the first world's ({first}) sd "
         "across seeds to this world's, on the rows both have.", "",
         "| world | rows | sd across seeds | test-set share of the variance | sd ratio, first / this |",
         "|---|---:|---|---:|---:|"]
    for name, rows in per.items():
        var = np.asarray([v for v, _ in rows.values()])
        noise = np.asarray([n for _, n in rows.values()])
        common = [k for k in rows if k in per[first] and rows[k][0] > 0]
        ratio = (f"{np.median([np.sqrt(per[first][k][0] / rows[k][0]) for k in common]):.2f}"
                 if common and name != first else "")
        share = f"{noise.sum() / var.sum():.2f}" if var.sum() > 0 else "n/a"
        L.append(f"| {name} | {len(rows)} | {100 * np.sqrt(var.min()):.1f} .. "
                 f"{100 * np.sqrt(var.max()):.1f} | {share} | {ratio} |")
    return L + [""]


def main(argv: Sequence[str] | None = None) -> int:
    from uld_jax.io.atomic import atomic_write

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m uld_jax.spread", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a python -m uld_jax.reproduce output folder")
    p.add_argument("--recipe", choices=sorted(qs.RECIPES), default="equal")
    p.add_argument("--seeds", type=rp.seeds_arg, default="0,1,2,3")
    rp.add_variant_arg(p, "the runs' world variant (reproduce --variant)")
    p.add_argument("--patients", type=int, default=96, help="patients of the larger held-out world")
    p.add_argument("--runs", required=True, help="comma-separated runs to evaluate and compare")
    p.add_argument("--worlds", default=None, help="only these worlds (comma-separated) are evaluated")
    p.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--results", default=None, metavar="PAGE", help="markdown page to write")
    p.add_argument("--results-only", action="store_true", help="write the page, run nothing")
    p.add_argument("--note", action="append", default=[], help="a line for the page's notes")
    a = p.parse_args(argv)
    seeds = a.seeds
    runs = [r for r in a.runs.split(",") if r]
    unknown = [r for r in runs if r not in rp.HELDOUT_RUNS and rp.unlabeled_ratio_of(r) is None]
    if unknown:
        p.error(f"--runs: unknown run(s) {unknown}; known: {', '.join(rp.HELDOUT_RUNS)}, and "
                "Fig. 5's ft_both_added<R> / ft_none_added<R> (reproduce --unlabeled)")
    if a.patients < 1 or a.samples < 2:
        p.error("--patients must be >= 1 and --samples >= 2")
    if not os.path.isdir(a.out):
        p.error(f"--out {a.out}: not a folder")
    recipe = rp.recipe_of_args(p, a)
    if not a.results_only:
        run(a.out, recipe, seeds, a.patients, runs, a.worlds.split(",") if a.worlds else None)
    res = analyse(a.out, recipe, seeds, a.patients, runs, a.samples)
    atomic_write(os.path.join(a.out, "spread.json"), (json.dumps(res, indent=1) + "\n").encode())
    rp.write_or_print(a.results, page_lines(res, argv, a.note), "spread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
