"""How much of a FROC difference is the test set's luck: a patient-level (paired) bootstrap.

A mean sensitivity read on a few hundred test lesions moves when other patients are drawn. Two
runs evaluated on the *same* test volumes share that draw, so their difference moves less, but not
by nothing: each run finds its own subset of the lesions. This module resamples the test patients
with replacement (every sub-volume of a drawn patient comes along, as many times as the patient is
drawn) and recomputes each run's mean sensitivity on every resample, with the same draws for every
run, so that differences are paired.

Exactness: a detection's status (true positive for the truths of its volume it hits first, false
positive, or neither) depends only on the higher-scored detections of its own volume, so it does
not change when volumes are repeated or left out. A resample is therefore a weighting of the
ranked detections and of the truths by their volume's draw count: the curve is the weighted
cumulative sums, read at the FP rates by :func:`uld_jax.evaluate.froc.sensitivity_at_fp`. With every weight 1 it is exactly
:func:`uld_jax.evaluate.froc.volumetric_froc` (tested), and with integer weights it equals the
protocol on the test set with each volume copied that many times (tested).

Command line (predictions saved by ``python -m uld_jax.evaluate --workdir ... --save-pred``)::

    python -m uld_jax.evaluate.bootstrap --truth TRUTH.pkl --pred A=a.npz --pred B=b.npz
        [--pred-2d] [--rule both|released|paper] [--samples 2000] [--seed 0] [--by patient|volume]
        [--out RESULT.json]

prints each run's mean sensitivity with its bootstrap sd and 95% interval, and every pair's
difference (second minus first, and so on for each later run against the first) with its sd,
interval and the share of resamples in which it is not positive.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from uld_jax.evaluate import froc
from uld_jax.evaluate.boxes import EvaluationInputError
from uld_jax.evaluate.inputs import parse_subvolume_name


@dataclasses.dataclass(frozen=True)
class CurveParts:
    """One run's volumetric FROC under one rule, in the terms a reweighting needs.

    ``det_volume`` [D]: the volume index (into ``keys``) of each detection, in ranked order;
    ``new_truths`` [D]: truths each ranked detection hits first; ``is_fp`` [D]: ranked detections
    that are false positives; ``truth_volume`` [G]: the volume of each truth.
    """

    rule: str
    keys: tuple[str, ...]
    det_volume: np.ndarray
    new_truths: np.ndarray
    is_fp: np.ndarray
    truth_volume: np.ndarray


def curve_parts(truth: Mapping[str, Any], pred: Mapping[str, Any] | None = None, *,
                slice_detections: Mapping[str, Any] | None = None, rule: str = "released",
                stack_iou: float = 0.5, score_mode: str = "max", pred_source: str = "<pred>",
                truth_source: str = "<truth>") -> CurveParts:
    """The run's ranked detections as :class:`CurveParts`, from 3D ``pred`` {name: n x 7} or from
    per-slice ``slice_detections`` {name: n x 6} stacked as the protocol stacks them (see
    :func:`uld_jax.evaluate.report.evaluate_predictions`). Volumes are the truth's, in its order;
    a volume missing from ``pred`` raises, as in the protocol (slice detections: it has none)."""
    from uld_jax.evaluate.report import stack_slice_detections

    if (pred is None) == (slice_detections is None):
        raise ValueError("give exactly one of pred (3D boxes) or slice_detections (2D boxes per slice)")
    keys = list(truth.keys())
    slice_boxes = None
    if slice_detections is not None:
        pred, slice_boxes = stack_slice_detections(slice_detections, keys, iou_threshold=stack_iou,
                                                   score_mode=score_mode, source=pred_source)
    flat, hd, ht = froc._volumetric_hits(
        pred, truth, rule=rule, slice_boxes=slice_boxes if rule == "paper" else None, keys=keys,
        missing_as_empty=slice_detections is not None, iobb_threshold=0.3, iou_threshold=0.5, pred_source=pred_source,
        truth_source=truth_source)
    scores = flat.det[:, -1]
    g = len(flat.truth)
    order, sens, _, is_fp = froc.curve_from_hits(scores, hd, ht, g, len(flat.keys))
    tps = np.rint(sens * g).astype(np.int64) if g else np.zeros(len(scores), np.int64)
    det_volume = np.repeat(np.arange(len(flat.keys)), flat.det_sizes)[order]
    return CurveParts(rule, tuple(flat.keys), det_volume, np.diff(tps, prepend=0), is_fp[order],
                      np.repeat(np.arange(len(flat.keys)), flat.truth_sizes))


def weighted_mean_sensitivity(parts: CurveParts, weights: np.ndarray,
                              fp_rates: Sequence[float] = froc.VOLUMETRIC_FP_RATES) -> np.ndarray:
    """Mean sensitivity over ``fp_rates`` for each row of ``weights`` [B, V] (non-negative draw
    counts per volume of ``parts.keys``); returns [B]. NaN for a row that draws no truth."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 2 or w.shape[1] != len(parts.keys):
        raise ValueError(f"weights must be [B, {len(parts.keys)}], got {w.shape}")
    ntru = w[:, parts.truth_volume].sum(axis=1)
    nvol = w.sum(axis=1)
    out = np.full(len(w), np.nan)
    for b in range(len(w)):        # one row at a time: memory O(D), not O(B x D)
        if ntru[b] <= 0:
            continue
        wd = w[b, parts.det_volume]
        # a detection of an undrawn volume repeats the point before it (or adds (0, 0) in front,
        # which the left-of-curve rule reads as 0 anyway): the reading equals the curve without it
        out[b] = froc.sensitivity_at_fp(np.cumsum(wd * parts.is_fp) / nvol[b],
                                        np.cumsum(wd * parts.new_truths) / ntru[b], fp_rates).mean()
    return out


def run_values(truth: Mapping[str, Any], det: Mapping[str, Any], weights: np.ndarray, *,
               rule: str, slice_2d: bool = True, source: str = "<pred>",
               fp_rates: Sequence[float] = froc.VOLUMETRIC_FP_RATES) -> tuple[float, np.ndarray]:
    """One run's observed mean sensitivity on ``truth`` and its values on the resamples
    ``weights`` [B, V]; ``det`` per-slice 2D detections (``slice_2d``) or 3D boxes."""
    kw = {"slice_detections": det} if slice_2d else {"pred": det}
    parts = curve_parts(truth, rule=rule, pred_source=source, **kw)
    observed = weighted_mean_sensitivity(parts, np.ones((1, len(parts.keys))), fp_rates)[0]
    return float(observed), weighted_mean_sensitivity(parts, weights, fp_rates)


def count_truths(truth: Mapping[str, Any]) -> int:
    """The number of lesion boxes in a ``{volume: [n, 6]}`` truth dict."""
    return int(sum(len(np.reshape(v, (-1, 6))) for v in truth.values()))


def patient_of(name: str) -> str:
    """The patient of a sub-volume name ``PPPPPP_SS_RR_AAA-BBB`` (its first field); a name of
    another form is its own group."""
    p = parse_subvolume_name(name)
    return (p[0] if p else name).split("_")[0]


def resample_weights(keys: Sequence[str], samples: int, seed: int = 0, by: str = "patient") -> np.ndarray:
    """[samples, V] draw counts: the groups (patients, or single volumes with ``by="volume"``)
    drawn with replacement, as many as there are, each volume weighted by its group's count."""
    if by not in ("patient", "volume"):
        raise ValueError(f"by must be 'patient' or 'volume', not {by!r}")
    names = [patient_of(k) if by == "patient" else k for k in keys]
    groups, gid = np.unique(names, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(groups), size=(samples, len(groups)))
    counts = np.stack([np.bincount(d, minlength=len(groups)) for d in draws])
    return counts[:, gid].astype(np.float64)


def summary(values: np.ndarray) -> dict[str, float]:
    """Mean, sd and the 2.5 / 97.5 percentiles (points) of bootstrap values given as fractions,
    and the share of values not above zero."""
    v = 100.0 * np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)), "lo": float(np.percentile(v, 2.5)),
            "hi": float(np.percentile(v, 97.5)), "share_not_positive": float(np.mean(v <= 0.0))}


def paired_bootstrap(truth: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]], *,
                     rules: Sequence[str] = froc.RULES, samples: int = 2000, seed: int = 0,
                     by: str = "patient", slice_2d: bool = True,
                     fp_rates: Sequence[float] = froc.VOLUMETRIC_FP_RATES) -> dict[str, Any]:
    """Every run (``{name: detections}``, per-slice 2D with ``slice_2d`` else 3D) on the same
    resamples of ``truth``'s patients. Returns ``{rule: {"runs": {name: summary + "observed"},
    "differences": {"B - A": ...}}}`` with each later run against the first."""
    if not runs:
        raise ValueError("no runs to bootstrap")
    keys = list(truth.keys())
    w = resample_weights(keys, samples, seed, by)
    out: dict[str, Any] = {"samples": samples, "seed": seed, "by": by, "volumes": len(keys),
                           "groups": len({patient_of(k) if by == "patient" else k for k in keys}),
                           "truths": count_truths(truth)}
    names = list(runs)
    for rule in rules:
        vals, obs = {}, {}
        for n in names:
            obs[n], vals[n] = run_values(truth, runs[n], w, rule=rule, slice_2d=slice_2d, source=n,
                                         fp_rates=fp_rates)
        res = {"runs": {n: {"observed": 100.0 * obs[n], **summary(vals[n])} for n in names},
               "differences": {}}
        for n in names[1:]:
            res["differences"][f"{n} - {names[0]}"] = {"observed": 100.0 * (obs[n] - obs[names[0]]),
                                                       **summary(vals[n] - vals[names[0]])}
        out[rule] = res
    return out


def to_markdown(res: Mapping[str, Any]) -> str:
    lines = [f"Paired bootstrap over {res['by']}s: {res['samples']} resamples of {res['groups']} "
             f"{res['by']}s ({res['volumes']} volumes, {res['truths']} truths), seed {res['seed']}. "
             "Mean sensitivity over the FP rates, points."]
    for rule in froc.RULES:
        if rule not in res:
            continue
        lines += ["", f"### {rule} rule", "", "| run | observed | bootstrap sd | 95% interval |",
                  "|---|---:|---:|---|"]
        for n, s in res[rule]["runs"].items():
            lines.append(f"| {n} | {s['observed']:.1f} | {s['sd']:.1f} | {s['lo']:.1f} .. {s['hi']:.1f} |")
        if res[rule]["differences"]:
            lines += ["", "| difference | observed | bootstrap sd | 95% interval | share <= 0 |",
                      "|---|---:|---:|---|---:|"]
            for n, s in res[rule]["differences"].items():
                lines.append(f"| {n} | {s['observed']:+.1f} | {s['sd']:.1f} | {s['lo']:+.1f} .. "
                             f"{s['hi']:+.1f} | {s['share_not_positive']:.3f} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uld_jax.evaluate.bootstrap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", required=True, help="volumetric truth file (1K-set structure)")
    p.add_argument("--split", default=None, help="split of split-nested files (default: test)")
    p.add_argument("--pred", action="append", required=True, metavar="NAME=FILE",
                   help="a run's predictions; give two or more, the first is the reference")
    p.add_argument("--pred-2d", action="store_true",
                   help="the files hold per-slice 2D detections n x 6 (as --save-pred writes them)")
    p.add_argument("--rule", choices=("both", "released", "paper"), default="both")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--by", choices=("patient", "volume"), default="patient")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    from uld_jax.evaluate import inputs
    from uld_jax.io.atomic import atomic_write

    a = _parser().parse_args(argv)
    try:
        if a.samples < 2:
            raise EvaluationInputError(f"--samples {a.samples}: need at least 2 resamples")
        runs = {}
        for spec in a.pred:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise EvaluationInputError(f"--pred {spec!r}: expected NAME=FILE")
            if name in runs:
                raise EvaluationInputError(f"--pred {spec!r}: the name {name!r} is given twice")
            runs[name] = inputs.load_volume_dict(path, split=a.split)
        truth = inputs.load_volume_dict(a.truth, split=a.split)
        rules = froc.RULES if a.rule == "both" else (a.rule,)
        res = paired_bootstrap(truth, runs, rules=rules, samples=a.samples, seed=a.seed, by=a.by,
                               slice_2d=a.pred_2d)
    except EvaluationInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(res))
    if a.out:
        atomic_write(a.out, (json.dumps(res, indent=1) + "\n").encode(), makedirs=True)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
