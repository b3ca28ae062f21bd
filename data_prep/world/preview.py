"""PNG mosaics of the written world with every lesion outlined (``--preview``).

``preview/deeplesion.png``: key slices of DeepLesion sub-volumes (window from DICOM_windows) with
every lesion crossing the slice outlined: marked ones (rows of DL_info.csv) in red, unmarked ones
in yellow. ``preview/luna16.png``, ``lits.png``, ``nihln.png``: slices through lesions of the
single-type sets, the dataset's own (labeled) lesions in red, other (unlabeled) lesions in yellow.
The outlines come from the generator's geometry, the pixels from the files as written.
"""

from __future__ import annotations

import csv
import glob
import os
import pathlib

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from data_prep.world import cohort as C
from data_prep.world import lesions as L
from data_prep.world import singles as SG
from data_prep.world.presets import Preset

TILE = 256
RED = (255, 40, 40)
YELLOW = (255, 220, 0)


def _window(hu, lo, hi):
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _outline(draw, cx, cy, a, b, angle, scale, color):
    t = np.linspace(0, 2 * np.pi, 48)
    ca, sa = np.cos(angle), np.sin(angle)
    xs = cx + (a * np.cos(t) * ca - b * np.sin(t) * sa)
    ys = cy + (a * np.cos(t) * sa + b * np.sin(t) * ca)
    draw.line([(x * scale, y * scale) for x, y in zip(xs, ys)] + [(xs[0] * scale, ys[0] * scale)],
              fill=color, width=1)


def _tile(gray: np.ndarray, outlines) -> Image.Image:
    """gray: [H, W] uint8; outlines: (cx, cy, a, b, angle, color) in pixels of gray."""
    scale = TILE / max(gray.shape)
    im = Image.fromarray(gray).convert("RGB").resize((TILE, TILE), Image.BILINEAR)
    dr = ImageDraw.Draw(im)
    for cx, cy, a, b, ang, col in outlines:
        _outline(dr, cx + 0.5, cy + 0.5, a, b, ang, scale, col)
    return im


def _mosaic(tiles, path, cols=4):
    if not tiles:
        return
    rows = (len(tiles) + cols - 1) // cols
    m = Image.new("RGB", (cols * TILE, rows * TILE))
    for i, t in enumerate(tiles):
        m.paste(t, ((i % cols) * TILE, (i // cols) * TILE))
    m.save(path)


def _ellipse_px(les: L.Lesion, k: int, d: float, x0: float, y0: float, px: float):
    cs = L.cross_section(les.centre, les.semi_at(k), les.angle, d)
    if cs is None:
        return None
    cx, cy, a, b = cs
    return (cx - x0) / px, (cy - y0) / px, a / px, b / px, les.angle


def deeplesion_tiles(world: pathlib.Path, seed: int, preset: Preset, max_tiles: int = 16):
    rows = list(csv.DictReader(open(world / "DeepLesion" / "DL_info.csv", newline="", encoding="utf-8")))
    plan = C.plan_deeplesion(seed, preset)
    tiles = []
    seen = set()
    cache = {}
    for r in rows:
        if len(tiles) >= max_tiles:
            break
        if r["File_name"] in seen:
            continue
        seen.add(r["File_name"])
        pidx, st, se_id, key = (int(r[k]) for k in ("Patient_index", "Study_index", "Series_ID", "Key_slice_index"))
        if pidx not in cache:
            cache = {pidx: C.make_dl_patient(seed, preset, plan, pidx)}
        p = cache[pidx]
        se = p.series[st - 1][se_id - 1]
        png = world / "DeepLesion" / "Images_png" / f"{pidx:06d}_{st:02d}_{se_id:02d}" / f"{key:03d}.png"
        hu = np.asarray(Image.open(png), dtype=np.int32) - 32768
        lo, hi = (float(v) for v in r["DICOM_windows"].split(","))
        x0, y0 = se.xy0(p.body)
        d = float(se.d_of(key))
        marked = {m.lesion.lesion_id for m in p.marks if m.study == st and m.series.series == se_id and m.key == key}
        outl = []
        for les in p.lesions:
            if les.scale[st - 1] <= 0:
                continue
            e = _ellipse_px(les, st - 1, d, x0, y0, se.proto["px"])
            if e is not None:
                outl.append((*e, RED if les.lesion_id in marked else YELLOW))
        tiles.append(_tile(_window(hu, lo, hi), outl))
    return tiles


def _single_tiles(scan: SG.SingleScan, vol_zyx: np.ndarray, lo: float, hi: float, max_tiles=2):
    tiles = []
    for les, lab in zip(scan.lesions, scan.labeled):
        if len(tiles) >= max_tiles:
            break
        ci = scan.canonical_index(les.centre)
        k = int(round(ci[2]))
        if not 0 <= k < vol_zyx.shape[0]:
            continue
        d = float(scan.grid.d[k])
        outl = []
        for o, olab in zip(scan.lesions, scan.labeled):
            e = _ellipse_px(o, 0, d, scan.grid.x0, scan.grid.y0, scan.grid.px)
            if e is not None:
                outl.append((*e, RED if olab else YELLOW))
        tiles.append(_tile(_window(vol_zyx[k], lo, hi), outl))
    return tiles


def write_previews(world, seed: int, preset: Preset, progress: bool = False) -> None:
    world = pathlib.Path(world)
    outd = world / "preview"
    outd.mkdir(exist_ok=True)
    _mosaic(deeplesion_tiles(world, seed, preset), outd / "deeplesion.png")
    tiles = []
    for i in range(min(preset.luna_scans, 6)):
        scan = SG.make_luna(seed, preset, i)
        f = glob.glob(str(world / "LUNA16" / f"subset{scan.subset}" / f"{scan.name}.mhd"))
        if f:
            tiles += _single_tiles(scan, sitk.GetArrayFromImage(sitk.ReadImage(f[0])), -1350, 150)
    _mosaic(tiles[:12], outd / "luna16.png")
    tiles = []
    for i in range(min(preset.lits_volumes, 6)):
        scan = SG.make_lits(seed, preset, i)
        img = sitk.ReadImage(str(world / "LiTS" / f"volume-{i}.nii"))
        # Back to the canonical (LPS, inferior-first) order for display.
        can = sitk.DICOMOrient(img, "LPS")
        vol = sitk.GetArrayFromImage(can)
        if can.GetDirection()[8] < 0:
            vol = vol[::-1]
        tiles += _single_tiles(scan, vol, -160, 240)
    _mosaic(tiles[:12], outd / "lits.png")
    tiles = []
    for i in range(min(preset.nihln_med + preset.nihln_abd, 6)):
        scan = SG.make_nihln(seed, preset, i)
        dirs = glob.glob(str(world / "NIH-LN" / scan.name / "*" / "*"))
        if not dirs:
            continue
        r = sitk.ImageSeriesReader()
        r.SetFileNames(sorted(glob.glob(os.path.join(dirs[0], "*.dcm"))))
        tiles += _single_tiles(scan, sitk.GetArrayFromImage(r.Execute()), -160, 240)
    _mosaic(tiles[:12], outd / "nihln.png")
