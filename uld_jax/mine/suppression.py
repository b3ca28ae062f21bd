"""Which lesions a run's detector finds on its own training slices: the ones its annotations mark,
and the ones they miss.

    python -m uld_jax.mine.suppression --store NAME=RUN/mining/step_N [--store NAME=...] \
        --truth WORLD/truth --data_dir DATA [--raw WORLD] [--rates 0.25,0.5,1,2,4] [--out J]

NRM's premise is that a detector trained with the unmarked lesions of its key slices among the
negatives learns to score such lesions low, so that keeping them out of the negatives lets it find
more lesions. This tool measures the first half of that on the synthetic world, whose truth is
complete. Each ``--store`` is a mining run's chunk store (``python -m uld_jax.mine --workdir RUN
--store_dir DIR --out TABLE``: the universal expert's detections on the training split's key slices
and on one slice every 5 mm). For each store it sets the score thresholds at which that expert
makes ``r`` detections per slice on no lesion (r in ``--rates``), and counts the lesion
cross-sections it finds there, apart for four groups:

* ``key_marked``: lesions marked on the key slice (the annotations training learns as positives);
* ``key_unmarked``: other lesions on key slices (training's negatives, or a perfect NRM's ignore
  regions);
* ``other_marked`` / ``other_unmarked``: the same on the other mined slices, which are never the
  centre of a training sample.

A cross-section is a lesion's in-plane extent on the slice shrunk as an ellipsoid's (the oracle's
rule, :func:`uld_jax.mine.oracle.cross_sections`; the poles, below ``min_extent``, are left out). A
detection hits the lesion it overlaps most (IoBB >= 0.3, the mining report's rule,
:func:`uld_jax.mine.quality.match_to_truth`); a detection that hits none is a detection on no
lesion.
Side by side, two runs that differ only in what their key slices' negatives hold (MELD and MELD
trained with a perfect NRM) show whether those negatives suppressed the unmarked lesions on the
slices trained on, and whether that reaches the slices next to them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from uld_jax.io.atomic import atomic_write_json
from uld_jax.io.json_safe import json_safe
from uld_jax.mine import oracle, overlap, quality, run, store

DEFAULT_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
GROUPS: tuple[str, ...] = ("key_marked", "key_unmarked", "other_marked", "other_unmarked")


def thresholds_at_rates(background_scores: np.ndarray, num_slices: int,
                        rates: Sequence[float]) -> np.ndarray:
    """[len(rates)] for each rate, the lowest score threshold at which at most
    ``floor(rate * num_slices)`` of the detections on no lesion score at or above it: ``inf`` when
    none may, ``-inf`` (every detection kept) when there are no more than that many."""
    s = np.sort(np.asarray(background_scores, np.float64).reshape(-1))[::-1]
    out = np.empty(len(rates))
    for i, r in enumerate(rates):
        k = int(np.floor(float(r) * num_slices + 1e-9))
        if k <= 0:
            out[i] = np.inf
        elif k >= s.size:
            out[i] = -np.inf
        else:
            # the k-th best is allowed; a threshold just above the (k+1)-th excludes it and its ties
            out[i] = np.nextafter(s[k], np.inf)
    return out


def found_by_group(truth: quality.LesionTruth, slices: run.SliceTable,
                   annotations: run.Annotations, proposals: run.Proposals, *,
                   rates: Sequence[float] = DEFAULT_RATES,
                   min_iobb: float = quality.DEFAULT_MIN_IOBB,
                   min_extent: float = oracle.DEFAULT_MIN_EXTENT) -> dict[str, Any]:
    """The measurement of the module docstring for one run's detections.

    Returns ``num_slices`` / ``num_key_slices``, ``rates``, ``thresholds`` (one per rate), and per
    group of :data:`GROUPS` ``n`` (cross-sections), ``found`` (fraction found at each rate),
    ``found_mean`` (their mean) and ``median_score`` (of the best detection on each cross-section,
    0 when none hits it)."""
    cid = np.asarray(slices.case_id).astype(str)
    sidx = np.asarray(slices.slice_index, np.int64)
    n_slices = int(cid.size)
    key = np.zeros(n_slices, bool)
    key[np.asarray(annotations.slice, np.int64)] = True
    # every cross-section on the run's slices (none is skipped as annotated: annotated_iou > 1)
    xs = oracle.oracle_positives(truth, cid, sidx, np.zeros(0, np.int64), np.zeros((0, 4)),
                                 min_extent=min_extent, annotated_iou=2.0)
    uni = np.asarray(proposals.expert) == run.UNIVERSAL_EXPERT
    p_slice = np.asarray(proposals.slice, np.int64)[uni]
    p_box = np.asarray(proposals.box, np.float64).reshape(-1, 4)[uni]
    p_score = np.asarray(proposals.score, np.float64)[uni]
    p_truth = quality.match_to_truth(truth, cid[p_slice], sidx[p_slice], p_box, min_iobb=min_iobb)
    thr = thresholds_at_rates(p_score[p_truth < 0], n_slices, rates)
    # the best score on each cross-section: detections on its slice that hit its lesion
    best = np.full(xs["slice"].size, -np.inf)      # -inf: no detection hits it
    hit = p_truth >= 0
    if xs["slice"].size and hit.any():
        qi, rj = overlap.same_key_pairs(
            xs["slice"] * (len(truth) + 1) + xs["truth_row"],
            p_slice[hit] * (len(truth) + 1) + p_truth[hit])
        np.maximum.at(best, qi, p_score[hit][rj])
    marked = np.asarray(truth.marked, bool)[xs["truth_row"]]
    on_key = key[xs["slice"]]
    out: dict[str, Any] = {"num_slices": n_slices, "num_key_slices": int(key.sum()),
                           "num_background": int(np.sum(p_truth < 0)),
                           "rates": [float(r) for r in rates],
                           "thresholds": [float(t) for t in thr], "groups": {}}
    for g, sel in zip(GROUPS, (on_key & marked, on_key & ~marked, ~on_key & marked,
                               ~on_key & ~marked)):
        b = best[sel]
        found = [float(np.mean(np.isfinite(b) & (b >= t))) if b.size else float("nan")
                 for t in thr]
        out["groups"][g] = {
            "n": int(b.size), "found": found,
            "found_mean": float(np.mean(found)) if b.size else float("nan"),
            "median_score": float(np.median(np.where(np.isfinite(b), b, 0.0))) if b.size
            else float("nan")}
    return out


def measure(stores: Mapping[str, str], truth: quality.LesionTruth, *,
            rates: Sequence[float] = DEFAULT_RATES,
            min_iobb: float = quality.DEFAULT_MIN_IOBB) -> dict[str, dict[str, Any]]:
    """:func:`found_by_group` of each named chunk store (``{name: directory}``), in order, with
    the store's path and the checkpoint step it was mined at."""
    results = {}
    for name, sdir in stores.items():
        if not os.path.isdir(sdir):
            raise FileNotFoundError(f"--store {name}={sdir}: no such chunk store")
        cs = store.ChunkStore.open(sdir)
        slices, ann, props = cs.load()
        results[name] = dict(found_by_group(truth, slices, ann, props, rates=rates,
                                            min_iobb=min_iobb), store=os.path.abspath(sdir),
                             checkpoint_step=int(cs.meta["checkpoint_step"]))
    return results


def markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One table: a row per run and group, the fraction found at each rate and their mean."""
    first = next(iter(results.values()))
    rates = first["rates"]
    head = ("| run | group | cross-sections | "
            + " | ".join(f"{r:g}" for r in rates) + " | mean | median best score |")
    lines = ["Lesion cross-sections found (%) at r detections per slice on no lesion.", "",
             head, "|" + "---|" * 3 + "---:|" * (len(rates) + 2)]
    for name, res in results.items():
        for g in GROUPS:
            d = res["groups"][g]
            cells = " | ".join(f"{100 * v:.1f}" for v in d["found"])
            lines.append(f"| {name} | {g} | {d['n']} | {cells} | {100 * d['found_mean']:.1f} | "
                         f"{d['median_score']:.3f} |")
    return "\n".join(lines) + "\n"


def _named_store(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--store {text!r}: expected NAME=DIR")
    return name, path


def main(argv: Sequence[str] | None = None) -> int:
    # pylint: disable=g-import-not-at-top
    from uld_jax.mine import report
    p = argparse.ArgumentParser(prog="python -m uld_jax.mine.suppression",
                                description=__doc__.split("\n")[0])
    p.add_argument("--store", action="append", type=_named_store, required=True,
                   help="NAME=DIR: a mining run's chunk store (repeat to compare runs)")
    p.add_argument("--truth", required=True, help="WORLD/truth (deeplesion_lesions.csv)")
    p.add_argument("--raw", default=None, help="WORLD (default: the parent of --truth)")
    p.add_argument("--data_dir", required=True, help="DATA_DIR of the build the runs mined")
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES))
    p.add_argument("--min_iobb", type=float, default=quality.DEFAULT_MIN_IOBB)
    p.add_argument("--out", default=None, help="JSON of the results (written atomically)")
    a = p.parse_args(argv)
    try:
        rates = [float(v) for v in a.rates.split(",") if v]
        truth = report.world_truth(a.truth, a.data_dir, a.raw)
        names = [n for n, _ in a.store]
        if len(set(names)) != len(names):
            raise ValueError(f"--store names repeat: {names}")
        results = measure(dict(a.store), truth, rates=rates, min_iobb=a.min_iobb)
    except (FileNotFoundError, ValueError, KeyError, store.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown(results))
    if a.out:
        atomic_write_json(a.out, json_safe(results))
        print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
