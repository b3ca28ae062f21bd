"""Mining-quality report on the synthetic world (whose truth is complete):

    python -m uld_jax.mine.report --workdir DIR --truth WORLD/truth [--raw WORLD] [--data_dir D]

Reads the mining run's overlay (``DIR/mined.npz``, ``--overlay``) and its chunk store (the path is in
the overlay's provenance), the world's truth (``deeplesion_lesions.csv``: every lesion of every
sub-volume with its 3D box, lesion id, and whether DL_info marks it; docs/formats.md "Volumetric
truth") and, to map the truth's source voxels onto the preprocessed Cases, the build's case table
(crop, pixel size, slice positions) and DL_info.csv (source spacing). It prints and writes
(``DIR/mining_report.md`` and ``.json``):

* the run's mined positives: count, precision (fraction on a real lesion; the paper checked 100 by
  hand and found 90%), how many are on unmarked lesions, recall of the unmarked lesions visible on
  the mined slices;
* suspicious regions (NRM): count and the fraction that are real lesions;
* sweeps of theta (MAM) and sigma (NRM), the paper's Fig. 5, re-thresholding the same model outputs.

Hit rule and counting: :mod:`uld_jax.mine.quality`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from uld_jax.io.atomic import atomic_write, atomic_write_figure
from uld_jax.io.json_safe import json_safe
from uld_jax.mine import external, quality, run, store, table

DEFAULT_THETAS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
DEFAULT_SIGMAS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_LOCATION_MMS: tuple[float, ...] = (0.0, 16.0, 32.0, 64.0, 128.0, 256.0)
SUMMARY_KEYS = ("n_mined", "n_mined_true", "precision", "n_mined_on_unmarked", "n_unmarked_visible",
                "n_unmarked_found", "recall_unmarked", "n_suspicious", "n_suspicious_true",
                "suspicious_true_fraction", "n_suspicious_on_unmarked")


# --------------------------------------------------------------------------------------------------
# Truth and frames.
# --------------------------------------------------------------------------------------------------
def _truthy(v: str) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "y", "t")


def truth_csv_rows(path: str, split: str, need: Sequence[str]):
    """Yields ``(line number, row dict)`` of ``deeplesion_lesions.csv``'s rows of ``split`` (its
    name or 1 / 2 / 3). Raises ValueError naming the file when the header lacks a ``need``
    column."""
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        missing = [c for c in need if c not in (r.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {missing}")
        for rec in r:
            if rec["split"].strip() in (split, str({"train": 1, "val": 2, "test": 3}[split])):
                yield r.line_num, rec


def load_truth_csv(path: str, split: str = "train") -> dict[str, dict[str, np.ndarray]]:
    """``deeplesion_lesions.csv`` -> {sub-volume name: {'boxes' [n, 6] released layout
    ``[x1, y1, z1, x2, y2, z2]``, 'lesion_id' [n], 'marked' [n] bool}} for one split.

    Raises ValueError naming the file and line for a missing column or a bad number."""
    need = ("subvolume", "x1", "y1", "z1", "x2", "y2", "z2", "lesion_id", "split", "marked")
    out: dict[str, dict[str, list]] = {}
    for line, rec in truth_csv_rows(path, split, need):
        try:
            box = [float(rec[k]) for k in ("x1", "y1", "z1", "x2", "y2", "z2")]
            lid = int(float(rec["lesion_id"]))
        except ValueError as e:
            raise ValueError(f"{path} line {line}: {e}") from None
        d = out.setdefault(rec["subvolume"].strip(), {"boxes": [], "lesion_id": [], "marked": []})
        d["boxes"].append(box)
        d["lesion_id"].append(lid)
        d["marked"].append(_truthy(rec["marked"]))
    return {k: {"boxes": np.asarray(v["boxes"], np.float64).reshape(-1, 6),
                "lesion_id": np.asarray(v["lesion_id"], np.int64),
                "marked": np.asarray(v["marked"], bool)} for k, v in out.items()}


def frames_from_build(data_dir: str, dl_info: str) -> dict[str, quality.CaseFrame]:
    """CaseFrames of DeepLesion's built Cases: crop, pixel size and slice positions from the case
    table, source spacing from DL_info.csv (``Spacing_mm_px_``; the reader puts source slice
    number n at ``(n - 1) * interval`` mm)."""
    from data_prep.readers import deeplesion as dl  # pylint: disable=g-import-not-at-top
    from uld_jax import slice_data as sd  # pylint: disable=g-import-not-at-top
    spacing = {r.case_id: r.spacing_mm for r in dl.parse_dl_info(dl_info)}
    frames = {}
    for c in sd.load_cases(data_dir, "deeplesion"):
        cid = sd._text(c["case_id"])  # pylint: disable=protected-access
        if cid not in spacing:
            continue
        sx, sy, dz = spacing[cid]
        px = float(c["pixel_mm"])
        z = np.asarray(c["z_mm"], np.float64)
        frames[cid] = quality.CaseFrame(
            case_id=cid, scale_yx=(sy / px, sx / px),
            crop_yx=tuple(float(v) for v in c["source_crop_yx"]), src_slice_mm=float(dz),
            case_slice_mm=float(c["slice_mm"]), src_z1_mm=0.0, out_z0_mm=float(z[0]))
    return frames


def truth_in_case_frames(truth: Mapping[str, Mapping[str, np.ndarray]],
                         frames: Mapping[str, quality.CaseFrame]) -> quality.LesionTruth:
    """The truth of the sub-volumes that were built (others are skipped) in Case frames."""
    names = [n for n in truth if n in frames]
    return quality.truth_from_volumetric(
        {n: truth[n]["boxes"] for n in names}, frames,
        lesion_ids={n: truth[n]["lesion_id"] for n in names},
        marked={n: truth[n]["marked"] for n in names})


def world_truth(truth_dir: str, data_dir: str, raw: str | None = None,
                split: str = "train") -> quality.LesionTruth:
    """The world's truth of ``split`` (``truth_dir/deeplesion_lesions.csv``) in the Case frames of
    the build ``data_dir``; ``raw`` is the world (default: the parent of ``truth_dir``), whose
    DL_info.csv gives the source spacing."""
    raw = raw or os.path.dirname(os.path.abspath(truth_dir))
    frames = frames_from_build(data_dir, os.path.join(raw, "DeepLesion", "DL_info.csv"))
    return truth_in_case_frames(
        load_truth_csv(os.path.join(truth_dir, "deeplesion_lesions.csv"), split), frames)


# --------------------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------------------
def options_from_meta(meta: Mapping[str, Any]) -> run.MiningOptions:
    """The MAM / NRM options a table was mined with (its provenance)."""
    o = dict(meta.get("options") or {})
    fields = {f.name for f in dataclasses.fields(run.MiningOptions)}
    kw = {k: v for k, v in o.items() if k in fields}
    if "nrm_experts" in kw:
        kw["nrm_experts"] = tuple(kw["nrm_experts"])
    return run.MiningOptions(**kw)


def quality_report(truth: quality.LesionTruth, overlay: table.Overlay, slices: run.SliceTable,
                   annotations: run.Annotations, proposals: run.Proposals, *,
                   thetas: Sequence[float] = DEFAULT_THETAS,
                   sigmas: Sequence[float] = DEFAULT_SIGMAS,
                   location_mms: Sequence[float] = DEFAULT_LOCATION_MMS,
                   min_iobb: float = quality.DEFAULT_MIN_IOBB, devices=None) -> dict[str, Any]:
    """The run's quality and the theta / sigma / MAM location sweeps (dicts of
    :func:`quality.mining_quality`)."""
    opts = options_from_meta(overlay.meta)
    q = quality.mining_quality(truth, overlay, seen_case_id=np.asarray(slices.case_id),
                               seen_slice_index=np.asarray(slices.slice_index), min_iobb=min_iobb)
    return {
        "provenance": {k: overlay.meta.get(k) for k in
                       ("checkpoint_step", "config_hash", "theta", "sigma", "created",
                        "sigma_calibration", "theta_calibration")
                       if k in overlay.meta or not k.endswith("_calibration")}
        | {"location_mm": float(opts.location_mm)},
        "counts": overlay.counts(),
        "truth": {"lesions": len(truth), "marked": int(np.sum(truth.marked)),
                  "cases": int(np.unique(np.asarray(truth.case_id)).size)},
        "slices_mined": len(slices), "min_iobb": float(min_iobb),
        "quality": q,
        "theta_sweep": quality.sweep_theta(thetas, truth, slices, annotations, proposals,
                                           options=opts, min_iobb=min_iobb, devices=devices),
        "sigma_sweep": quality.sweep_sigma(sigmas, truth, slices, annotations, proposals,
                                           options=opts, min_iobb=min_iobb, devices=devices),
        "inputs_check": quality.mining_inputs_check(truth, slices, annotations, proposals,
                                                    min_iobb=min_iobb, options=opts),
        "location_sweep": quality.sweep_location(location_mms, truth, slices, annotations,
                                                 proposals, options=opts, min_iobb=min_iobb,
                                                 devices=devices),
    }


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def _md_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def format_markdown(rep: Mapping[str, Any]) -> str:
    p, q, t = rep["provenance"], rep["quality"], rep["truth"]
    out = [
        "# Mining quality against the synthetic world's truth", "",
        f"Checkpoint step {p['checkpoint_step']}, config {p['config_hash']}, theta {p['theta']}, "
        f"sigma {p['sigma']}, MAM location term {p.get('location_mm', 0.0):g} mm (0: the paper's "
        f"embedding-only rule); {rep['slices_mined']} slices mined; truth: {t['lesions']} lesions "
        f"({t['marked']} marked) in {t['cases']} sub-volumes; hit: IoBB >= {rep['min_iobb']}.",
    ]
    cal = p.get("sigma_calibration")
    if cal:
        out += ["", f"NRM sigma {p['sigma']} is a precision level: each expert's score threshold is "
                "the one above which its detections on its own dataset are right that often: " +
                "; ".join(f"{e} {_cell(c['sigma']) if c['sigma'] is not None else 'none reaches it'}"
                          f" ({c['kept']} of {c['detections']} {c['split']} detections kept)"
                          for e, c in cal.items()) + "."]
    tc = p.get("theta_calibration")
    if tc:
        out += ["", f"MAM theta {_cell(float(tc['theta']))} is matched to the paper's yield: the "
                f"paper's embedding-only rule mines {tc['paper_mined']} positives at theta "
                f"{tc['paper_theta']:g}, the location rule {tc['mined']} here"
                + ("" if tc["reached"] else " (all it can: every proposal near an annotation)")
                + "."]
    out += [
        "",
        "| quantity | value |", "|---|---|",
        f"| mined positives | {q['n_mined']} |",
        f"| precision (on a real lesion) | {_cell(q['precision'])} ({q['n_mined_true']}) |",
        f"| mined on unmarked lesions | {q['n_mined_on_unmarked']} |",
        f"| recall of unmarked lesions | {_cell(q['recall_unmarked'])} "
        f"({q['n_unmarked_found']} / {q['n_unmarked_visible']} visible on mined slices) |",
        f"| suspicious regions (NRM) | {q['n_suspicious']} |",
        f"| suspicious regions that are real lesions | {_cell(q['suspicious_true_fraction'])} "
        f"({q['n_suspicious_true']}; {q['n_suspicious_on_unmarked']} unmarked) |",
        f"| unlabeled slices offered | {rep['counts']['unlabeled_slices']} |", "",
        "## theta sweep (MAM, paper Fig. 5 left)", "",
        _md_table(rep["theta_sweep"], ("theta", "n_mined", "precision", "n_mined_on_unmarked",
                                       "recall_unmarked")), "",
        "## sigma sweep (NRM, paper Fig. 5 right)", "",
        _md_table(rep["sigma_sweep"], ("sigma", "n_suspicious", "suspicious_true_fraction",
                                       "n_suspicious_on_unmarked")), ""]
    if rep.get("location_sweep"):
        out += ["## location sweep (MAM at this theta; location_mm 0 is the paper's rule)", "",
                "`p_own_closer_than_background`: the inputs check below under each rule.", "",
                _md_table(rep["location_sweep"], ("location_mm", "n_mined", "precision",
                                                  "n_mined_on_unmarked",
                                                  "p_own_closer_than_background")), ""]
    out += inputs_check_lines(rep.get("inputs_check"))
    return "\n".join(out)


def inputs_check_lines(c: Mapping[str, Any] | None) -> list[str]:
    """Markdown of :func:`quality.mining_inputs_check` (empty without one)."""
    if not c:
        return []
    L = ["## MAM's inputs against the truth (independent of theta and sigma)", "",
         f"Universal-expert proposals: {c['n_universal']}, {c['n_on_lesion']} on a real lesion; "
         f"annotations: {c['n_annotations']} ({c['n_annotations_on_truth']} matched to a truth "
         "lesion).", "", _md_table(c["by_score"], ("score", "n", "on_lesion_fraction")), ""]
    if c.get("p_own_closer_than_background") is not None:
        own, bg = c.get("own_distance_p10_50_90"), c.get("background_nearest_p10_50_90")
        L += [f"Embedding: {c['n_on_annotated_lesion']} proposals lie on an annotated lesion; their "
              "distance to that lesion's annotation (p10 / p50 / p90) "
              + (" / ".join(f"{v:.3f}" for v in own) if own else "n/a")
              + "; proposals on no lesion, distance to the nearest annotation of the patient "
              + (" / ".join(f"{v:.3f}" for v in bg) if bg else "n/a")
              + f". P(own < background) = {_cell(c['p_own_closer_than_background'])} (0.5: the "
              "embedding tells a proposal's lesion from the background no better than chance).", ""]
    return L


def write_report(rep: Mapping[str, Any], prefix: str) -> tuple[str, str]:
    """Writes ``prefix.md`` and ``prefix.json`` (NaN -> null); returns both paths."""
    md, js = prefix + ".md", prefix + ".json"
    for path, text in ((md, format_markdown(rep)),
                       (js, json.dumps(json_safe(rep), indent=1, sort_keys=True))):
        atomic_write(path, text.encode())
    return md, js


def plot_sweeps(rep: Mapping[str, Any], path: str) -> str:
    """The mining-quality figure (the paper's Fig. 5 analog) as a PNG at ``path``: left, MAM's
    precision and recall of unmarked lesions against theta, with the number mined; right, NRM's
    suspicious regions and the fraction of them on real lesions against sigma. Written to a
    temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(rows, key):
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], np.float64)

    def panel(ax, rows, x_key, x_at, fractions, count_key, count_label, xlabel, title, where):
        x = col(rows, x_key)
        for (key, label), marker in zip(fractions, ("o-", "s-")):
            ax.plot(x, col(rows, key), marker, label=label)
        ax.axvline(x_at, color="gray", ls=":", lw=1)
        ax.set(xlabel=xlabel, ylabel="fraction", ylim=(0, 1), title=title)
        twin = ax.twinx()
        twin.plot(x, col(rows, count_key), "^--", color="tab:green", alpha=0.6, label=count_label)
        twin.set_ylabel(count_label)
        h0, l0 = ax.get_legend_handles_labels()
        h1, l1 = twin.get_legend_handles_labels()
        ax.legend(h0 + h1, l0 + l1, loc=where, fontsize=8)

    p = rep["provenance"]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    try:
        panel(a0, rep["theta_sweep"], "theta", float(p["theta"]),
              (("precision", "precision (on a real lesion)"),
               ("recall_unmarked", "recall of unmarked lesions")),
              "n_mined", "mined positives", "theta (embedding distance)",
              "MAM: mined positives vs theta", "upper left")
        panel(a1, rep["sigma_sweep"], "sigma", float(p["sigma"]),
              (("suspicious_true_fraction", "on a real lesion"),),
              "n_suspicious", "suspicious regions", "sigma (single-type expert score)",
              "NRM: suspicious regions vs sigma", "upper right")
        fig.suptitle(f"Mining quality against the world's truth (checkpoint step "
                     f"{p['checkpoint_step']})", fontsize=10)
        return atomic_write_figure(path, fig)
    finally:
        plt.close(fig)


def load_run_outputs(overlay_path: str, store_dir: str | None = None,
                     embeddings: str | None = None):
    """(overlay, slices, annotations, proposals) of a finished mining run. The embeddings are the
    store's (the model's), or the external ones the table was mined with
    (:mod:`uld_jax.mine.external`; ``embeddings``: that file instead)."""
    ov = table.read_overlay(overlay_path)
    sdir = store_dir or ov.meta.get("store")
    if not sdir or not os.path.isdir(sdir):
        raise FileNotFoundError(f"{overlay_path}: its chunk store {sdir!r} is not there "
                                "(pass --store_dir)")
    slices, ann, props = store.ChunkStore.open(sdir).load()
    ext = embeddings or (ov.meta.get("external_embeddings") or {}).get("path")
    if ext:
        ann, props, info = external.load_embeddings(ext, slices, ann, props)
        recorded = (ov.meta.get("external_embeddings") or {}).get("sha256")
        if not embeddings and recorded and recorded != info["sha256"]:
            raise external.EmbeddingsError(
                f"{ext}: changed since {overlay_path} was mined with it (SHA-256 "
                f"{info['sha256'][:12]}..., recorded {recorded[:12]}...); pass --embeddings to use "
                "it anyway")
    return ov, slices, ann, props


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uld_jax.mine.report",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--truth", required=True, help="WORLD/truth (deeplesion_lesions.csv)")
    p.add_argument("--raw", default=None, help="WORLD (default: the parent of --truth)")
    p.add_argument("--data_dir", default=None, help="DATA_DIR (default: the overlay's provenance)")
    p.add_argument("--overlay", default=None, help="default WORKDIR/mined.npz")
    p.add_argument("--store_dir", default=None)
    p.add_argument("--embeddings", default=None,
                   help="external embeddings (python -m uld_jax.mine.external) for the sweeps and "
                   "the inputs check (default: those the table was mined with, if any)")
    p.add_argument("--out", default=None, help="report prefix (default WORKDIR/mining_report)")
    p.add_argument("--thetas", default=",".join(map(str, DEFAULT_THETAS)))
    p.add_argument("--sigmas", default=",".join(map(str, DEFAULT_SIGMAS)))
    p.add_argument("--location_mms", default=",".join(map(str, DEFAULT_LOCATION_MMS)),
                   help="MAM location scales to sweep ('' for none)")
    p.add_argument("--min_iobb", type=float, default=quality.DEFAULT_MIN_IOBB)
    a = p.parse_args(argv)
    try:
        ov, slices, ann, props = load_run_outputs(a.overlay or os.path.join(a.workdir, "mined.npz"),
                                                  a.store_dir, a.embeddings)
        data_dir = a.data_dir or (ov.meta.get("mining") or {}).get("data_dir")
        truth = world_truth(a.truth, data_dir, a.raw)
        rep = quality_report(truth, ov, slices, ann, props,
                             thetas=[float(v) for v in a.thetas.split(",") if v],
                             sigmas=[float(v) for v in a.sigmas.split(",") if v],
                             location_mms=[float(v) for v in a.location_mms.split(",") if v],
                             min_iobb=a.min_iobb)
    except (FileNotFoundError, ValueError, KeyError, store.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prefix = a.out or os.path.join(a.workdir, "mining_report")
    md, js = write_report(rep, prefix)
    png = plot_sweeps(rep, prefix + ".png")
    print(format_markdown(rep))
    print(f"written: {md}, {js}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
