"""Preprocessing of CT volumes and their annotations (DESIGN.md section 3). Pure numpy functions.

Coordinate conventions (see :mod:`uld_jax.core`):

* arrays are ``[z, y, x]``; a 2D box is ``[y1, x1, y2, x2]`` in *continuous* pixel coordinates,
  pixel (r, c) covering ``[r, r+1) x [c, c+1)``, so the centre of pixel index ``i`` is ``i + 0.5``;
* points (RECIST endpoints, sphere centres) use the same continuous coordinates, ``(x, y)`` order
  for RECIST as in DeepLesion, ``(y, x)`` elsewhere (stated per function);
* slice positions are in mm along the patient axis and increase with the slice index.

The geometry of one preprocessing run is a :class:`Resampling` plan: a crop of the source slice
grid (black-border clipping), an in-plane scale to ``pixel_mm`` and a set of output slice positions
``slice_mm`` apart, at which the source is linearly interpolated between its two nearest slices
(as MULAN interpolates its context slices). The same plan maps the pixels (linear), label volumes
(nearest) and annotations (exact affine map of continuous coordinates), so annotations land on the
pixels they describe.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
from scipy import ndimage

from uld_jax.core import HU_WINDOW, MAX_IMAGE_SIDE, TARGET_PIXEL_MM, TARGET_SLICE_MM


# --------------------------------------------------------------------------------------------------
# Intensities.
# --------------------------------------------------------------------------------------------------
def window_hu(hu: np.ndarray, lo: float = HU_WINDOW[0], hi: float = HU_WINDOW[1]) -> np.ndarray:
    """HU -> [0, 255] float32 by a linear window ``lo..hi`` (default -1024..3071 HU), clipped.

    ``hu``: any shape, HU. Returns the same shape, float32.
    """
    x = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(x, 0.0, 255.0)


def to_int16_hu(x: np.ndarray) -> np.ndarray:
    """Rounds HU values to int16, saturating at the int16 range."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64)), -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# Black-border clipping.
# --------------------------------------------------------------------------------------------------
def body_crop(hu: np.ndarray, threshold_hu: float = -500.0, margin: int = 2,
              opening: int = 7) -> tuple[int, int, int, int]:
    """The in-plane range of pixels that are not black border, over all slices of a volume.

    ``hu``: [Z, H, W] or [H, W] HU. A pixel is foreground when above ``threshold_hu`` (air, the
    padding outside the reconstruction circle and the -1024 background are below it). As in
    MULAN's clipping, an ``opening`` x ``opening`` binary opening (of the slice-wise maximum
    projection) removes isolated specks and thin structures such as the table's edges. The
    returned half-open range is widened by ``margin`` pixels and clipped to the image.

    Returns ``(y0, y1, x0, x1)``: rows ``y0..y1-1`` and columns ``x0..x1-1`` to keep; the whole
    image when no pixel is foreground.
    """
    hu = np.asarray(hu)
    proj = hu if hu.ndim == 2 else hu.max(axis=0)
    h, w = proj.shape
    fg = ndimage.binary_opening(proj > threshold_hu, structure=np.ones((opening, opening), bool))
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return 0, h, 0, w
    return (max(0, int(rows[0]) - margin), min(h, int(rows[-1]) + 1 + margin),
            max(0, int(cols[0]) - margin), min(w, int(cols[-1]) + 1 + margin))


# --------------------------------------------------------------------------------------------------
# The resampling plan.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Resampling:
    """Geometry of a preprocessing run from a source volume to the preprocessed slices.

    Attributes:
      crop_yx: (y0, x0) top-left of the crop in source pixels.
      crop_hw: (h, w) size of the crop in source pixels.
      scale_yx: (sy, sx) output pixels per source pixel (source spacing / output pixel size).
      out_hw: (H, W) output slice size in pixels.
      src_z: [Zs] source slice positions in mm (strictly increasing).
      out_z: [Z] output slice positions in mm, ``slice_mm`` apart, inside ``src_z[0]..src_z[-1]``.
      pixel_mm: output pixel size in mm (``pixel_mm`` requested, larger when capped by max_side).
      slice_mm: output slice distance in mm.

    A source continuous coordinate ``u`` (pixels) maps to ``(u - crop) * scale`` in the output.
    """

    crop_yx: tuple[int, int]
    crop_hw: tuple[int, int]
    scale_yx: tuple[float, float]
    out_hw: tuple[int, int]
    src_z: np.ndarray
    out_z: np.ndarray
    pixel_mm: float
    slice_mm: float

    # --- annotations -----------------------------------------------------------------------------
    def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """[..., 4] source boxes ``[y1, x1, y2, x2]`` (continuous pixels) -> output boxes."""
        b = np.asarray(boxes, dtype=np.float64)
        off = np.array([self.crop_yx[0], self.crop_yx[1]] * 2, np.float64)
        sc = np.array([self.scale_yx[0], self.scale_yx[1]] * 2, np.float64)
        return (b - off) * sc

    def map_points_yx(self, pts: np.ndarray) -> np.ndarray:
        """[..., 2] source points ``(y, x)`` (continuous pixels) -> output points."""
        p = np.asarray(pts, dtype=np.float64)
        return (p - np.asarray(self.crop_yx, np.float64)) * np.asarray(self.scale_yx, np.float64)

    def map_points_xy(self, pts: np.ndarray) -> np.ndarray:
        """[..., 2] source points ``(x, y)`` (continuous pixels) -> output points ``(x, y)``."""
        p = np.asarray(pts, dtype=np.float64)
        return (p - np.asarray(self.crop_yx[::-1], np.float64)) * np.asarray(self.scale_yx[::-1], np.float64)

    def unmap_points_yx(self, pts: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`map_points_yx`: [..., 2] output points (y, x) -> source points."""
        p = np.asarray(pts, dtype=np.float64)
        return p / np.asarray(self.scale_yx, np.float64) + np.asarray(self.crop_yx, np.float64)

    def unmap_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`map_boxes`: [..., 4] output boxes -> source boxes (continuous pixels)."""
        b = np.asarray(boxes, dtype=np.float64)
        off = np.array([self.crop_yx[0], self.crop_yx[1]] * 2, np.float64)
        sc = np.array([self.scale_yx[0], self.scale_yx[1]] * 2, np.float64)
        return b / sc + off

    def nearest_slice(self, z_mm: float) -> int:
        """Index of the output slice nearest to position ``z_mm`` (mm)."""
        return int(np.argmin(np.abs(self.out_z - z_mm)))

    def clip_box(self, box: np.ndarray) -> np.ndarray:
        """Clips an output box ``[y1, x1, y2, x2]`` to the output image."""
        h, w = self.out_hw
        return np.clip(np.asarray(box, np.float64), 0.0, [h, w, h, w])


def slice_positions(first_mm: float, last_mm: float, slice_mm: float, anchor_mm: float | None = None) -> np.ndarray:
    """Output slice positions ``slice_mm`` apart covering ``[first_mm, last_mm]`` (mm).

    With ``anchor_mm`` (e.g. a key slice) the grid contains that position exactly; otherwise it
    starts at ``first_mm``. Positions outside the source range are dropped (no extrapolation).
    Returns [Z] float64, increasing; at least one position.
    """
    if last_mm < first_mm:
        raise ValueError(f"empty slice range {first_mm}..{last_mm} mm")
    a = first_mm if anchor_mm is None else float(anchor_mm)
    eps = 1e-6 * max(1.0, slice_mm)
    n_lo = int(np.floor((a - first_mm) / slice_mm + eps))
    n_hi = int(np.floor((last_mm - a) / slice_mm + eps))
    z = a + slice_mm * np.arange(-n_lo, n_hi + 1, dtype=np.float64)
    return z if z.size else np.array([a], np.float64)


def plan_resampling(src_hw: tuple[int, int], spacing_yx: tuple[float, float], src_z: np.ndarray,
                    crop: tuple[int, int, int, int] | None = None, *, pixel_mm: float = TARGET_PIXEL_MM,
                    slice_mm: float = TARGET_SLICE_MM, max_side: int | None = MAX_IMAGE_SIDE,
                    z_anchor_mm: float | None = None) -> Resampling:
    """Plans crop + resampling of a volume.

    Args:
      src_hw: (H, W) source slice size, pixels.
      spacing_yx: source pixel size (row, column) in mm.
      src_z: [Zs] source slice positions in mm, strictly increasing.
      crop: ``(y0, y1, x0, x1)`` half-open crop in source pixels (see :func:`body_crop`), or None.
      pixel_mm: output pixel size in mm; enlarged so that the long side is at most ``max_side``.
      slice_mm: output slice distance in mm.
      z_anchor_mm: a position the output grid must contain exactly (a key slice).
    """
    src_z = np.asarray(src_z, dtype=np.float64)
    if src_z.ndim != 1 or src_z.size == 0 or np.any(np.diff(src_z) <= 0):
        raise ValueError("source slice positions must be a non-empty strictly increasing sequence")
    if min(spacing_yx) <= 0 or pixel_mm <= 0 or slice_mm <= 0:
        raise ValueError(f"spacings must be positive (spacing {spacing_yx}, pixel_mm {pixel_mm}, "
                         f"slice_mm {slice_mm})")
    h, w = src_hw
    y0, y1, x0, x1 = crop if crop is not None else (0, h, 0, w)
    ch, cw = y1 - y0, x1 - x0
    if ch <= 0 or cw <= 0:
        raise ValueError(f"empty crop {crop} of a {src_hw} image")
    px = float(pixel_mm)
    if max_side is not None:
        long_mm = max(ch * spacing_yx[0], cw * spacing_yx[1])
        px = max(px, long_mm / max_side)
    sy, sx = spacing_yx[0] / px, spacing_yx[1] / px
    out_hw = (max(1, int(round(ch * sy))), max(1, int(round(cw * sx))))
    if max_side is not None:
        out_hw = (min(out_hw[0], max_side), min(out_hw[1], max_side))
    out_z = slice_positions(src_z[0], src_z[-1], slice_mm, z_anchor_mm)
    return Resampling(crop_yx=(y0, x0), crop_hw=(ch, cw), scale_yx=(sy, sx), out_hw=out_hw,
                      src_z=src_z, out_z=out_z, pixel_mm=px, slice_mm=float(slice_mm))


def _linear_taps(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-tap linear interpolation at continuous *index* coordinates (index i = sample i) of an
    axis of length ``n``, replicating the edge samples. Returns (i0, i1, w1)."""
    c = np.clip(np.asarray(coords, dtype=np.float64), 0.0, n - 1.0)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (c - i0)


def _inplane_index_coords(p: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """Source index coordinates (pixel centre = integer) of the output pixel centres."""
    j = np.arange(p.out_hw[0], dtype=np.float64)
    k = np.arange(p.out_hw[1], dtype=np.float64)
    ys = (j + 0.5) / p.scale_yx[0] + p.crop_yx[0] - 0.5
    xs = (k + 0.5) / p.scale_yx[1] + p.crop_yx[1] - 0.5
    return ys, xs


def resample_volume(hu: np.ndarray, p: Resampling) -> np.ndarray:
    """Linear resampling of a [Zs, H, W] HU volume to the plan's [Z, H', W'] int16 slices.

    Separable: linear in z between the two nearest source slices, then linear in y and in x, edge
    samples replicated. Equals trilinear interpolation at the output voxel centres.
    """
    v = np.asarray(hu)
    if v.ndim != 3 or v.shape[0] != p.src_z.size:
        raise ValueError(f"volume shape {v.shape} does not match {p.src_z.size} source slices")
    zi = np.interp(p.out_z, p.src_z, np.arange(p.src_z.size, dtype=np.float64))
    ys, xs = _inplane_index_coords(p)
    # Restrict to the rows/columns the output needs before the z blend (crops are cheap).
    i0, i1, w = _linear_taps(zi, v.shape[0])
    y0, y1, wy = _linear_taps(ys, v.shape[1])
    x0, x1, wx = _linear_taps(xs, v.shape[2])
    rlo, rhi = int(y0.min()), int(y1.max()) + 1
    clo, chi = int(x0.min()), int(x1.max()) + 1
    sub = v[:, rlo:rhi, clo:chi]
    y0, y1, x0, x1 = y0 - rlo, y1 - rlo, x0 - clo, x1 - clo
    out = np.empty((zi.size,) + tuple(p.out_hw), np.int16)
    wy = wy[:, None].astype(np.float32)
    wx = wx[None, :].astype(np.float32)
    for n in range(zi.size):
        a = sub[i0[n]].astype(np.float32)
        if w[n] > 0:
            a = a * np.float32(1.0 - w[n]) + sub[i1[n]].astype(np.float32) * np.float32(w[n])
        a = a[y0] * (1.0 - wy) + a[y1] * wy
        a = a[:, x0] * (1.0 - wx) + a[:, x1] * wx
        out[n] = to_int16_hu(a)
    return out


def resample_labels(labels: np.ndarray, p: Resampling) -> np.ndarray:
    """Nearest-neighbour resampling of a [Zs, H, W] integer label volume to [Z, H', W'].

    The output voxel centre takes the label of the source voxel that contains it (in z: the
    nearest source slice).
    """
    v = np.asarray(labels)
    if v.ndim != 3 or v.shape[0] != p.src_z.size:
        raise ValueError(f"label volume shape {v.shape} does not match {p.src_z.size} source slices")
    zi = np.interp(p.out_z, p.src_z, np.arange(p.src_z.size, dtype=np.float64))
    ys, xs = _inplane_index_coords(p)
    zi = np.clip(np.floor(zi + 0.5), 0, v.shape[0] - 1).astype(np.int64)
    yi = np.clip(np.floor(ys + 0.5), 0, v.shape[1] - 1).astype(np.int64)
    xi = np.clip(np.floor(xs + 0.5), 0, v.shape[2] - 1).astype(np.int64)
    return v[np.ix_(zi, yi, xi)]


# --------------------------------------------------------------------------------------------------
# Orientation.
# --------------------------------------------------------------------------------------------------
def canonical_axes(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to permute/flip an image so that its index axes follow world x, y, z (LPS) positively.

    ``direction``: [3, 3] SimpleITK direction (column a = world direction of index axis a, index
    axes in (i, j, k) = (x, y, z) order). Returns ``(src_axis, flip)``: for each canonical index
    axis w (x, y, z), the source index axis that becomes it and whether it must be reversed.
    Raises ValueError when the axes are too oblique to assign (an axis at ~45 degrees).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    src_axis = [-1, -1, -1]
    flip = [False, False, False]
    for a in range(3):
        col = d[:, a]
        w = int(np.argmax(np.abs(col)))
        if abs(col[w]) < 0.75 or src_axis[w] != -1:
            raise ValueError(f"direction matrix {d.tolist()} is too oblique for an axial reorientation")
        src_axis[w] = a
        flip[w] = bool(col[w] < 0)
    return tuple(src_axis), tuple(flip)  # type: ignore[return-value]


def reorient_array(arr: np.ndarray, src_axis: tuple[int, int, int], flip: tuple[bool, bool, bool]) -> np.ndarray:
    """Applies :func:`canonical_axes`' permutation/flips to a [z, y, x] array (index k, j, i)."""
    # numpy axis of index axis a is 2 - a.
    out = np.transpose(arr, [2 - src_axis[2 - n] for n in range(3)])
    for w in range(3):
        if flip[w]:
            out = np.flip(out, axis=2 - w)
    return np.ascontiguousarray(out)


def canonical_geometry(shape_zyx: tuple[int, int, int], spacing_zyx, origin_xyz, direction):
    """Geometry after :func:`reorient_array`: returns (shape_zyx, spacing_zyx, origin_xyz, direction).

    The new origin is the world position of the source voxel that becomes index (0, 0, 0); the
    direction's columns are permuted and negated accordingly (identity for an axis-aligned scan).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    src_axis, flip = canonical_axes(d)
    size_ijk = np.asarray(shape_zyx[::-1])
    sp_ijk = np.asarray(spacing_zyx[::-1], dtype=np.float64)
    corner = np.zeros(3)
    for w in range(3):
        if flip[w]:
            corner[src_axis[w]] = size_ijk[src_axis[w]] - 1
    origin = np.asarray(origin_xyz, np.float64) + d @ (corner * sp_ijk)
    new_dir = np.stack([d[:, src_axis[w]] * (-1.0 if flip[w] else 1.0) for w in range(3)], axis=1)
    new_size = tuple(int(size_ijk[src_axis[w]]) for w in range(3))[::-1]
    new_sp = tuple(float(sp_ijk[src_axis[w]]) for w in range(3))[::-1]
    return new_size, new_sp, tuple(float(v) for v in origin), new_dir


# --------------------------------------------------------------------------------------------------
# Annotation geometry: RECIST, ellipses, spheres.
# --------------------------------------------------------------------------------------------------
def recist_to_box(recist_xy: np.ndarray, pad: float = 0.0) -> np.ndarray:
    """RECIST endpoints [4, 2] ``(x, y)`` (continuous pixels) -> box ``[y1, x1, y2, x2]``.

    The box is the extent of the four endpoints, widened by ``pad`` pixels on every side.
    """
    r = np.asarray(recist_xy, dtype=np.float64).reshape(4, 2)
    return np.array([r[:, 1].min() - pad, r[:, 0].min() - pad, r[:, 1].max() + pad, r[:, 0].max() + pad])


def recist_ellipse(recist_xy: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """The weak-mask ellipse of a RECIST measurement.

    ``recist_xy``: [4, 2] ``(x, y)``: long-axis endpoints then short-axis endpoints (continuous
    pixels). The ellipse is centred on the midpoint of the long axis, with semi-axes half the long
    and half the short diameter, the major axis along the long diameter.
    Returns ``(centre_xy [2], a, b, angle)``: semi-axes in pixels, angle of the major axis (radians,
    from +x towards +y).
    """
    r = np.asarray(recist_xy, dtype=np.float64).reshape(4, 2)
    long_v = r[1] - r[0]
    a = 0.5 * float(np.hypot(*long_v))
    b = 0.5 * float(np.hypot(*(r[3] - r[2])))
    return 0.5 * (r[0] + r[1]), a, b, float(np.arctan2(long_v[1], long_v[0]))


def ellipse_mask(shape_hw: tuple[int, int], centre_xy, a: float, b: float, angle: float) -> np.ndarray:
    """[H, W] bool: pixels whose centres lie inside the ellipse (semi-axes a, b px, major axis at
    ``angle`` radians from +x towards +y, centre ``(x, y)`` in continuous pixels)."""
    h, w = shape_hw
    a = max(a, 1e-6)
    b = max(b, 1e-6)
    yy = np.arange(h, dtype=np.float64)[:, None] + 0.5 - centre_xy[1]
    xx = np.arange(w, dtype=np.float64)[None, :] + 0.5 - centre_xy[0]
    c, s = np.cos(angle), np.sin(angle)
    u = xx * c + yy * s
    v = -xx * s + yy * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def recist_mask(shape_hw: tuple[int, int], recist_xy: np.ndarray) -> np.ndarray:
    """[H, W] bool ellipse weak mask of a RECIST measurement (see :func:`recist_ellipse`)."""
    centre, a, b, ang = recist_ellipse(recist_xy)
    return ellipse_mask(shape_hw, centre, a, b, ang)


def disk_mask(shape_hw: tuple[int, int], centre_yx, radius: float) -> np.ndarray:
    """[H, W] bool: pixels whose centres are within ``radius`` pixels of ``centre_yx``."""
    return ellipse_mask(shape_hw, (centre_yx[1], centre_yx[0]), radius, radius, 0.0)


def sphere_sections(centre_out_yx, centre_z_mm: float, diameter_mm: float, p: Resampling,
                    min_diameter_px: float = 1.0, with_masks: bool = True):
    """Cross-sections of a sphere with the output slices of a plan.

    Args:
      centre_out_yx: sphere centre in *output* continuous pixels (y, x).
      centre_z_mm: sphere centre position along the slice axis (mm, same axis as ``p.out_z``).
      diameter_mm: sphere diameter (mm).
      min_diameter_px: sections whose diameter is below this many pixels are dropped.
    Returns a list of ``(slice_index, box [4], mask [H, W] bool or None)``; boxes are clipped to
    the image, sections falling outside it are dropped.
    """
    r_mm = 0.5 * float(diameter_mm)
    out = []
    for k, z in enumerate(p.out_z):
        dz = float(z) - centre_z_mm
        if abs(dz) >= r_mm:
            continue
        r_px = np.sqrt(r_mm * r_mm - dz * dz) / p.pixel_mm
        if 2.0 * r_px < min_diameter_px:
            continue
        cy, cx = float(centre_out_yx[0]), float(centre_out_yx[1])
        box = p.clip_box([cy - r_px, cx - r_px, cy + r_px, cx + r_px])
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        mask = disk_mask(p.out_hw, (cy, cx), r_px) if with_masks else None
        out.append((k, box, mask))
    return out


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """[H, W] bool -> the box ``[y1, x1, y2, x2]`` covering its pixels (None when empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float64)


def label_sections(labels: np.ndarray, with_masks: bool = True):
    """Per-slice 2D boxes/masks of every label of a resampled [Z, H, W] label volume.

    Returns a list of ``(label, slice_index, box [4], mask [H, W] bool or None)`` ordered by label
    then slice; boxes cover exactly the label's pixels on that slice.
    """
    lab = np.asarray(labels)
    out = []
    for z in range(lab.shape[0]):
        sl = lab[z]
        if not sl.any():
            continue
        objs = ndimage.find_objects(sl)
        for i, o in enumerate(objs):
            if o is None:
                continue
            label = i + 1
            box = np.array([o[0].start, o[1].start, o[0].stop, o[1].stop], np.float64)
            out.append((label, z, box, (sl == label) if with_masks else None))
    out.sort(key=lambda t: (t[0], t[1]))
    return out


# --------------------------------------------------------------------------------------------------
# Splits.
# --------------------------------------------------------------------------------------------------
def patient_split(patient_id: str, test_fraction: float = 0.2, salt: str = "uld_jax-split-v1") -> str:
    """Deterministic patient-level split: 'train' or 'test' from a SHA-256 hash of the patient id.

    The same patient always lands in the same split, on every machine and Python version.
    """
    h = hashlib.sha256(f"{salt}:{patient_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0 ** 64
    return "test" if u < test_fraction else "train"
