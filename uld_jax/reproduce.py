"""The paper's experiments on the synthetic world, and docs/results.md written from their outputs.

    python -m uld_jax.reproduce --out runs/reproduce --seeds 0,1,2 [--keyslice] \
        [--thetas 0.05,0.1,0.2,0.3] [--results docs/results.md]
    python -m uld_jax.reproduce --out runs/reproduce --seeds 0 --results-only   # rewrite the page

What runs (each piece resumable: finished steps are skipped when run again):

* Table 1: the quick start's chain (``uld_jax.quickstart``) for each training seed, on one world
  (``OUT/seed_<first>`` synthesizes and builds it, the other seeds reuse it): baseline, MELD,
  MELD + MAM, MELD + NRM, MELD + MAM + NRM, volumetric protocol with both hit rules; the mean and
  the spread (sample standard deviation) across seeds, and whether the paper's ordering holds.
* mining quality: ``python -m uld_jax.mine.report`` of each seed's MELD (precision of the MAM
  positives, the unmarked lesions they find, the NRM regions that are real lesions, theta / sigma
  sweeps: the mining side of Fig. 5).
* ``--keyslice``: the Table 3 analog (MULAN key-slice protocol, FPs per key slice) for every run.
* ``--thetas``: Fig. 5's theta effect on detection: the first seed's MELD mined again at each theta
  (the chunk store's inference is reused), finetuned (MAM + NRM) and evaluated.

Not implemented here (named on the page as missing): Table 2's NRM with each single-type dataset,
Table 4's training variants, Fig. 5's number of added unlabeled slices.

The page is generated: every number comes from the runs' ``results.json`` / ``mining_report.json``
/ step records; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Sequence

import numpy as np

from uld_jax import quickstart as qs
from uld_jax.quickstart_table import RULE_TITLES, RULES

ORDER_CHECKS = (("MELD > baseline", "meld", "baseline"), ("MAM > MELD", "ft_mam", "meld"),
                ("NRM > MELD", "ft_nrm", "meld"), ("MAM+NRM > MAM", "ft_both", "ft_mam"),
                ("MAM+NRM > NRM", "ft_both", "ft_nrm"))


def _seed_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed_{seed}")


def run_seeds(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    first = _seed_dir(out, seeds[0])
    for i, s in enumerate(seeds):
        q = qs.Quickstart(_seed_dir(out, s), recipe, seed=s, data_from=None if i == 0 else first)
        q.run()


def run_keyslice(out: str, recipe: qs.Recipe, seeds: Sequence[int]) -> None:
    for s in seeds:
        q = qs.Quickstart(_seed_dir(out, s), recipe, seed=s,
                          data_from=None if s == seeds[0] else _seed_dir(out, seeds[0]))
        for run in qs.RUNS:
            q.step(f"keyslice_{run}", [[
                sys.executable, "-m", "uld_jax.evaluate", "--workdir", q.run_dir(run), "--data", q.data,
                "--datasets", "deeplesion", "--split", "test", "--protocol", "keyslice",
                "--batch-size", str(recipe.eval_batch),
                "--out", os.path.join(q.out, "eval_keyslice", run)]])


def _theta_tag(t: float) -> str:
    return f"{t:g}".replace(".", "p")


def run_thetas(out: str, recipe: qs.Recipe, seed: int, thetas: Sequence[float]) -> None:
    q = qs.Quickstart(_seed_dir(out, seed), recipe, seed=seed)
    meld = q.run_dir("meld")
    truth = os.path.join(q.world, "truth", "deeplesion_volumetric_truth.pkl")
    dl_info = os.path.join(q.world, "DeepLesion", "DL_info.csv")
    for t in thetas:
        tag = _theta_tag(t)
        mined = os.path.join(meld, f"mined_theta{tag}.npz")
        q.step(f"mine_theta{tag}", [[sys.executable, "-m", "uld_jax.mine", "--workdir", meld,
                                     "--epoch", str(recipe.mine_epoch), "--every_mm",
                                     str(recipe.mine_every_mm), "--batch_per_device",
                                     str(recipe.eval_batch), "--progress", "off", "--theta", str(t),
                                     "--out", mined]])
        run = f"ft_both_theta{tag}"
        q.step(run, [q._train_cmd(
            "finetune", run, f"--config.num_epochs={recipe.epochs - recipe.mine_epoch}",
            f"--config.init_from.workdir={meld}", f"--config.init_from.epoch={recipe.mine_epoch}",
            f"--config.optimizer.decay_epochs=({max(1, (recipe.epochs - recipe.mine_epoch) // 2)},)",
            f"--config.mine.theta={t}", f"--config.data.overlays=('{mined}',)")])
        q.step(f"eval_{run}", [[
            sys.executable, "-m", "uld_jax.evaluate", "--workdir", q.run_dir(run), "--data", q.data,
            "--datasets", "deeplesion", "--split", "test", "--protocol", "volumetric", "--truth", truth,
            "--dl-info", dl_info, "--rule", "both", "--batch-size", str(recipe.eval_batch),
            "--out", os.path.join(q.out, "eval", run)]])


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


def write_results(out: str, recipe: qs.Recipe, seeds: Sequence[int], path: str, argv: Sequence[str],
                  notes: Sequence[str] = ()) -> str:
    L: list[str] = ["# Results on the synthetic world", "",
                    "Generated by `python -m uld_jax.reproduce` from the runs' own outputs "
                    "(`results.json`, `mining_report.json`, step records); do not edit by hand.", ""]
    L += [f"- command: `python -m uld_jax.reproduce {' '.join(argv)}`",
          f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs while "
          f"measured), Python {platform.python_version()}, no accelerator",
          f"- recipe `{recipe.name}`: `{json.dumps(dataclasses.asdict(recipe))}`",
          f"- seeds: {', '.join(map(str, seeds))} (the first seed's world and build are shared; the "
          "seed changes training)"] + [f"- note: {n}" for n in notes] + [""]
    # ---- Table 1
    per = {s: {r: _load(os.path.join(_seed_dir(out, s), "eval", r, "results.json")) for r in qs.RUNS}
           for s in seeds}
    L += ["## Table 1: volumetric protocol, DeepLesion test split", "",
          "Sensitivity (%) at FPs per sub-volume; mean over 0.125 ... 8. With several seeds: mean ± "
          "sample standard deviation across seeds.", ""]
    verdict = {}
    for rule in RULES:
        rates = None
        for s in seeds:
            for r in qs.RUNS:
                t = (per[s][r] or {}).get("tables", {}).get(rule)
                if t:
                    rates = t["fp_rates"]
        if rates is None:
            continue
        L += [f"### {RULE_TITLES[rule]}", "",
              "| method | " + " | ".join(f"{x:g}" for x in rates) + " | mean |",
              "|---|" + "---:|" * (len(rates) + 1)]
        means = {}
        for r in qs.RUNS:
            ts = [(per[s][r] or {}).get("tables", {}).get(rule) for s in seeds]
            ts = [t for t in ts if t]
            if not ts:
                L.append(f"| {qs.ROW_NAMES[r]} | " + " | ".join("not run" for _ in rates) + " | not run |")
                continue
            cols = [_mean_sd([t["sensitivity"][i] for t in ts]) for i in range(len(rates))]
            means[r] = [t["mean"] for t in ts]
            L.append(f"| {qs.ROW_NAMES[r]} | " + " | ".join(cols) + f" | **{_mean_sd(means[r])}** |")
        L.append("")
        verdict[rule] = means
    counts = None
    for s in seeds:
        for r in qs.RUNS:
            if per[s][r]:
                counts = per[s][r].get("info", {}).get("counts")
                break
        if counts:
            break
    if counts:
        L += ["Test split: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + "."]
        nt = counts.get("truths")
        if isinstance(nt, int) and nt > 0:
            L.append(f"Resolution: one test lesion found or missed moves a sensitivity by "
                     f"{100 / nt:.1f} points; differences of that size are not evidence.")
        L.append("")
    # ---- ordering
    L += ["### The paper's ordering", "",
          "Difference of the mean sensitivity (points), per seed; 'holds' when every seed's "
          "difference is positive and the mean difference exceeds the seeds' spread of it.", "",
          "| check | rule | per-seed differences | mean ± sd | holds |", "|---|---|---|---:|---|"]
    for name, a, b in ORDER_CHECKS:
        for rule, means in verdict.items():
            if a not in means or b not in means or len(means[a]) != len(means[b]):
                continue
            d = np.asarray(means[a]) - np.asarray(means[b])
            sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
            holds = bool((d > 0).all() and (len(d) == 1 or d.mean() > sd))
            L.append(f"| {name} | {rule} | " + ", ".join(f"{100 * x:+.1f}" for x in d)
                     + f" | {100 * d.mean():+.1f}" + (f" ± {100 * sd:.1f}" if len(d) > 1 else "")
                     + " | " + (("undecided (one seed: no spread)" if holds else "no (one seed)")
                                if len(d) == 1 else ("yes" if holds else "no")) + " |")
    L.append("")
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
    m0 = _load(os.path.join(_seed_dir(out, seeds[0]), "runs", "meld", "mining_report.json"))
    if m0:
        for key, title, ks in (
                ("theta_sweep", "theta (MAM)", ["theta", "n_mined", "precision", "n_mined_on_unmarked",
                                                "n_unmarked_found", "recall_unmarked"]),
                ("sigma_sweep", "sigma (NRM)", ["sigma", "n_suspicious", "suspicious_true_fraction",
                                                "n_suspicious_on_unmarked"])):
            rows = m0.get(key) or []
            if rows and isinstance(rows, list) and isinstance(rows[0], dict):
                ks = [k for k in ks if k in rows[0]]
                L += [f"Seed {seeds[0]}, {title}:", "", "| " + " | ".join(ks) + " |",
                      "|" + "---:|" * len(ks)]
                L += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else
                                        ("n/a" if v is None else str(v)) for v in
                                        (r.get(k) for k in ks)) + " |" for r in rows]
                L.append("")
    # ---- observations computed from the mining reports
    obs = []
    for s in seeds:
        m = _load(os.path.join(_seed_dir(out, s), "runs", "meld", "mining_report.json"))
        if not m:
            continue
        q, prov = m["quality"], m.get("provenance", {})
        obs.append(f"- seed {s}: MAM mined {q['n_mined']} positives at theta {prov.get('theta')} "
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
    # ---- times
    L += ["## Wall time per step (s)", "", "| seed | " + " | ".join(_steps_header()) + " | total |",
          "|---|" + "---:|" * (len(_steps_header()) + 1)]
    for s in seeds:
        st = os.path.join(_seed_dir(out, s), "state")
        w = {n[:-5]: (_load(os.path.join(st, n)) or {}).get("wall_s", float("nan"))
             for n in (os.listdir(st) if os.path.isdir(st) else []) if n.endswith(".json")}
        L.append(f"| {s} | " + " | ".join(f"{w[k]:g}" if k in w else "-" for k in _steps_header())
                 + f" | {sum(v for v in w.values() if np.isfinite(v)):.0f} |")
    L += ["", "## Missing", "",
          "- Table 2 (organ strata; NRM with each single-type dataset), Table 4 (training variants) "
          "and Fig. 5's number of added unlabeled slices are not run by this script yet.",
          "- The recipe is the quick start's (minutes of CPU training of the `tiny` model on a "
          "reduced `small` world): far from the paper's scale, so differences of a few points are "
          "within the noise of one run; read the spread across seeds.", ""]
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
    try:
        import tensorflow as tf

        for f in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m uld_jax.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--recipe", choices=sorted(qs.RECIPES), default="quick")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--keyslice", action="store_true", help="Table 3 analog for every run")
    p.add_argument("--thetas", default="", help="comma-separated thetas for the Fig. 5 sweep")
    p.add_argument("--results", default="docs/results.md", help="page to write ('' = none)")
    p.add_argument("--results-only", action="store_true", help="only rewrite the page")
    p.add_argument("--note", action="append", default=[], help="a line added under the header "
                   "(how the runs were made when they were not made by this command)")
    p.add_argument("--config-table", action="store_true",
                   help="print docs/configuration.md's key table and exit")
    a = p.parse_args(argv)
    if a.config_table:
        print(config_table())
        return 0
    out = os.path.abspath(a.out)
    r = qs.RECIPES[a.recipe]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    results = os.path.abspath(a.results) if a.results else ""
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not a.results_only:
        run_seeds(out, r, seeds)
        if a.keyslice:
            run_keyslice(out, r, seeds)
        if a.thetas:
            run_thetas(out, r, seeds[0], [float(t) for t in a.thetas.split(",") if t.strip()])
    text = write_results(out, r, seeds, results, argv, notes=a.note)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
