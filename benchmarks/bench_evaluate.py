"""Benchmark: evaluation at the real 1K test set's scale, vectorised vs a per-detection Python loop.

1. Volumetric FROC (both hit rules): truth = the real DeepLesion 1K volumetric test set (val + test,
   1,000 sub-volumes, 5,447 3D boxes); 50 detections per sub-volume generated around the truths
   (jittered copies, shifted misses, random clutter; scores with ties).
2. Stacking: 43,000 slices x 50 2D detections (1,000 volumes x 43 slices; lesion tracks + clutter).

Each part runs the library's vectorised code and a straightforward per-detection loop written here,
asserts identical results, and prints the times and the speed ratio.

    python benchmarks/bench_evaluate.py [--real PATH_TO_REAL_DATA] [--slices 43000] [--per-slice 50]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uld_jax.evaluate.froc import VOLUMETRIC_FP_RATES, volumetric_froc  # noqa: E402
from uld_jax.evaluate.stacking import stack_slices  # noqa: E402
from uld_jax.io.safe_pickle import safe_load  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Per-detection reference loops.
# ------------------------------------------------------------------------------------------------
def _overlap(box, gts, metric):
    """Overlap of one box with the rows of gts (+1 convention); metric iobb (3D) or iou2d."""
    if metric == "iobb":
        inter = np.ones(len(gts))
        size = 1.0
        for k in range(3):
            inter = inter * np.maximum(np.minimum(gts[:, k + 3], box[k + 3]) - np.maximum(gts[:, k], box[k]) + 1.0, 0.0)
            size = size * (box[k + 3] - box[k] + 1.0)
        return inter / size
    # paper rule: shared slice and 2D IoU of the xy rectangles
    iw = np.maximum(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 0], box[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gts[:, 4], box[4]) - np.maximum(gts[:, 1], box[1]) + 1.0, 0.0)
    inter = iw * ih
    sa = (box[3] - box[0] + 1.0) * (box[4] - box[1] + 1.0)
    sg = (gts[:, 3] - gts[:, 0] + 1.0) * (gts[:, 4] - gts[:, 1] + 1.0)
    iou = inter / (sa + sg - inter)
    zok = np.maximum(gts[:, 2], box[2]) <= np.minimum(gts[:, 5], box[5])
    return np.where(zok, iou, 0.0)


def froc_loop(pred, truth, rule, rates):
    keys = list(truth)
    boxes = np.vstack([pred[k] for k in keys])
    vol = np.concatenate([np.full(len(pred[k]), i) for i, k in enumerate(keys)])
    gts = [np.asarray(truth[k], float).reshape(-1, 6) for k in keys]
    order = np.argsort(boxes[:, -1])[::-1]
    hit = [np.zeros(len(g), bool) for g in gts]
    nh = nm = 0
    tps, fps = [], []
    for i in order:
        g = gts[vol[i]]
        if rule == "released":
            ok = _overlap(boxes[i], g, "iobb") >= 0.3
        else:
            ok = _overlap(boxes[i], g, "paper") > 0.5
        if not ok.any():
            nm += 1
        else:
            for j in np.flatnonzero(ok):
                if not hit[vol[i]][j]:
                    hit[vol[i]][j] = True
                    nh += 1
        tps.append(nh)
        fps.append(nm)
    ngt = sum(len(g) for g in gts)
    sens = np.array(tps, float) / ngt
    fpv = np.array(fps, float) / len(keys)
    out = []
    for r in rates:
        if r < fpv[0]:
            out.append(0.0)
        elif r > fpv[-1]:
            out.append(sens[-1])
        else:
            out.append(float(np.interp(r, fpv, sens)))
    return sens, fpv, np.array(out)


def stack_loop(z, b, s, vol, thr=0.5):
    n = len(z)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        groups.setdefault((int(vol[i]), int(z[i])), []).append(i)
    prev_of = np.full(n, -1)
    for (v, zz), cur in groups.items():
        prev = groups.get((v, zz - 1))
        if not prev:
            continue
        pb = b[prev]
        edges = []
        for ci in cur:  # per detection: IoU against the previous slice's boxes
            bx = b[ci]
            iw = np.maximum(np.minimum(pb[:, 2], bx[2]) - np.maximum(pb[:, 0], bx[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(pb[:, 3], bx[3]) - np.maximum(pb[:, 1], bx[1]) + 1.0, 0.0)
            inter = iw * ih
            iou = inter / ((pb[:, 2] - pb[:, 0] + 1.0) * (pb[:, 3] - pb[:, 1] + 1.0)
                           + (bx[2] - bx[0] + 1.0) * (bx[3] - bx[1] + 1.0) - inter)
            for j in np.flatnonzero(iou > thr):
                edges.append((-iou[j], prev[j], ci))
        edges.sort()
        used_p, used_c = set(), set()
        for _, pi, ci in edges:
            if pi not in used_p and ci not in used_c:
                used_p.add(pi)
                used_c.add(ci)
                prev_of[ci] = pi
    heads = sorted((i for i in range(n) if prev_of[i] < 0), key=lambda i: (vol[i], z[i], -s[i], i))
    succ = {int(p): c for c, p in enumerate(prev_of) if p >= 0}
    track = np.empty(n, np.int64)
    boxes, scores = [], []
    for t, h in enumerate(heads):
        m = [h]
        while m[-1] in succ:
            m.append(succ[m[-1]])
        track[m] = t
        mb, mz = b[m], z[m]
        boxes.append([mb[:, 0].min(), mb[:, 1].min(), mz.min(), mb[:, 2].max(), mb[:, 3].max(), mz.max()])
        scores.append(s[m].max())
    return np.array(boxes), np.array(scores), track


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------
def make_volumetric(truth, per_volume, rng):
    pred = {}
    for k, g in truth.items():
        g = np.asarray(g, float).reshape(-1, 6)
        n_near = min(per_volume // 2, 4 * len(g))
        rows = []
        if len(g):
            src = g[rng.integers(0, len(g), n_near)]
            size = src[:, 3:] - src[:, :3] + 1
            jit = rng.normal(0, 0.15, (n_near, 6)) * np.concatenate([size, size], 1)
            d = np.round(src + jit)
            rows.append(d)
        n_rand = per_volume - sum(len(r) for r in rows)
        lo = rng.uniform([0, 0, 1], [480, 480, 40], (n_rand, 3))
        rows.append(np.round(np.hstack([lo, lo + rng.uniform([4, 4, 0], [60, 60, 8], (n_rand, 3))])))
        d = np.vstack(rows)
        d = np.sort(d.reshape(-1, 2, 3), axis=1).reshape(-1, 6)
        n_near = len(d) - n_rand
        # near-truth detections score higher than clutter; 3 decimals: many tied scores
        sc = np.round(np.r_[rng.uniform(0.3, 1, n_near), rng.uniform(0, 0.8, n_rand)], 3)[:, None]
        pred[k] = np.hstack([d, sc])
    return pred


def make_slices(n_slices, per_slice, rng, slices_per_volume=43):
    n_vol = max(1, n_slices // slices_per_volume)
    z_all, b_all, s_all, v_all = [], [], [], []
    for v in range(n_vol):
        z = np.repeat(np.arange(slices_per_volume), per_slice)
        boxes = np.empty((len(z), 4))
        c = rng.uniform(0, 480, (len(z), 2))
        w = rng.uniform(4, 50, (len(z), 2))
        boxes[:, :2], boxes[:, 2:] = c, c + w
        scores = rng.uniform(0, 0.5, len(z))
        for _ in range(6):  # lesions: one box per slice over a z range (first slots of each slice)
            z0, length = rng.integers(0, slices_per_volume - 1), rng.integers(2, 10)
            lc, lw = rng.uniform(50, 400, 2), rng.uniform(8, 50, 2)
            slot = rng.integers(0, per_slice)
            for zz in range(z0, min(z0 + length, slices_per_volume)):
                cc = lc + rng.normal(0, 1.0, 2)
                ww = lw * rng.uniform(0.9, 1.1, 2)
                boxes[zz * per_slice + slot] = np.r_[cc - ww / 2, cc + ww / 2]
                scores[zz * per_slice + slot] = rng.uniform(0.5, 1)
        z_all.append(z); b_all.append(np.round(boxes, 1)); s_all.append(np.round(scores, 3)); v_all.append(np.full(len(z), v))
    return np.concatenate(z_all), np.concatenate(b_all), np.concatenate(s_all), np.concatenate(v_all)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", default=os.environ.get("ULD_REAL_DATA", str(ROOT.parent / "shared" / "data" / "real")))
    ap.add_argument("--per-volume", type=int, default=50)
    ap.add_argument("--slices", type=int, default=43000)
    ap.add_argument("--per-slice", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    gts = safe_load(os.path.join(args.real, "deeplesion", "DeepLesion_manual_1K_test_release.pkl"))
    truth = {**gts["val"], **gts["test"]}
    pred = make_volumetric(truth, args.per_volume, rng)
    ntru = sum(len(v) for v in truth.values())
    ndet = sum(len(v) for v in pred.values())
    print(f"volumetric FROC: {len(truth)} sub-volumes, {ntru} truths, {ndet} detections")
    for rule in ("released", "paper"):
        t0 = time.perf_counter()
        r = volumetric_froc(pred, truth, rule=rule)
        t_vec = time.perf_counter() - t0
        t0 = time.perf_counter()
        s_ref, f_ref, sa_ref = froc_loop(pred, truth, rule, VOLUMETRIC_FP_RATES)
        t_loop = time.perf_counter() - t0
        assert np.array_equal(r.curve_sens, s_ref) and np.array_equal(r.curve_fps, f_ref), rule
        assert np.array_equal(r.sensitivity, sa_ref), (rule, r.sensitivity, sa_ref)
        print(f"  rule={rule:8s} sens={np.round(r.sensitivity, 4).tolist()} mean={r.mean_sensitivity:.4f}")
        print(f"  rule={rule:8s} vectorised {t_vec * 1e3:8.1f} ms | loop {t_loop * 1e3:8.1f} ms | "
              f"ratio {t_loop / t_vec:6.1f}x | identical: yes")

    z, b, s, v = make_slices(args.slices, args.per_slice, rng)
    print(f"stacking: {len(np.unique(v * 100000 + z))} slices, {len(z)} 2D detections")
    t0 = time.perf_counter()
    st = stack_slices(z, b, s, v)
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    rb, rs, rt = stack_loop(z, b, s, v)
    t_loop = time.perf_counter() - t0
    assert np.array_equal(st.track, rt) and np.array_equal(st.boxes, rb) and np.array_equal(st.scores, rs)
    print(f"  {len(st.scores)} 3D boxes, {(st.num_slices > 1).sum()} spanning > 1 slice")
    print(f"  vectorised {t_vec:8.2f} s | loop {t_loop:8.2f} s | ratio {t_loop / t_vec:6.1f}x | identical: yes")


if __name__ == "__main__":
    main()
