"""The paper's experiments on the synthetic world, and docs/results.md written from their outputs.

    python -m uld_jax.reproduce --out runs/reproduce --seeds 0,1,2 [--recipe quick|long|equal] \
        [--variant unbiased|dense] [--keyslice] [--control] [--oracle] \
        [--oracle-scratch [positive,ignore,ignore_key,ignore_added]] \
        [--mined-scratch [mam,nrm,both,yield,yield_mam,added]] [--resume [none,mined,oracle]] \
        [--baseline-nrm [key,added]] [--suppression] [--heldout N [--heldout-checkpoints K]] \
        [--calibrated-nrm] [--thetas 0.05,0.1,0.2,0.3] [--table2] [--table4] \
        [--unlabeled 0,0.25,1,2] [--results docs/results.md]
    python -m uld_jax.reproduce --out runs/reproduce --seeds 0 --results-only   # rewrite the page

What runs (each piece resumable: finished steps are skipped when run again):

* Table 1: the quick start's chain (``uld_jax.quickstart``) for each training seed, on one world
  (``OUT/seed_<first>`` synthesizes and builds it, the other seeds reuse it): baseline, MELD,
  MELD + MAM, MELD + NRM, MELD + MAM + NRM, volumetric protocol with both hit rules and organ strata
  (the world's organ of every test lesion); the mean and the spread (sample standard deviation)
  across seeds, and whether the paper's ordering holds.
* mining quality: ``python -m uld_jax.mine.report`` of each seed's MELD (precision of the MAM
  positives, the unmarked lesions they find, the NRM regions that are real lesions, theta / sigma
  sweeps: the mining side of Fig. 5).
* ``--keyslice``: the Table 3 analog (MULAN key-slice protocol, FPs per key slice) for every run.
* ``--calibrated-nrm``: NRM with sigma read as a precision level (``python -m uld_jax.mine
  --sigma_from precision``: each single-type expert's threshold from its own dataset's training
  split), finetuned as MELD + NRM and MELD + MAM + NRM, for every seed, beside Table 1's rows.
* ``--control``: the finetuning control, for every seed: MELD finetuned like the three mined runs
  with the same added unlabeled slices and nothing mined (``ft_none``), so that what mining adds is
  read against what the finetuning alone does (fresh optimizer, lower learning rate, the added
  slices as negatives).
* ``--oracle``: a perfect MAM and a perfect NRM, for every seed: every lesion cross-section on
  the slices MELD's mining looked at, from the world's truth of the training split
  (``uld_jax.mine.oracle``), finetuned like MELD + MAM, and the same boxes as ignore regions
  finetuned like MELD + NRM, both read against the control (which it runs too): the most MAM and
  NRM could add at this scale, whatever the embedding and the experts; and which unmarked lesions
  the paper's matching within a patient could reach at all.
* ``--oracle-scratch [AS]``: MELD trained from scratch, for every seed, with the oracle's positives
  as extra labels (complete labels on every mined slice, no added slices): the most label mining
  could give MELD at this scale. ``AS`` ``ignore`` trains it with the same boxes as ignore regions
  instead (a perfect NRM trained in: no lesion the annotations miss among the negatives, no
  positive added), read against MELD and NRM's own regions trained in the same way; ``ignore_key``
  the same table with no overlay-added slice drawn (``data.added_ratio`` 0), so that only the
  ignore regions on MELD's own training slices differ from MELD; ``ignore_added`` the perfect NRM
  with every added unlabeled slice of MELD's mining run drawn, as the paper's finetuning draws
  them (read against ``--mined-scratch added``, the same slices with nothing mined), and how many
  of MELD's sampled negatives those regions keep out (``uld_jax.mine.exposure``).
* ``--mined-scratch [PARTS]``: MELD trained from scratch, for every seed, with its own mined table
  (MAM's positives and NRM's ignore regions, no bare added slices) in place of the short
  finetuning: the recipe the oracle points to, read against MELD, the finetuned MELD + MAM + NRM
  and the oracle's labels trained in the same way. ``PARTS`` ``mam,nrm,both`` also trains MELD with
  the MAM positives alone and with the NRM regions alone: Table 1's ordering with that recipe;
  ``yield`` trains it with the table of MELD mined again with MAM's theta raised to the paper's
  yield (``python -m uld_jax.mine --theta_from paper_yield``: as many positives as the paper's
  embedding-only rule mines at theta 0.15, picked by the location rule), ``yield_mam`` with its
  MAM positives alone (with ``nrm``: Table 1's ordering with that table); ``added`` trains it
  with every added unlabeled slice of the mining run and nothing mined.
* ``--baseline-nrm [WHERE]``: the DeepLesion-only baseline trained 4x the recipe's epochs (the
  ``long`` recipe's length, where it fits its training key slices), plain and, for ``key``, with
  the oracle's boxes as ignore regions on its key slices (``--oracle-scratch ignore_key``'s table
  and flags): a perfect NRM on a detector that fits its labels; for ``added`` (both by default),
  with every added unlabeled slice of MELD's mining run drawn, with nothing mined
  (``--mined-scratch added``'s table) and with the oracle's boxes as ignore regions on every slice
  (``--oracle-scratch ignore_added``'s): a perfect NRM where the paper uses it.
* ``--suppression``: MELD, the perfect NRM on key slices and the ``--baseline-nrm`` runs (those
  finished) mined at their last checkpoint, and ``python -m uld_jax.mine.suppression`` on each:
  which lesions a run finds on its own training slices, marked or not, on the key slices (its
  positives and negatives) or on the others; whether its negatives taught it to miss the unmarked
  lesions, and whether a perfect NRM gives them back.
* ``--heldout N``: a held-out evaluation world of the same preset (another seed, N DeepLesion
  patients, every one in its test split), on which every seed's finished Table-1, control, oracle
  and from-scratch runs are evaluated too: several times the test lesions of the training world's
  own test split.
* ``--resume [ARMS]``: MELD's second half trained again, for every seed, from its checkpoint at
  half its epochs with its own learning rate and a fresh optimizer: with nothing added (the
  control), its own mined table, or the oracle's positives. The runs share MELD's first half, so
  each label source is read against the control on runs that differ only in their second half.
* ``--heldout-checkpoints K`` (with ``--heldout``): each of those runs' K - 1 saved checkpoints
  before its last evaluated on the held-out world too; the page then splits the spread of a run's
  result into what moves between its last K checkpoints and what moves between seeds, and reads
  the ordering on each run's mean over its last K checkpoints.
* ``--recipe long``: the quick recipe's world and model trained 4x as long (32 epochs, mining at
  24), where the detector fits its training lesions; write its page with ``--results
  docs/results_long.md``.
* ``--variant WORLD``: every run on a variant of the recipe's world (``uld_jax.marking_bias``'s
  variants: ``unbiased`` marks that ignore size and conspicuity, ``dense`` 40 unmarked lesions per
  patient beyond the marks instead of 10), the recipe named ``<recipe>_<variant>``; the held-out
  worlds keep the default generator, so that runs on different worlds are read on the same test.

Every run's processes share one JAX compilation cache, ``OUT/jax_cache`` (``--compile-cache``, as
in the quick start): the programs of an architecture are compiled once for all seeds and variants.
A finetune whose command and table rows are an earlier finished finetune's (the control's table
is MELD + NRM's when NRM marked no region) is that run, not trained again
(``quickstart.Quickstart.finetune``).

On the first seed only (its world, build and MELD run; the chunk store of MELD's mining is reused, so
mining again repeats no inference), each step of the same resumable kind:

* ``--thetas``: Fig. 5's theta effect on detection: MELD mined again at each theta, finetuned
  (MAM + NRM) and evaluated.
* ``--table2``: the Table 2 analog: organ-stratified sensitivities (lung, liver, lymph node,
  overall) of MELD, of MELD + NRM with each single-type expert alone (``--nrm_experts luna16`` /
  ``lits`` / ``nihln``: mined again, the NRM rows and added slices kept, finetuned as MELD + NRM)
  and with all three (Table 1's MELD + NRM).
* ``--table4``: the Table 4 analog: training variants from scratch for the recipe's epochs, as
  MELD: dataset concatenation (the baseline's one-expert model on the four datasets merged,
  ``data.merge_datasets``), concatenation with positive-only single-type datasets
  (``data.positive_only``), multi-task (an expert per dataset, no organ heads or gate); and NRM's
  suspicious regions as positives (``--nrm_as_positive``) against ignored (Table 1's MELD + NRM).
* ``--unlabeled R1,R2,...``: Fig. 5's number of added unlabeled slices, on every seed: MELD + MAM +
  NRM finetuned with ``data.added_ratio = R`` (``ft_both_added<R>``; Table 1's run at the config's
  default, always in the sweep), with the slices drawn per epoch (``runs/<run>/epoch_mix.json``).
  With ``--control`` as well, the finetuning control at each ratio too (``ft_none_added<R>``: the
  same added slices, nothing mined), so that what the mining adds is read at every ratio.

The page is generated: every number comes from the runs' ``results.json`` / ``mining_report.json``
/ ``epoch_mix.json`` / step records; nothing is typed by hand. A row without its results reads
"not run".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from typing import Callable, Sequence

import numpy as np

from uld_jax import quickstart as qs
from uld_jax.io.atomic import atomic_write, atomic_write_figure
from uld_jax.core import SINGLE_TYPE_DATASETS
from uld_jax.quickstart_table import RULE_TITLES, RULES

ORDER_CHECKS = (("MELD > baseline", "meld", "baseline"), ("MAM > MELD", "ft_mam", "meld"),
                ("NRM > MELD", "ft_nrm", "meld"), ("MAM+NRM > MAM", "ft_both", "ft_mam"),
                ("MAM+NRM > NRM", "ft_both", "ft_nrm"))


# the counts of an evaluation's ``info`` that describe the test split (volumetric / key-slice)
SPLIT_COUNTS = ("volumes", "images", "truths")


def _seed_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed_{seed}")


def run_seeds(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    for q in _seed_quickstarts(out, recipe, seeds):
        q.run()


def _first_seed(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> qs.Quickstart:
    """The first seed's quick start (its world, build and MELD run carry the extra experiments)."""
    return qs.Quickstart(_seed_dir(out, seeds[0]), recipe, seed=seeds[0])


def _seed_quickstarts(out: str, recipe: qs.Recipe, seeds: Sequence[int]):
    """Each seed's quick start, on the first seed's world and build."""
    for s in seeds:
        yield qs.Quickstart(_seed_dir(out, s), recipe, seed=s,
                            data_from=None if s == seeds[0] else _seed_dir(out, seeds[0]))


def run_keyslice(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    for q in _seed_quickstarts(out, recipe, seeds):
        for run in qs.RUNS:
            q.step(f"keyslice_{run}", [q.eval_cmd(run, protocol="keyslice")])
        # how well the from-scratch models fit their own training key slices (the learning check)
        for run in FIT_RUNS:
            q.step(f"keyslice_train_{run}", [q.eval_cmd(run, protocol="keyslice", split="train")])


FIT_RUNS = ("baseline", "meld")
INPUT_SCORES = (0.1, 0.3, 0.5, 0.7)   # score levels of the page's MAM-inputs table


def figure_name(page: str, name: str) -> str:
    """The page's figure ``name`` in ``figures/``: the page ``results.md`` keeps plain names, any
    other page prefixes its stem, so that pages beside each other keep their own figures."""
    stem = os.path.splitext(os.path.basename(page))[0]
    return name if stem == "results" else f"{stem}_{name}"


def _copy_figure(src: str, page: str, name: str) -> str | None:
    """Copies a run's PNG into ``figures/`` beside the page (atomically) and returns its link
    relative to the page; None without a page or a source."""
    if not page or not os.path.isfile(src):
        return None
    name = figure_name(page, name)
    with open(src, "rb") as f:
        atomic_write(os.path.join(os.path.dirname(os.path.abspath(page)), "figures", name), f.read(),
                     makedirs=True)
    return f"figures/{name}"


def plot_froc_over_seeds(out: str, seeds: Sequence[int], rows: Sequence[tuple[str, str]],
                         path: str) -> str | None:
    """Table 1 as FROC curves (one panel per hit rule): each row's sensitivity at the FP rates,
    mean over the seeds with a result, and a band of +- one standard deviation where there are
    several. Written to ``path`` (temporary name, then renamed); None when nothing was evaluated."""
    res = {(s, r): _result(out, s, r) for s in seeds for r, _ in rows}
    if not any(res.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RULES), figsize=(5.5 * len(RULES), 4.2), dpi=110)
    try:
        for ax, rule in zip(np.atleast_1d(axes), RULES):
            for r, name in rows:
                ts = [res[s, r]["tables"][rule] for s in seeds
                      if res[s, r] and rule in res[s, r].get("tables", {})]
                if not ts:
                    continue
                x = np.asarray(ts[0]["fp_rates"], np.float64)
                y = 100 * np.asarray([t["sensitivity"] for t in ts], np.float64)
                m = y.mean(0)
                ax.plot(x, m, "o-", ms=3, label=f"{name} ({m.mean():.1f})")
                if len(ts) > 1:
                    sd = y.std(0, ddof=1)
                    ax.fill_between(x, m - sd, m + sd, alpha=0.12)
            ax.set_xscale("log", base=2)
            ax.set(xlabel="FPs per sub-volume", ylabel="sensitivity (%)", title=RULE_TITLES[rule])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
        fig.suptitle(f"Table 1 on the synthetic world: mean over seeds {', '.join(map(str, seeds))}"
                     " (band: +- 1 sd)", fontsize=10)
        return atomic_write_figure(path, fig)
    finally:
        plt.close(fig)


def _section_learning(out: str, seeds: Sequence[int], recipe: qs.Recipe | None = None) -> list[str]:
    """Does the detector learn? Per seed: the validation key-slice FROC (sens@0.5-4 FPs, mean)
    logged at each epoch end of the baseline and MELD runs, and (with ``--keyslice``) the final
    models' key-slice FROC on their own training split next to the test split's."""
    L = ["## Learning check: validation curves and the fit to the training key slices", "",
         "Key-slice FROC mean (sensitivity at 0.5, 1, 2, 4 FPs per key slice, %) of the DeepLesion "
         "expert: on the validation split at every epoch end (logged by training, "
         "`val/deeplesion/froc_mean`), and the final model's on its own training key slices and "
         "on the test key slices (mean over 0.5 ... 16 FPs).", ""]
    def key_mean(j):
        return next(iter(j["tables"].values()))["mean"]

    rows, fits = [], {run: [] for run in FIT_RUNS}
    for s in seeds:
        for run in FIT_RUNS:
            curve = _scalar_curve(os.path.join(_seed_dir(out, s), "runs", run),
                                  ("val/deeplesion/froc_mean",)).get("val/deeplesion/froc_mean", [])
            fit = _result(out, s, run, "eval_keyslice_train")
            test = _result(out, s, run, "eval_keyslice")
            if fit:
                fits[run].append(key_mean(fit))
            if not curve and not fit and not test:
                continue
            rows.append(f"| {s} | {qs.ROW_NAMES[run]} | "
                        + (", ".join(_pct(v) for _, v in curve) if curve else "not logged")
                        + " | " + " | ".join(_pct(key_mean(j)) if j else "not run" for j in (fit, test))
                        + " |")
    if not rows:
        return []
    L += ["| seed | run | validation, by epoch | train key slices | test key slices |",
          "|---|---|---|---:|---:|"] + rows + [""]
    if all(fits.values()):
        fit = {r: float(np.mean(v)) >= 0.5 for r, v in fits.items()}
        names = {True: [qs.ROW_NAMES[r] for r in fits if fit[r]],
                 False: [qs.ROW_NAMES[r] for r in fits if not fit[r]]}
        verdict = ("they fit their training lesions" if not names[False] else
                   "they do not fit the lesions they were trained on, so the comparisons above "
                   "measure an under-trained detector" if not names[True] else
                   f"{' and '.join(names[True])} fits its training lesions (50% or more), "
                   f"{' and '.join(names[False])} does not")
        L += ["On their own training key slices the final models reach a key-slice FROC mean of "
              + " and ".join(f"{_mean_sd(v)}% ({qs.ROW_NAMES[r]})" for r, v in fits.items())
              + ": " + verdict + ".", ""]
    if recipe is not None:
        L += _passes_lines(out, seeds, recipe)
    return L


def dl_passes(q: qs.Quickstart) -> dict[str, float] | None:
    """How many times the baseline and MELD pass over each DeepLesion training key slice in the
    recipe (epochs x steps per epoch x batch x DeepLesion's share of the run's mixing epoch / the
    DeepLesion key slices), from the built data; None when the data is not there."""
    from uld_jax.input_pipeline import drawn_per_epoch, epoch_length

    out = {}
    try:
        for name in ("baseline", "meld"):
            comp = q.composition(name)
            dl = comp["deeplesion"]
            share = drawn_per_epoch(dl) / epoch_length(comp)
            out[name] = (q.r.epochs * q.steps_per_epoch(name) * q.r.batch_size * share
                         / dl["positive"])
    except (FileNotFoundError, ValueError, KeyError, ZeroDivisionError, OSError):
        return None
    return out


def _passes_lines(out: str, seeds: Sequence[int], recipe: qs.Recipe) -> list[str]:
    p = dl_passes(qs.Quickstart(_seed_dir(out, seeds[0]), recipe, seed=seeds[0], quiet=True))
    if not p:
        return []
    return [f"Passes over each DeepLesion training key slice in this recipe (epochs x steps x batch "
            f"x DeepLesion's share of the mixing epoch / key slices, from the built data): baseline "
            f"{p['baseline']:.1f}, MELD {p['meld']:.1f}"
            + (" (equal passes)." if recipe.equal_passes else
               ": MELD sees DeepLesion less often than the baseline, since its mixing epoch is "
               "mostly single-type slices and every run takes the same steps (`--recipe equal` "
               "evens the passes out)." if p["meld"] < 0.9 * p["baseline"] else "."), ""]


def _tag(v: float) -> str:
    return f"{v:g}".replace(".", "p")


def _mine_part(q: qs.Quickstart, tag: str, part: str, *mine_args: str) -> str:
    """MELD mined again with ``mine_args`` (the chunk store's inference is reused) into
    ``mined_<tag>_all.npz``, and its ``part`` (:func:`uld_jax.quickstart.split_mined`) in
    ``mined_<tag>.npz``, whose path is returned (step ``mine_<tag>``)."""
    full = os.path.join(q.run_dir("meld"), f"mined_{tag}_all.npz")
    dst = os.path.join(q.run_dir("meld"), f"mined_{tag}.npz")
    q.step(f"mine_{tag}", [q.mine_cmd(*mine_args, "--out", full)],
           fn=lambda: qs.split_mined(full, part, dst, q.data))
    return dst


def _finetune_eval(q: qs.Quickstart, run: str, overlay: str, *extra: str) -> None:
    q.finetune(run, overlay, *extra)
    q.eval_step(run)


def run_thetas(out: str, recipe: qs.Recipe, seed: int, thetas: Sequence[float]) -> None:
    q = qs.Quickstart(_seed_dir(out, seed), recipe, seed=seed)
    for t in thetas:
        tag = _tag(t)
        mined = os.path.join(q.run_dir("meld"), f"mined_theta{tag}.npz")
        q.step(f"mine_theta{tag}", [q.mine_cmd("--theta", str(t), "--out", mined)])
        _finetune_eval(q, f"ft_both_theta{tag}", mined, f"--config.mine.theta={t}")


# NRM's sigma as a precision level (uld_jax.mine.calibrate): MELD mined again with
# --sigma_from precision, finetuned as MELD + NRM and MELD + MAM + NRM, on every seed.
CALIBRATED_ROWS = (("meld", "MELD"), ("ft_mam", "MELD + MAM"),
                   ("ft_nrm", "MELD + NRM (sigma: score 0.5)"),
                   ("ft_nrm_cal", "MELD + NRM (sigma: precision 0.5)"),
                   ("ft_both", "MELD + MAM + NRM (sigma: score 0.5)"),
                   ("ft_both_cal", "MELD + MAM + NRM (sigma: precision 0.5)"))
CALIBRATED_CHECKS = (("NRM (precision) > MELD", "ft_nrm_cal", "meld"),
                     ("MAM+NRM (precision) > MAM", "ft_both_cal", "ft_mam"),
                     ("MAM+NRM (precision) > NRM (precision)", "ft_both_cal", "ft_nrm_cal"))
CALIBRATED_RUNS = tuple(r for r, _ in CALIBRATED_ROWS if r.endswith("_cal"))   # its own runs


def run_calibrated(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    for q in _seed_quickstarts(out, recipe, seeds):
        full = os.path.join(q.run_dir("meld"), "mined_cal.npz")
        part = os.path.join(q.run_dir("meld"), "mined_nrm_cal.npz")
        q.step("mine_cal", [q.mine_cmd("--sigma_from", "precision", "--out", full)],
               fn=lambda q=q, full=full, part=part: qs.split_mined(full, "nrm", part, q.data))
        q.step("report_cal", [q.report_cmd("_cal")])
        _finetune_eval(q, "ft_nrm_cal", part)
        _finetune_eval(q, "ft_both_cal", full)


# The finetuning control: MELD finetuned with the added unlabeled slices and nothing mined, on every
# seed; each mined run is read against it as well as against MELD.
CONTROL_ROWS = (("meld", qs.ROW_NAMES["meld"]),
                ("ft_none", "MELD + finetuning, nothing mined (control)"),
                *((r, qs.ROW_NAMES[r]) for r in ("ft_mam", "ft_nrm", "ft_both")))
CONTROL_CHECKS = (("control > MELD", "ft_none", "meld"), ("MAM > control", "ft_mam", "ft_none"),
                  ("NRM > control", "ft_nrm", "ft_none"),
                  ("MAM+NRM > control", "ft_both", "ft_none"))


def _split_step(q: qs.Quickstart, part: str, tag: str, added: bool = True) -> str:
    """Step ``mine_<tag>``: ``part`` of the seed's MELD mined table written to
    ``mined_<tag>.npz`` beside it (:func:`quickstart.split_mined`); returns that path."""
    meld = q.run_dir("meld")
    dst = os.path.join(meld, f"mined_{tag}.npz")
    q.step(f"mine_{tag}", fn=lambda: qs.split_mined(os.path.join(meld, "mined.npz"), part, dst,
                                                     q.data, added=added))
    return dst


def run_control(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    for q in _seed_quickstarts(out, recipe, seeds):
        _finetune_eval(q, "ft_none", _split_step(q, "none", "none"))


# The oracle: a perfect MAM (every lesion cross-section on the mined slices, from the world's
# truth of the training split) finetuned like MELD + MAM, and the same boxes as a perfect NRM's
# ignore regions, read against the control: how much mining could add.
ORACLE_ROWS = (("meld", qs.ROW_NAMES["meld"]), CONTROL_ROWS[1],
               ("ft_mam", qs.ROW_NAMES["ft_mam"]),
               ("ft_oracle",
                "MELD + oracle MAM (every lesion on the mined slices, from the truth)"),
               ("ft_nrm", qs.ROW_NAMES["ft_nrm"]),
               ("ft_oracle_nrm", "MELD + oracle NRM (the same boxes as ignore regions)"))
ORACLE_CHECKS = (("oracle MAM > control", "ft_oracle", "ft_none"),
                 ("oracle MAM > MAM", "ft_oracle", "ft_mam"),
                 ("oracle NRM > control", "ft_oracle_nrm", "ft_none"),
                 ("oracle NRM > NRM", "ft_oracle_nrm", "ft_nrm"))
# (run, table name, the oracle's options)
ORACLE_PARTS = (("ft_oracle", "mined_oracle", ("--as", "positive")),
                ("ft_oracle_nrm", "mined_oracle_nrm", ("--as", "ignore")))


def _oracle_cmd(q: qs.Quickstart, part: str, *opts: str) -> list[str]:
    """``python -m uld_jax.mine.oracle`` on the seed's MELD mining run, writing ``part``."""
    return [sys.executable, "-m", "uld_jax.mine.oracle", "--mined",
            os.path.join(q.run_dir("meld"), "mined.npz"), "--truth", os.path.join(q.world, "truth"),
            "--data_dir", q.data, *opts, "--out", part]


def run_oracle(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    """Every seed: the oracle tables from MELD's mining run (its slices and added slices), as
    mined positives (``ft_oracle``) and as ignore regions (``ft_oracle_nrm``), finetuned and
    evaluated; the control (``ft_none``) with them, which they are read against."""
    run_control(out, recipe, seeds)
    for q in _seed_quickstarts(out, recipe, seeds):
        for run, name, opts in ORACLE_PARTS:
            part = os.path.join(q.run_dir("meld"), f"{name}.npz")
            q.step(name.replace("mined_", "mine_"), [_oracle_cmd(q, part, *opts)])
            _finetune_eval(q, run, part)


# Labels trained in from scratch, in place of the short finetuning: MELD's own command for its whole
# schedule with the oracle's positives (``meld_oracle``: complete labels on every slice mined, an
# upper bound on what any label mining could give MELD at this scale) or with MELD's own mined table
# (``meld_mined``: MAM's positives and NRM's ignore regions, the recipe change the oracle points to;
# ``meld_mam`` / ``meld_nrm``: either part alone, Table 1's ordering with this recipe); none with
# the bare added slices. Read against MELD and the finetuned MELD + MAM + NRM.
SCRATCH_ROWS = (("meld", qs.ROW_NAMES["meld"]),
                ("ft_both", qs.ROW_NAMES["ft_both"] + " (finetuned)"),
                ("meld_mam", "MELD trained with its own MAM positives"),
                ("meld_nrm", "MELD trained with its own NRM ignore regions"),
                ("meld_mined", "MELD trained with its own mined table (MAM + NRM)"),
                ("meld_yield_mam", "MELD trained with its own MAM positives at the paper's yield"),
                ("meld_yield", "MELD trained with its own mined table, MAM at the paper's yield "
                 "(MAM + NRM)"),
                ("meld_oracle", "MELD trained with the oracle's positives (complete labels on the "
                 "mined slices)"),
                ("meld_oracle_nrm", "MELD trained with the oracle's boxes as ignore regions (a "
                 "perfect NRM)"),
                ("meld_oracle_nrm_key", "MELD trained with the oracle's boxes as ignore regions, "
                 "key slices only (a perfect NRM, no added slice drawn)"),
                ("meld_added", "MELD trained with the added unlabeled slices, nothing mined"),
                ("meld_oracle_nrm_added", "MELD trained with the added unlabeled slices and the "
                 "oracle's boxes as ignore regions (a perfect NRM on every slice)"))
# --mined-scratch PARTS: part -> (run, the table's tag, its part of the mined table
# (quickstart.split_mined), whether the table keeps the bare added slices). 'added' is the mining
# run's unlabeled slices alone, what NRM's ignore regions protect in the paper's finetuning.
SCRATCH_PARTS = {"mam": ("meld_mam", "mam_scratch", "mam", False),
                 "nrm": ("meld_nrm", "nrm_scratch", "nrm", False),
                 "both": ("meld_mined", "both_scratch", "both", False),
                 "yield": ("meld_yield", "yield_scratch", "both", False),
                 "yield_mam": ("meld_yield_mam", "yield_mam_scratch", "mam", False),
                 "added": ("meld_added", "added_scratch", "none", True)}
# the parts taken from the table mined with MAM at the paper's yield (the others: MELD's own table)
YIELD_PARTS = ("yield", "yield_mam")
# the from-scratch runs themselves: every row but the two they are read against
SCRATCH_RUNS = tuple(r for r, _ in SCRATCH_ROWS if r not in ("meld", "ft_both"))
SCRATCH_CHECKS = (("complete labels > MELD", "meld_oracle", "meld"),
                  ("MAM table > MELD", "meld_mam", "meld"),
                  ("NRM table > MELD", "meld_nrm", "meld"),
                  ("mined table > MELD", "meld_mined", "meld"),
                  ("mined table > MAM table", "meld_mined", "meld_mam"),
                  ("mined table > NRM table", "meld_mined", "meld_nrm"),
                  ("mined table > finetuned MAM + NRM", "meld_mined", "ft_both"),
                  ("complete labels > mined table", "meld_oracle", "meld_mined"),
                  ("yield table > MELD", "meld_yield", "meld"),
                  ("yield MAM table > MELD", "meld_yield_mam", "meld"),
                  ("yield table > yield MAM table", "meld_yield", "meld_yield_mam"),
                  ("yield table > NRM table", "meld_yield", "meld_nrm"),
                  ("yield table > mined table", "meld_yield", "meld_mined"),
                  ("complete labels > yield table", "meld_oracle", "meld_yield"),
                  ("perfect NRM > MELD", "meld_oracle_nrm", "meld"),
                  ("perfect NRM > NRM table", "meld_oracle_nrm", "meld_nrm"),
                  ("complete labels > perfect NRM", "meld_oracle", "meld_oracle_nrm"),
                  ("perfect NRM on key slices > MELD", "meld_oracle_nrm_key", "meld"),
                  ("perfect NRM on key slices > perfect NRM", "meld_oracle_nrm_key",
                   "meld_oracle_nrm"),
                  ("added slices > MELD", "meld_added", "meld"),
                  ("perfect NRM with added slices > added slices", "meld_oracle_nrm_added",
                   "meld_added"),
                  ("perfect NRM with added slices > MELD", "meld_oracle_nrm_added", "meld"))
# --oracle-scratch AS: the oracle's boxes as -> (run, the table's tag, the oracle's options, extra
# training flags). A slice holding only ignore regions enters training as an overlay-added slice,
# drawn data.added_ratio x the key slices per epoch, which MELD never sees; 'ignore_key' draws none
# (added_ratio 0), so that only the ignore regions on MELD's own slices differ from MELD;
# 'ignore_added' keeps every added unlabeled slice of MELD's mining run (the paper's finetuning
# data), read against the same slices with nothing mined ('--mined-scratch added').
ORACLE_SCRATCH = {
    "positive": ("meld_oracle", "oracle_scratch", ("--as", "positive", "--without_added"), ()),
    "ignore": ("meld_oracle_nrm", "oracle_nrm_scratch", ("--as", "ignore", "--without_added"), ()),
    "ignore_key": ("meld_oracle_nrm_key", "oracle_nrm_scratch",
                   ("--as", "ignore", "--without_added"), ("--config.data.added_ratio=0.0",)),
    "ignore_added": ("meld_oracle_nrm_added", "oracle_nrm_added", ("--as", "ignore"), ())}


def _oracle_scratch_step(q: qs.Quickstart, as_: str = "positive") -> str:
    """Step ``mine_<tag>`` (:data:`ORACLE_SCRATCH`): the oracle's boxes on MELD's mined slices, as
    positives or as ignore regions, with or without the bare added slices; returns the table's
    path."""
    _, tag, opts, _ = ORACLE_SCRATCH[as_]
    part = os.path.join(q.run_dir("meld"), f"mined_{tag}.npz")
    q.step(f"mine_{tag}", [_oracle_cmd(q, part, *opts)])
    return part


def run_oracle_scratch(out: str, recipe: qs.Recipe, seeds: Sequence[int],
                       as_: Sequence[str] = ("positive",)) -> None:
    """Every seed: MELD trained from scratch with the oracle's boxes as each of ``as_``:
    ``positive`` (complete labels on the mined slices, ``meld_oracle``), ``ignore`` (a perfect
    NRM trained in: every lesion the annotations miss kept out of the negatives, no positive
    added, ``meld_oracle_nrm``), ``ignore_key`` (the same table with no overlay-added slice
    drawn: only the ignore regions on MELD's own training slices act, ``meld_oracle_nrm_key``) or
    ``ignore_added`` (the perfect NRM with every added unlabeled slice of MELD's mining run drawn,
    as the paper's finetuning draws them, ``meld_oracle_nrm_added``)."""
    _known("--oracle-scratch", "use", as_, ORACLE_SCRATCH)
    for q in _seed_quickstarts(out, recipe, seeds):
        for a in as_:
            part, (run, _, _, extra) = _oracle_scratch_step(q, a), ORACLE_SCRATCH[a]
            if a == "ignore_added":
                _exposure_step(q, part)
            q.step(run, [q.scratch_cmd("meld", run, f"--config.data.overlays=('{part}',)",
                                       *extra)])
            q.eval_step(run)


EXPOSURE_BATCHES = 100          # training batches the exposure of MELD's negatives is counted on


def _exposure_step(q: qs.Quickstart, table: str, run: str = "meld") -> None:
    """Step ``exposure`` (``exposure_<run>`` for a run other than MELD): how many of the run's
    sampled training negatives, on key slices and on the added slices, the perfect NRM's ``table``
    keeps out (``python -m uld_jax.mine.exposure``), into ``runs/<run>/exposure.json``."""
    d = q.run_dir(run)
    q.step("exposure" if run == "meld" else f"exposure_{run}", [
        [sys.executable, "-m", "uld_jax.mine.exposure", "--workdir", d, "--overlay", table,
         "--data_dir", q.data, "--batches", str(EXPOSURE_BATCHES), "--seed", str(q.seed), "--out",
         os.path.join(d, "exposure.json")]])


def _known(flag: str, kind: str, given: Sequence[str], allowed: Sequence[str]) -> None:
    """Raises ValueError naming ``flag`` and the ``given`` names not in ``allowed``."""
    bad = [g for g in given if g not in allowed]
    if bad:
        raise ValueError(f"{flag}: unknown {kind}(s) {bad}; expected some of {', '.join(allowed)}")


def _yield_table(q: qs.Quickstart, tag: str, part: str = "both") -> str:
    """Steps ``mine_yield`` / ``report_yield``: MELD mined again with ``--theta_from paper_yield``
    (MAM's theta raised until its location rule mines as many positives as the paper's rule; the
    chunk store's inference is reused) into ``mined_yield.npz``, its mining report
    (``mining_report_yield``), and its ``part`` (:func:`uld_jax.quickstart.split_mined`) without the
    bare added slices in ``mined_<tag>.npz``, whose path is returned (step ``mine_<tag>``)."""
    meld = q.run_dir("meld")
    full = os.path.join(meld, "mined_yield.npz")
    q.step("mine_yield", [q.mine_cmd("--theta_from", "paper_yield", "--out", full)])
    q.step("report_yield", [q.report_cmd("_yield")])
    dst = os.path.join(meld, f"mined_{tag}.npz")
    q.step(f"mine_{tag}", fn=lambda: qs.split_mined(full, part, dst, q.data, added=False))
    return dst


def run_mined_scratch(out: str, recipe: qs.Recipe, seeds: Sequence[int],
                      parts: Sequence[str] = ("both",)) -> None:
    """Every seed: MELD's own command trained from scratch with each ``part`` of its mined table
    (:data:`SCRATCH_PARTS`: ``'mam'`` its MAM positives, ``'nrm'`` its NRM ignore regions,
    ``'both'`` both, ``'yield'`` / ``'yield_mam'`` both / the MAM positives of MELD mined again with
    MAM at the paper's yield, :func:`_yield_table`), without the bare added slices, or
    ``'added'`` those slices alone, nothing mined; then evaluated."""
    _known("--mined-scratch", "part", parts, SCRATCH_PARTS)
    for q in _seed_quickstarts(out, recipe, seeds):
        for part in parts:
            name, tag, split, added = SCRATCH_PARTS[part]
            table = (_yield_table(q, tag, split) if part in YIELD_PARTS
                     else _split_step(q, split, tag, added=added))
            q.step(name, [q.scratch_cmd("meld", name, f"--config.data.overlays=('{table}',)")])
            q.eval_step(name)


# --resume: the same labels trained in over MELD's second half (Quickstart.resume_cmd: from its
# checkpoint at half its epochs, its own learning rate and decays, a fresh optimizer), against the
# same second half with nothing added: paired runs that share MELD's first half, so that the seed's
# spread of whole from-scratch runs is partly shared, while the labels still train at MELD's rate.
RESUME_ARMS = {"none": "resume_none", "mined": "resume_mined", "oracle": "resume_oracle"}
RESUME_ROWS = (("meld", qs.ROW_NAMES["meld"]),
               ("resume_none", "MELD's second half again, nothing added (control)"),
               ("resume_mined", "MELD's second half with its own mined table (MAM + NRM)"),
               ("resume_oracle", "MELD's second half with the oracle's positives"))
RESUME_RUNS = tuple(RESUME_ARMS.values())
RESUME_CHECKS = (("second half: mined table > control", "resume_mined", "resume_none"),
                 ("second half: complete labels > control", "resume_oracle", "resume_none"),
                 ("second half: complete labels > mined table", "resume_oracle", "resume_mined"),
                 ("second half: control > MELD", "resume_none", "meld"))


def run_resume(out: str, recipe: qs.Recipe, seeds: Sequence[int],
               arms: Sequence[str] = tuple(RESUME_ARMS)) -> None:
    """Every seed: MELD's second half again with each of ``arms`` (:data:`RESUME_ARMS`: nothing,
    its own mined table as for ``--mined-scratch``, the oracle's positives as for
    ``--oracle-scratch``), then evaluated."""
    _known("--resume", "arm", arms, RESUME_ARMS)
    for q in _seed_quickstarts(out, recipe, seeds):
        for arm in arms:
            table = (None if arm == "none" else _oracle_scratch_step(q) if arm == "oracle"
                     else _split_step(q, "both", SCRATCH_PARTS["both"][1], added=False))
            run = RESUME_ARMS[arm]
            q.step(run, [q.resume_cmd(run, *(() if table is None else
                                            (f"--config.data.overlays=('{table}',)",)))])
            q.eval_step(run)


# --baseline-nrm: the DeepLesion-only baseline trained LONG_FACTOR x the recipe's epochs (the `long`
# recipe's length: there it fits its training key slices, which MELD at the recipe's length does
# not), plain and with the oracle's boxes as ignore regions on its key slices only (the table and
# flags of `--oracle-scratch ignore_key`): whether a perfect NRM helps a detector that fits its
# labels, where the unmarked lesions among its negatives could be learned as background. Then the
# same where the paper uses NRM: with every added unlabeled slice of MELD's mining run drawn, with
# nothing mined on them (`--mined-scratch added`'s table) and with the oracle's boxes as ignore
# regions on every slice (`--oracle-scratch ignore_added`'s table).
LONG_FACTOR = 4
LONG_ROWS = (("baseline_long", f"Baseline, {LONG_FACTOR}x the recipe's epochs"),
             ("baseline_long_nrm_key", f"Baseline, {LONG_FACTOR}x the recipe's epochs, with the "
              "oracle's boxes as ignore regions on its key slices (a perfect NRM)"),
             ("baseline_long_added", f"Baseline, {LONG_FACTOR}x the recipe's epochs, with the "
              "added unlabeled slices, nothing mined"),
             ("baseline_long_nrm_added", f"Baseline, {LONG_FACTOR}x the recipe's epochs, with the "
              "added unlabeled slices and the oracle's boxes as ignore regions on every slice (a "
              "perfect NRM)"))
LONG_RUNS = tuple(r for r, _ in LONG_ROWS)
# each run's table: None, or (the step that makes it: 'oracle' (_oracle_scratch_step) or 'split'
# (_split_step), its argument)
LONG_TABLES = {"baseline_long": None, "baseline_long_nrm_key": ("oracle", "ignore_key"),
               "baseline_long_added": ("split", "added"),
               "baseline_long_nrm_added": ("oracle", "ignore_added")}
# --baseline-nrm WHERE: where -> its runs beside the plain baseline_long
LONG_ARMS = {"key": ("baseline_long_nrm_key",),
             "added": ("baseline_long_added", "baseline_long_nrm_added")}
# the perfect NRM's run -> the run without it whose negatives its table is counted against
LONG_EXPOSURE = {"baseline_long_nrm_key": "baseline_long",
                 "baseline_long_nrm_added": "baseline_long_added"}
LONG_CHECKS = ((f"perfect NRM on key slices > baseline ({LONG_FACTOR}x epochs)",
                "baseline_long_nrm_key", "baseline_long"),
               (f"added slices > baseline ({LONG_FACTOR}x epochs)",
                "baseline_long_added", "baseline_long"),
               (f"perfect NRM with added slices > added slices ({LONG_FACTOR}x epochs)",
                "baseline_long_nrm_added", "baseline_long_added"),
               (f"perfect NRM with added slices > baseline ({LONG_FACTOR}x epochs)",
                "baseline_long_nrm_added", "baseline_long"))


def long_recipe(recipe: qs.Recipe) -> qs.Recipe:
    """``recipe`` trained :data:`LONG_FACTOR` x as long (its decays scaled with it)."""
    return dataclasses.replace(recipe, epochs=recipe.epochs * LONG_FACTOR,
                               mine_epoch=recipe.mine_epoch * LONG_FACTOR)


def run_baseline_nrm(out: str, recipe: qs.Recipe, seeds: Sequence[int],
                     where: Sequence[str] = tuple(LONG_ARMS),
                     oracle_table: Callable[[qs.Quickstart, str], str] | None = None) -> None:
    """Every seed: the baseline for :func:`long_recipe`'s epochs, plain and the runs of each of
    ``where`` (:data:`LONG_ARMS`), each with its table (:data:`LONG_TABLES`), then evaluated; and
    how many of a run's negatives each perfect NRM's table keeps out (:data:`LONG_EXPOSURE`,
    :func:`_exposure_step`). ``oracle_table(q, as_)`` makes an oracle table and returns its path
    (default :func:`_oracle_scratch_step`: from the seed's MELD mining run)."""
    _known("--baseline-nrm", "arm", where, LONG_ARMS)
    oracle_table = oracle_table or _oracle_scratch_step
    runs = [r for r in LONG_RUNS if r == LONG_RUNS[0] or any(r in LONG_ARMS[w] for w in where)]
    for q in _seed_quickstarts(out, long_recipe(recipe), seeds):
        for run in runs:
            extra: tuple[str, ...] = ()
            if LONG_TABLES[run] is not None:
                kind, arg = LONG_TABLES[run]
                if kind == "oracle":
                    table, flags = oracle_table(q, arg), ORACLE_SCRATCH[arg][3]
                else:
                    _, tag, part, added = SCRATCH_PARTS[arg]
                    table, flags = _split_step(q, part, tag, added=added), ()
                extra = (f"--config.data.overlays=('{table}',)", *flags)
            q.step(run, [q.scratch_cmd("baseline", run, *extra)])
            q.eval_step(run)
            if run in LONG_EXPOSURE:
                _exposure_step(q, table, LONG_EXPOSURE[run])


# --suppression: each of these runs (when finished) mined at its last checkpoint into its own chunk
# store, and python -m uld_jax.mine.suppression on it: which lesions it finds on its own training
# slices, marked or not, on key slices (its positives and negatives) or not (for the runs with the
# added unlabeled slices: on those slices). Pairs: a perfect NRM against the same run without it.
SUPPRESSION_RUNS = ("meld", "meld_oracle_nrm_key", *LONG_RUNS)
SUPPRESSION_PAIRS = (("meld_oracle_nrm_key", "meld"), *LONG_EXPOSURE.items())
SUPPRESSION_SUB = "suppression"


def run_suppression(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    """Every seed: step ``suppression_<run>`` for each finished run of :data:`SUPPRESSION_RUNS`:
    mined at its last checkpoint (``suppression/<run>/store``, nothing else of the mining is used;
    no NRM expert, which the baseline lacks) and measured into ``suppression/<run>.json``."""
    from uld_jax import train

    for q in _seed_quickstarts(out, recipe, seeds):
        for run in SUPPRESSION_RUNS:
            if not q.done(run):
                continue
            d = os.path.join(q.out, SUPPRESSION_SUB, run)
            step = train.checkpoint_steps(q.run_dir(run))[-1]
            q.step(f"suppression_{run}", [
                q.mine_cmd("--nrm_experts", "", "--store_dir", os.path.join(d, "store"), "--out",
                           os.path.join(d, "mined.npz"), run=run, step=step),
                [sys.executable, "-m", "uld_jax.mine.suppression", "--store",
                 f"{run}={os.path.join(d, 'store')}", "--truth", os.path.join(q.world, "truth"),
                 "--data_dir", q.data, "--out", d + ".json"]])


# A held-out evaluation world: the same preset and generator, another seed, every DeepLesion patient
# in its test split (``data_prep.synthesize --dl-split 0,1``), so that Table 1's comparisons rest on
# several times the test lesions of the training world's own test split. Every seed's runs are
# evaluated on it as on their own test split.
HELDOUT_SEED = 1000            # the held-out world's seed is this plus the first training seed
HELDOUT_RUNS = ("baseline", "meld", "ft_none", "ft_mam", "ft_nrm", "ft_both", "ft_oracle",
                "ft_oracle_nrm", "meld_oracle", "meld_mam", "meld_nrm", "meld_mined",
                "meld_yield_mam", "meld_yield", "meld_oracle_nrm", "meld_oracle_nrm_key",
                "meld_added", "meld_oracle_nrm_added", *CALIBRATED_RUNS, *RESUME_RUNS, *LONG_RUNS)
HELDOUT_ROWS = tuple((r, {**dict(SCRATCH_ROWS), **dict(RESUME_ROWS), **dict(LONG_ROWS),
                          **{c: n for c, n in CALIBRATED_ROWS if c in CALIBRATED_RUNS},
                          **qs.ROW_NAMES, **dict(CONTROL_ROWS + ORACLE_ROWS)}[r])
                     for r in HELDOUT_RUNS)


def heldout_quickstart(out: str, recipe: qs.Recipe, seeds: Sequence[int],
                       patients: int = 0, name: str = "heldout", offset: int = 0) -> qs.Quickstart:
    """The held-out world's quick start (``OUT/<name>``, by default ``OUT/heldout``): ``patients``
    DeepLesion patients, all in test, no single-type data, seed :data:`HELDOUT_SEED` + the first
    training seed + ``offset`` (another ``offset``: another world from the same generator)."""
    r = dataclasses.replace(recipe, world_args=(
        "--dl-patients", str(patients), "--luna", "0", "--lits", "0", "--nihln", "0",
        "--dl-split", "0,1"))
    return qs.Quickstart(os.path.join(out, name), r, seed=HELDOUT_SEED + seeds[0] + offset)


def run_heldout(out: str, recipe: qs.Recipe, seeds: Sequence[int], patients: int,
                checkpoints: int = 1) -> None:
    """The held-out world synthesized, checked and built (DeepLesion only) like the training world,
    then every finished run of :data:`HELDOUT_RUNS` of every seed evaluated on it
    (``seed_<s>/eval_heldout/<run>``), and with ``checkpoints`` > 1 its ``checkpoints`` - 1 saved
    checkpoints before the last too (``seed_<s>/eval_heldout_steps/<run>/<step>``)."""
    h = heldout_quickstart(out, recipe, seeds, patients)
    h.do_world()
    h.do_check_build(datasets=("deeplesion",))
    h.write_labels()
    for q in _seed_quickstarts(out, recipe, seeds):
        for run in HELDOUT_RUNS:
            if q.done(run):
                q.step(f"heldout_{run}", [q.eval_cmd(
                    run, on=h, out=os.path.join(q.out, "eval_heldout", run))])
                for step in earlier_steps(q.run_dir(run), checkpoints):
                    q.step(f"heldout_{run}_{step}", [q.eval_cmd(
                        run, on=h, out=os.path.join(q.out, STEPS_SUB, run, str(step)), step=step)])


STEPS_SUB = "eval_heldout_steps"


def earlier_steps(run_dir: str, checkpoints: int) -> list[int]:
    """The steps of a run's ``checkpoints`` - 1 saved checkpoints before its last, oldest first
    (fewer when it saved fewer)."""
    from uld_jax import train

    steps = train.checkpoint_steps(run_dir)
    return steps[max(0, len(steps) - int(checkpoints)):-1] if checkpoints > 1 else []


# Table 2: NRM with each single-type dataset's expert alone (and all three: the quick start's ft_nrm).
TABLE2_ROWS = (("meld", "MELD"),
               ("ft_nrm_luna16", "MELD + NRM, LUNA16 expert only"),
               ("ft_nrm_lits", "MELD + NRM, LiTS expert only"),
               ("ft_nrm_nihln", "MELD + NRM, NIH-LN expert only"),
               ("ft_nrm", "MELD + NRM, all three experts"))
STRATA = (("lung", "lung"), ("liver", "liver"), ("lymph_node", "lymph node"), ("overall", "overall"))


def run_table2(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    q = _first_seed(out, recipe, seeds)
    for run in ("meld", "ft_nrm"):
        q.eval_step(run)            # done by Table 1; again only when it has no organ strata
    for expert in SINGLE_TYPE_DATASETS:
        overlay = _mine_part(q, f"nrm_{expert}", "nrm", "--nrm_experts", expert)
        _finetune_eval(q, f"ft_nrm_{expert}", overlay)


# Table 4: training variants. The one-expert model of configs/baseline.py on MELD's four datasets.
_ONE_EXPERT = ("--config.model.num_datasets=1", "--config.model.num_organ_heads=1",
               "--config.model.use_gate=False", "--config.data.merge_datasets=True")
TABLE4_TRAINING = {
    "concat": _ONE_EXPERT,
    "concat_pos": _ONE_EXPERT + (f"--config.data.positive_only={SINGLE_TYPE_DATASETS!r}",),
    "multitask": ("--config.model.num_organ_heads=1", "--config.model.use_gate=False"),
}
TABLE4_ROWS = (("baseline", "Baseline (DeepLesion only)"),
               ("concat", "Dataset concatenation (one expert, four datasets)"),
               ("concat_pos", "Concatenation, single-type datasets positive-only"),
               ("multitask", "Multi-task (an expert per dataset, no organ heads or gate)"),
               ("meld", "MELD"),
               ("ft_nrm", "MELD + NRM, suspicious regions ignored"),
               ("ft_nrm_pos", "MELD + NRM, suspicious regions as positives"))


def run_table4(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    q = _first_seed(out, recipe, seeds)
    for run, extra in TABLE4_TRAINING.items():
        q.step(run, [q.scratch_cmd("meld", run, *extra)])
        q.eval_step(run)
    overlay = _mine_part(q, "nrm_pos", "nrm", "--nrm_as_positive")
    _finetune_eval(q, "ft_nrm_pos", overlay)


# Fig. 5: the number of added unlabeled slices (data.added_ratio of the MAM + NRM finetuning).
def default_added_ratio() -> float:
    from configs import finetune

    return float(finetune.get_config("tiny").data.added_ratio)


UNLABELED_BASES = {False: "ft_both", True: "ft_none"}     # MELD + MAM + NRM; the control


def unlabeled_run(ratio: float, control: bool = False) -> str:
    """The finetuning run of ``ratio``: MELD + MAM + NRM, or with ``control`` the same finetuning
    with nothing mined; at the config's default, the quick start's ft_both and the control's
    ft_none."""
    base = UNLABELED_BASES[control]
    return base if ratio == default_added_ratio() else f"{base}_added{_tag(ratio)}"


def unlabeled_ratio_of(run: str) -> float | None:
    """The ratio of a Fig. 5 run named by :func:`unlabeled_run` at a ratio other than the default
    (``ft_both_added<R>`` / ``ft_none_added<R>``); None for any other name (the name must be the
    one :func:`unlabeled_run` gives its ratio, so the parse cannot drift from ``_tag``)."""
    for control, base in UNLABELED_BASES.items():
        head = f"{base}_added"
        if run.startswith(head):
            try:
                ratio = float(run[len(head):].replace("p", "."))
            except ValueError:
                return None
            return ratio if unlabeled_run(ratio, control) == run else None
    return None


def unlabeled_ratios(runs: Sequence[str]) -> list[float]:
    """The ratios of the Fig. 5 runs among ``runs`` (:func:`unlabeled_ratio_of`), sorted."""
    return sorted({x for x in map(unlabeled_ratio_of, runs) if x is not None})


def unlabeled_checks(ratios: Sequence[float]) -> list[tuple[str, str, str]]:
    """The ordering checks of the Fig. 5 sweep at each of ``ratios``: the control against MELD and,
    at a ratio other than the default, against the default's control; then MAM + NRM against the
    control at the same ratio (at the default ratio, CONTROL_CHECKS' pairs under names that carry
    the ratio)."""
    rs, d = sorted(set(float(r) for r in ratios)), default_added_ratio()
    return ([(f"control (added_ratio {r:g}) > MELD", unlabeled_run(r, control=True), "meld")
             for r in rs]
            + [(f"control (added_ratio {r:g}) > control (added_ratio {d:g})",
                unlabeled_run(r, control=True), unlabeled_run(d, control=True))
               for r in rs if r != d]
            + [(f"MAM+NRM > control (added_ratio {r:g})", unlabeled_run(r),
                unlabeled_run(r, control=True)) for r in rs])


def run_unlabeled(out: str, recipe: qs.Recipe, seeds: Sequence[int], ratios: Sequence[float],
                  control: bool = False) -> None:
    for q in _seed_quickstarts(out, recipe, seeds):
        arms = [(False, os.path.join(q.run_dir("meld"), "mined.npz"))]
        if control:
            arms.append((True, _split_step(q, "none", "none")))
        for ratio in sorted(set(ratios) | {default_added_ratio()}):  # Table 1's runs: the reference
            # at the default, the quick start's ft_both and the control's ft_none: the same command
            # and step, so done before means skipped here
            extra = () if ratio == default_added_ratio() else (f"--config.data.added_ratio={ratio}",)
            for ctl, overlay in arms:
                run = unlabeled_run(ratio, ctl)
                _finetune_eval(q, run, overlay, *extra)
                q.step(f"mix_{run}", fn=lambda q=q, run=run, overlay=overlay, ratio=ratio:
                       write_epoch_mix(q, run, overlay, ratio))


def write_epoch_mix(q: qs.Quickstart, run: str, overlay: str, ratio: float) -> dict:
    """``runs/<run>/epoch_mix.json``: the finetuning's samples per mixing epoch and dataset
    (``input_pipeline.epoch_composition`` of configs/finetune.py with the run's overlay and
    ``added_ratio``), and the added slices expected among the samples the recipe trains on."""
    from configs import finetune
    from uld_jax import input_pipeline as ip

    c = finetune.get_config("tiny").data
    c.data_dir, c.overlays, c.added_ratio, c.seed = q.data, (overlay,), float(ratio), q.seed
    comp = ip.epoch_composition(c)
    length = ip.epoch_length(comp)
    added = sum(d["added"] for d in comp.values())
    # the finetuning command's own steps (the recipe's, scaled for equal_passes)
    trained = q.steps_per_epoch("finetune") * q.r.batch_size * (q.r.epochs - q.r.mine_epoch)
    info = {"run": run, "added_ratio": float(ratio), "composition": comp, "epoch_length": length,
            "added_per_epoch": added, "added_pool": sum(d["added_pool"] for d in comp.values()),
            "training_samples": trained,
            "expected_added_trained": round(trained * added / length, 1) if length else 0.0}
    path = os.path.join(q.run_dir(run), "epoch_mix.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)
    return info


# --------------------------------------------------------------------------------------------------
# The page.
# --------------------------------------------------------------------------------------------------
def _load(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pct(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * float(v):.1f}"


def _mean_sd(vals: list[float]) -> str:
    v = np.asarray([x for x in vals if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{100 * v[0]:.1f}"
    return f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}"


def _result(out: str, seed: int, run: str, sub: str = "eval"):
    return _load(os.path.join(_seed_dir(out, seed), sub, run, "results.json"))


def _froc_tables(out: str, seeds: Sequence[int], rows: Sequence[tuple[str, str]],
                 seeds_column: bool = False, sub: str = "eval"
                 ) -> tuple[list[str], dict[str, dict[str, dict[int, float]]]]:
    """Per hit rule, a table of ``rows`` ((run, name)): sensitivity at each FP rate and the mean,
    mean ± sd over the seeds with a result ('not run' without one), from each seed's ``sub``
    folder. Returns (lines, {rule: {run: {seed: mean}}})."""
    res = {(s, r): _result(out, s, r, sub) for s in seeds for r, _ in rows}
    L: list[str] = []
    verdict: dict[str, dict[str, list[float]]] = {}
    for rule in RULES:
        found = [v["tables"][rule] for v in res.values() if v and rule in v.get("tables", {})]
        rates = found[-1]["fp_rates"] if found else list(qs.FP_RATES)
        L += [f"### {RULE_TITLES[rule]}", "",
              "| method |" + (" seeds |" if seeds_column else "") + " "
              + " | ".join(f"{x:g}" for x in rates) + " | mean |",
              "|---|" + ("---:|" if seeds_column else "") + "---:|" * (len(rates) + 1)]
        means: dict[str, dict[int, float]] = {}
        for r, name in rows:
            ts = {s: res[s, r]["tables"][rule] for s in seeds
                  if res[s, r] and rule in res[s, r].get("tables", {})}
            lead = f"| {name} |" + (f" {len(ts)} |" if seeds_column else "")
            if not ts:
                L.append(lead + " " + " | ".join("not run" for _ in rates) + " | not run |")
                continue
            cols = [_mean_sd([t["sensitivity"][i] for t in ts.values()]) for i in range(len(rates))]
            means[r] = {s: t["mean"] for s, t in ts.items()}
            L.append(lead + " " + " | ".join(cols)
                     + f" | **{_mean_sd(list(means[r].values()))}** |")
        L.append("")
        verdict[rule] = means
    return L, verdict


ORDER_HEADER = ["Difference of the mean sensitivity (points), per seed; 'holds' when every seed's "
                "difference is positive and the mean difference exceeds the seeds' spread of it.",
                "", "| check | rule | per-seed differences | mean ± sd | holds |",
                "|---|---|---|---:|---|"]


def _points(x: float) -> str:
    """A difference of sensitivities in signed points, one decimal; never ``-0.0``."""
    return f"{round(100 * float(x), 1) + 0.0:+.1f}"


def _check_rows(verdict: dict[str, dict[str, dict[int, float]]], name: str, a: str, b: str
                ) -> list[str]:
    """One ordering check's rows, one per hit rule: run ``a``'s mean sensitivity minus ``b``'s, on
    the seeds both runs have (none: no row)."""
    L = []
    for rule, means in verdict.items():
        common = sorted(set(means.get(a, ())) & set(means.get(b, ())))
        if not common:
            continue
        d = np.asarray([means[a][s] - means[b][s] for s in common])
        sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
        holds = bool((d > 0).all() and (len(d) == 1 or d.mean() > sd))
        L.append(f"| {name} | {rule} | " + ", ".join(_points(x) for x in d)
                 + f" | {_points(d.mean())}" + (f" ± {100 * sd:.1f}" if len(d) > 1 else "")
                 + " | " + (("undecided (one seed: no spread)" if holds else "no (one seed)")
                            if len(d) == 1 else ("yes" if holds else "no")) + " |")
    return L


def _order_lines(verdict: dict[str, dict[str, dict[int, float]]],
                 checks: Sequence[tuple[str, str, str]]) -> list[str]:
    """The ordering checks' table: per check and hit rule, the per-seed differences of the mean
    sensitivity, their mean ± sd, and whether the check holds."""
    return ORDER_HEADER + [r for c in checks for r in _check_rows(verdict, *c)] + [""]


def _section_calibrated(out: str, seeds: Sequence[int]) -> list[str]:
    if not any(_result(out, s, r) for s in seeds for r in CALIBRATED_RUNS):
        return []
    L = ["## NRM with sigma as a precision level (`python -m uld_jax.reproduce --calibrated-nrm`)",
         "", "MELD mined again with `python -m uld_jax.mine --sigma_from precision` (each single-type "
         "expert's score threshold is the one above which its detections on its own dataset's "
         "training split are right at least half of the time, `uld_jax.mine.calibrate`), then "
         "finetuned as MELD + NRM and MELD + MAM + NRM; the rows with the paper's rule (score > 0.5) "
         "are Table 1's. Same seeds, same test split.", ""]
    lines, verdict = _froc_tables(out, seeds, CALIBRATED_ROWS)
    L += lines + ["### Ordering with the precision-level sigma", ""]
    L += _order_lines(verdict, CALIBRATED_CHECKS)
    L += ["| seed | expert: threshold (detections kept of those on its own training split) | NRM "
          "regions | on real lesions |", "|---|---|---:|---:|"]
    for s in seeds:
        m = _load(os.path.join(_seed_dir(out, s), "runs", "meld", "mining_report_cal.json"))
        if not m:
            continue
        cal = (m.get("provenance") or {}).get("sigma_calibration") or {}
        L.append(f"| {s} | " + "; ".join(
            f"{e}: {'none' if c.get('sigma') is None else format(c['sigma'], '.3f')} "
            f"({c.get('kept')} of {c.get('detections')})"
            for e, c in cal.items())
            + f" | {m['quality']['n_suspicious']} | {_pct(m['quality']['suspicious_true_fraction'])} |")
    return L + [""]


def _section_control(out: str, seeds: Sequence[int]) -> list[str]:
    if not any(_result(out, s, "ft_none") for s in seeds):
        return []
    L = ["## The finetuning control (`python -m uld_jax.reproduce --control`)", "",
         "MELD finetuned exactly as the mined runs (same checkpoint, schedule, seed and added "
         "unlabeled slices) with nothing mined: the mined runs' gain over MELD is the control's "
         "plus what mining adds. Same seeds, same test split.", ""]
    lines, verdict = _froc_tables(out, seeds, CONTROL_ROWS)
    return L + lines + ["### Ordering against the control", ""] + _order_lines(verdict,
                                                                                CONTROL_CHECKS)


ORACLE_REACH = (("unmarked", "unmarked lesions (lesion x sub-volume)"),
                ("unmarked_marked_elsewhere", "marked in another study of the patient (identity)"),
                ("unmarked_same_type_marked", "a lesion of the same type marked in the patient"),
                ("unmarked_no_marked_like", "nothing like it marked in the patient"))


def _section_oracle(out: str, seeds: Sequence[int]) -> list[str]:
    if not any(_result(out, s, r) for s in seeds for r, _, _ in ORACLE_PARTS):
        return []
    L = ["## The oracle: what a perfect MAM or NRM could add (`python -m uld_jax.reproduce "
         "--oracle`)", "",
         "`python -m uld_jax.mine.oracle` mines, on the slices MELD's mining run looked at (every "
         "5 mm and the key slices of the training sub-volumes), every lesion cross-section that no "
         "annotation covers, from the world's truth of the training split: MAM with no false "
         "positive and no miss. Finetuned like MELD + MAM (the same added slices) and read against "
         "the control. The same boxes as ignore regions (`--as ignore`) are a perfect NRM, "
         "finetuned like MELD + NRM. A diagnosis, not a method: real data has no such truth; the "
         "test split is never read.", "",
         "| seed | MAM positives | oracle boxes | on unmarked lesions | lesions | "
         + " | ".join(n for _, n in ORACLE_REACH) + " |",
         "|---|" + "---:|" * (4 + len(ORACLE_REACH))]
    for s in seeds:
        meld = os.path.join(_seed_dir(out, s), "runs", "meld")
        j = _load(os.path.join(meld, "mined_oracle.json"))
        if j:
            L.append(f"| {s} | {j['mam_positives']} | {j['oracle_boxes']} | "
                     f"{j['oracle_on_unmarked']} | {j['oracle_lesions']} | "
                     + " | ".join(str(j["reach"][k]) for k, _ in ORACLE_REACH) + " |")
    L += ["", "The last four columns count the training split's unmarked lesions (one per lesion "
          "and sub-volume) by what the paper's rule (matching within the patient) could reach: "
          "the same lesion marked at another time point (a lesion identity), a marked lesion of "
          "the same type (a type-level embedding like LesaNet's), or nothing marked like it.", ""]
    lines, verdict = _froc_tables(out, seeds, ORACLE_ROWS)
    L += lines + ["### Ordering against the control", ""] + _order_lines(verdict, ORACLE_CHECKS)
    return L


def _runs_section(out: str, seeds: Sequence[int], sub: str, runs: Sequence[str], title: str,
                  text: str, rows: Sequence[tuple[str, str]],
                  checks: Sequence[tuple[str, str, str]]) -> list[str]:
    """A section of ``rows`` and ``checks`` on the seeds with any of ``runs`` (none: no section);
    a page section on the training world's split, a subsection of the held-out one's."""
    have = [s for s in seeds if any(_result(out, s, r, sub) for r in runs)]
    if not have:
        return []
    L = [("## " if sub == "eval" else "### ") + title, "", text, ""]
    lines, verdict = _froc_tables(out, have, rows, seeds_column=True, sub=sub)
    return L + lines + _order_lines(verdict, checks)


def _scratch_lines(out: str, seeds: Sequence[int], sub: str = "eval") -> list[str]:
    """MELD trained from scratch with its own mined table and with the oracle's complete labels,
    against MELD and the finetuned MELD + MAM + NRM, on the seeds that have either."""
    return _runs_section(
        out, seeds, sub, SCRATCH_RUNS,
        "Labels trained in from scratch (`--mined-scratch`, `--oracle-scratch`)",
        "MELD's own command (its whole schedule, from scratch) with extra labels on the mined "
        "slices instead of the short finetuning: its own mined table (`--mined-scratch`: MAM's "
        "positives and NRM's ignore regions, without the bare added slices; `--mined-scratch "
        "mam,nrm,both` also each part alone, Table 1's ordering with this recipe; `yield` the "
        "table of MELD mined again with MAM's theta raised to the paper's yield, below) or the "
        "oracle's positives (`--oracle-scratch`, `python -m uld_jax.mine.oracle "
        "--without_added`: the most any mining of labels could give MELD at this scale; "
        "`--oracle-scratch ignore` the same boxes as ignore regions, a perfect NRM, and "
        "`ignore_key` that table with no overlay-added slice drawn, so that only the ignore "
        "regions on MELD's own training slices differ from MELD; `--mined-scratch added` MELD "
        "with every added unlabeled slice of its mining run drawn as the paper's finetuning draws "
        "them, nothing mined, and `--oracle-scratch ignore_added` the same slices with the "
        "perfect NRM, where NRM has the most to protect). The "
        "seeds column counts the seeds with the run; a check compares the seeds both of its runs "
        "have.",
        SCRATCH_ROWS, SCRATCH_CHECKS)


def _yield_quality_lines(out: str, seeds: Sequence[int]) -> list[str]:
    """The yield-matched tables' mining quality (``mining_report_yield.json``), on the seeds that
    have one, beside the default table's (``mining_report.json``)."""
    rows = []
    for s in seeds:
        meld = os.path.join(_seed_dir(out, s), "runs", "meld")
        y, m = _load(os.path.join(meld, "mining_report_yield.json")), _load(
            os.path.join(meld, "mining_report.json"))
        if not y:
            continue
        tc = y["provenance"].get("theta_calibration") or {}
        qy, qm = y["quality"], (m or {}).get("quality") or {}
        rows.append(
            f"| {s} | {tc.get('paper_mined', 'n/a')} | {qm.get('n_mined', 'n/a')} "
            f"({_pct(qm['precision']) if qm else 'n/a'}) | {float(y['provenance']['theta']):.3f}"
            f"{'' if tc.get('reached', True) else ' (not reached)'} | {qy['n_mined']} | "
            f"{_pct(qy['precision'])} | {qy['n_mined_on_unmarked']} | {qy['n_suspicious']} |")
    if not rows:
        return []
    return ["## MAM at the paper's yield (`--mined-scratch yield`)", "",
            "MELD mined again with `python -m uld_jax.mine --theta_from paper_yield`: MAM keeps its "
            "location term and raises theta from 0.15 until it mines as many positives as the "
            "paper's embedding-only rule mines at 0.15 (`uld_jax.mine.run.yield_matched_theta`; "
            "no label is read beyond MAM's inputs). Mining quality against the world's truth of "
            "the training split:", "",
            "| seed | paper's rule at 0.15: mined | location rule at 0.15: mined (precision) | "
            "theta | mined | precision | on unmarked lesions | NRM regions |",
            "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]


EXPOSURE_HEADER = ["| seed | slices | n | with unmarked lesions | unmarked lesions | positive ROIs | "
                   "negative ROIs | in a lesion (IoBB) | covering one | covering (n) | ROI loss | "
                   "negative anchors in a lesion | anchor loss |",
                   "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]


def _exposure_rows(out: str, seeds: Sequence[int], run: str) -> tuple[list[str], str | None]:
    """The exposure table's rows of ``runs/<run>/exposure.json`` on the seeds that have it, and
    the command that made the first."""
    from uld_jax.mine import exposure
    rows, cmd = [], None
    for s in seeds:
        res = _load(os.path.join(_seed_dir(out, s), "runs", run, "exposure.json"))
        if not res:
            continue
        fr = exposure.fractions(res)
        for kind in exposure.KINDS:
            c, f = res["counts"][kind], fr[kind]
            rows.append(
                f"| {s} | {kind} | {c['slices']} | {c['slices_with_regions']} | "
                f"{c['ignore_regions']} | {c['roi_positives']} | {c['roi_negatives']} | "
                f"{_pct(f['roi_negatives_in_region'])} | {_pct(f['roi_negatives_covering'])} | "
                f"{c['roi_negatives_covering']} | {_pct(f['roi_negative_loss_in_region'])} | "
                f"{_pct(f['anchor_negatives_in_region'])} | "
                f"{_pct(f['anchor_negative_loss_in_region'])} |")
        cmd = cmd or (f"`python -m uld_jax.mine.exposure --workdir runs/{run} --overlay "
                      f"{os.path.basename(res['overlay'])} --batches {res['batches']}`")
    return rows, cmd


def _exposure_lines(out: str, seeds: Sequence[int]) -> list[str]:
    """What the perfect NRM keeps out of MELD's sampled negatives (``runs/meld/exposure.json``,
    :func:`_exposure_step`), and out of the ``--baseline-nrm`` baseline's, on the seeds that have
    them."""
    rows, cmd = _exposure_rows(out, seeds, "meld")
    brows, bcmd = _exposure_rows(out, seeds, LONG_RUNS[0])
    arows, acmd = _exposure_rows(out, seeds, "baseline_long_added")
    if not rows and not brows and not arows:
        return []
    L = ["## What a perfect NRM keeps out of MELD's negatives (`uld_jax.mine.exposure`)", ""]
    if rows:
        L += [f"{cmd}: MELD's last checkpoint, its training batches (DeepLesion only, with the "
              "oracle's boxes of `--oracle-scratch ignore_added` overlaid and the mining run's "
              "added unlabeled slices drawn as in training) and its training forward with those "
              "ignore regions switched off, i.e. the negatives MELD was trained with. A sampled "
              "negative ROI or anchor whose IoBB with a region exceeds `roi.ignore_iobb` is one a "
              "perfect NRM would have kept out; 'covering' counts the negative ROIs with IoU >= "
              "0.5 with a region, a box on the lesion itself; 'loss' is their share of the "
              "negatives' classification loss (the training loss's own per-box terms: a hard "
              "negative weighs more than its count). Every region is a lesion cross-section the "
              "annotations miss. Percentages of the negatives of the slice kind.", "",
              *EXPOSURE_HEADER, *rows, ""]
    if brows:
        L += [f"The same for the baseline trained {LONG_FACTOR}x as long (`--baseline-nrm`), a "
              f"detector that fits its labels: {bcmd}, the table of its perfect NRM "
              "(`--oracle-scratch ignore_key`'s). Its key slices are the ones it was trained on; "
              "the table's other mining slices, drawn here as added slices, were not in its "
              "training.", "", *EXPOSURE_HEADER, *brows, ""]
    if arows:
        L += [f"The same baseline trained with the added unlabeled slices, nothing mined "
              f"(`baseline_long_added`): {acmd}, the table of its perfect NRM (`--oracle-scratch "
              "ignore_added`'s), its own training slices and batches: the negatives that "
              "`baseline_long_nrm_added` keeps out.", "", *EXPOSURE_HEADER, *arows, ""]
    return L


def _resume_lines(out: str, seeds: Sequence[int], sub: str = "eval") -> list[str]:
    """MELD's second half again with nothing, its mined table or the oracle's positives."""
    return _runs_section(
        out, seeds, sub, RESUME_RUNS, "Labels trained in over MELD's second half (`--resume`)",
        "MELD's own command again from its checkpoint at half its epochs (the paper's finetuning "
        "start), for its remaining epochs at its own learning rate and decays, with a fresh "
        "optimizer: with nothing added (the control), with its own mined table (as "
        "`--mined-scratch`) or with the oracle's positives (as `--oracle-scratch`). The runs of "
        "a seed share MELD's first half, so the checks against the control pair runs that differ "
        "only in their second half. The seeds column counts the seeds with the run; a check "
        "compares the seeds both of its runs have.",
        RESUME_ROWS, RESUME_CHECKS)


def _long_lines(out: str, seeds: Sequence[int], sub: str = "eval") -> list[str]:
    """The long-trained baseline with and without a perfect NRM, on its key slices and with the
    added unlabeled slices."""
    return _runs_section(
        out, seeds, sub, LONG_RUNS,
        f"A perfect NRM on a detector trained {LONG_FACTOR}x as long (`--baseline-nrm`)",
        f"The DeepLesion-only baseline trained {LONG_FACTOR}x the recipe's epochs (the `long` "
        "recipe's length, where the baseline fits its own training key slices), plain and with "
        "the oracle's boxes as ignore regions on its key slices (the table and flags of "
        "`--oracle-scratch ignore_key`: every lesion the annotations miss kept out of its "
        "negatives, nothing else changed); then with every added unlabeled slice of MELD's "
        "mining run drawn (`data.added_ratio` x the key slices per epoch, as the paper's "
        "finetuning draws them), with nothing mined on them (`--mined-scratch added`'s table: "
        "every box on them a negative) and with the oracle's boxes as ignore regions on every "
        "slice (`--oracle-scratch ignore_added`'s table): a perfect NRM where the paper uses "
        "NRM, on a detector that fits its labels. The seeds column counts the seeds with the "
        "run; a check compares the seeds both of its runs have.",
        LONG_ROWS, LONG_CHECKS)


SUPPRESSION_GROUPS = (("key_marked", "key slices, marked"),
                      ("key_unmarked", "key slices, unmarked"),
                      ("other_marked", "other slices, marked"),
                      ("other_unmarked", "other slices, unmarked"))


def _suppression_lines(out: str, seeds: Sequence[int],
                       runs: Sequence[str] = SUPPRESSION_RUNS,
                       pairs: Sequence[tuple[str, str]] = SUPPRESSION_PAIRS) -> list[str]:
    """Which lesions each of ``runs`` finds on its own training slices (``suppression/<run>.json``,
    :func:`run_suppression`), and each pair's (a perfect NRM, the run without it) differences."""
    res = {(s, r): _load(os.path.join(_seed_dir(out, s), SUPPRESSION_SUB, f"{r}.json"))
           for s in seeds for r in runs}
    res = {k: v[k[1]] for k, v in res.items() if v and k[1] in v}
    if not res:
        return []
    names = {**dict(SCRATCH_ROWS), **dict(LONG_ROWS)}
    rates = next(iter(res.values()))["rates"]
    L = ["## Which lesions a run finds on its own training slices (`--suppression`, "
         "`uld_jax.mine.suppression`)", "",
         "Each run mined at its last checkpoint (`python -m uld_jax.mine --step LAST`: the "
         "DeepLesion expert's detections on the training split's key slices and on its mining "
         "slices, one every 5 mm), then the lesion cross-sections of the "
         "world's truth it finds (%), averaged over the score thresholds at which it makes "
         + ", ".join(f"{r:g}" for r in rates) + " detections per slice on no lesion. Key "
         "slices hold the annotations: their marked lesions are the run's positives, their "
         "unmarked ones its negatives (or, with a perfect NRM, its ignore regions); the other "
         "slices are never the centre of a training sample, except in the runs with the added "
         "unlabeled slices, whose added slices are exactly these other slices: every box on "
         "them a negative (or, with a perfect NRM, every lesion on them an ignore region). A "
         "detector that learns its negatives as background finds fewer unmarked lesions on "
         "key slices than on the other slices (on the other slices than on the key slices, "
         "where those are its added slices), and a perfect NRM gives them back. The other "
         "slices hold partly the same lesions 5 mm away, so the first comparison can "
         "understate what a detector learnt against its negatives; the second (a run against "
         "the same run with a perfect NRM) cannot.", "",
         "| seed | run | step | " + " | ".join(f"{n} (n)" for _, n in SUPPRESSION_GROUPS) + " |",
         "|---|---|---:|" + "---:|" * len(SUPPRESSION_GROUPS)]
    for (s, r), v in sorted(res.items(), key=lambda kv: (list(runs).index(kv[0][1]), kv[0][0])):
        L.append(f"| {s} | {names.get(r, r)} | {v.get('checkpoint_step', 'n/a')} | " + " | ".join(
            f"{_pct(v['groups'][g]['found_mean'])} ({v['groups'][g]['n']})"
            for g, _ in SUPPRESSION_GROUPS) + " |")
    L += ["", "| difference (points) | per-seed | mean ± sd |", "|---|---|---:|"]

    def diff_row(title, pairs):
        d = np.asarray([a - b for a, b in pairs])
        if d.size:
            L.append(f"| {title} | " + ", ".join(_points(x) for x in d) + f" | {_points(d.mean())}"
                     + (f" ± {100 * d.std(ddof=1):.1f}" if d.size > 1 else "") + " |")

    def found(s, r, g):
        return res[s, r]["groups"][g]["found_mean"]

    for r in runs:
        diff_row(f"{names.get(r, r)}: unmarked, key slices - other slices",
                 [(found(s, r, "key_unmarked"), found(s, r, "other_unmarked"))
                  for s in seeds if (s, r) in res])
    for a, b in pairs:
        for g, gname in SUPPRESSION_GROUPS:
            diff_row(f"{names.get(a, a)} - {names.get(b, b)}: {gname}",
                     [(found(s, a, g), found(s, b, g)) for s in seeds
                      if (s, a) in res and (s, b) in res])
    return L + [""]


HELDOUT_CHECKS = (*ORDER_CHECKS, *CONTROL_CHECKS, *CALIBRATED_CHECKS,
                  *(c for c in ORACLE_CHECKS if c[0] in ("oracle MAM > control",
                                                         "oracle NRM > control")))


Curves = dict[str, dict[str, dict[int, list[float]]]]       # {rule: {run: {seed: [means]}}}


def _last_checkpoints(out: str, seeds: Sequence[int], k: int
                      ) -> tuple[Curves, dict[str, list[int]]]:
    """Per hit rule, run and seed, the held-out mean sensitivity of the run's last ``k``
    checkpoints, oldest first: ``k`` - 1 of ``eval_heldout_steps/<run>/<step>`` (the latest ones)
    and its last, ``eval_heldout/<run>``; only seeds with all ``k``. Also each run's steps
    (first such seed's)."""
    vals: Curves = {rule: {} for rule in RULES}
    steps: dict[str, list[int]] = {}
    for run in HELDOUT_RUNS:
        for s in seeds:
            d = os.path.join(_seed_dir(out, s), STEPS_SUB, run)
            earlier = {int(n): _result(out, s, os.path.join(run, n), STEPS_SUB)
                       for n in (os.listdir(d) if os.path.isdir(d) else ()) if n.isdigit()}
            keep = sorted(n for n, r in earlier.items() if r)[-(k - 1):]
            last = _result(out, s, run, "eval_heldout")
            if len(keep) != k - 1 or not last:
                continue
            res = [earlier[n] for n in keep] + [last]
            steps.setdefault(run, keep)
            for rule in RULES:
                if all(rule in r.get("tables", {}) for r in res):
                    vals[rule].setdefault(run, {})[s] = [r["tables"][rule]["mean"] for r in res]
    return vals, steps


def _section_checkpoints(out: str, seeds: Sequence[int], k: int) -> list[str]:
    """How much of a run's spread is between its last ``k`` checkpoints and how much between seeds;
    the ordering on each run's mean over its last ``k`` checkpoints."""
    vals, steps = _last_checkpoints(out, seeds, k) if k > 1 else ({}, {})
    if not steps:
        return []
    names = dict(HELDOUT_ROWS)
    L = [f"### The last {k} checkpoints (`--heldout-checkpoints {k}`)", "",
         ("Every run's last saved checkpoint before its end" if k == 2 else
          f"Every run's last {k - 1} saved checkpoints before its end")
         + ", evaluated on the held-out world like its end. 'Last' is the table above (mean "
         f"± sd over seeds); 'between its last {k}' is the sd of a run's mean sensitivity over "
         f"its last {k} checkpoints, averaged over the seeds: how much the result moves within a "
         "run's last epochs, against the spread between seeds in 'last'; 'mean "
         f"of its last {k}' averages those checkpoints' results per seed, then over seeds. The "
         "steps column gives the earlier checkpoints' steps (the last is the run's end).", ""]
    for rule in RULES:
        L += [f"#### {RULE_TITLES[rule]}", "",
              "| run | earlier steps | seeds | last | "
              f"between its last {k} | mean of its last {k} |",
              "|---|---|---:|---:|---:|---:|"]
        for run, per in vals[rule].items():
            v = np.asarray(list(per.values()), np.float64)
            within = float(v.std(axis=1, ddof=1).mean())
            L.append(f"| {names[run]} | {', '.join(map(str, steps[run]))} | {len(per)} | "
                     f"{_mean_sd(list(v[:, -1]))} | {100 * within:.1f} | "
                     f"{_mean_sd(list(v.mean(axis=1)))} |")
        L.append("")
    return L + [f"#### Ordering on the mean of the last {k} checkpoints", ""] + _order_lines(
        checkpoint_verdict(vals), (*HELDOUT_CHECKS, *SCRATCH_CHECKS, *RESUME_CHECKS, *LONG_CHECKS))


def checkpoint_verdict(vals: Curves) -> dict[str, dict[str, dict[int, float]]]:
    """:func:`_last_checkpoints`' curves as the ordering checks' input: per hit rule, run and seed,
    the mean over the run's last checkpoints."""
    return {rule: {run: {s: float(np.mean(x)) for s, x in per.items()}
                   for run, per in vals[rule].items()} for rule in vals}


def _section_heldout(out: str, seeds: Sequence[int], checkpoints: int = 1) -> list[str]:
    if not any(_result(out, s, r, "eval_heldout") for s in seeds for r in HELDOUT_RUNS):
        return []
    def n_truths(sub):
        res = _result(out, seeds[0], "meld", sub) or {}
        return ((res.get("info") or {}).get("counts") or {}).get("truths", "n/a")

    n_truth, n_own = n_truths("eval_heldout"), n_truths("eval")
    L = ["## Table 1 on a held-out evaluation world (`python -m uld_jax.reproduce --heldout N`)",
         "",
         f"The same runs evaluated on another world of the same preset and generator (seed "
         f"{HELDOUT_SEED} + the first seed; `python -m data_prep.synthesize --dl-split 0,1`: every "
         f"DeepLesion patient in its test split): {n_truth} test lesions against the training "
         f"world's {n_own}, so one lesion weighs less in every number. Same protocol, both hit "
         "rules; no run was trained, tuned or selected on it.", ""]
    rows = tuple(r for r in HELDOUT_ROWS if r[0] not in SCRATCH_RUNS + RESUME_RUNS + LONG_RUNS)
    lines, verdict = _froc_tables(out, seeds, rows, sub="eval_heldout")
    return (L + lines + ["### Ordering on the held-out world", ""]
            + _order_lines(verdict, HELDOUT_CHECKS)
            + _scratch_lines(out, seeds, sub="eval_heldout")
            + _resume_lines(out, seeds, sub="eval_heldout")
            + _long_lines(out, seeds, sub="eval_heldout")
            + _section_checkpoints(out, seeds, checkpoints))


def _section_table2(out: str, seeds: Sequence[int]) -> list[str]:
    res = {(s, r): _result(out, s, r) for s in seeds for r, _ in TABLE2_ROWS}
    L = ["## Table 2 analog: organ-stratified sensitivity, NRM with each single-type expert", "",
         "Average sensitivity (%, mean over 0.125 ... 8 FPs per sub-volume) of the DeepLesion test "
         "lesions of each organ, the world's organ of every lesion (`organ_labels_test.json` from "
         "`truth/deeplesion_lesions.csv`); 'overall' counts every lesion, other organs included. A "
         "stratum's FROC has only that organ's lesions as truths (detections of other lesions count "
         "as FPs, the released recipe). MELD + NRM with one single-type expert (`python -m "
         f"uld_jax.mine --nrm_experts NAME`, then finetuned as MELD + NRM) runs on seed {seeds[0]} "
         "only; MELD and MELD + NRM with all three experts over every seed with results "
         "(mean ± sd; `seeds` = how many).", ""]
    for rule in RULES:
        L += [f"### {RULE_TITLES[rule]}", "",
              "| method | seeds | " + " | ".join(n for _, n in STRATA) + " |",
              "|---|---:|" + "---:|" * len(STRATA)]
        for r, name in TABLE2_ROWS:
            st = [res[s, r]["strata"] for s in seeds if res[s, r] and res[s, r].get("strata")]
            if not st:
                L.append(f"| {name} | 0 | " + " | ".join("not run" for _ in STRATA) + " |")
                continue
            L.append(f"| {name} | {len(st)} | " + " | ".join(
                _mean_sd([x.get(k, {}).get(rule) for x in st]) for k, _ in STRATA) + " |")
        L.append("")
    st = next((v["strata"] for v in res.values() if v and v.get("strata")), None)
    if st:
        L += ["Test lesions per stratum: " + ", ".join(
            f"{n} {st.get(k, {}).get('num_truths', 'n/a')}" for k, n in STRATA) + ".", ""]
    return L


def _section_table4(out: str, seeds: Sequence[int]) -> list[str]:
    L = ["## Table 4 analog: training variants (volumetric protocol)", "",
         "Sensitivity (%) at FPs per sub-volume on the DeepLesion test split. Every variant trains "
         "from scratch for the recipe's epochs as MELD does: `concat` is the baseline's one-expert "
         "model (one RPN / box / classification output, no organ heads or gate) on all four "
         "datasets as one (`data.merge_datasets`); `concat, positive-only` also makes LUNA16, LiTS "
         "and NIH-LN teach only their lesions (`data.positive_only`: nothing else on their slices "
         "is a negative, their lesion-free slices are not drawn); `multi-task` has an expert per "
         "dataset but no organ heads or gate. The NRM pair finetunes from MELD with the suspicious "
         "regions ignored (MELD + NRM of Table 1) or as positives (`--nrm_as_positive`). The "
         f"variants run on seed {seeds[0]} only; rows also in Table 1 are over every seed with "
         "results (mean ± sd; `seeds` = how many).", ""]
    lines, _ = _froc_tables(out, seeds, TABLE4_ROWS, seeds_column=True)
    return L + lines


def _section_unlabeled(out: str, seeds: Sequence[int], ratios: Sequence[float]) -> list[str]:
    """Fig. 5's section: the first seed's mixing epoch at each ratio, then every seed's MELD + MAM +
    NRM (and, where run, the control) at each ratio, mean ± sd, and the checks between them."""
    sd0 = _seed_dir(out, seeds[0])
    runs_dir = os.path.join(sd0, "runs")
    found = {}
    for name in (sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []):
        mix = _load(os.path.join(runs_dir, name, "epoch_mix.json"))
        if mix and name == unlabeled_run(float(mix["added_ratio"])):
            found[float(mix["added_ratio"])] = mix
    given = set(found) | {float(r) for r in ratios}
    ratios = sorted(given | {default_added_ratio()}) if given else []   # Table 1's: the reference
    L = ["## Fig. 5 analog: number of added unlabeled slices (MELD + MAM + NRM finetuning)", "",
         "`added_ratio` R: unlabeled slices (from mining) drawn per mixing epoch = R x the positive "
         "slices, fresh each epoch (configs/finetune.py's default, "
         f"{default_added_ratio():g}, is Table 1's MELD + MAM + NRM). The finetuning trains on a "
         "fixed number of samples (its command's steps x batch), so the last column is how many of "
         f"them are expected to be added slices (seed {seeds[0]}'s mixing epoch). Mean sensitivity "
         "(%) over 0.125 ... 8 FPs per sub-volume, mean ± sd over the seeds with the run "
         "(`seeds`).", ""]
    if not ratios:
        return L + ["Not run (`--unlabeled R1,R2,...`).", ""]
    L += ["| added_ratio | added slices per epoch (pool) | epoch length | seeds | "
          + " | ".join(RULES) + " | added slices expected in training |",
          "|---:|---:|---:|---:|" + "---:|" * (len(RULES) + 1)]
    for ratio in ratios:
        mix = found.get(ratio)
        res = [x for x in (_result(out, s, unlabeled_run(ratio)) for s in seeds) if x]
        sens = [_mean_sd([x["tables"][r]["mean"] for x in res if r in x.get("tables", {})])
                if res else "not run" for r in RULES]
        mix_cols = ([f"{mix['added_per_epoch']} ({mix['added_pool']})", str(mix["epoch_length"])]
                    if mix else ["not run", "not run"])
        L.append(f"| {ratio:g} | " + " | ".join(mix_cols + [str(len(res))] + sens)
                 + f" | {mix['expected_added_trained'] if mix else 'not run'} |")
    L.append("")
    if not any(_result(out, s, unlabeled_run(r, control=True)) for s in seeds for r in ratios):
        return L
    rows = [("meld", qs.ROW_NAMES["meld"])]
    for r in ratios:
        rows += [(unlabeled_run(r, control=True), f"control (nothing mined), added_ratio {r:g}"),
                 (unlabeled_run(r), f"MELD + MAM + NRM, added_ratio {r:g}")]
    lines, verdict = _froc_tables(out, seeds, rows, seeds_column=True)
    return (L + ["### With the finetuning control at each ratio (`--unlabeled ... --control`)", "",
                 "The control is the same finetuning with the same added slices and nothing mined "
                 "(Table 1's control at the default ratio): what the mining adds is the difference "
                 "at the same ratio.", ""] + lines
            + _order_lines(verdict, unlabeled_checks(ratios)))


def write_results(out: str, recipe: qs.Recipe, seeds: Sequence[int], path: str, argv: Sequence[str],
                  notes: Sequence[str] = (), unlabeled: Sequence[float] = (),
                  checkpoints: int = 1) -> str:
    L: list[str] = ["# Results on the synthetic world", "",
                    "Generated by `python -m uld_jax.reproduce` from the runs' own outputs "
                    "(`results.json`, `mining_report.json`, step records); do not edit by hand.", ""]
    L += [f"- command: `python -m uld_jax.reproduce {shlex.join(argv)}`",
          f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs while "
          f"measured), Python {platform.python_version()}, no accelerator",
          f"- recipe `{recipe.name}`: `{json.dumps(dataclasses.asdict(recipe))}`",
          f"- seeds: {', '.join(map(str, seeds))} (the first seed's world and build are shared; the "
          "seed changes training)"] + [f"- note: {n}" for n in notes] + [""]
    # ---- Table 1
    per = {s: {r: _result(out, s, r) for r in qs.RUNS} for s in seeds}
    L += ["## Table 1: volumetric protocol, DeepLesion test split", "",
          "Sensitivity (%) at FPs per sub-volume; mean over 0.125 ... 8. With several seeds: mean ± "
          "sample standard deviation across seeds.", ""]
    lines, verdict = _froc_tables(out, seeds, [(r, qs.ROW_NAMES[r]) for r in qs.RUNS])
    L += lines
    if path and plot_froc_over_seeds(out, seeds, [(r, qs.ROW_NAMES[r]) for r in qs.RUNS],
                                     os.path.join(os.path.dirname(os.path.abspath(path)), "figures",
                                                  figure_name(path, "table1_froc.png"))):
        L += [f"![Table 1 FROC curves](figures/{figure_name(path, 'table1_froc.png')})", ""]
    counts = next((per[s][r].get("info", {}).get("counts") for s in seeds for r in qs.RUNS
                   if per[s][r] and per[s][r].get("info", {}).get("counts")), None)
    if counts:
        # the split's own counts only: they come from the first run with results, whose
        # detection count is its own, not every run's
        L += ["Test split: " + ", ".join(f"{k} {counts[k]}" for k in SPLIT_COUNTS if k in counts)
              + "."]
        nt = counts.get("truths")
        if isinstance(nt, int) and nt > 0:
            L.append(f"Resolution: one test lesion found or missed moves a sensitivity by "
                     f"{100 / nt:.1f} points; differences of that size are not evidence.")
        L.append("")
    # ---- ordering
    L += ["### The paper's ordering", ""] + _order_lines(verdict, ORDER_CHECKS)
    # ---- mining quality
    L += ["## Mining quality (MELD's mined table against the world's full truth)", "",
          "| seed | mined positives | precision | on unmarked lesions | recall of unmarked (visible) "
          "| NRM regions | NRM regions on real lesions | unlabeled slices |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in seeds:
        m = _load(os.path.join(_seed_dir(out, s), "runs", "meld", "mining_report.json"))
        if not m:
            L.append(f"| {s} | not run |||||||")
            continue
        q = m["quality"]
        L.append(f"| {s} | {q['n_mined']} | {_pct(q['precision'])} | {q['n_mined_on_unmarked']} | "
                 f"{_pct(q['recall_unmarked'])} ({q['n_unmarked_visible']}) | {q['n_suspicious']} | "
                 f"{_pct(q['suspicious_true_fraction'])} | {m['counts'].get('unlabeled_slices', 'n/a')} |")
    L += ["", f"Sweeps of theta and sigma (re-thresholds of the same mining): "
          f"`{os.path.join(_seed_dir(out, seeds[0]), 'runs', 'meld', 'mining_report.md')}`.", ""]
    fig = _copy_figure(os.path.join(_seed_dir(out, seeds[0]), "runs", "meld", "mining_report.png"),
                       path, f"mining_quality_seed{seeds[0]}.png")
    if fig:
        L += [f"![Mining quality, seed {seeds[0]}]({fig})", ""]
    m0 = _load(os.path.join(_seed_dir(out, seeds[0]), "runs", "meld", "mining_report.json"))
    if m0:
        for key, title, ks in (
                ("theta_sweep", "theta (MAM)", ["theta", "n_mined", "precision", "n_mined_on_unmarked",
                                                "n_unmarked_found", "recall_unmarked"]),
                ("sigma_sweep", "sigma (NRM)", ["sigma", "n_suspicious", "suspicious_true_fraction",
                                                "n_suspicious_on_unmarked"]),
                ("location_sweep", "MAM's location scale at the mined theta (location_mm 0: the "
                 "paper's embedding-only rule)", ["location_mm", "n_mined", "precision",
                                                  "n_mined_on_unmarked",
                                                  "p_own_closer_than_background"])):
            rows = m0.get(key) or []
            if rows and isinstance(rows, list) and isinstance(rows[0], dict):
                ks = [k for k in ks if k in rows[0]]
                L += [f"Seed {seeds[0]}, {title}:", "", "| " + " | ".join(ks) + " |",
                      "|" + "---:|" * len(ks)]
                L += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else
                                        ("n/a" if v is None else str(v)) for v in
                                        (r.get(k) for k in ks)) + " |" for r in rows]
                L.append("")
    # ---- MAM's inputs (detector and embedding) against the truth
    rows = []
    for s in seeds:
        m = _load(os.path.join(_seed_dir(out, s), "runs", "meld", "mining_report.json"))
        c = (m or {}).get("inputs_check")
        if not c:
            continue
        frac = {r["score"]: r for r in c["by_score"]}
        rows.append(f"| {s} | {c['n_universal']} | {c['n_on_lesion']} | " + " | ".join(
            f"{_pct(frac[t]['on_lesion_fraction'])} ({frac[t]['n']})" if t in frac else "n/a"
            for t in INPUT_SCORES) + f" | {c.get('n_on_annotated_lesion', 'n/a')} | "
            + (f"{c['p_own_closer_than_background']:.2f}"
               if c.get("p_own_closer_than_background") is not None else "n/a") + " |")
    if rows:
        L += ["### MAM's inputs against the truth (`inputs_check` of the mining reports)", "",
              "The universal expert's proposals on the mined slices: how many lie on a real lesion, "
              "overall and at or above each score (%, count in brackets); and the embedding: for "
              "the proposals on an annotated lesion, P(their distance to that lesion's annotation "
              "< a background proposal's distance to the nearest annotation it is compared with), "
              "in MAM's own distance (with a location term, the embedding and the place in the "
              "sub-volume), where 0.5 means MAM has no information to match on.", "",
              "| seed | proposals | on a lesion | " + " | ".join(f"score >= {t:g}" for t in INPUT_SCORES)
              + " | on an annotated lesion | P(own < background) |",
              "|---|---:|---:|" + "---:|" * len(INPUT_SCORES) + "---:|---:|"] + rows + [""]
    # ---- observations computed from the mining reports
    obs = []
    for s in seeds:
        m = _load(os.path.join(_seed_dir(out, s), "runs", "meld", "mining_report.json"))
        if not m:
            continue
        q, prov = m["quality"], m.get("provenance", {})
        loc = prov.get("location_mm") or 0.0
        rule = (f" with a location term of {loc:g} mm (within a sub-volume)" if loc > 0 else
                " on the embedding alone (the paper's rule)")
        obs.append(f"- seed {s}: MAM mined {q['n_mined']} positives at theta "
                   f"{prov.get('theta')}{rule} "
                   f"from MELD step {prov.get('checkpoint_step')}, {_pct(q['precision'])}% of them on "
                   f"a real lesion ({q['n_mined_on_unmarked']} on unmarked lesions); "
                   + (f"NRM found no suspicious region at sigma {prov.get('sigma')}, so MELD + NRM "
                      "differs from MELD only by the finetuning itself (fresh optimizer, added "
                      "unlabeled slices as negatives)." if q["n_suspicious"] == 0 else
                      f"NRM marked {q['n_suspicious']} suspicious regions, "
                      f"{_pct(q['suspicious_true_fraction'])}% of them real lesions."))
    for s in seeds:
        curve = _scalar_curve(os.path.join(_seed_dir(out, s), "runs", "meld"),
                              ("train/loss/embedding", "val/loss/embedding"))
        if curve.get("val/loss/embedding"):
            tr = curve.get("train/loss/embedding", [])
            obs.append(f"- seed {s}: MELD's embedding loss (the metric MAM matches with), by step: "
                       "validation " + ", ".join(f"{st}: {v:.2f}" for st, v in curve["val/loss/embedding"])
                       + "; training " + ", ".join(f"{st}: {v:.2f}" for st, v in tr[-3:]) + ".")
    if obs:
        L += ["### Observations (from the mining reports and MELD's logged losses)", ""] + obs + [""]
    # ---- key-slice
    ks = {s: {r: _load(os.path.join(_seed_dir(out, s), "eval_keyslice", r, "results.json"))
              for r in qs.RUNS} for s in seeds}
    if any(v for d in ks.values() for v in d.values()):
        L += ["## Table 3 analog: key-slice protocol (FPs per key slice)", ""]
        rid = None
        for d in ks.values():
            for v in d.values():
                if v:
                    rid = next(iter(v["tables"]))
                    rates = v["tables"][rid]["fp_rates"]
        L += ["| method | " + " | ".join(f"{x:g}" for x in rates) + " | mean |",
              "|---|" + "---:|" * (len(rates) + 1)]
        for r in qs.RUNS:
            ts = [ks[s][r]["tables"][rid] for s in seeds if ks[s][r]]
            if ts:
                L.append(f"| {qs.ROW_NAMES[r]} | " + " | ".join(
                    _mean_sd([t["sensitivity"][i] for t in ts]) for i in range(len(rates)))
                    + f" | **{_mean_sd([t['mean'] for t in ts])}** |")
        L.append("")
    # ---- theta sweep
    sd0 = _seed_dir(out, seeds[0])
    th = sorted((f for f in os.listdir(os.path.join(sd0, "eval")) if f.startswith("ft_both_theta"))
                if os.path.isdir(os.path.join(sd0, "eval")) else [])
    if th:
        L += ["## Fig. 5 (theta): MELD + MAM + NRM finetuned at each theta (seed "
              f"{seeds[0]}; mean sensitivity, %)", "", "| theta | " + " | ".join(RULES) + " |",
              "|---|" + "---:|" * len(RULES)]
        for f in th:
            j = _load(os.path.join(sd0, "eval", f, "results.json"))
            if j:
                L.append(f"| {f[len('ft_both_theta'):].replace('p', '.')} | " + " | ".join(
                    _pct(j["tables"].get(r, {}).get("mean")) for r in RULES) + " |")
        L.append("")
    L += _section_learning(out, seeds, recipe)
    L += _section_control(out, seeds)
    L += _section_oracle(out, seeds)
    L += _scratch_lines(out, seeds)
    L += _yield_quality_lines(out, seeds)
    L += _exposure_lines(out, seeds)
    L += _resume_lines(out, seeds)
    L += _long_lines(out, seeds)
    L += _suppression_lines(out, seeds)
    L += _section_heldout(out, seeds, checkpoints)
    L += _section_calibrated(out, seeds)
    L += _section_table2(out, seeds)
    L += _section_table4(out, seeds)
    L += _section_unlabeled(out, seeds, unlabeled)
    # ---- times
    L += ["## Wall time per step (s)", "", "| seed | " + " | ".join(_steps_header()) + " | total |",
          "|---|" + "---:|" * (len(_steps_header()) + 1)]
    extra: dict[str, float] = {}
    for s in seeds:
        st = os.path.join(_seed_dir(out, s), "state")
        w = {n[:-5]: (_load(os.path.join(st, n)) or {}).get("wall_s", float("nan"))
             for n in (sorted(os.listdir(st)) if os.path.isdir(st) else []) if n.endswith(".json")}
        L.append(f"| {s} | " + " | ".join(f"{w[k]:g}" if k in w else "-" for k in _steps_header())
                 + f" | {sum(v for v in w.values() if np.isfinite(v)):.0f} |")
        if s == seeds[0]:
            extra = {k: v for k, v in w.items() if k not in _steps_header()}
    if extra:
        L += ["", f"Seed {seeds[0]}'s other steps (Tables 2-4, Fig. 5): " + ", ".join(
            f"{k} {v:g}" for k, v in extra.items()) + "."]
    L += ["", "## Caveats", "",
          f"- The recipe `{recipe.name}` trains the `tiny` model for {recipe.epochs} epochs of "
          f"{recipe.steps_per_epoch} steps of {recipe.batch_size} samples on the CPU"
          + (" (MELD's runs: more steps, for equal passes over DeepLesion)"
             if recipe.equal_passes else "") + ", on a "
          "reduced `small` world: far from the paper's scale, so differences of a few points are "
          "within the noise of one run; read the spread across seeds.",
          "- Tables 2 and 4 and the Fig. 5 sweeps run on the first seed only (one training run per "
          "row): a single run's differences are not evidence.", ""]
    text = "\n".join(L)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return text


def _scalar_curve(workdir: str, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from a run's TensorBoard event files (empty when unreadable)."""
    import glob

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
    if not files:
        return out
    try:
        import tensorflow as tf

        for f in files:
            for e in tf.compat.v1.train.summary_iterator(f):
                for v in e.summary.value:
                    if v.tag in tags:
                        val = tf.make_ndarray(v.tensor) if v.HasField("tensor") else v.simple_value
                        out.setdefault(v.tag, []).append((int(e.step), float(val)))
    except Exception:  # noqa: BLE001 - a missing or partial log only drops the observation
        return out
    return out


def _steps_header() -> list[str]:
    return ["world", "check", "build", "baseline", "meld", "mine", "report", "ft_mam", "ft_nrm",
            "ft_both", "eval_baseline", "eval_meld", "eval_ft_mam", "eval_ft_nrm", "eval_ft_both",
            "table", "overlays"]


def config_table() -> str:
    """Markdown table of every config key: tiny and paper values of configs/meld.py, and where
    configs/baseline.py (tiny) or configs/finetune.py (tiny / paper) differ (docs/configuration.md)."""
    from configs import baseline, finetune, meld

    def flat(d, p=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, p + k + ".") if hasattr(v, "items") else {p + k: v})
        return out

    t, pp = flat(meld.get_config("tiny").to_dict()), flat(meld.get_config("paper").to_dict())
    b = flat(baseline.get_config("tiny").to_dict())
    f, fp = flat(finetune.get_config("tiny").to_dict()), flat(finetune.get_config("paper").to_dict())
    lines = ["| key | tiny | paper | baseline.py / finetune.py differ |", "|---|---|---|---|"]
    for k in t:
        diff = []
        if b.get(k) != t[k]:
            diff.append(f"baseline: `{b[k]}`")
        if f.get(k) != t[k] or fp.get(k) != pp[k]:
            diff.append(f"finetune: `{f[k]}` / `{fp[k]}`")
        lines.append(f"| `{k}` | `{t[k]}` | `{pp[k]}` | {'; '.join(diff)} |")
    return "\n".join(lines)


def _number_list(flag: str, low: float, strict: bool = False):
    """argparse type: comma-separated numbers, each >= ``low`` (> with ``strict``), distinct."""
    def parse(text: str) -> list[float]:
        try:
            vals = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")
        bad = [v for v in vals if not np.isfinite(v) or (v <= low if strict else v < low)]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: every value must be {'>' if strict else '>='} {low:g} (got {bad[0]:g})")
        if len(set(vals)) != len(vals):
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
        return vals
    parse.__name__ = flag
    return parse


def write_or_print(path: str | None, lines: Sequence[str], tag: str, suffix: str = "") -> None:
    """A page's lines written to ``path`` (atomically) when given, else printed."""
    text = "\n".join(lines).rstrip() + "\n"
    if path:
        atomic_write(path, text.encode("utf-8"), makedirs=True)
        print(f"[{tag}] wrote {path}{suffix}")
    else:
        print(text)


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: one or more distinct integers, comma-separated (ValueError naming the flag)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: {text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: {text!r}: give one or more distinct seeds")
    return seeds


def seeds_arg(text: str) -> list[int]:
    """:func:`parse_seeds` as an argparse ``type`` (its message becomes the usage error)."""
    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_variant_arg(p: argparse.ArgumentParser, what: str) -> None:
    """The ``--variant WORLD`` option (read by :func:`recipe_of_args`)."""
    p.add_argument("--variant", default="", metavar="WORLD",
                   help=f"{what} (uld_jax.marking_bias.VARIANTS: unbiased = marks that ignore size "
                        "and conspicuity, dense = 40 unmarked lesions per patient beyond the "
                        "marks); the recipe's name gets the suffix; held-out worlds keep the "
                        "default generator")


def recipe_of_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> qs.Recipe:
    """``--recipe`` on the world of ``--variant`` (a one-line usage error when it is unknown)."""
    r = qs.RECIPES[a.recipe]
    if a.variant:
        from uld_jax import marking_bias   # it builds on this module
        try:
            r = marking_bias.variant_recipe(r, a.variant)
        except ValueError as e:
            p.error(f"--variant: {e}")
    return r


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m uld_jax.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--recipe", choices=sorted(qs.RECIPES), default="quick")
    p.add_argument("--seeds", type=seeds_arg, default="0,1,2")
    add_variant_arg(p, "train on a variant of the recipe's world")
    p.add_argument("--keyslice", action="store_true", help="Table 3 analog for every run")
    p.add_argument("--thetas", default="", type=_number_list("--thetas", 0.0, strict=True),
                   help="comma-separated thetas for the Fig. 5 sweep")
    p.add_argument("--control", action="store_true",
                   help="every seed: MELD finetuned with the added slices and nothing mined")
    p.add_argument("--oracle", action="store_true",
                   help="every seed: a perfect MAM and a perfect NRM from the world's truth "
                   "(uld_jax.mine.oracle), finetuned like MELD + MAM and MELD + NRM, with the "
                   "control")
    p.add_argument("--oracle-scratch", nargs="?", const="positive", default="", metavar="AS",
                   help="every seed: MELD trained from scratch with the oracle's boxes; AS "
                   "(comma-separated, default 'positive'): 'positive' as labels (complete labels "
                   "on the mined slices), 'ignore' as ignore regions (a perfect NRM), "
                   "'ignore_key' the same with no overlay-added slice drawn (only the ignore "
                   "regions on MELD's own training slices), 'ignore_added' as ignore regions with "
                   "every added unlabeled slice of MELD's mining run drawn (read against "
                   "--mined-scratch added; also measures the negatives it keeps out, "
                   "python -m uld_jax.mine.exposure)")
    p.add_argument("--mined-scratch", nargs="?", const="both", default="", metavar="PARTS",
                   help="every seed: MELD trained from scratch with its own mined table instead of "
                   "finetuned on it; PARTS (comma-separated, default 'both'): 'mam' its MAM "
                   "positives, 'nrm' its NRM ignore regions, 'both' both (Table 1 from scratch: "
                   "mam,nrm,both), 'yield' both with MAM's theta raised to the paper's yield "
                   "(python -m uld_jax.mine --theta_from paper_yield), 'yield_mam' that table's "
                   "MAM positives alone, 'added' nothing mined but every added unlabeled slice "
                   "of the mining run drawn")
    p.add_argument("--resume", nargs="?", const="none,mined,oracle", default="", metavar="ARMS",
                   help="every seed: MELD's second half again (from its checkpoint at half its "
                   "epochs, its own learning rate) with ARMS (comma-separated, default all): "
                   "'none' nothing added, 'mined' its own mined table, 'oracle' the oracle's "
                   "positives; paired against 'none'")
    p.add_argument("--baseline-nrm", nargs="?", const=",".join(LONG_ARMS), default="",
                   metavar="WHERE",
                   help=f"every seed: the DeepLesion-only baseline trained {LONG_FACTOR}x the "
                   "recipe's epochs, plain and, for each of WHERE (comma-separated, default "
                   "both), with a perfect NRM on a detector that fits its labels: 'key' the "
                   "oracle's boxes as ignore regions on its key slices, 'added' the added "
                   "unlabeled slices without and with the oracle's boxes as ignore regions")
    p.add_argument("--suppression", action="store_true",
                   help="every seed: MELD, the perfect NRM on key slices and the --baseline-nrm "
                   "runs (those finished) mined at their last checkpoint; which lesions each "
                   "finds on its own training slices (python -m uld_jax.mine.suppression)")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="every seed's finished Table-1, control, oracle and from-scratch runs "
                   "also evaluated on a held-out world of N DeepLesion patients, all in test "
                   "(96 or more: at 24 about half of the seeds' spread is the test set's, "
                   "docs/results_spread.md)")
    p.add_argument("--heldout-checkpoints", type=int, default=1, metavar="K",
                   help="with --heldout: also each run's K - 1 checkpoints before its last on "
                   "the held-out world; the page reads the spread between a run's last K "
                   "checkpoints and the ordering on their mean (default 1: the last only)")
    p.add_argument("--calibrated-nrm", action="store_true",
                   help="every seed: NRM with sigma as a precision level (mine --sigma_from "
                   "precision), finetuned as MELD + NRM and MELD + MAM + NRM")
    p.add_argument("--table2", action="store_true", help="Table 2 analog (first seed)")
    p.add_argument("--table4", action="store_true", help="Table 4 analog (first seed)")
    p.add_argument("--unlabeled", default="", type=_number_list("--unlabeled", 0.0),
                   help="comma-separated data.added_ratio values for Fig. 5's added unlabeled "
                   "slices (every seed; with --control, the control at each ratio too)")
    p.add_argument("--results", default=None, help="page to write ('' = none; default "
                   "docs/results.md, or docs/results_<recipe>.md for a recipe other than quick)")
    p.add_argument("--results-only", action="store_true", help="only rewrite the page")
    p.add_argument("--note", action="append", default=[], help="a line added under the header "
                   "(how the runs were made when they were not made by this command)")
    p.add_argument("--config-table", action="store_true",
                   help="print docs/configuration.md's key table and exit")
    qs.add_compile_cache_arg(p)
    a = p.parse_args(argv)
    if a.config_table:
        print(config_table())
        return 0
    out = os.path.abspath(a.out)
    r = recipe_of_args(p, a)
    seeds = a.seeds
    def subset(flag: str, value: str, kind: str, allowed: Sequence[str]) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        try:
            if value and not names:
                raise ValueError(f"{flag}: {value!r}: no {kind} given")
            _known(flag, kind, names, allowed)
        except ValueError as e:
            p.error(str(e))
        return names

    scratch_parts = subset("--mined-scratch", a.mined_scratch, "part", SCRATCH_PARTS)
    oracle_as = subset("--oracle-scratch", a.oracle_scratch, "use", ORACLE_SCRATCH)
    resume_arms = subset("--resume", a.resume, "arm", RESUME_ARMS)
    long_arms = subset("--baseline-nrm", a.baseline_nrm, "arm", LONG_ARMS)
    if a.heldout_checkpoints < 1:
        p.error(f"--heldout-checkpoints: {a.heldout_checkpoints}: give 1 or more")
    if a.results is None:
        a.results = ("docs/results.md" if r.name == "quick" else f"docs/results_{r.name}.md")
    results = os.path.abspath(a.results) if a.results else ""
    if not a.results_only:                  # one cache for every seed's and world's runs
        qs.use_compile_cache(out, a.compile_cache)
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not a.results_only:
        run_seeds(out, r, seeds)
        if a.keyslice:
            run_keyslice(out, r, seeds)
        if a.control:
            run_control(out, r, seeds)
        if a.oracle:
            run_oracle(out, r, seeds)
        if a.oracle_scratch:
            run_oracle_scratch(out, r, seeds, oracle_as)
        if a.mined_scratch:
            run_mined_scratch(out, r, seeds, scratch_parts)
        if a.resume:
            run_resume(out, r, seeds, resume_arms)
        if a.baseline_nrm:
            run_baseline_nrm(out, r, seeds, long_arms)
        if a.suppression:
            run_suppression(out, r, seeds)
        if a.heldout:
            run_heldout(out, r, seeds, a.heldout, a.heldout_checkpoints)
        if a.calibrated_nrm:
            run_calibrated(out, r, seeds)
        if a.thetas:
            run_thetas(out, r, seeds[0], a.thetas)
        if a.table2:
            run_table2(out, r, seeds)
        if a.table4:
            run_table4(out, r, seeds)
        if a.unlabeled:
            run_unlabeled(out, r, seeds, a.unlabeled, control=a.control)
    text = write_results(out, r, seeds, results, argv, notes=a.note, unlabeled=a.unlabeled or (),
                         checkpoints=a.heldout_checkpoints)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
