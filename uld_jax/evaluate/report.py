"""Evaluation entry points and report writing (Markdown, JSON, FROC PNGs, clu scalars).

Entry points for the rest of the project (the detect CLI and the from-a-workdir evaluation call
these; they never need the file formats):

* :func:`evaluate_predictions` - volumetric protocol from per-volume 3D detections
  (``pred``: {name: n x 7}) or from per-slice 2D detections (``slice_detections``: {name: n x 6
  ``[z, x1, y1, x2, y2, score]``}, stacked here with :func:`uld_jax.evaluate.stacking.stack_slices`);
  both hit rules, optional organ strata.
* :func:`evaluate_keyslice` - MULAN key-slice FROC.
* :func:`evaluate_luna16` - LUNA16 FROC / CPM.

Each returns an :class:`EvaluationReport`; ``report.write(out_dir)`` writes ``results.json``,
``results.md`` and ``froc_<protocol>.png`` atomically; ``report.log_to_clu(logdir, step)`` writes the
scalars through ``clu.metric_writers``; ``report.scalars()`` gives the flat scalar dict.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from uld_jax.evaluate.boxes import EvaluationInputError, as_box_array
from uld_jax.io.atomic import atomic_write
from uld_jax.io.json_safe import json_safe
from uld_jax.evaluate.froc import (
    KEYSLICE_FP_RATES,
    STRATA,
    VOLUMETRIC_FP_RATES,
    FrocResult,
    keyslice_froc,
    stratified_froc,
    stratified_keyslice_froc,
    volumetric_froc,
)
from uld_jax.evaluate.luna import LUNA_FP_RATES, LunaResult, luna16_froc
from uld_jax.evaluate.stacking import stack_slices

RULE_TITLES = {
    "released": "released protocol (3D IoBB >= 0.3, +1 px)",
    "paper": "paper text (2D cross-section IoU > 0.5)",
}


@dataclasses.dataclass
class Table:
    """One row of results: sensitivities at FP rates and their mean."""

    title: str
    fp_rates: list[float]
    sensitivity: list[float]
    mean: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvaluationReport:
    """Results of one protocol: ``tables`` {row id: Table}, ``curves`` {row id: (fps, sens)},
    ``strata`` {stratum: {row id: mean sensitivity}}, ``info`` (sources, counts, notes)."""

    protocol: str
    fp_unit: str
    tables: dict[str, Table]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    info: dict[str, Any]
    strata: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    # ---------------------------------------------------------------- views
    def scalars(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for rid, t in self.tables.items():
            for r, s in zip(t.fp_rates, t.sensitivity):
                out[f"{self.protocol}/{rid}/sens@{r:g}"] = float(s)
            out[f"{self.protocol}/{rid}/mean"] = float(t.mean)
            for k, v in t.extra.items():
                if isinstance(v, (int, float)):
                    out[f"{self.protocol}/{rid}/{k}"] = float(v)
        for stratum, rows in self.strata.items():
            for rid, v in rows.items():
                if rid != "num_truths":
                    out[f"{self.protocol}/strata/{stratum}/{rid}"] = float(v)
        return out

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "fp_unit": self.fp_unit,
            "tables": {k: dataclasses.asdict(t) for k, t in self.tables.items()},
            "strata": self.strata,
            "info": self.info,
        }

    def to_markdown(self) -> str:
        lines = [f"# Evaluation: {self.protocol}", ""]
        for k, v in self.info.get("sources", {}).items():
            lines.append(f"- {k}: `{v}`")
        for k, v in self.info.get("counts", {}).items():
            lines.append(f"- {k}: {v}")
        lines.append("")
        first = next(iter(self.tables.values()), None)
        if first is not None:
            rates = first.fp_rates
            lines.append(f"Sensitivity at FPs per {self.fp_unit}:")
            lines.append("")
            lines.append("| result | " + " | ".join(f"{r:g}" for r in rates) + " | mean |")
            lines.append("|---|" + "---:|" * (len(rates) + 1))
            for t in self.tables.values():
                lines.append(f"| {t.title} | " + " | ".join(_fmt(s) for s in t.sensitivity) + f" | {_fmt(t.mean)} |")
            lines.append("")
        if self.strata:
            rids = [r for r in self.tables]
            lines.append("Organ-stratified average sensitivity (mean over the FP rates above):")
            lines.append("")
            lines.append("| stratum | truths | " + " | ".join(rids) + " |")
            lines.append("|---|---:|" + "---:|" * len(rids))
            for stratum, rows in self.strata.items():
                lines.append(f"| {stratum} | {rows.get('num_truths', '')} | "
                             + " | ".join(_fmt(rows.get(r, float('nan'))) for r in rids) + " |")
            lines.append("")
        notes = self.info.get("notes", [])
        if notes:
            lines.append("Notes:")
            lines.extend(f"- {n}" for n in notes)
            lines.append("")
        return "\n".join(lines)

    # ---------------------------------------------------------------- outputs
    def plot_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
        try:
            for rid, (x, y) in self.curves.items():
                t = self.tables[rid]
                xs = np.r_[x, max(t.fp_rates[-1], x[-1] if len(x) else 0) * 1.5]
                ys = np.r_[y, y[-1] if len(y) else 0]
                ax.plot(xs, ys, drawstyle="steps-post", lw=1.5, label=f"{t.title} (mean {_fmt(t.mean)})")
                ax.plot(t.fp_rates, t.sensitivity, "o", ms=4, color=ax.lines[-1].get_color())
            first = next(iter(self.tables.values()))
            ax.set_xscale("log", base=2)
            ax.set_xlim(first.fp_rates[0] / 1.5, first.fp_rates[-1] * 1.5)
            ax.set_xticks(first.fp_rates)
            ax.set_xticklabels([f"{r:g}" for r in first.fp_rates])
            ax.set_ylim(0, 1)
            ax.set_xlabel(f"FPs per {self.fp_unit}")
            ax.set_ylabel("sensitivity")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(loc="lower right", fontsize=7)
            ax.set_title(f"FROC - {self.protocol}")
            buf = io.BytesIO()
            fig.tight_layout()
            fig.savefig(buf, format="png")
            return buf.getvalue()
        finally:
            plt.close(fig)

    def write(self, out_dir: str | os.PathLike, *, plot: bool = True) -> list[str]:
        """Writes results.json, results.md and froc_<protocol>.png into ``out_dir`` atomically."""
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        p = os.path.join(out_dir, "results.json")
        atomic_write(p, (json.dumps(json_safe(self.to_json_dict()), indent=2, allow_nan=True) + "\n").encode())
        paths.append(p)
        p = os.path.join(out_dir, "results.md")
        atomic_write(p, self.to_markdown().encode())
        paths.append(p)
        if plot and self.curves:
            p = os.path.join(out_dir, f"froc_{self.protocol}.png")
            atomic_write(p, self.plot_png())
            paths.append(p)
        return paths

    def log_to_clu(self, logdir: str | os.PathLike, step: int = 0) -> None:
        """Writes :meth:`scalars` with ``clu.metric_writers`` (TensorBoard event files in ``logdir``)."""
        from clu import metric_writers

        writer = metric_writers.create_default_writer(os.fspath(logdir), just_logging=False)
        try:
            writer.write_scalars(step, {k: v for k, v in self.scalars().items() if np.isfinite(v)})
            writer.flush()
        finally:
            writer.close()


def _fmt(x: float) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.4f}"


def _froc_table(title: str, r: FrocResult) -> Table:
    return Table(title, [float(x) for x in r.fp_rates], [float(x) for x in r.sensitivity], float(r.mean_sensitivity),
                 {"num_hit": r.num_hit, "num_fp": r.num_fp, "num_detections": r.num_detections})


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------
def stack_slice_detections(
    slice_detections: Mapping[str, Any],
    keys: Sequence[str],
    *,
    iou_threshold: float = 0.5,
    score_mode: str = "max",
    source: str = "<slice detections>",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-slice 2D detections {name: n x 6 ``[z, x1, y1, x2, y2, score]``} -> (pred {name: n x 7},
    slice_boxes {name: m x 6}) for every name in ``keys`` (missing names: no detections)."""
    zs, bs, ss, vs = [], [], [], []
    for v, k in enumerate(keys):
        a = np.asarray(slice_detections.get(k, np.zeros((0, 6))), np.float64)
        a = a.reshape(-1, 6) if a.size else np.zeros((0, 6))
        if a.shape[1:] != (6,):
            raise EvaluationInputError(f"{source}: key {k!r}: shape {a.shape}, expected n x 6 [z,x1,y1,x2,y2,score]")
        as_box_array(a[:, 1:5], 4, source=source, key=k, what="n x 6 [z,x1,y1,x2,y2,score]")
        if len(a) and (a[:, 0] != np.round(a[:, 0])).any():
            raise EvaluationInputError(f"{source}: key {k!r}: slice index (column 0) must be an integer")
        zs.append(a[:, 0]); bs.append(a[:, 1:5]); ss.append(a[:, 5]); vs.append(np.full(len(a), v))
    z = np.concatenate(zs).astype(np.int64) if zs else np.zeros(0, np.int64)
    b = np.concatenate(bs) if bs else np.zeros((0, 4))
    st = stack_slices(z, b, np.concatenate(ss) if ss else np.zeros(0),
                      np.concatenate(vs) if vs else np.zeros(0, np.int64),
                      iou_threshold=iou_threshold, score_mode=score_mode)
    return st.to_volume_dicts(list(keys), z, b)


def evaluate_predictions(
    truth: Mapping[str, Any],
    pred: Mapping[str, Any] | None = None,
    *,
    slice_detections: Mapping[str, Any] | None = None,
    rules: Sequence[str] = ("released", "paper"),
    fp_rates: Sequence[float] = VOLUMETRIC_FP_RATES,
    slice_boxes: Mapping[str, Any] | None = None,
    truth_labels: Mapping[str, Sequence[str]] | None = None,
    strata: Sequence[str] = STRATA,
    missing_as_empty: bool = False,
    stack_iou: float = 0.5,
    score_mode: str = "max",
    pred_source: str = "<pred>",
    truth_source: str = "<truth>",
) -> EvaluationReport:
    """The volumetric protocol (DeepLesion 1K set) on 3D or per-slice 2D detections.

    ``truth``: {sub-volume name: n x 6 ``[x1,y1,z1,x2,y2,z2]``} inclusive (the real 1K pkl's
    ``['test']``). Exactly one of ``pred`` ({name: n x 7 ``[..., score]``}) or
    ``slice_detections`` ({name: n x 6 ``[z, x1, y1, x2, y2, score]``}, z in the truth's slice
    numbering, boxes inclusive pixel indices; stacked with IoU > ``stack_iou``, 3D score =
    ``score_mode`` of the 2D scores) must be given. ``rules``: subset of ("released", "paper").
    ``truth_labels``: {name: organ label per truth row} for organ strata. Volumes of the truth
    without predictions raise unless ``missing_as_empty`` (always allowed for slice detections:
    a volume may have no detection).
    """
    if (pred is None) == (slice_detections is None):
        raise ValueError("give exactly one of pred (3D boxes) or slice_detections (2D boxes per slice)")
    keys = list(truth.keys())
    notes: list[str] = []
    if slice_detections is not None:
        extra = [k for k in slice_detections if k not in truth]
        if extra:
            notes.append(f"{len(extra)} volume(s) of the slice detections not in the truth ignored, e.g. {extra[0]!r}")
        pred, slice_boxes = stack_slice_detections(slice_detections, keys, iou_threshold=stack_iou,
                                                   score_mode=score_mode, source=pred_source)
        missing_as_empty = True
        n2d = sum(len(v) for v in slice_boxes.values())
        notes.append(f"{n2d} 2D detections stacked into {sum(len(v) for v in pred.values())} 3D boxes "
                     f"(IoU > {stack_iou} on consecutive slices, 3D score = {score_mode})")
    notes.extend(_check_release_z(pred, truth))
    tables, curves, strata_out = {}, {}, {}
    counts: dict[str, Any] = {}
    for rule in rules:
        kw = dict(rule=rule, fp_rates=fp_rates, missing_as_empty=missing_as_empty,
                  pred_source=pred_source, truth_source=truth_source)
        if rule == "paper" and slice_boxes is not None:
            kw["slice_boxes"] = slice_boxes
        if truth_labels is not None:
            res = stratified_froc(pred, truth, truth_labels, strata=strata, **kw)
            r = res["overall"]
            for s in ("overall", *strata):
                strata_out.setdefault(s, {})[rule] = res[s].mean_sensitivity
                strata_out[s]["num_truths"] = res[s].num_truths
        else:
            r = volumetric_froc(pred, truth, **kw)
        tables[rule] = _froc_table(RULE_TITLES.get(rule, rule), r)
        curves[rule] = (r.curve_fps, r.curve_sens)
        counts.update({"volumes": r.num_volumes, "truths": r.num_truths, "detections": r.num_detections})
        notes.extend(n for n in r.notes if n not in notes)
    info = {"sources": {"truth": truth_source, "pred": pred_source}, "counts": counts, "notes": notes}
    return EvaluationReport("volumetric", "sub-volume", tables, curves, info, strata_out)


def _check_release_z(pred: Mapping[str, Any], truth: Mapping[str, Any]) -> list[str]:
    """Notes when boxes lie outside the slice range named by their sub-volume (``..._AAA-BBB``):
    the release numbers z as 1-based slice numbers AAA..BBB, a common source of silent misses."""
    from uld_jax.evaluate.inputs import parse_subvolume_name

    out = []
    for what, d, zc in (("predicted", pred, (2, 5)), ("truth", truth, (2, 5))):
        n_out, example = 0, None
        for k, v in d.items():
            rng = parse_subvolume_name(str(k))
            a = np.asarray(v, np.float64)
            if rng is None or a.size == 0 or a.ndim != 2 or a.shape[1] < 6:
                continue
            bad = (a[:, zc[0]] < rng[1]) | (a[:, zc[1]] > rng[2])
            n_out += int(bad.sum())
            if bad.any() and example is None:
                example = k
        if n_out:
            out.append(f"{n_out} {what} box(es) extend outside their sub-volume's slice range (e.g. {example!r}); "
                       "z must be the release's 1-based slice number (first slice of PPPPPP_SS_RR_AAA-BBB is AAA)")
    return out


def evaluate_keyslice(
    truth: Mapping[str, Any],
    pred: Mapping[str, Any],
    *,
    fp_rates: Sequence[float] = KEYSLICE_FP_RATES,
    metric: str = "iou",
    threshold: float = 0.5,
    missing_as_empty: bool = False,
    truth_labels: Mapping[str, Sequence[str]] | None = None,
    strata: Sequence[str] = STRATA,
    pred_source: str = "<pred>",
    truth_source: str = "<truth>",
) -> EvaluationReport:
    """MULAN key-slice FROC: truth {image: n x 4 ``[x1,y1,x2,y2]``}, pred {image: n x 5}; optional
    organ strata from ``truth_labels`` {image: [label per box]}."""
    kw = dict(fp_rates=fp_rates, metric=metric, threshold=threshold, missing_as_empty=missing_as_empty,
              pred_source=pred_source, truth_source=truth_source)
    strata_out: dict[str, dict[str, Any]] = {}
    if truth_labels is not None:
        res = stratified_keyslice_froc(pred, truth, truth_labels, strata=strata, **kw)
        r = res["overall"]
        for s in ("overall", *strata):
            strata_out[s] = {"keyslice": res[s].mean_sensitivity, "keyslice_mean_first4": res[s].mean_of_first(4),
                             "num_truths": res[s].num_truths}
    else:
        r = keyslice_froc(pred, truth, **kw)
    t = _froc_table(f"key slices ({metric} >= {threshold:g})", r)
    t.extra["mean_first4"] = r.mean_of_first(4)
    info = {"sources": {"truth": truth_source, "pred": pred_source},
            "counts": {"images": r.num_volumes, "truths": r.num_truths, "detections": r.num_detections},
            "notes": list(r.notes) + ["MULAN's headline is the mean of the first 4 rates (mean_first4)"]}
    return EvaluationReport("keyslice", "key slice", {"keyslice": t}, {"keyslice": (r.curve_fps, r.curve_sens)}, info,
                            strata_out)


def evaluate_luna16(result: LunaResult | None = None, *, sources: Mapping[str, str] | None = None,
                    **kwargs: Any) -> EvaluationReport:
    """LUNA16 report from a :class:`LunaResult` or from :func:`luna16_froc` keyword arguments."""
    r = result if result is not None else luna16_froc(**kwargs)
    rates = [float(x) for x in r.fp_rates]
    tables = {
        "linear": Table("LUNA16 FROC, linear interpolation (CPM)", rates, [float(x) for x in r.sensitivity], r.cpm,
                        {k: v for k, v in r.counts.items()}),
        "corner": Table("LUNA16 FROC, script's corner reading", rates, [float(x) for x in r.sensitivity_corner],
                        r.cpm_corner),
    }
    info = {"sources": dict(sources or {}), "counts": dict(r.counts), "notes": list(r.notes)}
    return EvaluationReport("luna16", "scan", tables, {"linear": (r.curve_fps, r.curve_sens)}, info)


__all__ = [
    "EvaluationReport", "Table", "evaluate_predictions", "evaluate_keyslice", "evaluate_luna16",
    "stack_slice_detections", "atomic_write", "LUNA_FP_RATES",
]
