"""Lesions: types, sizes, placement in the patient frame, growth across studies, ellipsoid geometry.

A lesion is an ellipsoid in the patient frame of :mod:`data_prep.world.anatomy`: centre (x, y, d)
mm, in-plane semi-axes ``a >= b`` along an in-plane angle, ``c`` along d; all three scale with the
lesion's size at each study (``scale[k]``, 0 where it is absent), the centre and shape stay: the same
lesion, grown or shrunk. Size distributions per type were fitted so that the *marked* lesions of the
DeepLesion-like world match the real DL_info.csv (long diameter 5/50/95th percentiles about
5/19/65 mm, see :mod:`data_prep.world.stats`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.world import anatomy as A


@dataclasses.dataclass(frozen=True)
class LesionType:
    name: str
    coarse: int            # DeepLesion Coarse_lesion_type code
    organ: str             # organ name in the truth tables
    gated: str | None      # gated organ head (lung / liver / lymph_node) or None
    median_mm: float       # median long diameter (mm) when it appears
    sigma: float           # lognormal sigma of the long diameter
    lo_mm: float
    hi_mm: float
    conspicuity: float     # how readily a radiologist marks it
    weight: float          # prior share among DeepLesion lesions


LESION_TYPES: dict[str, LesionType] = {t.name: t for t in (
    LesionType("lung_nodule", 5, "lung", "lung", 10.0, 0.8, 3.0, 30.0, 1.25, 0.25),
    LesionType("liver_tumour", 4, "liver", "liver", 18.0, 0.88, 5.0, 80.0, 1.0, 0.09),
    LesionType("lymph_node_mediastinal", 3, "lymph_node", "lymph_node", 17.0, 0.5, 8.0, 55.0, 0.95, 0.27),
    LesionType("lymph_node_abdominal", 2, "lymph_node", "lymph_node", 17.0, 0.5, 8.0, 60.0, 0.75, 0.12),
    LesionType("lymph_node_pelvic", 8, "lymph_node", "lymph_node", 17.0, 0.5, 8.0, 55.0, 0.8, 0.03),
    LesionType("lymph_node_axillary", 7, "lymph_node", "lymph_node", 16.0, 0.45, 8.0, 45.0, 0.8, 0.03),
    LesionType("kidney_lesion", 6, "kidney", None, 17.0, 0.7, 5.0, 70.0, 0.9, 0.05),
    LesionType("adrenal_nodule", 2, "adrenal", None, 17.0, 0.5, 6.0, 60.0, 0.85, 0.04),
    LesionType("abdominal_mass", 2, "abdomen", None, 24.0, 0.75, 6.0, 90.0, 0.8, 0.07),
    LesionType("bone_lesion", 1, "bone", None, 20.0, 0.5, 6.0, 45.0, 0.6, 0.025),
    LesionType("soft_tissue_lesion", 7, "soft_tissue", None, 19.0, 0.65, 5.0, 80.0, 0.75, 0.04),
    LesionType("pelvic_mass", 8, "pelvis", None, 28.0, 0.6, 6.0, 90.0, 0.85, 0.025),
)}
TYPE_NAMES = tuple(LESION_TYPES)
TYPE_WEIGHTS = np.array([LESION_TYPES[n].weight for n in TYPE_NAMES])
TYPE_WEIGHTS = TYPE_WEIGHTS / TYPE_WEIGHTS.sum()
NODE_TYPE_STATIONS = {
    "lymph_node_mediastinal": ("paratracheal", "aortopulmonary", "subcarinal", "hilar_r", "hilar_l",
                               "prevascular"),
    "lymph_node_abdominal": ("paraaortic", "aortocaval", "mesenteric", "retrocrural"),
    "lymph_node_pelvic": ("iliac_r", "iliac_l", "inguinal_r", "inguinal_l"),
    "lymph_node_axillary": ("axillary_r", "axillary_l"),
}


@dataclasses.dataclass
class Lesion:
    """One lesion of one patient/scan.

    lesion_id: identity (persists across the patient's studies); centre: (x, y, d) mm;
    semi: (a, b, c) mm at scale 1; angle: in-plane rad; hu: [3] HU per contrast phase;
    scale: [n_studies] size factor per study (0: absent).
    """

    lesion_id: int
    type: str
    centre: np.ndarray
    semi: np.ndarray
    angle: float
    hu: np.ndarray
    tex: float
    scale: np.ndarray
    station: str = ""

    @property
    def ltype(self) -> LesionType:
        return LESION_TYPES[self.type]

    def semi_at(self, k: int) -> np.ndarray:
        return self.semi * float(self.scale[k])

    def long_mm(self, k: int = 0) -> float:
        return 2.0 * float(self.semi[0] * self.scale[k])

    def render_item(self, k: int, phase: int):
        """The ellipsoid tuple for :func:`scanner.render` at study k."""
        return (self.centre, self.semi_at(k), self.angle, float(self.hu[phase]), self.tex)


def cross_section(centre, semi, angle, d):
    """The ellipse cut by the axial plane at depth d: (cx, cy, a, b) mm, or None if it misses.

    Semi-axes a >= b stay along ``angle`` and its perpendicular (rotation about d only).
    """
    t = (d - centre[2]) / semi[2]
    if abs(t) >= 1.0:
        return None
    f = np.sqrt(1.0 - t * t)
    return float(centre[0]), float(centre[1]), float(semi[0] * f), float(semi[1] * f)


def inplane_extent(semi, angle):
    """Half extents (ex, ey) mm of an in-plane ellipse with semi-axes (a, b) at ``angle``."""
    a, b = semi[0], semi[1]
    ca, sa = np.cos(angle), np.sin(angle)
    return float(np.hypot(a * ca, b * sa)), float(np.hypot(a * sa, b * ca))


def _hu(g, type_name: str) -> tuple[np.ndarray, float]:
    """HU per phase (non-contrast, arterial, venous) and texture amplitude of a new lesion."""
    liver = A.HU_LUT[:, A.LIVER]
    if type_name == "lung_nodule":
        if g.random() < 0.12:  # ground-glass / part-solid
            v = g.uniform(-650, -300)
            return np.array([v, v + 10, v + 10]), 25.0
        v = g.uniform(15, 45)
        return np.array([v, v + 25, v + 20]), 10.0
    if type_name == "liver_tumour":
        if g.random() < 0.78:  # hypodense
            dv = g.uniform(25, 60)
            return np.array([liver[0] - dv * 0.5, liver[1] - dv * 0.6, liver[2] - dv]), 10.0
        dv = g.uniform(25, 70)
        return np.array([liver[0] + 5, liver[1] + dv, liver[2] + dv * 0.4]), 10.0
    if type_name.startswith("lymph_node"):
        v = g.uniform(35, 55)
        return np.array([v, v + 20, v + 30]), 8.0
    if type_name == "kidney_lesion":
        if g.random() < 0.5:
            v = g.uniform(2, 18)
            return np.array([v, v, v + 3]), 3.0
        v = g.uniform(30, 45)
        return np.array([v, v + 50, v + 45]), 12.0
    if type_name == "adrenal_nodule":
        v = g.uniform(5, 40)
        return np.array([v, v + 25, v + 30]), 6.0
    if type_name == "bone_lesion":
        if g.random() < 0.65:
            v = g.uniform(30, 80)   # lytic
            return np.array([v, v + 10, v + 15]), 12.0
        v = g.uniform(550, 900)     # sclerotic
        return np.array([v, v, v]), 40.0
    v = g.uniform(25, 50)
    return np.array([v, v + 30, v + 35]), 12.0


def _candidates(body: A.Body, g, type_name: str, n: int, station: str | None = None) -> np.ndarray:
    """[n, 3] candidate centres (x, y, d) mm for a lesion type, before the organ check."""
    s = body.s
    u = g.uniform(size=(n, 3))
    if type_name == "lung_nodule":
        lo, hi = np.array([-140, -100, 10]) * s, np.array([140, 110, 280]) * s
    elif type_name == "liver_tumour":
        lo, hi = np.array([-150, -95, 195]) * s, np.array([60, 95, 370]) * s
    elif type_name == "kidney_lesion":
        lo, hi = np.array([-105, 10, 280]) * s, np.array([105, 80, 410]) * s
    elif type_name == "adrenal_nodule":
        side = np.where(g.random(n) < 0.5, -1.0, 1.0)
        return np.stack([side * 40 * s + g.normal(0, 3, n), 32 * s + g.normal(0, 3, n),
                         302 * s + g.normal(0, 5, n)], axis=1)
    elif type_name == "bone_lesion":
        lo, hi = np.array([-150, -110, 0]) * s, np.array([150, 110, 620]) * s
    elif type_name == "soft_tissue_lesion":
        lo, hi = np.array([-200, -150, -20]) * s, np.array([200, 130, 620]) * s
    elif type_name == "pelvic_mass":
        lo, hi = np.array([-80, -60, 520]) * s, np.array([80, 40, 630]) * s
    elif type_name == "abdominal_mass":
        lo, hi = np.array([-80, -70, 300]) * s, np.array([80, 40, 520]) * s
    elif type_name.startswith("lymph_node"):
        stations = NODE_TYPE_STATIONS[type_name] if station is None else (station,)
        pick = g.integers(0, len(stations), size=n)
        return A.station_points(body, [stations[i] for i in pick], g)
    else:
        raise KeyError(f"unknown lesion type {type_name!r}")
    return lo + u * (hi - lo)


def _in_body_outline(body: A.Body, x, y, d):
    ba, bb = body.body_ab(d)
    bb_eff = np.where(y > 0, bb * 0.93, bb)
    return (A._se(x, y, ba, bb_eff, 2.3) < 1) & (y < body.table_y(x) - 0.5)


def organ_ok(body: A.Body, type_name: str, x, y, d) -> np.ndarray:
    """Whether points (x, y, d) mm lie in the tissue a lesion type grows in (cheap organ tests,
    the same regions as :meth:`anatomy.Body.labels`)."""
    if type_name == "lung_nodule":
        return body.in_lung(x, y, d)
    if type_name == "liver_tumour":
        return body.in_liver(x, y, d)
    if type_name == "kidney_lesion":
        return body.in_kidney(x, y, d)[0] & body.in_abdomen_fat(x, y, d)
    bone = body.in_bone(x, y, d)[0]
    if type_name == "bone_lesion":
        a, b = body.core_ab(d)
        return bone & (A._se(x, y, a, b, 2.0) < 1)
    if type_name == "soft_tissue_lesion":
        a, b = body.core_ab(d)
        return _in_body_outline(body, x, y, d) & ~(A._se(x, y, a, b, 2.0) < 1)
    if type_name.startswith("lymph_node"):
        return _in_body_outline(body, x, y, d) & ~body.in_lung(x, y, d) & ~bone
    abd = body.in_abdomen_fat(x, y, d) & ~bone
    if type_name == "adrenal_nodule":
        return abd & ~body.in_liver(x, y, d) & ~body.in_kidney(x, y, d)[0]
    if type_name in ("abdominal_mass", "pelvic_mass"):
        return abd & ~body.in_liver(x, y, d) & ~body.in_kidney(x, y, d)[0] & ~body.in_spleen(x, y, d)
    raise KeyError(f"unknown lesion type {type_name!r}")


_ALLOWED = {
    "lung_nodule": (A.LUNG,),
    "liver_tumour": (A.LIVER,),
    "kidney_lesion": (A.KID_CORTEX, A.KID_MEDULLA),
    "adrenal_nodule": (A.ADRENAL, A.VFAT),
    "bone_lesion": (A.CANCELLOUS, A.CORTEX),
    "soft_tissue_lesion": (A.FAT,),
    "pelvic_mass": (A.VFAT,),
    "abdominal_mass": (A.VFAT, A.PANCREAS),
}


def place(body: A.Body, g, type_name: str, long_mm: float, station: str | None = None):
    """Finds a centre (x, y, d) for a lesion of the given type and size; None if the organ has no room.

    The centre lies in the type's organ; for lung nodules and liver tumours the in-plane ends of the
    long axis must also be in the organ (juxtapleural nodules and capsular tumours still occur).
    """
    for n in (24, 96, 96, 96):
        cand = _candidates(body, g, type_name, n, station)
        ok = organ_ok(body, type_name, cand[:, 0], cand[:, 1], cand[:, 2])
        if type_name in ("lung_nodule", "liver_tumour", "kidney_lesion", "soft_tissue_lesion") and ok.any():
            r = 0.45 * long_mm
            off = np.array([(r, 0), (-r, 0), (0, r), (0, -r)])
            inside = organ_ok(body, type_name, cand[None, :, 0] + off[:, None, 0],
                              cand[None, :, 1] + off[:, None, 1],
                              cand[None, :, 2] + 0 * off[:, None, 0]).sum(axis=0)
            need = {"kidney_lesion": 2, "soft_tissue_lesion": 4}.get(type_name, 3)
            if type_name == "soft_tissue_lesion":  # inside the body outline, not just in the fat
                inside = _in_body_outline(body, cand[None, :, 0] + off[:, None, 0],
                                          cand[None, :, 1] + off[:, None, 1],
                                          cand[None, :, 2] + 0 * off[:, None, 0]).sum(axis=0)
            ok &= inside >= need
        idx = np.flatnonzero(ok)
        if len(idx):
            return cand[idx[0]]
    return None


def sample_size(g, type_name: str, size_mult: float = 1.0) -> float:
    t = LESION_TYPES[type_name]
    v = t.median_mm * size_mult * float(np.exp(g.normal(0, t.sigma)))
    return float(np.clip(v, t.lo_mm, t.hi_mm))


def new_lesion(body: A.Body, g, lesion_id: int, type_name: str, n_studies: int, long_mm: float,
               station: str | None = None, sphere: bool = False) -> Lesion | None:
    """A lesion of the given type and long diameter (mm) placed in the body; None if no room."""
    c = place(body, g, type_name, long_mm, station)
    if c is None:
        return None
    a = long_mm / 2.0
    if sphere:
        semi = np.array([a, a * g.uniform(0.85, 1.0), a * g.uniform(0.85, 1.0)])
    else:
        b = a * g.uniform(0.5, 0.95)
        semi = np.array([a, b, max(b, a * g.uniform(0.55, 1.05))])
    hu, tex = _hu(g, type_name)
    return Lesion(lesion_id=lesion_id, type=type_name, centre=np.asarray(c, float), semi=semi,
                  angle=float(g.uniform(0, np.pi)), hu=hu, tex=tex, scale=np.ones(n_studies),
                  station=station or "")


def evolve(g, lesion: Lesion, n_studies: int, trend: float, onset: int = 0) -> None:
    """Sets ``lesion.scale`` over the studies: absent before ``onset``, then multiplicative growth
    (patient trend + lesion noise); a lesion shrinking below 3 mm long diameter disappears."""
    scale = np.zeros(n_studies)
    f = 1.0 if onset == 0 else g.uniform(0.4, 0.8)
    for k in range(n_studies):
        if k < onset:
            continue
        if k > onset:
            f *= float(np.exp(trend + g.normal(0, 0.12)))
        scale[k] = f if 2 * lesion.semi[0] * f >= 3.0 else 0.0
    lesion.scale = scale
