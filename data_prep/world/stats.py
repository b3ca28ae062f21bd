"""The world's distributions next to the real files' (``--stats``).

Reads only the written tables (DL_info.csv, truth, LUNA16 csvs) and the real reference files in
``$ULD_REAL_DATA`` or ``../shared/data/real`` next to the checkout; a missing real file shows as
"n/a".
"""

from __future__ import annotations

import collections
import csv
import os
import pathlib

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def real_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("ULD_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "real"))


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def dl_info_stats(path) -> dict:
    """Distributions of a DL_info.csv (real or synthetic). Keys hold arrays or dict shares."""
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    if not rows:
        return {}
    sp = np.array([_floats(r["Spacing_mm_px_"]) for r in rows])
    diam = np.array([_floats(r["Lesion_diameters_Pixel_"]) for r in rows])
    sr = np.array([_floats(r["Slice_range"]) for r in rows])
    per_key = collections.Counter(r["File_name"] for r in rows)
    studies = {(r["Patient_index"], r["Study_index"]) for r in rows}
    patients = {r["Patient_index"] for r in rows}
    coarse = collections.Counter(int(r["Coarse_lesion_type"]) for r in rows if r["Train_Val_Test"] != "1")
    n_coarse = max(sum(coarse.values()), 1)
    split_pat = collections.Counter({r["Patient_index"]: r["Train_Val_Test"] for r in rows}.values())
    ivals = collections.Counter(float(v) for v in sp[:, 2])
    return {
        "rows": len(rows),
        "long_mm": diam[:, 0] * sp[:, 0],
        "short_over_long": diam[:, 1] / np.maximum(diam[:, 0], 1e-6),
        "pixel_mm": sp[:, 0],
        "interval_share": {k: v / len(rows) for k, v in sorted(ivals.items())},
        "slices_per_subvolume": sr[:, 1] - sr[:, 0] + 1,
        "marks_per_key_slice": {k: v / len(per_key) for k, v in sorted(collections.Counter(per_key.values()).items())},
        "marks_per_study": len(rows) / len(studies),
        "studies_per_patient": len(studies) / len(patients),
        "coarse_share": {k: coarse[k] / n_coarse for k in range(1, 9)},
        "patient_split_share": {k: split_pat[k] / len(patients) for k in ("1", "2", "3")},
    }


def luna_stats(path) -> dict:
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    d = np.array([float(r["diameter_mm"]) for r in rows]) if rows else np.zeros(0)
    per_scan = collections.Counter(r["seriesuid"] for r in rows)
    return {"diameter_mm": d, "nodules": len(rows), "scans_with_nodules": len(per_scan)}


def volumetric_stats(truth_pkl, lesions_csv=None) -> dict:
    from uld_jax.io.safe_pickle import safe_load

    t = safe_load(truth_pkl)
    n = [len(v) for split in t.values() for v in split.values()]
    out = {"subvolumes": len(n), "lesions_per_subvolume": float(np.mean(n)) if n else 0.0}
    if lesions_csv is not None and os.path.exists(lesions_csv):
        rows = list(csv.DictReader(open(lesions_csv, newline="", encoding="utf-8")))
        if rows:
            out["marked_fraction"] = float(np.mean([r["marked"] == "1" for r in rows]))
    return out


def _pct(a, q=(5, 50, 95)) -> str:
    a = np.asarray(a, float)
    if a.size == 0:
        return "n/a"
    return "/".join(f"{v:.3g}" for v in np.percentile(a, q))


def _shares(d: dict) -> str:
    return " ".join(f"{k:g}:{v:.2f}" if isinstance(k, float) else f"{k}:{v:.2f}" for k, v in d.items())


def format_stats(world: pathlib.Path) -> str:
    world = pathlib.Path(world)
    real = real_data_dir()
    w = dl_info_stats(world / "DeepLesion" / "DL_info.csv")
    r_path = real / "deeplesion" / "DL_info_test_split.csv"
    r = dl_info_stats(r_path) if r_path.exists() else {}
    rs_path = real / "deeplesion" / "DL_info_sample.csv"
    rs = dl_info_stats(rs_path) if rs_path.exists() else {}
    lines = [f"{'statistic':40s} {'synthetic world':34s} {'real (DL_info test split / sample)':s}"]

    def row(name, wv, rv):
        lines.append(f"{name:40s} {wv:34s} {rv}")

    na = "n/a"
    row("DeepLesion marked lesions (rows)", str(w.get("rows", 0)), str(r.get("rows", na)))
    row("long diameter mm p5/p50/p95", _pct(w.get("long_mm", [])), _pct(r.get("long_mm", [])))
    row("short/long p5/p50/p95", _pct(w.get("short_over_long", [])), _pct(r.get("short_over_long", [])))
    row("pixel spacing mm p5/p50/p95", _pct(w.get("pixel_mm", [])), _pct(r.get("pixel_mm", [])))
    row("slice interval shares (mm:share)", _shares(w.get("interval_share", {})),
        _shares({k: v for k, v in r.get("interval_share", {}).items() if v >= 0.01}))
    row("slices per sub-volume p5/p50/p95", _pct(w.get("slices_per_subvolume", [])),
        _pct(r.get("slices_per_subvolume", [])))
    row("marks per key slice (n:share)", _shares(w.get("marks_per_key_slice", {})),
        _shares(r.get("marks_per_key_slice", {})))
    row("marks per study", f"{w.get('marks_per_study', 0):.2f}",
        f"{r['marks_per_study']:.2f} (test split; 3.09 whole set)" if r else na)
    row("studies per patient", f"{w.get('studies_per_patient', 0):.2f}",
        f"{r['studies_per_patient']:.2f} (test split; 2.39 whole set)" if r else na)
    row("coarse type shares val/test (code:share)", _shares(w.get("coarse_share", {})),
        _shares(r.get("coarse_share", {})))
    row("patient split shares (1/2/3)", _shares(w.get("patient_split_share", {})),
        _shares(rs.get("patient_split_share", {})) + " (sample)" if rs else na)
    vt = world / "truth" / "deeplesion_volumetric_truth.pkl"
    if vt.exists():
        v = volumetric_stats(vt, world / "truth" / "deeplesion_lesions.csv")
        rk = real / "deeplesion" / "DeepLesion_manual_1K_test_release.pkl"
        rv = volumetric_stats(rk) if rk.exists() else {}
        row("lesions per sub-volume (all, truth)", f"{v['lesions_per_subvolume']:.2f}",
            f"{rv['lesions_per_subvolume']:.2f} (1K volumetric set)" if rv else na)
        row("marked fraction of truth lesions", f"{v.get('marked_fraction', float('nan')):.2f}",
            "0.45 (1,642 marks of 3,665 lesions in the 1K set)")
    lw = luna_stats(world / "LUNA16" / "annotations.csv")
    lr_path = real / "luna16" / "annotations.csv"
    lr = luna_stats(lr_path) if lr_path.exists() else {}
    row("LUNA16 nodule diameter p5/p50/p95", _pct(lw["diameter_mm"]), _pct(lr.get("diameter_mm", [])))
    row("LUNA16 diameter min/max",
        f"{lw['diameter_mm'].min():.3g}/{lw['diameter_mm'].max():.3g}" if lw["nodules"] else na,
        f"{lr['diameter_mm'].min():.3g}/{lr['diameter_mm'].max():.3g}" if lr else na)
    n_scans = sum(1 for _ in open(world / "LUNA16" / "seriesuids.csv", encoding="utf-8"))
    row("LUNA16 nodules / scans with nodules / scans", f"{lw['nodules']}/{lw['scans_with_nodules']}/{n_scans}",
        f"{lr['nodules']}/{lr['scans_with_nodules']}/888" if lr else na)
    return "\n".join(lines)


def print_stats(world) -> None:
    print(format_stats(world))
