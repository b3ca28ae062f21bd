"""Acquisition protocols and the rendering of a scan grid.

A :class:`ScanGrid` says where the voxels of one series sit in the patient frame of
:mod:`data_prep.world.anatomy` (pixel spacing, matrix, slice depths, slice thickness) and how the
scanner degrades the anatomy: partial volume across the slice thickness (sub-slices averaged),
in-plane blur, the reconstruction kernel (soft: smooth correlated noise; sharp/lung: edge
enhancement and grainy noise), the contrast phase, the reconstruction circle.
:func:`render` returns float32 HU ``[Z, H, W]``; writers round and clip to int16.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from data_prep.world import anatomy as A
from data_prep.world import rng as wrng

KERNELS = ("soft", "standard", "sharp")
# Noise standard deviation (HU) in a 300 mm wide trunk, per kernel; correlation length (pixels).
_KERNEL_NOISE = {"soft": (9.0, 1.1), "standard": (16.0, 0.8), "sharp": (70.0, 0.5)}


@dataclasses.dataclass
class ScanGrid:
    """Voxel geometry of one series in the patient frame, plus the scanner's settings.

    nx, ny: matrix (columns, rows); px: in-plane pixel spacing (mm, square pixels);
    x0, y0: patient-frame position (mm) of the centre of pixel (row 0, column 0);
    d: [Z] depth (mm) of each slice centre in the patient frame (slice 0 first);
    thickness: reconstructed slice thickness (mm); kernel: one of KERNELS; phase: index into
    anatomy.PHASES; noise: noise std (HU) of this series; fov_pad: HU outside the reconstruction
    circle.
    """

    nx: int
    ny: int
    px: float
    x0: float
    y0: float
    d: np.ndarray
    thickness: float
    kernel: str
    phase: int
    noise: float
    fov_pad: float = -1024.0

    def xs(self):
        return self.x0 + self.px * np.arange(self.nx)

    def ys(self):
        return self.y0 + self.px * np.arange(self.ny)


def sample_protocol(g, body: A.Body, interval: float, kernel: str | None = None,
                    phase: int | None = None, nx: int = 512) -> dict:
    """Samples pixel spacing (0.5-1 mm, fitted to the body), kernel, phase, noise and table shift."""
    ba, _ = body.body_ab(300 * body.s)
    want = (2 * ba + g.uniform(40, 150) * body.s) / nx
    px = float(np.clip(want, 0.5, 0.977))
    px = round(px * 512) / 512  # scanner-like values (n/512 mm)
    if kernel is None:
        kernel = str(g.choice(KERNELS, p=[0.45, 0.35, 0.20]))
    if phase is None:
        phase = int(g.choice(3, p=[0.15, 0.15, 0.70]))
    base, _ = _KERNEL_NOISE[kernel]
    noise = base * (ba / 150.0) ** 1.3 * g.uniform(0.8, 1.25) * (5.0 / max(interval, 0.6)) ** 0.25
    return dict(px=px, kernel=kernel, phase=phase, noise=float(noise),
                cx=float(g.normal(0, 8)), cy=float(g.normal(-25, 6)))


def make_grid(body: A.Body, proto: dict, d_slices: np.ndarray, thickness: float, nx: int = 512,
              ny: int = 512, fov_pad: float = -1024.0) -> ScanGrid:
    """The grid whose centre sits at (cx, cy) in the patient frame (cy < 0: the table shows)."""
    px = proto["px"]
    x0 = proto["cx"] - px * (nx - 1) / 2.0
    y0 = proto["cy"] - px * (ny - 1) / 2.0 + body.s * 10.0
    return ScanGrid(nx=nx, ny=ny, px=px, x0=x0, y0=y0, d=np.asarray(d_slices, float),
                    thickness=float(thickness), kernel=proto["kernel"], phase=int(proto["phase"]),
                    noise=proto["noise"], fov_pad=fov_pad)


# Low-frequency texture amplitude per label (HU).
_TEX = np.zeros(A.N_LABELS, np.float32)
for _lab, _amp in ((A.FAT, 10), (A.VFAT, 14), (A.MUSCLE, 9), (A.LUNG, 22), (A.LIVER, 7), (A.SPLEEN, 9),
                   (A.CANCELLOUS, 55), (A.KID_CORTEX, 8), (A.KID_MEDULLA, 8), (A.MYO, 8),
                   (A.PANCREAS, 12), (A.STOMACH_FLUID, 5), (A.CORTEX, 60)):
    _TEX[_lab] = _amp


def _texture(g, grid: ScanGrid, fine_d: np.ndarray, step_mm: float = 3.0) -> np.ndarray:
    """Smooth unit-variance noise at the fine slices, [F, H, W] float32, correlated over ~step_mm."""
    lx = max(4, int(np.ceil(grid.nx * grid.px / step_mm)))
    ly = max(4, int(np.ceil(grid.ny * grid.px / step_mm)))
    dmin, dmax = float(fine_d.min()), float(fine_d.max())
    lz = max(2, int(np.ceil((dmax - dmin) / step_mm)) + 2)
    low = ndimage.gaussian_filter(g.standard_normal((lz, ly, lx)).astype(np.float32), 0.8)
    low /= max(float(low.std()), 1e-6)
    zpos = (fine_d - dmin) / step_mm
    out = np.empty((len(fine_d), grid.ny, grid.nx), np.float32)
    for i, zf in enumerate(zpos):
        z0 = int(np.floor(zf))
        t = zf - z0
        sl = (1 - t) * low[min(z0, lz - 1)] + t * low[min(z0 + 1, lz - 1)]
        out[i] = ndimage.zoom(sl, (grid.ny / ly, grid.nx / lx), order=1, prefilter=False)[:grid.ny, :grid.nx]
    return out


def _capsule_fraction(P, a, b, r, w):
    """Partial-volume fraction of a capsule (segment a-b, radius r, edge width w) at points P [..., 3]."""
    ab = b - a
    L2 = float(ab @ ab)
    ap = P - a
    t = np.clip((ap @ ab) / L2, 0.0, 1.0) if L2 > 0 else np.zeros(P.shape[:-1])
    dist = np.linalg.norm(ap - t[..., None] * ab, axis=-1)
    return np.clip((r - dist) / w + 0.5, 0.0, 1.0)


def _blend_tubes(vol, grid: ScanGrid, fine_d, tubes: A.Tubes, phase: int, g_tube=None):
    xs, ys = grid.xs(), grid.ys()
    px = grid.px
    lo = np.minimum(tubes.p0, tubes.p1) - tubes.r[:, None] - tubes.wall[:, None] - px
    hi = np.maximum(tubes.p0, tubes.p1) + tubes.r[:, None] + tubes.wall[:, None] + px
    fd_min, fd_max = fine_d.min(), fine_d.max()
    sel = ((hi[:, 2] >= fd_min) & (lo[:, 2] <= fd_max) & (hi[:, 0] >= xs[0]) & (lo[:, 0] <= xs[-1])
           & (hi[:, 1] >= ys[0]) & (lo[:, 1] <= ys[-1]))
    # Solid vessels first, hollow organs after (their lumen overrides crossing vessels).
    order = np.argsort(np.isin(tubes.kind, (A.TUBE_AIRWAY, A.TUBE_BOWEL, A.TUBE_COLON, A.TUBE_ESOPHAGUS)),
                       kind="stable")
    for i in order:
        if not sel[i]:
            continue
        k0 = np.searchsorted(fine_d, lo[i, 2])
        k1 = np.searchsorted(fine_d, hi[i, 2], side="right")
        c0 = max(0, int(np.floor((lo[i, 0] - xs[0]) / px)))
        c1 = min(grid.nx, int(np.ceil((hi[i, 0] - xs[0]) / px)) + 1)
        r0 = max(0, int(np.floor((lo[i, 1] - ys[0]) / px)))
        r1 = min(grid.ny, int(np.ceil((hi[i, 1] - ys[0]) / px)) + 1)
        if k1 <= k0 or c1 <= c0 or r1 <= r0:
            continue
        P = np.stack(np.broadcast_arrays(xs[None, None, c0:c1], ys[None, r0:r1, None],
                                         fine_d[k0:k1, None, None]), axis=-1)
        kind = int(tubes.kind[i])
        hu = float(A.TUBE_HU[phase, kind])
        sub = vol[k0:k1, r0:r1, c0:c1]
        r = tubes.r[i]
        if kind in (A.TUBE_AIRWAY, A.TUBE_BOWEL, A.TUBE_COLON, A.TUBE_ESOPHAGUS):
            outer = r + (tubes.wall[i] if kind == A.TUBE_AIRWAY else 0.0)
            inner = r - (0.0 if kind == A.TUBE_AIRWAY else tubes.wall[i])
            f = _capsule_fraction(P, tubes.p0[i], tubes.p1[i], outer, px).astype(np.float32)
            sub += f * (hu - sub)
            fi = _capsule_fraction(P, tubes.p0[i], tubes.p1[i], inner, px).astype(np.float32)
            if kind == A.TUBE_AIRWAY:
                content = np.float32(-1000.0)
            else:
                yc = 0.5 * (tubes.p0[i, 1] + tubes.p1[i, 1])
                level = -inner + 2 * inner * tubes.gas[i]
                yy = P[..., 1] - yc
                fluid = 28.0 if kind != A.TUBE_COLON else 12.0
                content = np.where(yy < level, -990.0, fluid).astype(np.float32)
                if kind == A.TUBE_COLON:  # mottled stool: small gas bubbles in the faeces
                    bub = ndimage.gaussian_filter(g_tube.standard_normal(P.shape[:-1]), 1.0) > 0.35
                    content = np.where(bub & (yy >= level), -600.0, content).astype(np.float32)
                if kind == A.TUBE_ESOPHAGUS:
                    fi *= 0.0
            sub += fi * (content - sub)
        else:
            f = _capsule_fraction(P, tubes.p0[i], tubes.p1[i], r, px).astype(np.float32)
            sub += f * (hu - sub)


def ellipsoid_fraction(P, c, semi, angle, w):
    """Partial-volume fraction of an ellipsoid rotated by ``angle`` (rad) about the patient d axis.

    P: [..., 3] points (x, y, d) mm; c: centre; semi: (a, b, c) semi-axes mm along the rotated
    in-plane axes and d; w: edge width (mm).
    """
    q = P - c
    ca, sa = np.cos(angle), np.sin(angle)
    u = q[..., 0] * ca + q[..., 1] * sa
    v = -q[..., 0] * sa + q[..., 1] * ca
    rho = np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (q[..., 2] / semi[2]) ** 2)
    return np.clip((1.0 - rho) * min(semi[0], semi[1]) / w + 0.5, 0.0, 1.0)


def _blend_ellipsoids(vol, grid: ScanGrid, fine_d, items, g):
    """items: list of (centre[3], semi[3], angle, hu, texture_amp) blended in order."""
    xs, ys = grid.xs(), grid.ys()
    px = grid.px
    for c, semi, ang, hu, tex in items:
        ext = max(semi[0], semi[1]) + px
        k0 = np.searchsorted(fine_d, c[2] - semi[2] - px)
        k1 = np.searchsorted(fine_d, c[2] + semi[2] + px, side="right")
        c0 = max(0, int(np.floor((c[0] - ext - xs[0]) / px)))
        c1 = min(grid.nx, int(np.ceil((c[0] + ext - xs[0]) / px)) + 1)
        r0 = max(0, int(np.floor((c[1] - ext - ys[0]) / px)))
        r1 = min(grid.ny, int(np.ceil((c[1] + ext - ys[0]) / px)) + 1)
        if k1 <= k0 or c1 <= c0 or r1 <= r0:
            continue
        P = np.stack(np.broadcast_arrays(xs[None, None, c0:c1], ys[None, r0:r1, None],
                                         fine_d[k0:k1, None, None]), axis=-1)
        f = ellipsoid_fraction(P, np.asarray(c), semi, ang, px).astype(np.float32)
        target = np.float32(hu)
        if tex:
            target = target + np.float32(tex) * g.standard_normal(f.shape).astype(np.float32)
            target = ndimage.gaussian_filter(target, 0.8)
        sub = vol[k0:k1, r0:r1, c0:c1]
        sub += f * (target - sub)


def render(body: A.Body, grid: ScanGrid, seed: int, key: tuple, ellipsoids=()) -> np.ndarray:
    """Renders the series as float32 HU ``[Z, H, W]`` (Z = len(grid.d)).

    ellipsoids: extra ellipsoids drawn after the anatomy (lesions), each ``(centre (x, y, d) mm,
    semi-axes (a, b, c) mm, in-plane angle rad, HU, texture amplitude HU)``. The body must have
    its tubes grown (:func:`anatomy.grow_tubes`).
    """
    g = wrng.stream(seed, "render", *key)
    n_sub = max(1, int(np.ceil(grid.thickness / 2.5 - 1e-6)))
    offs = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * grid.thickness
    fine_d = (grid.d[:, None] + offs[None, :]).reshape(-1)
    order = np.argsort(fine_d, kind="stable")
    fd_sorted = fine_d[order]
    xs, ys = grid.xs(), grid.ys()
    X, Y = np.meshgrid(xs, ys)
    tex = _texture(g, grid, fd_sorted)
    vol = np.empty((len(fd_sorted), grid.ny, grid.nx), np.float32)
    lut = A.HU_LUT[grid.phase].copy()
    lut[A.LUNG] = body.lung_hu
    # Labels are evaluated only inside the window that can hold body or table (the rest is air).
    dd = np.linspace(fd_sorted.min(), fd_sorted.max(), 8)
    ba, bb = body.body_ab(dd)
    xmax = max(float(ba.max()), 235 * body.s) + 2
    ymin, ymax = -float(bb.max()) - 2, float(body.table_y(0.0)) + 32
    c0, c1 = np.searchsorted(xs, -xmax), np.searchsorted(xs, xmax, side="right")
    r0, r1 = np.searchsorted(ys, ymin), np.searchsorted(ys, ymax, side="right")
    Xc, Yc = X[r0:r1, c0:c1], Y[r0:r1, c0:c1]
    for i, d in enumerate(fd_sorted):
        vol[i] = lut[A.AIR]
        if r1 <= r0 or c1 <= c0:
            continue
        lab = body.labels(Xc, Yc, float(d))
        sl = lut[lab]
        sl += _TEX[lab] * tex[i, r0:r1, c0:c1]
        # Dependent lung density: the posterior lung is denser.
        lung = lab == A.LUNG
        sl[lung] += (25.0 * np.clip((Yc[lung] / (100 * body.s) + 0.2), 0, 1.2)).astype(np.float32)
        vol[i, r0:r1, c0:c1] = sl
    _blend_tubes(vol, grid, fd_sorted, body.tubes, grid.phase, g)
    nodes = [(n[:3], n[3:6], n[6], float(A.HU_LUT[grid.phase, A.NODE]), 6.0) for n in body.nodes]
    _blend_ellipsoids(vol, grid, fd_sorted, list(nodes) + list(ellipsoids), g)
    # Partial volume across the slice thickness.
    unsort = np.empty_like(order)
    unsort[order] = np.arange(len(order))
    vol = vol[unsort].reshape(len(grid.d), n_sub, grid.ny, grid.nx).mean(axis=1)
    # In-plane blur (system PSF, ~0.6 mm) then the kernel's edge enhancement and noise.
    sig = 0.55 / grid.px
    corr = _KERNEL_NOISE[grid.kernel][1]
    out = np.empty_like(vol)
    for k in range(len(vol)):
        sl = ndimage.gaussian_filter(vol[k], sig, mode="nearest")
        if grid.kernel == "sharp":
            sl = sl + 0.9 * (sl - ndimage.gaussian_filter(sl, 1.2, mode="nearest"))
        n = ndimage.gaussian_filter(g.standard_normal(sl.shape).astype(np.float32), corr)
        n *= grid.noise / max(float(n.std()), 1e-6)
        out[k] = sl + n
    # Reconstruction circle and the scanner's HU range.
    rr = np.hypot(X - (xs[0] + xs[-1]) / 2, Y - (ys[0] + ys[-1]) / 2)
    fov = rr <= grid.px * min(grid.nx, grid.ny) / 2.0
    np.clip(out, -1024.0, 3071.0, out=out)
    out[:, ~fov] = grid.fov_pad
    return out
