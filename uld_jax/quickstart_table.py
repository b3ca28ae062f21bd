"""The quick start's outputs: the Table-1-style table from the evaluation reports, and overlay PNGs.

``table1(out, runs, names, recipe)`` reads ``OUT/eval/<run>/results.json`` (written by
``python -m uld_jax.evaluate``) and returns (Markdown, JSON dict); nothing is typed by hand.
``overlay_pngs(workdir, data_dir, out_dir)`` draws a run's detections on the test key slices.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Mapping, Sequence

import numpy as np

RULES = ("released", "paper")
RULE_TITLES = {"released": "released protocol: 3D IoBB >= 0.3",
               "paper": "paper text: 2D cross-section IoU > 0.5"}


def _fmt(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * float(v):.1f}"


def table1(out: str, runs: Sequence[str], names: Mapping[str, str], recipe: Mapping,
           twins: Mapping[str, str] | None = None) -> tuple[str, dict]:
    """``twins``: {run: the earlier run it is}, for finetunes whose table held the same rows as
    an earlier one's and that were therefore not trained again (a note under the table)."""
    twins = dict(twins or {})
    res = {}
    for run in runs:
        with open(os.path.join(out, "eval", run, "results.json"), encoding="utf-8") as f:
            res[run] = json.load(f)
    first = res[runs[0]]
    counts = first.get("info", {}).get("counts", {})
    lines = ["# Table 1 on the synthetic world (quick start)", "",
             "Sensitivity (%) at 0.125 ... 8 false positives per sub-volume on the DeepLesion test "
             "split of the synthetic world (volumetric protocol), and the mean over the 7 rates.", ""]
    js: dict = {"recipe": dict(recipe), "counts": counts, "rules": {}, "same_as": twins}
    for rule in RULES:
        rows = {r: res[r]["tables"].get(rule) for r in runs}
        some = next((t for t in rows.values() if t), None)
        if some is None:
            continue
        rates = some["fp_rates"]
        lines += [f"## {RULE_TITLES.get(rule, rule)}", "",
                  "| method | " + " | ".join(f"{r:g}" for r in rates) + " | mean |",
                  "|---|" + "---:|" * (len(rates) + 1)]
        js["rules"][rule] = {}
        for r in runs:
            t = rows[r]
            if t is None:
                continue
            lines.append(f"| {names.get(r, r)} | " + " | ".join(_fmt(s) for s in t["sensitivity"])
                         + f" | **{_fmt(t['mean'])}** |")
            js["rules"][rule][r] = {"fp_rates": t["fp_rates"], "sensitivity": t["sensitivity"],
                                    "mean": t["mean"]}
        lines.append("")
    if counts:
        lines.append("Test split: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    for run, twin in twins.items():
        lines += ["", f"{names.get(run, run)}: its finetuning table holds the same rows as "
                  f"{names.get(twin, twin)}'s, so the finetuning would train the same model; "
                  f"`runs/{run}` is that run (not trained again), and its row is that run's."]
    rc = dict(recipe)
    walls = rc.pop("step_wall_s", {})
    lines += ["", f"Recipe: `{json.dumps(rc)}`.", "",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
              f"{platform.python_version()}.", ""]
    if walls:
        lines += ["Wall time per step (s): " + ", ".join(f"{k} {v:g}" for k, v in walls.items())
                  + f"; total {sum(walls.values()):.0f} s.", ""]
    lines += ["One seed: differences of a few points are within the spread of a run this small "
              "(see docs/results.md for several seeds).", ""]
    return "\n".join(lines), js


def _draw(hu: np.ndarray, truth: np.ndarray, dets: np.ndarray, scores: np.ndarray, caption: str,
          min_side: int = 512) -> bytes:
    import io

    from PIL import Image, ImageDraw

    lo, hi = -160.0, 240.0                                    # soft-tissue window
    g = (np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    h, w = g.shape
    f = max(1, int(np.ceil(min_side / max(h, w))))
    img = Image.fromarray(g).resize((w * f, h * f), Image.NEAREST).convert("RGB")
    d = ImageDraw.Draw(img)
    for (y1, x1, y2, x2) in truth:
        d.rectangle([x1 * f, y1 * f, max(x1 * f, x2 * f - 1), max(y1 * f, y2 * f - 1)],
                    outline=(40, 220, 40), width=max(1, f))
    for (y1, x1, y2, x2), s in zip(dets, scores):
        d.rectangle([x1 * f, y1 * f, max(x1 * f, x2 * f - 1), max(y1 * f, y2 * f - 1)],
                    outline=(255, 40, 40), width=max(1, f))
        d.text((x1 * f + 2, max(0, y1 * f - 12)), f"{s:.2f}", fill=(255, 80, 80))
    d.text((4, 4), caption, fill=(255, 255, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def overlay_pngs(workdir: str, data_dir: str, out_dir: str, *, dataset: str = "deeplesion",
                 split: str = "test", max_images: int = 8, min_score: float = 0.5,
                 batch_size: int = 4, top_k_fallback: int = 3) -> list[str]:
    """The run's detections (red, score >= ``min_score``, or the ``top_k_fallback`` best when none
    reaches it) and the truth (green) on the first ``max_images`` samples of ``dataset``/``split``;
    returns the PNG paths."""
    from uld_jax import inference, slice_data
    from uld_jax.evaluate.from_workdir import infer_split

    loaded = inference.load_model(workdir)
    sd = infer_split(loaded, data_dir, dataset, split, batch_size=batch_size, progress=False)
    store = slice_data.SliceStore(slice_data.dataset_dir_for(data_dir, dataset), dataset)
    t = sd.table
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s in range(min(max_images, len(t))):
        c = int(t.case_row[s])
        z = int(t.slice_index[s])
        hu = store.read([int(t.case_slice_start[c]) + z], case_id=str(t.case_id[c]),
                        slice_indices=[z])[0]
        truth = np.asarray(t.sample_lesions(s)["boxes"], np.float32).reshape(-1, 4)
        keep = sd.scores[s] >= min_score
        what = f"score >= {min_score:g}"
        if not keep.any() and len(sd.scores[s]):          # an undertrained model: show its top 3
            keep = np.zeros(len(sd.scores[s]), bool)
            keep[np.argsort(-sd.scores[s])[:top_k_fallback]] = True
            what = f"none >= {min_score:g}; top {int(keep.sum())}"
        cap = f"{t.case_id[c]} slice {z}: truth green, detections red ({what}), step {loaded.step}"
        path = os.path.join(out_dir, f"{split}_{s:03d}.png")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_draw(hu, truth, sd.boxes[s][keep], sd.scores[s][keep], cap))
        os.replace(tmp, path)
        paths.append(path)
    return paths
