"""Scan plans of the single-type datasets: LUNA16 (lung nodules), LiTS (liver tumours) and NIH-LN
(enlarged lymph nodes). Each set labels only its own lesion type; other lesion types are present in
its scans, unlabeled (and recorded in the truth tables).

World coordinates (LPS mm) of a scan: ``x = x_patient``, ``y = y_patient``, ``z = z_ref - d``.
The canonical voxel grid has index (i, j, k) = (column, row, slice) with slice 0 the most inferior,
so the canonical direction is the identity; LiTS volumes are then re-oriented (axis flips and an
in-plane transposition) as in the real set.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.world import anatomy as A
from data_prep.world import lesions as L
from data_prep.world import rng as wrng
from data_prep.world import scanner as S
from data_prep.world.presets import Preset

# LiTS orientations: (permutation of canonical axes (i, j, k) -> file axes, signs).
LITS_ORIENTATIONS = (
    ((0, 1, 2), (1, 1, 1)),     # LPS, like DICOM
    ((0, 1, 2), (-1, -1, 1)),   # RAS-style in-plane flips
    ((0, 1, 2), (-1, -1, -1)),  # ... and slices head-first
    ((0, 1, 2), (1, 1, -1)),
    ((1, 0, 2), (1, 1, 1)),     # rows and columns transposed
    ((1, 0, 2), (-1, 1, 1)),
)


@dataclasses.dataclass
class SingleScan:
    """One scan of a single-type dataset.

    dataset: 'luna16' | 'lits' | 'nihln'; name: seriesuid / 'N' / patient ID; grid: canonical
    ScanGrid (grid.d[k] = depth of canonical slice k, descending, so slice 0 is inferior);
    z_ref: world z = z_ref - d; lesions: every lesion in the scan (scale has one entry);
    labeled: [n] whether the dataset annotates it; excluded: LUNA16 irrelevant findings,
    [m, 4] world x, y, z, diameter (-1 unknown); orient: LiTS orientation index; uids: NIH-LN UIDs.
    """

    dataset: str
    index: int
    name: str
    subset: int
    body: A.Body
    grid: S.ScanGrid
    z_ref: float
    lesions: list
    labeled: list
    excluded: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4)))
    orient: int = 0
    uids: dict = dataclasses.field(default_factory=dict)

    def world(self, pts):
        """[..., 3] patient (x, y, d) -> world LPS (x, y, z) mm."""
        p = np.asarray(pts, float)
        return np.stack([p[..., 0], p[..., 1], self.z_ref - p[..., 2]], axis=-1)

    @property
    def origin(self):
        """World position of canonical voxel (0, 0, 0)."""
        return (self.grid.x0, self.grid.y0, self.z_ref - float(self.grid.d[0]))

    @property
    def spacing(self):
        return (self.grid.px, self.grid.px, self.grid.thickness)

    def canonical_index(self, pts):
        """[..., 3] patient (x, y, d) -> continuous canonical (i, j, k)."""
        p = np.asarray(pts, float)
        sp = self.spacing
        return np.stack([(p[..., 0] - self.grid.x0) / sp[0], (p[..., 1] - self.grid.y0) / sp[1],
                         (self.grid.d[0] - p[..., 2]) / sp[2]], axis=-1)


def _choice(g, pairs):
    vals = [p[0] for p in pairs]
    probs = np.array([p[1] for p in pairs], float)
    return vals[int(g.choice(len(vals), p=probs / probs.sum()))]


def _grid(g, body, preset: Preset, interval: float, d_lo: float, d_hi: float, kernel=None, pad=-1024.0):
    if preset.cover_mm is not None and d_hi - d_lo > preset.cover_mm:
        mid = 0.5 * (d_lo + d_hi) + g.uniform(-0.15, 0.15) * (d_hi - d_lo - preset.cover_mm)
        d_lo, d_hi = mid - preset.cover_mm / 2, mid + preset.cover_mm / 2
    n = int((d_hi - d_lo) / interval) + 1
    d = d_lo + interval * (n - 1) - interval * np.arange(n)   # descending: slice 0 inferior
    proto = S.sample_protocol(g, body, interval, nx=preset.matrix, kernel=kernel)
    return S.make_grid(body, proto, d, interval, nx=preset.matrix, ny=preset.matrix, fov_pad=pad)


def _inside_grid(grid: S.ScanGrid, les: L.Lesion, margin=2.0) -> bool:
    ex, ey = L.inplane_extent(les.semi_at(0)[:2], les.angle)
    c = (les.centre[0] - grid.x0) / grid.px
    r = (les.centre[1] - grid.y0) / grid.px
    dmin, dmax = float(grid.d.min()), float(grid.d.max())
    return (c - ex / grid.px > margin and c + ex / grid.px < grid.nx - 1 - margin
            and r - ey / grid.px > margin and r + ey / grid.px < grid.ny - 1 - margin
            and dmin < les.centre[2] < dmax)


def _others(g, body, grid, types, n, first_id, size_mult):
    out = []
    for _ in range(n):
        tn = str(g.choice(types))
        les = L.new_lesion(body, g, first_id + len(out), tn, 1, L.sample_size(g, tn, size_mult))
        if les is not None and _inside_grid(grid, les):
            out.append(les)
    return out


def luna_uid(seed: int, i: int) -> str:
    g = wrng.stream(seed, "luna-uid", i)
    return "1.3.6.1.4.1.14519.5.2.1.6279.6001." + wrng.uid_digits(g, 30)


def make_luna(seed: int, preset: Preset, i: int) -> SingleScan:
    """LUNA16 scan i: whole chest, nodules >= 3 mm annotated (diameter_mm), smaller nodules and
    non-nodule findings in annotations_excluded, other lesion types unannotated."""
    g = wrng.stream(seed, "luna", i)
    body = A.sample_body(seed, ("luna", i), scale_mult=preset.body_scale)
    s = body.s
    interval = float(_choice(g, preset.luna_intervals))
    d_lo = g.uniform(-35, -15) * s
    d_hi = max(body.dome_l, body.dome_r) + g.uniform(60, 95) * s
    pad = float(g.choice([-1024.0, -2000.0, -3024.0], p=[0.4, 0.4, 0.2]))
    grid = _grid(g, body, preset, interval, d_lo, d_hi, kernel=str(g.choice(["standard", "sharp", "soft"],
                                                                               p=[0.45, 0.35, 0.2])), pad=pad)
    z_ref = float(g.uniform(-150, 60))
    lesions, labeled = [], []
    excl = []
    if g.random() < 601 / 888:
        n = min(int(g.geometric(0.5)), 12)
        tries = 0
        while sum(labeled) < n and tries < 4 * n + 8:
            tries += 1
            dia = float(np.exp(g.normal(np.log(5.2), 0.76)))
            if dia > 32.0:
                continue
            les = L.new_lesion(body, g, len(lesions), "lung_nodule", 1, dia, sphere=True)
            if les is None or not _inside_grid(grid, les):
                continue
            lesions.append(les)
            lab = dia >= 3.0
            labeled.append(bool(lab))
            if not lab:
                excl.append([*les.centre, dia])
    # Small nodules below 3 mm and non-nodule findings (vessel crossings, scars): irrelevant findings.
    for _ in range(int(g.poisson(4))):
        dia = float(g.uniform(1.5, 3.0))
        les = L.new_lesion(body, g, len(lesions), "lung_nodule", 1, dia, sphere=True)
        if les is not None and _inside_grid(grid, les):
            lesions.append(les)
            labeled.append(False)
            excl.append([*les.centre, dia if g.random() < 0.5 else -1.0])
    n_nonnod = int(g.poisson(30 if preset.name == "paper" else 8))
    if n_nonnod:
        cand = np.stack([g.uniform(-140, 140, 4 * n_nonnod) * s, g.uniform(-100, 100, 4 * n_nonnod) * s,
                         g.uniform(grid.d.min(), grid.d.max(), 4 * n_nonnod)], axis=1)
        inl = body.in_lung(cand[:, 0], cand[:, 1], cand[:, 2])
        for c in cand[inl][:n_nonnod]:
            excl.append([*c, -1.0])
    if g.random() < 0.35:
        others = _others(g, body, grid, ["lymph_node_mediastinal", "liver_tumour", "bone_lesion",
                                         "soft_tissue_lesion", "lymph_node_axillary"],
                         int(g.integers(1, 4)), len(lesions), preset.body_scale)
        lesions += others
        labeled += [False] * len(others)
    ex = np.array(excl, float).reshape(-1, 4)
    if len(ex):
        ex[:, 2] = z_ref - ex[:, 2]
    return SingleScan("luna16", i, luna_uid(seed, i), i % 10, body, grid, z_ref, lesions, labeled,
                      excluded=ex)


def make_lits(seed: int, preset: Preset, i: int, orient: int | None = None) -> SingleScan:
    """LiTS volume i: abdomen around the liver; liver and tumours segmented, other lesions not.
    ``orient`` forces an index into LITS_ORIENTATIONS (default: drawn)."""
    g = wrng.stream(seed, "lits", i)
    body = A.sample_body(seed, ("lits", i), scale_mult=preset.body_scale)
    s = body.s
    interval = float(_choice(g, preset.lits_intervals))
    grid = _grid(g, body, preset, interval, body.dome_r - g.uniform(25, 50) * s,
                 g.uniform(430, 480) * s, kernel=str(g.choice(["soft", "standard"])))
    lesions, labeled = [], []
    n = 0 if g.random() < 0.1 else min(1 + int(g.geometric(0.3)), 15)
    tries = 0
    while len(lesions) < n and tries < 3 * n + 5:
        tries += 1
        dia = float(np.clip(np.exp(g.normal(np.log(18.0), 0.85)), 4.0, 110.0)) * preset.body_scale
        les = L.new_lesion(body, g, len(lesions), "liver_tumour", 1, dia)
        if les is not None and _inside_grid(grid, les):
            lesions.append(les)
            labeled.append(True)
    others = _others(g, body, grid, ["kidney_lesion", "lymph_node_abdominal", "lung_nodule", "adrenal_nodule",
                                     "bone_lesion"], int(g.integers(0, 4)), len(lesions), preset.body_scale)
    lesions += others
    labeled += [False] * len(others)
    drawn = int(g.integers(0, len(LITS_ORIENTATIONS)))
    return SingleScan("lits", i, str(i), 0, body, grid, float(g.uniform(-100, 100)), lesions, labeled,
                      orient=drawn if orient is None else int(orient))


def nihln_ids(preset: Preset) -> list[str]:
    return ([f"MED_LYMPH_{k:03d}" for k in range(1, preset.nihln_med + 1)]
            + [f"ABD_LYMPH_{k:03d}" for k in range(1, preset.nihln_abd + 1)])


def make_nihln(seed: int, preset: Preset, i: int) -> SingleScan:
    """NIH-LN patient i (MED_LYMPH_* first, then ABD_LYMPH_*): enlarged nodes annotated."""
    ident = nihln_ids(preset)[i]
    med = ident.startswith("MED")
    g = wrng.stream(seed, "nihln", i)
    body = A.sample_body(seed, ("nihln", i), scale_mult=preset.body_scale)
    s = body.s
    interval = float(_choice(g, preset.nihln_interval))
    lo, hi = ((-10, 265) if med else (205, 565))
    grid = _grid(g, body, preset, interval, (lo + g.uniform(-8, 8)) * s, (hi + g.uniform(-8, 8)) * s,
                 kernel=str(g.choice(["soft", "standard"])))
    types = (["lymph_node_mediastinal"] * 4 + ["lymph_node_axillary"]) if med else \
        (["lymph_node_abdominal"] * 4 + ["lymph_node_pelvic"])
    n = (2 + int(g.poisson(2.5))) if med else (3 + int(g.poisson(4.0)))
    lesions, labeled = [], []
    tries = 0
    while len(lesions) < n and tries < 4 * n:
        tries += 1
        short = float(np.clip(np.exp(g.normal(np.log(11.0), 0.35)), 6.0, 35.0)) * preset.body_scale
        longd = short * g.uniform(1.1, 1.9)
        tn = str(g.choice(types))
        les = L.new_lesion(body, g, len(lesions), tn, 1, longd)
        if les is None or not _inside_grid(grid, les):
            continue
        # z half-axis at least 0.6 slice intervals: the node's centre voxel is always inside it.
        les.semi = np.array([longd / 2, short / 2, max(short / 2 * g.uniform(1.0, 1.4), 0.6 * interval)])
        # Keep clear of nodes already placed (one label per voxel in the mask).
        if any(np.linalg.norm(les.centre - o.centre) < (les.semi[0] + o.semi[0]) for o in lesions):
            continue
        lesions.append(les)
        labeled.append(True)
    others = _others(g, body, grid, ["lung_nodule", "liver_tumour", "bone_lesion", "kidney_lesion"],
                     int(g.integers(0, 3)), len(lesions), preset.body_scale)
    lesions += others
    labeled += [False] * len(others)
    uid_root = "1.3.6.1.4.1.9328.50.14."
    uids = {k: uid_root + wrng.uid_digits(wrng.stream(seed, "nihln-uid", i, k), 20)
            for k in ("study", "series", "frame")}
    return SingleScan("nihln", i, ident, 0, body, grid, float(g.uniform(-200, 200)), lesions, labeled,
                      uids=uids)


def lesion_mask(scan: SingleScan, les: L.Lesion, shape_zyx) -> tuple[tuple, np.ndarray]:
    """Canonical voxels (voxel centres) inside a lesion: (slices (z, y, x) of a sub-box, bool mask)."""
    g = scan.grid
    ci = scan.canonical_index(les.centre)
    semi = les.semi_at(0)
    ext = max(semi[0], semi[1])
    sp = scan.spacing
    lo = np.floor([ci[0] - ext / sp[0] - 1, ci[1] - ext / sp[1] - 1, ci[2] - semi[2] / sp[2] - 1]).astype(int)
    hi = np.ceil([ci[0] + ext / sp[0] + 1, ci[1] + ext / sp[1] + 1, ci[2] + semi[2] / sp[2] + 1]).astype(int)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [shape_zyx[2] - 1, shape_zyx[1] - 1, shape_zyx[0] - 1])
    if np.any(hi < lo):
        return (slice(0, 0),) * 3, np.zeros((0, 0, 0), bool)
    ii = np.arange(lo[0], hi[0] + 1)
    jj = np.arange(lo[1], hi[1] + 1)
    kk = np.arange(lo[2], hi[2] + 1)
    X = g.x0 + ii * g.px
    Y = g.y0 + jj * g.px
    D = g.d[kk]
    q = np.stack(np.broadcast_arrays(X[None, None, :], Y[None, :, None], D[:, None, None]), -1) - les.centre
    ca, sa = np.cos(les.angle), np.sin(les.angle)
    u = q[..., 0] * ca + q[..., 1] * sa
    v = -q[..., 0] * sa + q[..., 1] * ca
    inside = (u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (q[..., 2] / semi[2]) ** 2 <= 1.0
    return (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1)), inside
