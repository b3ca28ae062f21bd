"""Patients, studies, series, key slices, sub-volumes and the DeepLesion label policy; the scan plans
of the single-type sets (LUNA16, LiTS, NIH-LN).

Everything here is tables (no voxels): a whole ``paper`` cohort is planned in minutes. Each patient
or scan is generated from its own random streams (:mod:`data_prep.world.rng`), so patients can be
produced one at a time (streamed) and ``--tables-only`` writes exactly the tables of a full run.

DeepLesion label policy (the radiologist): per study a quota of marks (>= 1, mean ~3); candidates are
the lesions visible in the study's series; a lesion is drawn with weight
``long_diameter^1.3 * conspicuity * (5 if it was marked at an earlier study)``; it is marked on its
key slice (the slice through its largest cross-section) with RECIST long/short axes; now and then a
second lesion on the same key slice is marked too (1-3 marks per key slice). The other lesions stay
unmarked; they are in the truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.world import anatomy as A
from data_prep.world import lesions as L
from data_prep.world import rng as wrng
from data_prep.world import scanner as S
from data_prep.world.presets import Preset

SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
REGIONS = {  # name: (first d, last d) in mm for scale 1, probability
    "chest_abdomen_pelvis": ((-25.0, 630.0), 0.40),
    "chest": ((-25.0, 300.0), 0.20),
    "abdomen_pelvis": ((185.0, 630.0), 0.25),
    "abdomen": ((185.0, 470.0), 0.15),
}
WINDOWS_SOFT = (((-175, 275), 0.88), ((-160, 240), 0.05), ((-182.5, 322.5), 0.03),
                ((-177.5, 307.5), 0.025), ((-50, 50), 0.015))
WINDOWS_LUNG = (((-1500, 500), 0.93), ((-1400, 200), 0.035), ((-1350, 250), 0.035))


# the radiologist's weight of a candidate lesion: long diameter ** MARK_SIZE_POWER x conspicuity
MARK_SIZE_POWER = 1.3


def _choice(g, pairs):
    vals = [p[0] for p in pairs]
    probs = np.array([p[1] for p in pairs], float)
    return vals[int(g.choice(len(vals), p=probs / probs.sum()))]


@dataclasses.dataclass
class Series:
    """One DeepLesion series. Slice k (1-based) lies at depth ``d_first + (k - 1) * interval``."""

    study: int
    series: int
    interval: float
    n_slices: int
    d_first: float
    proto: dict
    matrix: int

    def d_of(self, k):
        return self.d_first + (np.asarray(k, float) - 1.0) * self.interval

    def grid(self, body: A.Body, k0: int, k1: int) -> S.ScanGrid:
        return S.make_grid(body, self.proto, self.d_of(np.arange(k0, k1 + 1)), self.interval,
                           nx=self.matrix, ny=self.matrix)

    def xy0(self, body: A.Body) -> tuple[float, float]:
        g = S.make_grid(body, self.proto, np.zeros(1), self.interval, nx=self.matrix, ny=self.matrix)
        return g.x0, g.y0


@dataclasses.dataclass
class Mark:
    """One DL_info row: a RECIST-marked lesion on its key slice."""

    lesion: L.Lesion
    study: int           # 1-based
    series: Series
    key: int             # key slice, 1-based
    recist: np.ndarray   # [4, 2] (x, y) 1-based pixels: long axis ends, short axis ends
    window: tuple
    noisy: int
    subvolume: "SubVolume | None" = None
    row: int = -1


@dataclasses.dataclass
class SubVolume:
    series: Series
    patient: int
    k0: int
    k1: int
    keys: list

    @property
    def folder(self) -> str:
        return f"{self.patient:06d}_{self.series.study:02d}_{self.series.series:02d}"

    @property
    def name(self) -> str:
        return f"{self.folder}_{self.k0:03d}-{self.k1:03d}"


@dataclasses.dataclass
class DLPatient:
    index: int
    body: A.Body
    sex: str
    ages: list
    split: str
    lesions: list
    series: list          # [study][series] -> Series
    marks: list
    subvolumes: list


# ------------------------------------------------------------------------------------------------
# Cohort plan: studies per patient, marks per study, split (cheap, global, deterministic).
# ------------------------------------------------------------------------------------------------
def _adjust_total(g, counts: np.ndarray, target: int, lo: int, hi: int) -> np.ndarray:
    counts = counts.copy()
    diff = target - int(counts.sum())
    while diff != 0:
        step = 1 if diff > 0 else -1
        ok = np.flatnonzero((counts < hi) if step > 0 else (counts > lo))
        if len(ok) == 0:
            raise ValueError(f"cannot reach total {target} with per-item bounds [{lo}, {hi}]")
        pick = g.choice(ok, size=min(abs(diff), len(ok)), replace=False)
        counts[pick] += step
        diff -= step * len(pick)
    return counts


@dataclasses.dataclass
class DLPlan:
    n_studies: np.ndarray        # [P] studies per patient
    marks: list                  # [P] arrays of marks per study
    split: np.ndarray            # [P] 'train' / 'val' / 'test'


def plan_deeplesion(seed: int, preset: Preset) -> DLPlan:
    g = wrng.stream(seed, "dl-plan")
    n = preset.dl_patients
    p_geo = 1.0 / 2.39 if preset.dl_max_studies > 3 else 0.55
    ns = np.minimum(g.geometric(p_geo, size=n), preset.dl_max_studies)
    if preset.dl_studies_total is not None:
        ns = _adjust_total(g, ns, preset.dl_studies_total, 1, preset.dl_max_studies)
    total_studies = int(ns.sum())
    extra_mean = max(preset.dl_marks_mean - 1.0, 0.0)
    # Negative binomial (over-dispersed like the real per-study counts).
    r = 1.5
    m = 1 + g.negative_binomial(r, r / (r + extra_mean), size=total_studies) if extra_mean > 0 \
        else np.ones(total_studies, int)
    m = np.minimum(m, 12)
    if preset.dl_marks_total is not None:
        m = _adjust_total(g, m, preset.dl_marks_total, 1, 12)
    splits = np.empty(n, object)
    perm = g.permutation(n)
    fv, ft = preset.dl_val_fraction, preset.dl_test_fraction
    n_val = max(1, int(round(fv * n))) if fv > 0 else 0
    n_test = min(max(1, int(round(ft * n))), n - n_val) if ft > 0 else 0
    splits[perm[:n_val]] = "val"
    splits[perm[n_val:n_val + n_test]] = "test"
    splits[perm[n_val + n_test:]] = "train"
    bounds = np.concatenate([[0], np.cumsum(ns)])
    return DLPlan(ns, [m[bounds[i]:bounds[i + 1]] for i in range(n)], splits)


# ------------------------------------------------------------------------------------------------
# Geometry helpers shared by writers and tests.
# ------------------------------------------------------------------------------------------------
def lesion_voxel_box(les: L.Lesion, k: int, x0: float, y0: float, px: float, d_slices: np.ndarray):
    """3D box of a lesion (study k) on a slice grid: ([c1, r1, c2, r2] inclusive 0-based pixel
    indices, [i1, i2] inclusive indices into d_slices) of the voxel centres inside the ellipsoid;
    None when no voxel centre is inside. Vectorised over the slices."""
    semi = les.semi_at(k)
    if semi[0] <= 0:
        return None
    t = (np.asarray(d_slices, float) - les.centre[2]) / semi[2]
    f = np.sqrt(np.clip(1.0 - t * t, 0.0, None))
    ex0, ey0 = L.inplane_extent(semi[:2], les.angle)
    cx, cy = les.centre[0], les.centre[1]
    c1 = np.ceil((cx - ex0 * f - x0) / px)
    c2 = np.floor((cx + ex0 * f - x0) / px)
    r1 = np.ceil((cy - ey0 * f - y0) / px)
    r2 = np.floor((cy + ey0 * f - y0) / px)
    ok = (np.abs(t) < 1.0) & (c2 >= c1) & (r2 >= r1)
    if not ok.any():
        return None
    zs = np.flatnonzero(ok)
    box = np.array([c1[ok].min(), r1[ok].min(), c2[ok].max(), r2[ok].max()]).astype(int)
    return box, (int(zs[0]), int(zs[-1]))


def recist_on_slice(les: L.Lesion, k: int, d: float, x0: float, y0: float, px: float):
    """Exact RECIST end points on the axial plane at depth d: [4, 2] (x, y) in 0-based continuous
    pixel coordinates (long axis ends, then short axis ends); None if the plane misses."""
    cs = L.cross_section(les.centre, les.semi_at(k), les.angle, d)
    if cs is None:
        return None
    cx, cy, a, b = cs
    ca, sa = np.cos(les.angle), np.sin(les.angle)
    c = np.array([(cx - x0) / px, (cy - y0) / px])
    u = np.array([ca, sa]) * a / px
    v = np.array([-sa, ca]) * b / px
    return np.stack([c + u, c - u, c + v, c - v])


def _in_image(les: L.Lesion, k: int, x0, y0, px, matrix, margin_px=2.0) -> bool:
    ex, ey = L.inplane_extent(les.semi_at(k)[:2], les.angle)
    c = (les.centre[0] - x0) / px
    r = (les.centre[1] - y0) / px
    return (c - ex / px > margin_px and c + ex / px < matrix - 1 - margin_px
            and r - ey / px > margin_px and r + ey / px < matrix - 1 - margin_px)


# ------------------------------------------------------------------------------------------------
# One DeepLesion patient.
# ------------------------------------------------------------------------------------------------
def make_dl_patient(seed: int, preset: Preset, plan: DLPlan, pidx: int) -> DLPatient:
    """Patient number ``pidx`` (1-based Patient_index): anatomy, lesions over time, series, marks,
    sub-volumes. Depends only on (seed, preset, plan entries of this patient)."""
    i = pidx - 1
    n_st = int(plan.n_studies[i])
    quotas = [int(q) for q in plan.marks[i]]
    g = wrng.stream(seed, "dl", pidx)
    body = A.sample_body(seed, ("dl", pidx), scale_mult=preset.body_scale)
    s = body.s
    age0 = int(np.clip(g.normal(57, 15), 18, 89))
    t = np.concatenate([[0.0], np.cumsum(g.uniform(0.08, 1.2, size=n_st - 1))])
    ages = [int(min(age0 + np.floor(tt), 95)) for tt in t]
    trend = float(g.choice([-0.2, -0.08, 0.0, 0.08, 0.18]))
    primary = str(g.choice(L.TYPE_NAMES, p=L.TYPE_WEIGHTS))
    w_pat = 0.6 * (np.array(L.TYPE_NAMES) == primary) + 0.4 * L.TYPE_WEIGHTS
    w_pat /= w_pat.sum()
    size_mult = preset.body_scale

    lesions: list[L.Lesion] = []

    def add_lesion(onset: int, d_range=None) -> L.Lesion | None:
        for _ in range(6):
            tn = str(g.choice(L.TYPE_NAMES, p=w_pat))
            les = L.new_lesion(body, g, pidx * 1000 + len(lesions), tn, n_st, L.sample_size(g, tn, size_mult))
            if les is None:
                continue
            if d_range is not None and not (d_range[0] + 5 < les.centre[2] < d_range[1] - 5):
                continue
            L.evolve(g, les, n_st, trend, onset)
            lesions.append(les)
            return les
        return None

    n_init = max(quotas) + int(g.poisson(preset.dl_extra_lesions))
    for _ in range(n_init):
        add_lesion(0 if g.random() < 0.8 else int(g.integers(0, n_st)))

    # Studies and series.
    series: list[list[Series]] = []
    for st in range(1, n_st + 1):
        rname = _choice(g, [(k, v[1]) for k, v in REGIONS.items()])
        lo, hi = REGIONS[rname][0]
        n_ser = 1 if g.random() < 0.85 else 2
        lst = []
        for se in range(1, n_ser + 1):
            interval = float(_choice(g, preset.dl_intervals))
            proto = S.sample_protocol(g, body, interval, nx=preset.matrix,
                                      kernel=str(g.choice(["soft", "standard", "sharp"],
                                                          p=[0.6, 0.3, 0.1] if interval >= 2.5 else [0.3, 0.4, 0.3])))
            d0 = lo * s + g.uniform(-10, 10)
            d1 = hi * s + g.uniform(-10, 10)
            n_sl = min(int((d1 - d0) / interval) + 1, 999)
            lst.append(Series(st, se, interval, n_sl, d0, proto, preset.matrix))
        series.append(lst)

    # Label policy.
    marks: list[Mark] = []
    marked_before: set[int] = set()
    for st in range(1, n_st + 1):
        k = st - 1
        quota = quotas[k]
        ser_list = series[k]
        xy0 = [se.xy0(body) for se in ser_list]

        def visible_in(les, si):
            se = ser_list[si]
            if les.scale[k] <= 0 or les.long_mm(k) < 4.0:
                return False
            c = les.centre[2]
            if not (se.d_of(1) + se.interval <= c <= se.d_of(se.n_slices) - se.interval):
                return False
            return _in_image(les, k, xy0[si][0], xy0[si][1], se.proto["px"], se.matrix)

        def key_of(les, si):
            se = ser_list[si]
            kk = int(np.clip(np.round((les.centre[2] - se.d_first) / se.interval) + 1, 1, se.n_slices))
            return kk

        per_slice: dict[tuple, int] = {}

        def mark(les, si, kk):
            per_slice[(si, kk)] = per_slice.get((si, kk), 0) + 1
            se = ser_list[si]
            x0, y0 = xy0[si]
            rec = recist_on_slice(les, k, float(se.d_of(kk)), x0, y0, se.proto["px"])
            noisy = int(g.random() < 0.003)
            rec = rec + g.normal(0, 0.45 if not noisy else 3.0, size=rec.shape) + 1.0  # 1-based
            win = _choice(g, WINDOWS_LUNG if (les.type == "lung_nodule" and g.random() < 0.85)
                          else WINDOWS_SOFT)
            marks.append(Mark(les, st, se, kk, rec, win, noisy))
            marked_before.add(les.lesion_id)

        done = 0
        taken: set[int] = set()
        attempts = 0
        while done < quota and attempts < 200:
            attempts += 1
            cands = []
            for les in lesions:
                if les.lesion_id in taken:
                    continue
                sis = [si for si in range(len(ser_list)) if visible_in(les, si)]
                if sis:
                    cands.append((les, sis))
            if not cands:
                # Not enough visible lesions for the quota: a new lesion appears in this study.
                se0 = ser_list[0]
                add_lesion(k, (se0.d_of(1) + 10, se0.d_of(se0.n_slices) - 10))
                continue
            w = np.array([(les.long_mm(k) ** MARK_SIZE_POWER * les.ltype.conspicuity
                            if preset.dl_mark_bias
                           else 1.0) * (5.0 if les.lesion_id in marked_before else 1.0)
                          for les, _ in cands])
            les, sis = cands[int(g.choice(len(cands), p=w / w.sum()))]
            si = int(g.choice(sis))
            kk = key_of(les, si)
            if per_slice.get((si, kk), 0) >= 3:   # at most 3 marks on one key slice
                taken.add(les.lesion_id)
                continue
            if recist_on_slice(les, k, float(ser_list[si].d_of(kk)), *xy0[si], ser_list[si].proto["px"]) is None:
                taken.add(les.lesion_id)
                continue
            mark(les, si, kk)
            taken.add(les.lesion_id)
            done += 1
            # Occasionally a second (rarely third) lesion on the same key slice.
            while done < quota and per_slice[(si, kk)] < 3 and g.random() < 0.04:
                d = float(ser_list[si].d_of(kk))
                co = [o for o, osis in cands if o.lesion_id not in taken and si in osis
                      and L.cross_section(o.centre, o.semi_at(k), o.angle, d) is not None
                      and 2 * L.cross_section(o.centre, o.semi_at(k), o.angle, d)[2] >= 4.0]
                if not co:
                    break
                o = co[int(g.integers(0, len(co)))]
                mark(o, si, kk)
                taken.add(o.lesion_id)
                done += 1

    # Sub-volumes: context around each key slice, overlapping ranges merged (<= 220 slices).
    subvols: list[SubVolume] = []
    by_series: dict[tuple, list[Mark]] = {}
    for m in marks:
        by_series.setdefault((m.study, m.series.series), []).append(m)
    for key_ in sorted(by_series):
        ms = by_series[key_]
        se = ms[0].series
        ranges = []
        for kk in sorted({m.key for m in ms}):
            before = int(round(g.uniform(*preset.dl_context_mm) / se.interval))
            after = int(round(g.uniform(*preset.dl_context_mm) / se.interval))
            before, after = max(before, 3), max(after, 3)
            r0, r1 = max(1, kk - before), min(se.n_slices, kk + after)
            while r1 - r0 + 1 < 7:
                if r0 > 1:
                    r0 -= 1
                if r1 - r0 + 1 < 7 and r1 < se.n_slices:
                    r1 += 1
                if r0 == 1 and r1 == se.n_slices:
                    break
            if r1 - r0 + 1 > 220:
                r0, r1 = max(1, kk - 109), min(se.n_slices, kk + 110)
            ranges.append([r0, r1, [kk]])
        merged = [ranges[0]]
        for r in ranges[1:]:
            last = merged[-1]
            if r[0] <= last[1] + 1 and max(r[1], last[1]) - last[0] + 1 <= 220:
                last[1] = max(last[1], r[1])
                last[2].extend(r[2])
            elif r[2][0] <= last[1]:      # key already inside a full-length sub-volume
                last[2].extend(r[2])
            else:                         # overlapping but too long together: trim, never overlap
                r[0] = max(r[0], last[1] + 1)
                merged.append(r)
        for r0, r1, keys in merged:
            sv = SubVolume(se, pidx, r0, r1, keys)
            subvols.append(sv)
            for m in ms:
                if m.key in keys:
                    m.subvolume = sv
    marks.sort(key=lambda m: (m.study, m.series.series, m.key))
    return DLPatient(pidx, body, body.sex, ages, str(plan.split[i]), lesions, series, marks, subvols)


def subvolume_truth(p: DLPatient, sv: SubVolume):
    """Every lesion visible in a sub-volume: list of (lesion, box [x1, y1, z1, x2, y2, z2]) with x/y
    0-based inclusive pixels and z 1-based slice numbers (the released 1K set's convention)."""
    se = sv.series
    k = se.study - 1
    x0, y0 = se.xy0(p.body)
    ds = se.d_of(np.arange(sv.k0, sv.k1 + 1))
    out = []
    for les in p.lesions:
        if les.scale[k] <= 0:
            continue
        res = lesion_voxel_box(les, k, x0, y0, se.proto["px"], ds)
        if res is None:
            continue
        (c1, r1, c2, r2), (i1, i2) = res
        c1, r1 = max(c1, 0), max(r1, 0)
        c2, r2 = min(c2, se.matrix - 1), min(r2, se.matrix - 1)
        if c2 < c1 or r2 < r1:
            continue
        out.append((les, np.array([c1, r1, sv.k0 + i1, c2, r2, sv.k0 + i2], float)))
    return out
