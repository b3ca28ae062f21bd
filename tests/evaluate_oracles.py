"""Slow, literal per-detection reference implementations used as test oracles.

They follow the released protocols step by step (one detection at a time, Python loops, scipy's
interp1d for the reading) so the vectorised code in uld_jax.evaluate can be checked against them.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import interp1d


def overlap_loop(box, gts, dim, metric):
    """Overlap of one box against rows of gts, +1 convention, one pair at a time."""
    out = []
    for g in gts:
        inter, sa, sg = 1.0, 1.0, 1.0
        for k in range(dim):
            lo = max(g[k], box[k])
            hi = min(g[k + dim], box[k + dim])
            inter *= max(hi - lo + 1.0, 0.0)
            sa *= box[k + dim] - box[k] + 1.0
            sg *= g[k + dim] - g[k] + 1.0
        if metric == "iou":
            out.append(inter / (sa + sg - inter))
        elif metric == "iobb":
            out.append(inter / sa)
        else:
            raise ValueError(metric)
    return np.array(out, dtype=np.float64)


def froc_loop(dets_list, gts_list, dim, metric, th, strict=False, paper=False):
    """Per-detection FROC loop; returns (sens, fps_per_volume) like the released FROC()."""
    n = len(dets_list)
    vol = np.concatenate([[i] * len(d) for i, d in enumerate(dets_list)] + [[]]).astype(int)
    allb = np.vstack([np.asarray(d, float).reshape(-1, 2 * dim + 1) for d in dets_list])
    order = np.argsort(allb[:, -1])[::-1]
    hit = [np.zeros(len(g), bool) for g in gts_list]
    nh = nm = 0
    tps, fps = [], []
    for i in order:
        g = np.asarray(gts_list[vol[i]], float).reshape(-1, 2 * dim)
        b = allb[i, :-1]
        if paper:
            zok = np.array([max(b[2], t[2]) <= min(b[5], t[5]) for t in g], bool)
            ov = overlap_loop(b[[0, 1, 3, 4]], g[:, [0, 1, 3, 4]], 2, "iou") if len(g) else np.zeros(0)
            ov = np.where(zok, ov, 0.0)
        else:
            ov = overlap_loop(b, g, dim, metric)
        ok = (ov > th) if strict else (ov >= th)
        if len(ov) == 0 or not ok.any():
            nm += 1
        else:
            for j in range(len(ov)):
                if ok[j] and not hit[vol[i]][j]:
                    hit[vol[i]][j] = True
                    nh += 1
        tps.append(nh)
        fps.append(nm)
    ngt = sum(len(np.asarray(g).reshape(-1, 2 * dim)) for g in gts_list)
    return np.array(tps, float) / ngt, np.array(fps, float) / n


def read_loop(sens, fps, rates):
    """The released sens_at_FP: 0 left, interp1d inside, last value right."""
    left = [a for a in rates if a < fps[0]]
    inside = [a for a in rates if fps[0] <= a <= fps[-1]]
    right = [a for a in rates if a > fps[-1]]
    f = interp1d(fps, sens)
    return np.hstack([np.zeros(len(left)), f(np.array(inside)), np.ones(len(right)) * sens[-1]])


def stack_loop(z, b, s, vol, thr=0.5, mode="max"):
    """Per-detection stacking: greedy IoU links between consecutive slices, one box at a time.

    Returns (boxes [T, 6], scores [T], volume [T], track [N]) in the documented track order.
    """
    z = [int(t) for t in z]
    vol = [int(t) for t in vol]
    b = np.asarray(b, float)
    n = len(z)
    groups = {}
    for i in range(n):
        groups.setdefault((vol[i], z[i]), []).append(i)
    prev_of = [-1] * n
    for (v, zz), cur in groups.items():
        prev = groups.get((v, zz - 1))
        if not prev:
            continue
        edges = []
        for ci in cur:
            ious = overlap_loop(b[ci], b[prev], 2, "iou")
            for pi, iou in zip(prev, ious):
                if iou > thr:
                    edges.append((-iou, pi, ci))
        edges.sort()
        used_p, used_c = set(), set()
        for _, pi, ci in edges:
            if pi in used_p or ci in used_c:
                continue
            used_p.add(pi)
            used_c.add(ci)
            prev_of[ci] = pi
    heads = [i for i in range(n) if prev_of[i] == -1]
    heads.sort(key=lambda i: (vol[i], z[i], -s[i], i))
    succ = {p: c for c, p in enumerate(prev_of) if p >= 0}
    track = [-1] * n
    boxes, scores, vols = [], [], []
    for t, h in enumerate(heads):
        members = [h]
        while members[-1] in succ:
            members.append(succ[members[-1]])
        for m in members:
            track[m] = t
        mb = b[members]
        zs = [z[m] for m in members]
        boxes.append([mb[:, 0].min(), mb[:, 1].min(), min(zs), mb[:, 2].max(), mb[:, 3].max(), max(zs)])
        ms = [s[m] for m in members]
        scores.append(max(ms) if mode == "max" else sum(ms) / len(ms))
        vols.append(vol[h])
    return np.array(boxes).reshape(-1, 6), np.array(scores), np.array(vols), np.array(track)


def luna_loop(cands, nodules, excluded, scans, max_marks=100, rates=(0.125, 0.25, 0.5, 1, 2, 4, 8)):
    """The LUNA16 script's matching, one candidate and one finding at a time.

    cands: list of (uid, x, y, z, p); nodules / excluded: list of (uid, x, y, z, d).
    Returns (linear sensitivities, found count, fp count).
    """
    import math

    pos, neg, nnod = [], [], 0
    for uid in scans:
        cs = [c for c in cands if c[0] == uid]
        if max_marks > 0 and len(cs) > max_marks:
            probs = sorted((c[4] for c in cs), reverse=True)
            cut = probs[max_marks]
            cs = [c for c in cs if c[4] > cut][:max_marks]
        left = dict(enumerate(cs))
        findings = [(f, True) for f in nodules if f[0] == uid] + [(f, False) for f in excluded if f[0] == uid]
        for f, included in findings:
            if included:
                nnod += 1
            d = f[4] if f[4] >= 0 else 10.0
            r2 = (d / 2.0) ** 2
            matches = []
            for key, c in enumerate(cs):
                dist = math.pow(f[1] - c[1], 2) + math.pow(f[2] - c[2], 2) + math.pow(f[3] - c[3], 2)
                if dist < r2:
                    if included:
                        matches.append(c)
                        left.pop(key, None)
                    else:
                        left.pop(key, None)
            if included and matches:
                pos.append(max(c[4] for c in matches))
        neg += [c[4] for c in left.values()]
    # naive FROC points at every distinct score, then the linear reading
    thr = sorted(set(pos + neg), reverse=True)
    fps = [0.0] + [sum(1 for q in neg if q >= t) / len(scans) for t in thr]
    sens = [0.0] + [sum(1 for q in pos if q >= t) / nnod for t in thr]
    return np.interp(rates, fps, sens), len(pos), len(neg)
