"""The trunk phantom: one patient's anatomy in millimetres, as tissue labels and Hounsfield units.

Patient frame (all lengths in mm):
  x  patient left positive (LPS x), 0 on the midline;
  y  posterior positive (LPS y), 0 at the centre of the trunk's cross-section;
  d  depth below the lung apex, inferior positive (d = 0 apex, ~215 right diaphragm dome,
     ~440 iliac crest, ~640 femoral heads). World LPS z of a scan = ``z_ref - d``.

Every geometric function is elementwise on broadcastable numpy arrays ``(x, y, d)``, so one code
path labels a whole axial slice (x, y grids, scalar d), a 3D grid, or a list of query points (lesion
placement, vessel growth). Smooth organs (body wall, lungs, heart, liver, spleen, kidneys, spine,
ribs, pelvis, table) are analytic shapes; branching and winding structures (pulmonary arteries and
veins, airways, hepatic and portal vessels, aorta and great vessels, bowel) are chains of capsules
(:class:`Tubes`) grown once per patient and rasterised on the scan's grid with partial volume.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.world import rng as wrng

# ------------------------------------------------------------------------------------------------
# Tissue labels and their HU by contrast phase.
# ------------------------------------------------------------------------------------------------
AIR, FAT, MUSCLE, LUNG, VFAT, MYO, CHAMBER, CORTEX, CANCELLOUS, CSF, LIVER, SPLEEN = range(12)
KID_CORTEX, KID_MEDULLA, STOMACH_WALL, STOMACH_FLUID, GAS, PANCREAS, ADRENAL, GALL = range(12, 20)
BLADDER, CARTILAGE, TABLE_SHELL, TABLE_FOAM, DISC, NODE = range(20, 26)
N_LABELS = 26
LABEL_NAMES = (
    "air", "fat", "muscle", "lung", "visceral_fat", "myocardium", "heart_blood", "bone_cortex",
    "bone_cancellous", "csf", "liver", "spleen", "kidney_cortex", "kidney_medulla", "stomach_wall",
    "stomach_fluid", "gas", "pancreas", "adrenal", "gallbladder", "bladder", "cartilage",
    "table_shell", "table_foam", "disc", "lymph_node",
)
PHASES = ("non_contrast", "arterial", "venous")

#                    non    art    ven
_HU = {
    AIR: (-1000, -1000, -1000), FAT: (-105, -105, -105), MUSCLE: (48, 55, 60),
    LUNG: (-860, -860, -860), VFAT: (-95, -95, -95), MYO: (45, 115, 100),
    CHAMBER: (42, 290, 160), CORTEX: (950, 950, 950), CANCELLOUS: (230, 235, 240), CSF: (12, 12, 12),
    LIVER: (58, 78, 115), SPLEEN: (48, 125, 120), KID_CORTEX: (32, 190, 170),
    KID_MEDULLA: (30, 70, 165), STOMACH_WALL: (45, 95, 90), STOMACH_FLUID: (12, 12, 14),
    GAS: (-995, -995, -995), PANCREAS: (42, 110, 95), ADRENAL: (30, 65, 60), GALL: (8, 8, 10),
    BLADDER: (8, 8, 10), CARTILAGE: (120, 120, 125), TABLE_SHELL: (420, 420, 420),
    TABLE_FOAM: (-880, -880, -880), DISC: (85, 85, 90), NODE: (45, 70, 80),
}
HU_LUT = np.array([[_HU[i][p] for i in range(N_LABELS)] for p in range(3)], dtype=np.float32)

# Tube kinds (capsule chains) and their HU by phase; airways and bowel are hollow.
TUBE_PULM_ART, TUBE_PULM_VEIN, TUBE_AORTA, TUBE_SYSTEMIC_VEIN, TUBE_PORTAL, TUBE_HEPATIC_VEIN = range(6)
TUBE_AIRWAY, TUBE_BOWEL, TUBE_COLON, TUBE_ESOPHAGUS = range(6, 10)
TUBE_HU = np.array([
    # pulm art, pulm vein, aorta, sys vein, portal, hep vein, airway wall, bowel wall, colon wall, esoph
    [40, 40, 42, 40, 38, 36, 40, 45, 45, 45],
    [320, 260, 330, 90, 110, 60, 45, 75, 70, 70],
    [170, 160, 165, 150, 175, 165, 45, 70, 65, 75],
], dtype=np.float32)

# Landmark depths (mm below the lung apex for a patient of scale 1) and the musculoskeletal trunk's
# half-width (lateral, A) and half-depth (antero-posterior, B) there, without subcutaneous fat.
_LEVELS = np.array([-80, -20, 0, 60, 150, 230, 300, 380, 450, 520, 580, 700.0])
_CORE_A = np.array([70, 95, 118, 136, 145, 142, 133, 126, 136, 146, 140, 130.0])
_CORE_B = np.array([55, 68, 80, 90, 97, 97, 93, 88, 86, 88, 88, 84.0])


@dataclasses.dataclass
class Tubes:
    """Capsule chains in the patient frame.

    p0, p1: [N, 3] segment end points (x, y, d) in mm; r: [N] radius (mm); kind: [N] TUBE_*;
    wall: [N] wall thickness (mm, hollow kinds); gas: [N] gas level of hollow contents as a fraction
    of the radius measured from the anterior side (0 no gas, 1 all gas).
    """

    p0: np.ndarray
    p1: np.ndarray
    r: np.ndarray
    kind: np.ndarray
    wall: np.ndarray
    gas: np.ndarray

    @staticmethod
    def concat(parts: list["Tubes"]) -> "Tubes":
        return Tubes(*[np.concatenate([getattr(p, f.name) for p in parts])
                       for f in dataclasses.fields(Tubes)])

    @staticmethod
    def chain(points, radii, kind, wall=0.0, gas=0.0) -> "Tubes":
        pts = np.asarray(points, dtype=np.float64)
        rad = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
        n = len(pts) - 1
        return Tubes(pts[:-1], pts[1:], 0.5 * (rad[:-1] + rad[1:]), np.full(n, kind, np.int16),
                     np.full(n, wall), np.broadcast_to(np.asarray(gas, float), (n,)).copy())


@dataclasses.dataclass
class Body:
    """One patient's anatomy (sampled by :func:`sample_body`; tubes grown lazily by :func:`grow_tubes`)."""

    patient_key: tuple
    s: float            # size scale (lengths scale with it)
    fat: float          # subcutaneous fat thickness, mm
    visceral: float     # visceral fat abundance, 0..1
    lung_hu: float      # parenchyma HU
    dome_r: float       # right diaphragm dome depth, mm
    dome_l: float
    heart_shift: float  # lateral heart shift, mm
    table_gap: float    # mm between the back and the table top
    sex: str
    tubes: Tubes | None = None
    nodes: np.ndarray | None = None   # [K, 7] normal lymph nodes: x, y, d, a, b, c, angle

    # -------------------------------------------------------------------------- outline and core
    def core_ab(self, d):
        dd = np.asarray(d, dtype=np.float64) / self.s
        return np.interp(dd, _LEVELS, _CORE_A) * self.s, np.interp(dd, _LEVELS, _CORE_B) * self.s

    def body_ab(self, d):
        a, b = self.core_ab(d)
        dd = np.asarray(d, dtype=np.float64) / self.s
        belly = 1.0 + 0.6 * self.visceral * np.clip((dd - 250) / 150, 0, 1) * np.clip((560 - dd) / 100, 0, 1)
        return a + self.fat * (1.0 + 0.3 * belly), b + self.fat * belly

    def table_y(self, x):
        """y (mm) of the table top under the patient at lateral position x (the table is concave)."""
        _, b = self.body_ab(150.0 * self.s)
        return b * 0.9 + self.table_gap - 0.0011 * np.asarray(x, dtype=np.float64) ** 2

    def vertebra_y(self, d):
        """y of the vertebral body centre (mm) at depth d."""
        _, b = self.core_ab(d)
        return b - 62.0 * self.s

    def diaphragm_d(self, x, y):
        """Depth of the diaphragm surface (mm) above the point (x, y): lungs above, abdomen below."""
        key = (id(x), id(y))
        memo = self.__dict__.get("_dia_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        out = self._diaphragm_d(x, y)
        self.__dict__["_dia_memo"] = (key, out, (x, y))
        return out

    def _diaphragm_d(self, x, y):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        # Smooth blend between the right and left domes (no seam on the midline).
        t = 1.0 / (1.0 + np.exp(-x / (12.0 * self.s)))
        dome = self.dome_r + (self.dome_l - self.dome_r) * t
        xd = (-65.0 + 130.0 * t) * self.s
        _, b = self.core_ab(dome)
        yd = -0.15 * b   # the dome's summit, slightly anterior; it slopes down in every direction
        return (dome + 0.0028 * (x - xd) ** 2 / self.s + 0.0025 * np.minimum(y - yd, 0.0) ** 2 / self.s
                + 100.0 * self.s * np.clip(y / b, 0, 1) ** 1.3)

    # ------------------------------------------------------------------------------- regions
    def _heart_q(self, x, y, d):
        s = self.s
        cx, cy, cd = 20.0 * s + self.heart_shift, -22.0 * s, 165.0 * s
        ang = np.deg2rad(35.0)
        u = (x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)
        v = -(x - cx) * np.sin(ang) + (y - cy) * np.cos(ang)
        return (u / (56 * s)) ** 2 + (v / (44 * s)) ** 2 + ((d - cd) / (56 * s)) ** 2, u

    def in_cavity(self, x, y, d):
        key = (id(x), id(y), id(d))
        memo = self.__dict__.get("_cav_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        out = self._in_cavity(x, y, d)
        self.__dict__["_cav_memo"] = (key, out, (x, y, d))
        return out

    def _in_cavity(self, x, y, d):
        a, b = self.core_ab(d)
        d_ = np.asarray(d, dtype=np.float64) / self.s
        w = np.where(d_ < 300, 11.0, 9.0) * self.s
        yv = self.vertebra_y(d)
        inside = _se(x, y, a - w, b - w, 2.0) < 1.0
        spine = _se(x, y - yv - 12 * self.s, 27 * self.s, 34 * self.s, 2.0) < 1
        para = _se(x, y - b, 56 * self.s, 38 * self.s, 2.0) < 1
        return inside & ~spine & ~para

    def in_lung(self, x, y, d):
        x, y, d = (np.asarray(v, dtype=np.float64) for v in (x, y, d))
        s = self.s
        a, b = self.core_ab(d)
        w = 11.0 * s
        f = 0.35 + 0.65 * np.sqrt(np.clip(d / (45 * s), 0, 1))
        # Each lung is a rounded region of its hemithorax; the apex tapers.
        lat = _se(x, y - 4 * s, (a - w) * f, (b - w) * np.maximum(f, 0.6), 2.0) < 1.0
        cav = self.in_cavity(x, y, d) & lat & (d > 0) & (d < self.diaphragm_d(x, y))
        med_w = np.where(d < 120 * s, 24.0, 18.0) * s
        taper = 0.45 + 0.55 * np.clip((y + 0.3 * b) / (0.6 * b), 0, 1)
        med = _se(x - 6 * s, y + 8 * s, (med_w + 8 * s * np.clip((d - 40 * s) / (60 * s), 0, 1)) * taper,
                  b, 2.0) < 1.0
        hq, _ = self._heart_q(x, y, d)
        heart = hq < 1.12
        yv = self.vertebra_y(d)
        desc = _se(x - 18 * s, y - (yv - 20 * s), 18 * s, 30 * s, 2.0) < 1.0
        return cav & ~med & ~heart & ~(desc & (d > 40 * s))

    def in_liver(self, x, y, d):
        s = self.s
        e1 = _ell3(x, y, d, -58 * s, 0 * s, 275 * s, 88 * s, 88 * s, 92 * s)
        e2 = _ell3(x, y, d, 5 * s, -45 * s, 248 * s, 52 * s, 34 * s, 42 * s)
        return (e1 | e2) & (d > self.diaphragm_d(x, y) + 1.5) & self.in_cavity(x, y, d) \
            & ~self.in_kidney(x, y, d)[0]

    def in_kidney(self, x, y, d):
        """(kidney, cortex_shell, sinus) masks."""
        s = self.s
        out = np.zeros(np.broadcast(x, y, d).shape, bool)
        shell = out.copy()
        sinus = out.copy()
        for side, dd in ((-1, 352.0), (1, 338.0)):
            cx, cy, cd = side * 70 * s, 45 * s, dd * s
            if np.all(np.abs(np.asarray(d) - cd) > 56 * s):
                continue
            ang = np.deg2rad(-side * 25.0)
            u = (x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)
            v = -(x - cx) * np.sin(ang) + (y - cy) * np.cos(ang)
            q = (u / (30 * s)) ** 2 + (v / (24 * s)) ** 2 + ((d - cd) / (55 * s)) ** 2
            out |= q < 1
            shell |= (q < 1) & (q > 0.55)
            qs = ((u + side * 14 * s) / (9 * s)) ** 2 + (v / (8 * s)) ** 2 + ((d - cd) / (28 * s)) ** 2
            sinus |= qs < 1
        return out, shell, sinus

    def in_spleen(self, x, y, d):
        s = self.s
        ang = np.deg2rad(-35.0)
        u = (x - 82 * s) * np.cos(ang) + (y - 40 * s) * np.sin(ang)
        v = -(x - 82 * s) * np.sin(ang) + (y - 40 * s) * np.cos(ang)
        return ((u / (25 * s)) ** 2 + (v / (50 * s)) ** 2 + ((d - 262 * s) / (52 * s)) ** 2 < 1) \
            & (d > self.diaphragm_d(x, y) + 1.5) & self.in_cavity(x, y, d)

    def in_abdomen_fat(self, x, y, d):
        """Intra-abdominal cavity (below the diaphragm, above the pelvic floor)."""
        return self.in_cavity(x, y, d) & (d > self.diaphragm_d(x, y)) & (d < 640 * self.s)

    def in_bone(self, x, y, d):
        """(bone, cortex) masks of the spine, ribs, sternum and pelvis."""
        x, y, d = (np.asarray(v, dtype=np.float64) for v in (x, y, d))
        shape = np.broadcast(x, y, d).shape
        s = self.s
        a, b = self.core_ab(d)
        yv = self.vertebra_y(d)
        dn = d / s
        # Vertebral body, larger in the lumbar spine.
        va = (15 + 10 * np.clip((dn - 0) / 450, 0, 1)) * s
        vb = (13 + 6 * np.clip(dn / 450, 0, 1)) * s
        q = _se(x, y - yv, va, vb, 2.0)
        disc = (np.mod(dn + 7.0, 27.0) < 4.5) & (dn > -60) & (dn < 470)
        body = (q < 1) & ~disc
        cort = body & (q > (1 - 2.2 / vb) ** 2)
        # Posterior arch around the canal, spinous and transverse processes.
        yc = yv + vb + 9 * s
        rc = np.hypot(x, y - yc)
        arch = (rc > 8 * s) & (rc < 13 * s) & (y > yc - 2 * s)
        spin = (np.abs(x) < 4 * s) & (y > yc + 10 * s) & (y < b - 14 * s) & (np.mod(dn, 27.0) < 17)
        trans = (np.abs(y - yc + 1.5 * s) < 3.0 * s) & (np.abs(x) < 27 * s) & (np.abs(x) > 10 * s) \
            & (np.mod(dn + 5, 27.0) < 7)
        post = (arch | spin | trans) & (dn < 560)
        # Ribs: 12 pairs descending anteriorly around the chest wall.
        rn = np.sqrt(_se(x, y, a, b, 2.0))
        r_rib = 1.0 - 7.0 * s / (0.5 * (a + b))
        radial_all = (rn - r_rib) * 0.5 * (a + b)
        rib_core = np.zeros(shape, bool)
        rib_cart = np.zeros(shape, bool)
        rib_cort = np.zeros(shape, bool)
        ring = np.broadcast_to(np.abs(radial_all) < 4.0 * s, shape) & np.broadcast_to(dn < 420, shape)
        if ring.any():
            # Only the chest-wall ring can hold a rib: evaluate the rib geometry there.
            xr, yr = np.broadcast_to(x, shape)[ring], np.broadcast_to(y, shape)[ring]
            dr = np.broadcast_to(d, shape)[ring]
            radial = np.broadcast_to(radial_all, shape)[ring]
            alpha = np.pi - np.abs(np.arctan2(xr, -yr))      # 0 posterior midline, pi anterior
            base = 8 * s + 115 * s * (alpha / np.pi) ** 1.6 - 10 * s * np.sin(alpha * 1.2)
            k = np.round((dr - base) / (24 * s))
            valid_k = (k >= 0) & (k <= 11)
            dist = np.abs(dr - base - k * 24 * s)
            reach = np.where(k >= 9, 1.9, np.pi - 0.75)   # bony rib ends near the midclavicular line
            core_r = valid_k & (dist < 4.6 * s) & (np.abs(radial) < 3.2 * s) & (alpha > 0.32) & (alpha < reach)
            rib_core[ring] = core_r
            rib_cart[ring] = valid_k & (dist < 4.0 * s) & (np.abs(radial) < 4.0 * s) \
                & (alpha >= np.pi - 0.75) & (alpha < np.pi - 0.12) & (k < 8)
            rib_cort[ring] = core_r & ((dist > 4.6 * s - 1.3) | (np.abs(radial) > 3.2 * s - 1.3))
        # Sternum.
        st = (dn > 15) & (dn < 190) & (_se(x, y + (b - 9 * s), 15 * s, 6 * s, 2.0) < 1)
        st_c = st & (_se(x, y + (b - 9 * s), 13 * s, 4.2 * s, 2.0) > 1)
        # Pelvis: iliac wings and femoral heads.
        il = np.zeros(shape, bool)
        il_c = np.zeros(shape, bool)
        for side in (-1, 1):
            # Iliac wing: a curved plate (~8 mm thick) lateral to the psoas, open anteriorly.
            qw = _se(x - side * 80 * s, y - 30 * s, 48 * s, 62 * s, 2.0)
            wing = (dn > 440) & (dn < 570) & (qw > 0.74) & (qw < 1.0) & (y > -20 * s) \
                & (side * x > 60 * s + 0.25 * np.abs(y))
            il |= wing
            il_c |= wing & ((qw > 0.95) | (qw < 0.79))
            fh = np.sqrt((x - side * 88 * s) ** 2 + (y - 8 * s) ** 2 + (d - 612 * s) ** 2)
            il |= fh < 24 * s
            il_c |= (fh < 24 * s) & (fh > 21.5 * s)
        bone = body | post | rib_core | st | il
        cortex = cort | post | rib_cort | st_c | il_c
        return bone, cortex, rib_cart & ~bone, disc & (q < 1)

    # ----------------------------------------------------------------------------- labels
    def labels(self, x, y, d) -> np.ndarray:
        """Tissue label (uint8, one of the module's label ids) at points (x, y, d) mm, broadcast."""
        x, y = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (x, y)))
        d = np.asarray(d, dtype=np.float64)
        shape = np.broadcast(x, y, d).shape
        x, y = np.broadcast_to(x, shape), np.broadcast_to(y, shape)
        s = self.s
        lab = np.full(shape, AIR, np.uint8)
        # Table: two shells with foam between.
        ty = self.table_y(x)
        tab_x = np.abs(x) < 235 * s
        lab[tab_x & (y > ty) & (y < ty + 2.2)] = TABLE_SHELL
        lab[tab_x & (y >= ty + 2.2) & (y < ty + 28)] = TABLE_FOAM
        lab[tab_x & (y >= ty + 28) & (y < ty + 30)] = TABLE_SHELL
        ba, bb = self.body_ab(d)
        bb_eff = np.where(y > 0, bb * 0.93, bb)
        body = (_se(x, y, ba, bb_eff, 2.3) < 1) & (y < ty - 0.5)
        lab[body] = FAT
        a, b = self.core_ab(d)
        core = body & (_se(x, y, a, b, 2.0) < 1)
        lab[core] = MUSCLE
        cav = core & self.in_cavity(x, y, d)
        dia = self.diaphragm_d(x, y)
        thorax = cav & (d < dia)
        lab[thorax] = VFAT
        abdomen = cav & (d >= dia) & (d < 640 * s)
        lab[abdomen] = np.uint8(VFAT)
        lab[abdomen & (d < dia + 3.0)] = MUSCLE   # the diaphragm itself, ~3 mm thick
        # Muscular diaphragm sheet and abdominal wall muscles already MUSCLE; psoas:
        for side in (-1, 1):
            dn = d / s
            rr = np.clip(7 + 0.09 * (dn - 330), 0, 24) * s
            ps = (dn > 330) & (dn < 600) & (np.hypot(x - side * (26 + 0.12 * np.clip(dn - 330, 0, 250)) * s,
                                                     y - self.vertebra_y(d) + 2 * s) < rr)
            lab[cav & ps] = MUSCLE
        lung = core & self.in_lung(x, y, d)
        lab[lung] = LUNG
        # Heart.
        hq, hu_ = self._heart_q(x, y, d)
        heart = hq < 1
        lab[cav & heart] = MYO
        chamber = (hq < 0.62) & (np.abs(hu_ + 6 * s) > 4 * s)
        lab[cav & chamber] = CHAMBER
        # Abdominal organs.
        liver = abdomen & self.in_liver(x, y, d)
        lab[liver] = LIVER
        gall = liver & _ell3(x, y, d, -52 * s, -52 * s, 332 * s, 14 * s, 16 * s, 30 * s)
        lab[gall] = GALL
        lab[abdomen & self.in_spleen(x, y, d)] = SPLEEN
        st_q = _rot_q(x, y, d, 45 * s, -28 * s, 262 * s, 46 * s, 36 * s, 50 * s, 20.0)
        stom = abdomen & (st_q < 1) & ~liver
        lab[stom] = STOMACH_WALL
        inner = stom & (st_q < 0.78)
        lab[inner] = STOMACH_FLUID
        lab[inner & (y < -28 * s - 12 * s)] = GAS
        kid, shell, sinus = self.in_kidney(x, y, d)
        lab[abdomen & kid] = KID_MEDULLA
        lab[abdomen & kid & shell] = KID_CORTEX
        lab[abdomen & kid & sinus] = VFAT
        lab[abdomen & _rot_q(x, y, d, 15 * s, 8 * s, 320 * s, 62 * s, 11 * s, 14 * s, 12.0).__lt__(1) & ~kid
            & ~liver] = PANCREAS
        for side in (-1, 1):
            lab[abdomen & _ell3(x, y, d, side * 40 * s, 32 * s, 302 * s, 4 * s, 13 * s, 15 * s)] = ADRENAL
        lab[abdomen & _ell3(x, y, d, 0, -30 * s, 590 * s, 46 * s, 34 * s, 36 * s)] = BLADDER
        # Bones last (they bound everything).
        bone, cortex, cart, disc = self.in_bone(x, y, d)
        lab[body & bone] = CANCELLOUS
        lab[body & cortex] = CORTEX
        lab[body & cart] = CARTILAGE
        lab[body & disc] = DISC
        yv = self.vertebra_y(d)
        _, vb = (None, (13 + 6 * np.clip(d / s / 450, 0, 1)) * s)
        canal = np.hypot(x, y - (yv + vb + 9 * s)) < 8 * s
        lab[body & canal & (d / s < 560)] = CSF
        return lab

    def organ_at(self, x, y, d) -> np.ndarray:
        """Label ids at points (alias of :meth:`labels`, for lesion placement)."""
        return self.labels(x, y, d)


def _se(x, y, a, b, p):
    tx = x / a
    ty = y / b
    if p == 2.0:
        return tx * tx + ty * ty
    tx = tx * tx
    ty = ty * ty
    return tx ** (p / 2) + ty ** (p / 2)


def _ell3(x, y, d, cx, cy, cd, a, b, c):
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((d - cd) / c) ** 2 < 1


def _rot_q(x, y, d, cx, cy, cd, a, b, c, ang_deg):
    t = np.deg2rad(ang_deg)
    u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
    v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 + ((d - cd) / c) ** 2


# ------------------------------------------------------------------------------------------------
# Sampling a patient and growing the tubes.
# ------------------------------------------------------------------------------------------------
def sample_body(seed: int, patient_key: tuple, sex: str | None = None, scale_mult: float = 1.0) -> Body:
    """Samples one patient's anatomy parameters (cheap; tubes are grown on demand).

    scale_mult multiplies the patient's size (the tiny preset's small bodies).
    """
    g = wrng.stream(seed, "body", *patient_key)
    sex = sex or ("M" if g.random() < 0.6 else "F")
    s = float(np.clip(g.normal(1.0 if sex == "M" else 0.93, 0.06), 0.82, 1.18)) * scale_mult
    return Body(
        patient_key=tuple(patient_key), s=s,
        fat=float(np.clip(g.lognormal(np.log(16.0), 0.45), 5.0, 55.0)) * scale_mult,
        visceral=float(g.uniform(0, 1)),
        lung_hu=float(g.normal(-875, 15)),
        dome_r=float(g.normal(212, 8) * s), dome_l=float(g.normal(226, 8) * s),
        heart_shift=float(g.normal(0, 5)), table_gap=float(g.uniform(0.5, 4.0)), sex=sex,
    )


def _perp(v, g):
    """[n, 3] random unit vectors perpendicular to the rows of v [n, 3]."""
    v = np.asarray(v, float).reshape(-1, 3)
    a = np.cross(v, g.normal(size=v.shape))
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return np.where(n > 1e-9, a / np.maximum(n, 1e-12), np.array([1.0, 0.0, 0.0]))


def _grow_tree(body: Body, g, roots, inside, kind, r_min, max_gen=18, length_k=(4.0, 7.0),
               targets: np.ndarray | None = None) -> Tubes:
    """Grows a branching vessel tree generation by generation (vectorised over the tips).

    roots: list of (point (x, y, d), direction, radius); inside(x, y, d) -> bool array: where
    segments may end. Each tip splits into a major and a minor child (radius ratios ~0.73, ~0.58).
    """
    p = np.array([r[0] for r in roots], float)
    v = np.array([r[1] for r in roots], float)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    r = np.array([r[2] for r in roots], float)
    out_p0, out_p1, out_r = [], [], []
    for gen in range(max_gen):
        if len(p) == 0:
            break
        n = len(p)
        L = np.clip(r * g.uniform(*length_k, size=n), 3.0, 24.0)
        best_q = np.full((n, 3), np.nan)
        best_v = v.copy()
        for attempt in range(6):
            jitter = g.normal(size=(n, 3)) * (0.25 + 0.2 * attempt)
            vv = v + jitter
            if targets is not None and attempt >= 2:
                # Steer towards random points of the organ not yet reached (space filling).
                tg = targets[g.integers(0, len(targets), size=n)] - p
                tg /= np.maximum(np.linalg.norm(tg, axis=1, keepdims=True), 1e-6)
                vv = v + 1.5 * tg + jitter * 0.5
            vv /= np.linalg.norm(vv, axis=1, keepdims=True)
            q = p + vv * L[:, None]
            ok = inside(q[:, 0], q[:, 1], q[:, 2]) & np.isnan(best_q[:, 0])
            best_q[ok] = q[ok]
            best_v[ok] = vv[ok]
        alive = ~np.isnan(best_q[:, 0])
        if gen < 1:  # the hilar roots may start outside the lung
            q = p + v * L[:, None]
            best_q[~alive] = q[~alive]
            best_v[~alive] = v[~alive]
            alive[:] = True
        out_p0.append(p[alive])
        out_p1.append(best_q[alive])
        out_r.append(r[alive])
        p, v, r = best_q[alive], best_v[alive], r[alive]
        # Branch.
        r1 = r * g.uniform(0.8, 0.93, size=len(p))
        r2 = r * g.uniform(0.45, 0.72, size=len(p))
        keep1 = r1 >= r_min
        keep2 = r2 >= r_min
        ang1 = np.deg2rad(g.uniform(15, 40, size=len(p)))
        ang2 = np.deg2rad(g.uniform(25, 60, size=len(p)))
        axes = _perp(v, g)
        v1 = v * np.cos(ang1)[:, None] + axes * np.sin(ang1)[:, None]
        v2 = v * np.cos(ang2)[:, None] - axes * np.sin(ang2)[:, None]
        p = np.concatenate([p[keep1], p[keep2]])
        v = np.concatenate([v1[keep1], v2[keep2]])
        r = np.concatenate([r1[keep1], r2[keep2]])
    if not out_p0:
        z = np.zeros((0, 3))
        return Tubes(z, z, np.zeros(0), np.zeros(0, np.int16), np.zeros(0), np.zeros(0))
    p0 = np.concatenate(out_p0)
    n = len(p0)
    return Tubes(p0, np.concatenate(out_p1), np.concatenate(out_r), np.full(n, kind, np.int16),
                 np.zeros(n), np.zeros(n))


def grow_tubes(body: Body, seed: int) -> Body:
    """Grows the patient's vessels, airways and bowel (deterministic in (seed, patient)); returns body."""
    if body.tubes is not None:
        return body
    g = wrng.stream(seed, "tubes", *body.patient_key)
    s = body.s
    yv = body.vertebra_y
    parts = []
    # Aorta, great vessels, venae cavae, esophagus.
    aorta = [(8, -14, 178), (-10, -30, 140), (-14, -28, 90), (-8, -22, 55), (6, -5, 42), (18, 12, 52),
             (20, None, 80), (19, None, 160), (16, None, 240), (10, None, 320), (6, None, 400), (4, None, 440)]
    pts = []
    for x, y, d in aorta:
        d = d * s
        y = (float(yv(d)) - 24 * s) if y is None else y * s
        pts.append((x * s, y, d))
    parts.append(Tubes.chain(pts, [15 * s] * 5 + [13 * s] * 4 + [11 * s] * 3, TUBE_AORTA))
    for side in (-1, 1):
        parts.append(Tubes.chain([(side * 45 * s, float(yv(460 * s)) - 15 * s, 460 * s),
                                  (side * 10 * s, float(yv(440 * s)) - 24 * s, 440 * s)][::-1]
                                 + [(side * 60 * s, -10 * s, 560 * s), (side * 85 * s, -20 * s, 640 * s)],
                                 [8 * s], TUBE_AORTA))
        parts.append(Tubes.chain([(side * 8 * s, -12 * s, 44 * s), (side * 22 * s, -18 * s, 0),
                                  (side * 30 * s, -20 * s, -80 * s)], [6 * s], TUBE_AORTA))
    parts.append(Tubes.chain([(-28 * s, -22 * s, -60 * s), (-26 * s, -18 * s, 60 * s),
                              (-24 * s, -14 * s, 150 * s)], [10 * s], TUBE_SYSTEMIC_VEIN))
    ivc = [(-20 * s, -5 * s, 200 * s)] + [(-22 * s, float(yv(dd * s)) - 30 * s, dd * s)
                                          for dd in (240, 320, 400, 450)]
    parts.append(Tubes.chain(ivc, [12 * s], TUBE_SYSTEMIC_VEIN))
    for side in (-1, 1):
        parts.append(Tubes.chain([(-22 * s, float(yv(450 * s)) - 30 * s, 450 * s),
                                  (side * 55 * s, -5 * s, 560 * s), (side * 80 * s, -15 * s, 640 * s)],
                                 [9 * s], TUBE_SYSTEMIC_VEIN))
    eso = [(4 * s, float(yv(dd * s)) - 24 * s + (8 * s if dd > 60 else 0), dd * s)
           for dd in (-60, 40, 120, 200)] + [(30 * s, -15 * s, 245 * s)]
    parts.append(Tubes.chain(eso, [7 * s], TUBE_ESOPHAGUS, wall=5.5 * s, gas=0.0))
    # Pulmonary trunk and the lung trees.
    pt = [(22 * s, -42 * s, 150 * s), (24 * s, -30 * s, 118 * s), (12 * s, -14 * s, 104 * s)]
    parts.append(Tubes.chain(pt, [13 * s], TUBE_PULM_ART))
    lung = body.in_lung
    cand = np.stack([g.uniform(-150, 150, 6000) * s, g.uniform(-110, 110, 6000) * s,
                     g.uniform(0, 300, 6000) * s], axis=1)
    lung_pts = cand[lung(cand[:, 0], cand[:, 1], cand[:, 2])]
    roots_art = []
    for side, hx, hd in ((-1, -34.0, 106.0), (1, 34.0, 100.0)):
        for k in range(9):
            theta = 2 * np.pi * k / 9 + g.uniform(-0.3, 0.3)
            dirv = (side * 1.0, 0.8 * np.cos(theta), 1.1 * np.sin(theta))
            roots_art.append(((hx * s, -6 * s + g.normal(0, 3), hd * s + g.normal(0, 4)), dirv,
                              float(g.uniform(4.0, 6.5) * s)))
        # Lower-lobe arteries: large trunks running down and back to the bases.
        for k in range(4):
            dirv = (side * g.uniform(0.2, 0.7), g.uniform(-0.2, 0.8), 1.0)
            roots_art.append((((hx + side * 6) * s, 4 * s + g.normal(0, 4), (hd + 20) * s + g.normal(0, 4)),
                              dirv, float(g.uniform(4.5, 6.5) * s)))
    parts.append(Tubes.chain([(12 * s, -14 * s, 104 * s), (-30 * s, -10 * s, 106 * s)], [9.5 * s], TUBE_PULM_ART))
    parts.append(Tubes.chain([(12 * s, -14 * s, 104 * s), (36 * s, -8 * s, 100 * s)], [9 * s], TUBE_PULM_ART))
    art = _grow_tree(body, g, roots_art, lung, TUBE_PULM_ART, r_min=0.45, targets=lung_pts)
    parts.append(art)
    roots_vein = []
    for side, hx, hd in ((-1, -24.0, 145.0), (1, 26.0, 142.0)):
        for k in range(7):
            theta = 2 * np.pi * k / 7 + g.uniform(-0.3, 0.3)
            dirv = (side * 1.0, 0.6 * np.cos(theta), 1.2 * np.sin(theta))
            roots_vein.append(((hx * s, 2 * s + g.normal(0, 3), hd * s + g.normal(0, 4)), dirv,
                               float(g.uniform(3.5, 5.5) * s)))
        for k in range(3):
            dirv = (side * g.uniform(0.3, 0.8), g.uniform(-0.3, 0.6), 1.0)
            roots_vein.append((((hx + side * 8) * s, 6 * s + g.normal(0, 3), (hd + 8) * s), dirv,
                               float(g.uniform(4.0, 5.5) * s)))
    parts.append(_grow_tree(body, g, roots_vein, lung, TUBE_PULM_VEIN, r_min=0.45, targets=lung_pts))
    # Airways: trachea, main bronchi, then bronchi running beside the larger arteries.
    carina = (0, -2 * s, 78 * s)
    parts.append(Tubes.chain([(0, -12 * s, -80 * s), (0, -6 * s, 20 * s), carina], [8.5 * s],
                             TUBE_AIRWAY, wall=1.8 * s))
    parts.append(Tubes.chain([carina, (-32 * s, -2 * s, 100 * s)], [6.5 * s], TUBE_AIRWAY, wall=1.5 * s))
    parts.append(Tubes.chain([carina, (30 * s, -2 * s, 104 * s)], [6.0 * s], TUBE_AIRWAY, wall=1.5 * s))
    big = art.r >= 3.2
    if big.any():
        off = _perp(art.p1[big] - art.p0[big], g)
        rr = art.r[big] * 0.75
        shift = off * (art.r[big] + rr + 1.0)[:, None]
        n = int(big.sum())
        parts.append(Tubes(art.p0[big] + shift, art.p1[big] + shift, rr, np.full(n, TUBE_AIRWAY, np.int16),
                           0.25 * rr + 0.4, np.zeros(n)))
    # Liver: portal tree from the hilum, hepatic veins towards the IVC.
    liv = body.in_liver
    roots_portal = [((-30 * s, 8 * s, 305 * s), (-1, -0.3, -0.3), 7.5 * s),
                    ((-25 * s, 5 * s, 300 * s), (0.6, -0.6, -0.3), 5.0 * s)]
    parts.append(_grow_tree(body, g, roots_portal, liv, TUBE_PORTAL, r_min=0.9, max_gen=9,
                            length_k=(4.0, 7.0)))
    roots_hv = [((-22 * s, -2 * s, 232 * s), (-0.8, -0.3, 0.6), 6.0 * s),
                ((-18 * s, -6 * s, 230 * s), (-0.2, -0.9, 0.5), 5.0 * s),
                ((-14 * s, -4 * s, 232 * s), (0.6, -0.6, 0.5), 4.5 * s)]
    parts.append(_grow_tree(body, g, roots_hv, liv, TUBE_HEPATIC_VEIN, r_min=0.9, max_gen=8,
                            length_k=(4.0, 7.0)))
    # Colon: a fixed frame with wiggle; small bowel: random walks in the lower abdomen.
    cpath = [(-82, -5, 540), (-88, 5, 470), (-86, 0, 390), (-70, -40, 365), (-20, -62, 380),
             (30, -60, 372), (75, -30, 345), (92, 5, 360), (94, 15, 440), (86, 5, 520),
             (50, -5, 560), (10, 30, 575), (0, 52, 610), (0, 55, 650)]
    cp = np.array(cpath, float) * s
    dense = [cp[0]]
    for a_, b_ in zip(cp[:-1], cp[1:]):
        n = max(2, int(np.linalg.norm(b_ - a_) / (10 * s)))
        for t in np.linspace(0, 1, n + 1)[1:]:
            dense.append(a_ + (b_ - a_) * t + np.r_[g.normal(0, 3, 2), g.normal(0, 2)])
    dense = np.array(dense)
    nseg = len(dense) - 1
    colon = Tubes(dense[:-1], dense[1:], np.clip(g.normal(19, 3, nseg), 12, 26) * s,
                  np.full(nseg, TUBE_COLON, np.int16), np.full(nseg, 2.5), g.uniform(0.0, 0.8, nseg))
    parts.append(colon)
    walk_p0, walk_p1, walk_r, walk_gas = [], [], [], []
    def in_bowel(px, py, pd):
        return (body.in_abdomen_fat(px, py, pd) & (pd > 335 * s) & (pd < 585 * s)
                & ~body.in_kidney(px, py, pd)[0] & ~body.in_liver(px, py, pd)
                & (py < body.vertebra_y(pd) - 22 * s) & (np.abs(px) < 78 * s))
    for loop in range(7):
        for _ in range(20):
            p = np.array([g.uniform(-65, 65) * s, g.uniform(-55, 10) * s, g.uniform(380, 560) * s])
            if in_bowel(*p):
                break
        v = _unit(g.normal(size=3))
        r = float(np.clip(g.normal(11, 2), 7, 15) * s)
        gas = float(g.choice([0.0, 0.0, 0.15, 0.35, 0.7]))
        for step in range(40):
            for attempt in range(6):
                vv = _unit(v + g.normal(size=3) * (0.45 + 0.3 * attempt))
                q = p + vv * 9.0 * s
                if in_bowel(*q):
                    break
            else:
                break
            walk_p0.append(p)
            walk_p1.append(q)
            walk_r.append(r)
            walk_gas.append(gas)
            p, v = q, vv
    if walk_p0:
        n = len(walk_p0)
        parts.append(Tubes(np.array(walk_p0), np.array(walk_p1), np.array(walk_r),
                           np.full(n, TUBE_BOWEL, np.int16), np.full(n, 1.6), np.array(walk_gas)))
    body.tubes = Tubes.concat(parts)
    body.nodes = normal_nodes(body, g)
    return body


def _unit(v):
    return v / np.linalg.norm(v)


NODE_STATIONS = {
    # name: (x, y, d, spread) in patient mm (scaled by s), roughly the nodal stations.
    "paratracheal": (-14, -12, 55, 8), "aortopulmonary": (14, -12, 88, 6),
    "subcarinal": (0, 8, 96, 6), "hilar_r": (-28, 4, 112, 5), "hilar_l": (28, 2, 106, 5),
    "prevascular": (0, -45, 70, 10), "paraaortic": (16, None, 390, 25),
    "aortocaval": (-6, None, 360, 12), "mesenteric": (0, -20, 420, 45), "iliac_r": (-55, 0, 520, 15),
    "iliac_l": (55, 0, 520, 15), "inguinal_r": (-95, -40, 640, 12), "inguinal_l": (95, -40, 640, 12),
    "axillary_r": (-138, -10, 55, 8), "axillary_l": (138, -10, 55, 8), "retrocrural": (12, None, 260, 8),
}
STATION_COARSE = {
    "paratracheal": 3, "aortopulmonary": 3, "subcarinal": 3, "hilar_r": 3, "hilar_l": 3,
    "prevascular": 3, "paraaortic": 2, "aortocaval": 2, "mesenteric": 2, "iliac_r": 8, "iliac_l": 8,
    "inguinal_r": 8, "inguinal_l": 8, "axillary_r": 7, "axillary_l": 7, "retrocrural": 2,
}


def station_point(body: Body, name: str, g) -> np.ndarray:
    """A random point (x, y, d) mm of a nodal station."""
    x, y, d, spread = NODE_STATIONS[name]
    s = body.s
    d = (d + g.normal(0, spread * 0.5)) * s
    if y is None:
        y = float(body.vertebra_y(d)) - 26 * s
    else:
        y = y * s
    return np.array([x * s + g.normal(0, spread), y + g.normal(0, spread * 0.4), d])


def station_points(body: Body, names, g) -> np.ndarray:
    """Vectorised :func:`station_point`: [n, 3] random points of the named stations."""
    s = body.s
    st = np.array([NODE_STATIONS[n][:2] + (NODE_STATIONS[n][2], NODE_STATIONS[n][3]) for n in names],
                  dtype=object)
    n = len(names)
    x = np.array([v[0] for v in st], float)
    y = np.array([np.nan if v[1] is None else v[1] for v in st], float)
    dd = np.array([v[2] for v in st], float)
    spread = np.array([v[3] for v in st], float)
    d = (dd + g.normal(0, 1, n) * spread * 0.5) * s
    yv = body.vertebra_y(d) - 26 * s
    yy = np.where(np.isnan(y), yv, y * s)
    return np.stack([x * s + g.normal(0, 1, n) * spread, yy + g.normal(0, 1, n) * spread * 0.4, d], axis=1)


def normal_nodes(body: Body, g) -> np.ndarray:
    """Normal-size lymph nodes (short axis 3-8 mm) at the nodal stations: [K, 7] x, y, d, a, b, c, angle."""
    rows = []
    for name in NODE_STATIONS:
        for _ in range(int(g.integers(1, 4))):
            p = station_point(body, name, g)
            a = g.uniform(2.0, 4.0)
            rows.append([*p, a, a * g.uniform(1.0, 1.8), a * g.uniform(1.0, 2.0), g.uniform(0, np.pi)])
    return np.array(rows, float)
