"""Validate raw dataset folders before a long build.

    python -m data_prep.check --raw DIR [--datasets deeplesion,luna16,lits,nihln]

Reads every table and every image of each dataset found under ``DIR`` (``DeepLesion/``,
``LUNA16/``, ``LiTS/``, ``NIH-LN/``) the way the builders will, without preprocessing, and lists
every problem as ``<file or file row>: <problem>``. Exit code 1 when there is any problem (or no
dataset was found), 0 when clean.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.readers import DATASET_FOLDERS, reader_module
from data_prep.types import BadItem


def check_raw(raw: str | Path, datasets: list[str] | None = None, *,
              show_progress: bool | None = None) -> dict[str, list[BadItem]]:
    """{dataset: problems} for the requested datasets (default: those whose folder exists)."""
    raw = Path(raw)
    if datasets is None:
        datasets = [d for d, folder in DATASET_FOLDERS.items() if (raw / folder).is_dir()]
    out: dict[str, list[BadItem]] = {}
    for d in datasets:
        folder = raw / DATASET_FOLDERS[d]
        if not folder.is_dir():
            out[d] = [BadItem(str(folder), f"dataset folder for {d} not found")]
            continue
        out[d] = reader_module(d).check(raw, show_progress=show_progress)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True, help="folder holding DeepLesion/, LUNA16/, LiTS/, NIH-LN/")
    ap.add_argument("--datasets", default=None,
                    help=f"comma-separated subset of {','.join(DATASET_FOLDERS)} (default: every folder found)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    raw = Path(args.raw)
    if not raw.is_dir():
        print(f"error: --raw {raw}: no such folder", file=sys.stderr)
        return 1
    datasets = None
    if args.datasets:
        datasets = [s.strip() for s in args.datasets.split(",") if s.strip()]
        unknown = [d for d in datasets if d not in DATASET_FOLDERS]
        if unknown:
            print(f"error: unknown dataset(s) {', '.join(unknown)}; known: {', '.join(DATASET_FOLDERS)}",
                  file=sys.stderr)
            return 1
    results = check_raw(raw, datasets, show_progress=False if args.no_progress else None)
    if not results:
        print(f"no dataset folders ({', '.join(DATASET_FOLDERS.values())}) found under {raw}")
        return 1
    total = 0
    for d, problems in results.items():
        print(f"{d}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  {p}")
        total += len(problems)
    print(f"{total} problem(s) in {len(results)} dataset(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
