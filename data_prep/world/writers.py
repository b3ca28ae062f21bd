"""Writers, one per on-disk format of docs/formats.md, plus the truth tables.

Each ``*_unit`` function produces one patient or scan: it renders and writes its images under the
output folder (unless ``tables_only``) and returns its table rows, which the caller appends in
order to the dataset-wide CSV files. Units depend only on (seed, preset, index), so they can run in
worker processes in any order and the output bytes stay the same.
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
from PIL import Image

from data_prep.world import anatomy as A
from data_prep.world import cohort as C
from data_prep.world import lesions as L
from data_prep.world import rng as wrng
from data_prep.world import scanner as S
from data_prep.world import singles as SG
from data_prep.world.presets import Preset
from uld_jax.core import COARSE_TYPE_ORGAN, DEEPLESION_HU_OFFSET, GATED_ORGANS

DL_COLUMNS = ["File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index",
              "Measurement_coordinates", "Bounding_boxes", "Lesion_diameters_Pixel_",
              "Normalized_lesion_location", "Coarse_lesion_type", "Possibly_noisy", "Slice_range",
              "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender", "Patient_age",
              "Train_Val_Test"]
ORGAN_SCORE_COLUMNS = ["row", "File_name", "lung", "liver", "lymph_node"]
DL_TRUTH_COLUMNS = ["subvolume", "x1", "y1", "z1", "x2", "y2", "z2", "lesion_id", "patient", "study",
                    "series", "split", "lesion_type", "coarse_type", "organ", "long_diameter_mm",
                    "marked", "dl_row"]
SINGLE_TRUTH_COLUMNS = ["scan", "lesion_id", "lesion_type", "organ", "labeled", "i1", "j1", "k1",
                        "i2", "j2", "k2", "world_x", "world_y", "world_z", "long_diameter_mm",
                        "short_diameter_mm"]


def fmt(v: float) -> str:
    """Numbers as the real DL_info.csv writes them: 6 significant digits, no trailing zeros."""
    v = float(v)
    if v == 0:
        v = 0.0  # no "-0"
    return f"{v:.6g}"


def fmt_list(vals) -> str:
    return ", ".join(fmt(v) for v in vals)


def write_png16(path: str, hu: np.ndarray) -> None:
    """16-bit grayscale PNG with value = HU + 32768 (DeepLesion)."""
    v = np.clip(np.rint(hu) + DEEPLESION_HU_OFFSET, 0, 65535).astype(np.uint16)
    Image.fromarray(v).save(path, format="PNG", compress_level=1)


def _to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


# ------------------------------------------------------------------------------------------------
# DeepLesion
# ------------------------------------------------------------------------------------------------
def _organ_scores(g, les: L.Lesion) -> list[float]:
    """Noisy per-organ probabilities (lung, liver, lymph node) like a lesion classifier's output."""
    target = [les.ltype.gated == o for o in GATED_ORGANS]
    out = []
    for o, t in zip(GATED_ORGANS, target):
        v = g.beta(9, 2) if t else g.beta(1, 14)
        if not t and o == "lung" and les.type == "lymph_node_mediastinal" and g.random() < 0.3:
            v = g.beta(2, 4)
        if not t and o == "liver" and les.type in ("kidney_lesion", "adrenal_nodule") and g.random() < 0.25:
            v = g.beta(2, 5)
        if not t and o == "lymph_node" and les.type in ("abdominal_mass", "soft_tissue_lesion") and g.random() < 0.3:
            v = g.beta(2, 4)
        out.append(float(v))
    return out


def dl_patient_unit(seed: int, preset: Preset, plan: C.DLPlan, pidx: int, out: str | None,
                    tables_only: bool):
    """One DeepLesion patient: writes its sub-volume PNGs; returns (DL rows, organ score rows
    (without the global row index), truth {split: {name: boxes}}, truth csv rows, per-mark info for
    stats/preview)."""
    p = C.make_dl_patient(seed, preset, plan, pidx)
    g = wrng.stream(seed, "dl-rows", pidx)
    split_code = C.SPLIT_CODE[p.split]
    rows, scores, info = [], [], []
    for m in p.marks:
        se = m.series
        rec = m.recist
        long_px = float(np.linalg.norm(rec[0] - rec[1]))
        short_px = float(np.linalg.norm(rec[2] - rec[3]))
        box = [rec[:, 0].min() - 5, rec[:, 1].min() - 5, rec[:, 0].max() + 5, rec[:, 1].max() + 5]
        d_key = float(se.d_of(m.key))
        ba, bb = p.body.body_ab(d_key)
        nl = [np.clip((m.lesion.centre[0] + ba) / (2 * ba), 0, 1),
              np.clip((m.lesion.centre[1] + bb) / (bb * 1.93), 0, 1),
              np.clip((m.lesion.centre[2] / p.body.s + 60.0) / 760.0 + g.normal(0, 0.01), 0, 1)]
        px = se.proto["px"]
        fname = f"{p.index:06d}_{se.study:02d}_{se.series:02d}_{m.key:03d}.png"
        coarse = m.lesion.ltype.coarse if p.split != "train" else -1
        rows.append([
            fname, str(p.index), str(se.study), str(se.series), str(m.key),
            fmt_list(rec.reshape(-1)), fmt_list(box), fmt_list([long_px, short_px]), fmt_list(nl),
            str(coarse), str(m.noisy), f"{m.subvolume.k0}, {m.subvolume.k1}",
            fmt_list([px, px, se.interval]), f"{se.matrix}, {se.matrix}", fmt_list(m.window),
            p.sex, str(p.ages[se.study - 1]), str(split_code)])
        scores.append([fname] + [f"{v:.4f}" for v in _organ_scores(g, m.lesion)])
        info.append(dict(long_mm=long_px * px, short_mm=short_px * px, px=px, interval=se.interval,
                         coarse=m.lesion.ltype.coarse, type=m.lesion.type, lesion_id=m.lesion.lesion_id,
                         key=(p.index, se.study, se.series, m.key), split=p.split))
    truth: dict[str, dict] = {"train": {}, "val": {}, "test": {}}
    truth_rows = []
    mark_of = {}
    for j, m in enumerate(p.marks):
        mark_of[(m.subvolume.name, m.lesion.lesion_id)] = j
    for sv in p.subvolumes:
        tr = C.subvolume_truth(p, sv)
        boxes = np.array([b for _, b in tr], float).reshape(-1, 6)
        truth[p.split][sv.name] = boxes
        for les, b in tr:
            j = mark_of.get((sv.name, les.lesion_id), -1)
            truth_rows.append([sv.name, *[str(int(v)) for v in b], str(les.lesion_id), str(p.index),
                               str(sv.series.study), str(sv.series.series), p.split, les.type,
                               str(les.ltype.coarse), les.ltype.organ,
                               f"{les.long_mm(sv.series.study - 1):.2f}", str(int(j >= 0)), str(j)])
    if not tables_only and out is not None:
        A.grow_tubes(p.body, seed)
        for sv in p.subvolumes:
            se = sv.series
            k = se.study - 1
            grid = se.grid(p.body, sv.k0, sv.k1)
            items = [les.render_item(k, se.proto["phase"]) for les in p.lesions if les.scale[k] > 0]
            vol = S.render(p.body, grid, seed, ("dl", p.index, se.study, se.series, sv.k0), items)
            folder = os.path.join(out, "DeepLesion", "Images_png", sv.folder)
            os.makedirs(folder, exist_ok=True)
            for i, kk in enumerate(range(sv.k0, sv.k1 + 1)):
                write_png16(os.path.join(folder, f"{kk:03d}.png"), vol[i])
    return rows, scores, truth, truth_rows, info, [(sv.name, p.split) for sv in p.subvolumes]


# ------------------------------------------------------------------------------------------------
# Single-type sets: shared helpers.
# ------------------------------------------------------------------------------------------------
def _render_single(scan: SG.SingleScan, seed: int) -> np.ndarray:
    A.grow_tubes(scan.body, seed)
    items = [les.render_item(0, scan.grid.phase) for les in scan.lesions]
    return S.render(scan.body, scan.grid, seed, (scan.dataset, scan.index), items)


def _single_truth_rows(scan: SG.SingleScan, to_file_index) -> list:
    rows = []
    shape = (len(scan.grid.d), scan.grid.ny, scan.grid.nx)
    for les, lab in zip(scan.lesions, scan.labeled):
        sl, inside = SG.lesion_mask(scan, les, shape)
        if inside.size == 0 or not inside.any():
            continue
        kk, jj, ii = np.nonzero(inside)
        lo = np.array([ii.min() + sl[2].start, jj.min() + sl[1].start, kk.min() + sl[0].start])
        hi = np.array([ii.max() + sl[2].start, jj.max() + sl[1].start, kk.max() + sl[0].start])
        a, b = to_file_index(lo), to_file_index(hi)
        f1, f2 = np.minimum(a, b), np.maximum(a, b)
        w = scan.world(les.centre)
        semi = les.semi_at(0)
        rows.append([scan.name, str(les.lesion_id), les.type, les.ltype.organ, str(int(lab)),
                     *[str(int(v)) for v in f1], *[str(int(v)) for v in f2],
                     *[f"{v:.4f}" for v in w], f"{2 * semi[0]:.3f}", f"{2 * semi[1]:.3f}"])
    return rows


def _g(v: float) -> str:
    return f"{float(v):.15g}"


# ------------------------------------------------------------------------------------------------
# LUNA16
# ------------------------------------------------------------------------------------------------
def write_mhd(path_mhd: str, vol_zyx: np.ndarray, spacing_xyz, offset_xyz) -> None:
    """MetaImage header + raw int16 little-endian data (the LUNA16 release's header fields)."""
    raw_name = os.path.basename(path_mhd)[:-4] + ".raw"
    nz, ny, nx = vol_zyx.shape
    header = "\n".join([
        "ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        "CompressedData = False", "TransformMatrix = 1 0 0 0 1 0 0 0 1",
        "Offset = " + " ".join(_g(v) for v in offset_xyz), "CenterOfRotation = 0 0 0",
        "AnatomicalOrientation = RAI", "ElementSpacing = " + " ".join(_g(v) for v in spacing_xyz),
        f"DimSize = {nx} {ny} {nz}", "ElementType = MET_SHORT", f"ElementDataFile = {raw_name}", ""])
    with open(path_mhd, "w", newline="\n", encoding="utf-8") as f:
        f.write(header)
    _to_int16(vol_zyx).astype("<i2").tofile(os.path.join(os.path.dirname(path_mhd), raw_name))


def luna_unit(seed: int, preset: Preset, i: int, out: str | None, tables_only: bool):
    scan = SG.make_luna(seed, preset, i)
    ann, exc = [], []
    for les, lab in zip(scan.lesions, scan.labeled):
        if lab:
            w = scan.world(les.centre)
            ann.append([scan.name, *[f"{v:.10g}" for v in w], f"{2 * les.semi[0]:.10g}"])
    for x, y, z, dia in scan.excluded:
        exc.append([scan.name, f"{x:.10g}", f"{y:.10g}", f"{z:.10g}", f"{dia:.10g}" if dia > 0 else "-1"])
    truth = _single_truth_rows(scan, lambda ijk: ijk)
    if not tables_only and out is not None:
        vol = _render_single(scan, seed)
        folder = os.path.join(out, "LUNA16", f"subset{scan.subset}")
        os.makedirs(folder, exist_ok=True)
        write_mhd(os.path.join(folder, scan.name + ".mhd"), vol, scan.spacing, scan.origin)
    return scan.name, ann, exc, truth


# ------------------------------------------------------------------------------------------------
# LiTS
# ------------------------------------------------------------------------------------------------
def lits_orientation(scan: SG.SingleScan):
    """(to_file_index function, direction [3, 3] columns = world axes of file axes, spacing, origin,
    array transform canonical (z, y, x) -> file (z', y', x'))."""
    perm, signs = SG.LITS_ORIENTATIONS[scan.orient]
    n_ijk = np.array([scan.grid.nx, scan.grid.ny, len(scan.grid.d)])
    sp = np.array(scan.spacing)
    direction = np.zeros((3, 3))
    corner = np.zeros(3)
    for m in range(3):
        direction[perm[m], m] = signs[m]
        corner[perm[m]] = 0 if signs[m] > 0 else n_ijk[perm[m]] - 1
    origin = np.array(scan.origin) + corner * sp
    file_sp = sp[list(perm)]

    def to_file_index(ijk):
        ijk = np.asarray(ijk)
        return np.array([(ijk[perm[m]] if signs[m] > 0 else n_ijk[perm[m]] - 1 - ijk[perm[m]])
                         for m in range(3)])

    def to_file_array(vol_zyx):
        a = vol_zyx.transpose(2, 1, 0).transpose(perm)      # file index order (i', j', k')
        for m in range(3):
            if signs[m] < 0:
                a = a[(slice(None),) * m + (slice(None, None, -1),)]
        return np.ascontiguousarray(a.transpose(2, 1, 0))

    return to_file_index, direction, file_sp, origin, to_file_array


def _sitk_image(arr_zyx, spacing, origin, direction=np.eye(3)):
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in np.asarray(direction).reshape(-1)])
    return img


def lits_unit(seed: int, preset: Preset, i: int, out: str | None, tables_only: bool,
              orient: int | None = None):
    scan = SG.make_lits(seed, preset, i, orient)
    to_file_index, direction, file_sp, origin, to_file_array = lits_orientation(scan)
    truth = _single_truth_rows(scan, to_file_index)
    if not tables_only and out is not None:
        vol = _render_single(scan, seed)
        shape = vol.shape
        seg = np.zeros(shape, np.uint8)
        X, Y = np.meshgrid(scan.grid.xs(), scan.grid.ys())
        for k, d in enumerate(scan.grid.d):
            seg[k][scan.body.in_liver(X, Y, float(d)) & scan.body.in_abdomen_fat(X, Y, float(d))] = 1
        for les, lab in zip(scan.lesions, scan.labeled):
            if lab:
                sl, inside = SG.lesion_mask(scan, les, shape)
                if inside.size:
                    seg[sl][inside] = 2
        folder = os.path.join(out, "LiTS")
        os.makedirs(folder, exist_ok=True)
        sitk.WriteImage(_sitk_image(to_file_array(_to_int16(vol)), file_sp, origin, direction),
                        os.path.join(folder, f"volume-{i}.nii"))
        sitk.WriteImage(_sitk_image(to_file_array(seg), file_sp, origin, direction),
                        os.path.join(folder, f"segmentation-{i}.nii"))
    return scan.name, truth


# ------------------------------------------------------------------------------------------------
# NIH-LN
# ------------------------------------------------------------------------------------------------
def nihln_unit(seed: int, preset: Preset, i: int, out: str | None, tables_only: bool):
    scan = SG.make_nihln(seed, preset, i)
    truth = _single_truth_rows(scan, lambda ijk: ijk)
    nodes = [les for les, lab in zip(scan.lesions, scan.labeled) if lab]
    if not tables_only and out is not None:
        vol = _to_int16(_render_single(scan, seed))
        ident = scan.name
        kind = "mediastinallymphnodes" if ident.startswith("MED") else "abdominallymphnodes"
        g = wrng.stream(seed, "nihln-files", i)
        date = f"{int(g.integers(1, 13)):02d}-{int(g.integers(1, 29)):02d}-{int(g.integers(1995, 2012))}"
        study = f"{date}-{ident.replace('_', '')}-{kind}-{int(g.integers(10000, 99999))}"
        series = f"{kind}-{int(g.integers(10000, 99999))}"
        folder = os.path.join(out, "NIH-LN", ident, study, series)
        os.makedirs(folder, exist_ok=True)
        px = scan.grid.px
        sp = scan.spacing
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        ymd = date[6:] + date[0:2] + date[3:5]
        for k in range(vol.shape[0]):
            z = scan.origin[2] + k * sp[2]
            img = sitk.GetImageFromArray(vol[k])
            img.SetSpacing((px, px))
            img.SetOrigin((scan.grid.x0, scan.grid.y0))
            tags = {
                "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{scan.uids['series']}.{k + 1}", "0008|0020": ymd, "0008|0060": "CT",
                "0008|103e": kind, "0010|0010": ident, "0010|0020": ident,
                "0018|0050": _g(sp[2]), "0020|000d": scan.uids["study"],
                "0020|000e": scan.uids["series"], "0020|0052": scan.uids["frame"],
                "0020|0011": "2", "0020|0013": str(k + 1),
                "0020|0032": "\\".join(_g(v) for v in (scan.grid.x0, scan.grid.y0, z)),
                "0020|0037": "1\\0\\0\\0\\1\\0", "0020|1041": _g(z),
                "0028|0030": f"{_g(px)}\\{_g(px)}", "0028|1052": "-1024", "0028|1053": "1",
                "0028|1054": "HU",
            }
            for key, val in tags.items():
                img.SetMetaData(key, val)
            writer.SetFileName(os.path.join(folder, f"{k:06d}.dcm"))
            writer.Execute(img)
        ann = os.path.join(out, "NIH-LN", "MED_ABD_LYMPH_ANNOTATIONS", ident)
        os.makedirs(ann, exist_ok=True)
        idx_lines, phys_lines, size_lines = [], [], []
        mask = np.zeros(vol.shape, np.uint8)
        for n, les in enumerate(nodes, start=1):
            ci = scan.canonical_index(les.centre)
            ijk = np.rint(ci).astype(int)
            w = scan.world(les.centre)
            idx_lines.append(f"{ijk[0]} {ijk[1]} {ijk[2]}")
            phys_lines.append(" ".join(f"{v:.4f}" for v in w))
            size_lines.append(f"{2 * les.semi[1]:.2f} {2 * les.semi[0]:.2f}")
            sl, inside = SG.lesion_mask(scan, les, vol.shape)
            if inside.size:
                sub = mask[sl]
                sub[inside & (sub == 0)] = n
        for suffix, lines in (("indices", idx_lines), ("physicalPoints", phys_lines), ("sizes", size_lines)):
            with open(os.path.join(ann, f"{ident}_lymphnodes_{suffix}.txt"), "w", newline="\n", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
        mdir = os.path.join(out, "NIH-LN", "MED_ABD_LYMPH_MASKS", ident)
        os.makedirs(mdir, exist_ok=True)
        sitk.WriteImage(_sitk_image(mask, sp, scan.origin), os.path.join(mdir, f"{ident}_mask.nii.gz"),
                        True)
    return scan.name, truth
