"""Writes the synthetic CT world in the four released formats (docs/formats.md) with its truth.

    python -m data_prep.synthesize --preset {tiny,small,paper} --seed N --out DIR
        [--overwrite] [--stats] [--preview] [--tables-only] [--workers K]
        [--dl-patients N] [--luna N] [--lits N] [--nihln N] [--dl-split VAL,TEST]
        [--unbiased-marks] [--extra-lesions M]

Everything is written into a temporary sibling folder and renamed to DIR at the end, so an
interrupted or failed run leaves nothing partial behind. The same preset, seed and counts give the
same bytes (every patient/scan draws from its own random stream; ``--workers`` does not matter).
Bad input (unknown preset, negative counts, a non-empty DIR without --overwrite, an unwritable
parent) exits with status 2 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
from typing import Any

import numpy as np

from data_prep.world import cohort as C
from data_prep.world import singles as SG
from data_prep.world import writers as W
from data_prep.world.presets import PRESETS, Preset, PresetError, get_preset
from uld_jax.io.safe_pickle import atomic_dump

FORMAT_VERSION = 1


class SynthesisError(ValueError):
    """Bad input to the generator (one-line message)."""


def _tqdm(iterable, **kw):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is pinned in requirements.txt
        return iterable
    return tqdm(iterable, **kw)


def resolve_preset(preset: str, counts: dict | None, *, mark_bias: bool = True,
                   extra_lesions: float | None = None) -> Preset:
    """The named preset with optional count overrides (dl_patients, luna_scans, lits_volumes,
    nihln_med, nihln_abd) and DeepLesion split fractions (dl_val_fraction, dl_test_fraction);
    negative counts or fractions outside [0, 1] raise :class:`PresetError`. ``mark_bias`` False
    switches the radiologist's marking bias off (``Preset.dl_mark_bias``). ``extra_lesions``
    replaces the mean number of lesions per DeepLesion patient beyond its marked ones
    (``Preset.dl_extra_lesions``; None: the preset's): the marks per study stay, so a larger value
    leaves more lesions unmarked."""
    if not isinstance(mark_bias, (bool, np.bool_)):
        raise PresetError(f"mark_bias must be True or False, got {mark_bias!r}")
    p = dataclasses.replace(get_preset(preset), dl_mark_bias=bool(mark_bias))
    if extra_lesions is not None:
        if isinstance(extra_lesions, bool) or not isinstance(extra_lesions, (int, float, np.number)) \
                or not np.isfinite(extra_lesions) or extra_lesions < 0:
            raise PresetError(f"extra_lesions must be a finite number >= 0, got {extra_lesions!r}")
        p = dataclasses.replace(p, dl_extra_lesions=float(extra_lesions))
    if counts:
        fractions = {"dl_val_fraction", "dl_test_fraction"}
        unknown = set(counts) - {"dl_patients", "luna_scans", "lits_volumes", "nihln_med",
                                 "nihln_abd"} - fractions
        if unknown:
            raise PresetError(f"unknown count override(s): {', '.join(sorted(unknown))}")
        for k, v in counts.items():
            if v is None or k in fractions:
                continue
            if not isinstance(v, (int, np.integer)) or v < 0:
                raise PresetError(f"{k} must be a non-negative integer, got {v!r}")
        fixed = {k: (float(v) if k in fractions else int(v)) for k, v in counts.items()
                 if v is not None}
        if "dl_patients" in fixed and p.dl_studies_total is not None:
            fixed.update(dl_studies_total=None, dl_marks_total=None)
        p = dataclasses.replace(p, **fixed)
        p.validate()
    return p


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthesisError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SynthesisError(f"output folder {out} is not empty (use --overwrite to replace it)")
    parent = out.parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SynthesisError(f"cannot create output parent folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SynthesisError(f"output parent folder {parent} is not writable")


# Worker plumbing: each task is (kind, index); the globals are set once per process.
_CTX: dict[str, Any] = {}


def _init(ctx):
    _CTX.clear()
    _CTX.update(ctx)


def _run(task):
    kind, i = task
    seed, preset, out, tables_only = _CTX["seed"], _CTX["preset"], _CTX["out"], _CTX["tables_only"]
    if kind == "dl":
        return W.dl_patient_unit(seed, preset, _CTX["plan"], i, out, tables_only)
    if kind == "luna":
        return W.luna_unit(seed, preset, i, out, tables_only)
    if kind == "lits":
        return W.lits_unit(seed, preset, i, out, tables_only)
    if kind == "nihln":
        return W.nihln_unit(seed, preset, i, out, tables_only)
    raise KeyError(kind)


def _csv_writer(path):
    f = open(path, "w", newline="", encoding="utf-8")
    return f, csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)


def _generate(preset: Preset, seed: int, tmp: pathlib.Path, tables_only: bool, workers: int,
              progress: bool) -> dict:
    plan = C.plan_deeplesion(seed, preset)
    ctx = dict(seed=seed, preset=preset, out=str(tmp), tables_only=tables_only, plan=plan)
    for sub in ("DeepLesion", "truth", "LUNA16", "LiTS", "NIH-LN"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    if not tables_only:
        (tmp / "DeepLesion" / "Images_png").mkdir(exist_ok=True)
        for k in range(10):
            (tmp / "LUNA16" / f"subset{k}").mkdir(exist_ok=True)
    pool = None
    if workers > 1:
        # spawn, not fork: callers (tests, the quick start) may have JAX's threads running, and a
        # forked child of a multithreaded process can deadlock.
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init, initargs=(ctx,))
        imap = lambda tasks: pool.imap(_run, tasks, chunksize=1)  # noqa: E731
    else:
        _init(ctx)
        imap = lambda tasks: map(_run, tasks)  # noqa: E731
    summary: dict[str, Any] = {"marks": [], "luna_diameters": [], "subvolumes": []}
    try:
        # DeepLesion: streamed patient by patient, rows appended in patient order.
        f_info, w_info = _csv_writer(tmp / "DeepLesion" / "DL_info.csv")
        f_sc, w_sc = _csv_writer(tmp / "DeepLesion" / "lesion_organ_scores.csv")
        f_tr, w_tr = _csv_writer(tmp / "truth" / "deeplesion_lesions.csv")
        w_info.writerow(W.DL_COLUMNS)
        w_sc.writerow(W.ORGAN_SCORE_COLUMNS)
        w_tr.writerow(W.DL_TRUTH_COLUMNS)
        truth = {"train": {}, "val": {}, "test": {}}
        row0 = 0
        tasks = [("dl", p) for p in range(1, preset.dl_patients + 1)]
        for rows, scores, tr, tr_rows, info, svs in _tqdm(
                imap(tasks), total=len(tasks), desc="DeepLesion patients", disable=not progress,
                unit="patient"):
            for j, (r, sc) in enumerate(zip(rows, scores)):
                w_info.writerow(r)
                w_sc.writerow([str(row0 + j)] + sc)
            for r in tr_rows:
                if r[-1] != "-1":
                    r[-1] = str(row0 + int(r[-1]))
                w_tr.writerow(r)
            row0 += len(rows)
            for k in truth:
                truth[k].update(tr[k])
            summary["marks"].extend(info)
            summary["subvolumes"].extend(svs)
        for f in (f_info, f_sc, f_tr):
            f.close()
        # Fresh arrays with the canonical dtype object, so the pickle's bytes do not depend on
        # whether the boxes came from this process or from a worker.
        truth = {split: {str(k): np.array(np.asarray(v).tolist(), dtype=np.float64).reshape(-1, 6)
                         for k, v in d.items()} for split, d in truth.items()}
        atomic_dump(truth, tmp / "truth" / "deeplesion_volumetric_truth.pkl")

        # LUNA16.
        f_a, w_a = _csv_writer(tmp / "LUNA16" / "annotations.csv")
        f_e, w_e = _csv_writer(tmp / "LUNA16" / "annotations_excluded.csv")
        f_s, w_s = _csv_writer(tmp / "LUNA16" / "seriesuids.csv")
        f_t, w_t = _csv_writer(tmp / "truth" / "luna16_lesions.csv")
        for w in (w_a, w_e):
            w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        w_t.writerow(W.SINGLE_TRUTH_COLUMNS)
        tasks = [("luna", i) for i in range(preset.luna_scans)]
        for uid, ann, exc, tr in _tqdm(imap(tasks), total=len(tasks), desc="LUNA16 scans",
                                       disable=not progress, unit="scan"):
            w_s.writerow([uid])
            for r in ann:
                w_a.writerow(r)
                summary["luna_diameters"].append(float(r[-1]))
            for r in exc:
                w_e.writerow(r)
            for r in tr:
                w_t.writerow(r)
        for f in (f_a, f_e, f_s, f_t):
            f.close()

        # LiTS and NIH-LN.
        for name, kind, n, sub in (("LiTS volumes", "lits", preset.lits_volumes, "lits_lesions.csv"),
                                   ("NIH-LN patients", "nihln", preset.nihln_med + preset.nihln_abd,
                                    "nihln_lesions.csv")):
            f_t, w_t = _csv_writer(tmp / "truth" / sub)
            w_t.writerow(W.SINGLE_TRUTH_COLUMNS)
            tasks = [(kind, i) for i in range(n)]
            for _, tr in _tqdm(imap(tasks), total=len(tasks), desc=name, disable=not progress,
                               unit="scan"):
                for r in tr:
                    w_t.writerow(r)
            f_t.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return summary


def synthesize(preset: str = "tiny", seed: int = 0, out: str | os.PathLike = "world",
               overwrite: bool = False, stats: bool = False, preview: bool = False,
               tables_only: bool = False, *, counts: dict | None = None, workers: int = 1,
               progress: bool = True, mark_bias: bool = True,
               extra_lesions: float | None = None) -> pathlib.Path:
    """Generates the world into ``out`` (see module docstring); returns the output path.

    Raises PresetError / SynthesisError (ValueError subclasses, one-line messages) on bad input,
    before anything is written.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthesisError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(workers, int) or workers < 1:
        raise SynthesisError(f"workers must be a positive integer, got {workers!r}")
    p = resolve_preset(preset, counts, mark_bias=mark_bias, extra_lesions=extra_lesions)
    out = pathlib.Path(out).absolute()
    _check_out(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        summary = _generate(p, int(seed), tmp, tables_only, workers, progress)
        manifest = {"format_version": FORMAT_VERSION, "preset": p.name, "seed": int(seed),
                    "tables_only": bool(tables_only), "counts": {
                        "dl_patients": p.dl_patients, "dl_marks": len(summary["marks"]),
                        "dl_subvolumes": len(summary["subvolumes"]), "luna16_scans": p.luna_scans,
                        "lits_volumes": p.lits_volumes, "nihln_patients": p.nihln_med + p.nihln_abd},
                    "preset_values": {k: v for k, v in dataclasses.asdict(p).items()}}
        with open(tmp / "world.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
        if preview and not tables_only:
            from data_prep.world import preview as PV
            PV.write_previews(tmp, seed, p, progress=progress)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if stats:
        from data_prep.world import stats as ST
        ST.print_stats(out)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        sys.stderr.write(f"synthesize: error: {message}\n")
        sys.exit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m data_prep.synthesize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--stats", action="store_true", help="print the world's distributions next to the real files'")
    ap.add_argument("--preview", action="store_true", help="write PNG mosaics to OUT/preview/")
    ap.add_argument("--tables-only", action="store_true", help="annotation tables only, no images")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dl-patients", type=int, default=None)
    ap.add_argument("--luna", type=int, default=None, help="LUNA16 scans")
    ap.add_argument("--lits", type=int, default=None, help="LiTS volumes")
    ap.add_argument("--nihln", type=int, default=None, help="NIH-LN patients (half MED, half ABD)")
    ap.add_argument("--dl-split", default=None, metavar="VAL,TEST",
                    help="fractions of the DeepLesion patients in the val and test splits (default "
                    "0.15,0.15; 0,1: an evaluation-only world, every patient in test)")
    ap.add_argument("--unbiased-marks", action="store_true",
                    help="a diagnostic world: DeepLesion marks drawn regardless of lesion size and "
                    "conspicuity (the radiologist's bias off), so the unmarked lesions are as easy "
                    "to see as the marked ones")
    ap.add_argument("--extra-lesions", type=float, default=None, metavar="M",
                    help="mean lesions per DeepLesion patient beyond its marked ones (default: the "
                    "preset's, 10 on small); the marks stay as many, so a larger M makes a world "
                    "with more unmarked lesions per slice")
    a = ap.parse_args(argv)
    # A terminated run unwinds like Ctrl-C, so the temporary output folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = {"dl_patients": a.dl_patients, "luna_scans": a.luna, "lits_volumes": a.lits}
    if a.dl_split is not None:
        try:
            fv, ft = (float(v) for v in a.dl_split.split(","))
        except ValueError:
            sys.stderr.write(f"synthesize: error: --dl-split {a.dl_split!r}: expected two "
                             "fractions VAL,TEST, e.g. 0.15,0.15\n")
            return 2
        counts.update(dl_val_fraction=fv, dl_test_fraction=ft)
    if a.nihln is not None:
        if a.nihln < 0:
            sys.stderr.write(f"synthesize: error: --nihln must be a non-negative integer, got {a.nihln}\n")
            return 2
        counts.update(nihln_med=a.nihln // 2, nihln_abd=a.nihln - a.nihln // 2)
    try:
        out = synthesize(a.preset, a.seed, a.out, overwrite=a.overwrite, stats=a.stats,
                         preview=a.preview, tables_only=a.tables_only, counts=counts,
                         workers=a.workers, mark_bias=not a.unbiased_marks,
                         extra_lesions=a.extra_lesions)
    except (PresetError, SynthesisError) as e:
        sys.stderr.write(f"synthesize: error: {e}\n")
        return 2
    print(f"synthesize: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
