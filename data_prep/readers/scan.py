"""Generic CT scan reading for inference and for the dataset readers.

:func:`read_scan` reads a NIfTI file (``.nii``, ``.nii.gz``), a DICOM series folder, a MetaImage
(``.mhd``/``.mha``) or an NRRD file (``.nrrd``/``.nhdr``) into a :class:`~data_prep.types.Volume`:
HU voxels ``[Z, Y, X]``, spacing (z, y, x) mm, origin (x, y, z) mm and direction in SimpleITK's LPS
convention. Every failure (unreadable, truncated or corrupt file, missing or unevenly spaced DICOM
slices, NaN voxels, non-CT modality, values that are not Hounsfield units) raises
:class:`~data_prep.types.BadItem` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import struct
import zlib

import numpy as np
import SimpleITK as sitk

from data_prep.readers.common import as_hu_dtype, check_hu_array, check_volume_geometry
from data_prep.types import BadItem, Volume

FILE_SUFFIXES = (".nii", ".nii.gz", ".mhd", ".mha", ".nrrd", ".nhdr")


def _first_line(e: Exception) -> str:
    """ITK's exception text without source locations and object addresses, shortened."""
    msg = " ".join(str(e).split())
    if "ITK ERROR:" in msg:
        msg = msg.split("ITK ERROR:", 1)[1]
    msg = re.sub(r"\S+\.(cxx|h|hxx|cpp):\d+:?", "", msg)
    msg = re.sub(r"\(0x[0-9a-fA-F]+\)", "", msg)
    return " ".join(msg.split())[:300]


def verify_nifti(path: str | os.PathLike) -> None:
    """Checks a NIfTI-1/2 file (``.nii`` or ``.nii.gz``): the voxel bytes its header announces are all
    there, a gzip stream is complete with a valid CRC, and float voxels are finite.

    ITK reads a truncated NIfTI without complaint (the missing voxels come back as garbage or
    zeros) and turns NaN voxels into 0, so both are checked here on the file itself. Raises BadItem.
    """
    path = str(path)
    opener = gzip.open if path.lower().endswith(".gz") else open
    n_nan = 0
    try:
        with opener(path, "rb") as f:
            hdr = f.read(540)
            if len(hdr) < 348:
                raise BadItem(path, f"truncated NIfTI header ({len(hdr)} bytes)")
            for endian in ("<", ">"):
                size = struct.unpack(endian + "i", hdr[:4])[0]
                if size in (348, 540):
                    break
            else:
                raise BadItem(path, "not a NIfTI file (bad header size field)")
            if size == 348:
                dims = struct.unpack(endian + "8h", hdr[40:56])
                dtype_code = struct.unpack(endian + "h", hdr[70:72])[0]
                bitpix = struct.unpack(endian + "h", hdr[72:74])[0]
                offset = int(struct.unpack(endian + "f", hdr[108:112])[0])
            else:
                if len(hdr) < 540:
                    raise BadItem(path, f"truncated NIfTI-2 header ({len(hdr)} bytes)")
                dims = struct.unpack(endian + "8q", hdr[16:80])
                dtype_code = struct.unpack(endian + "h", hdr[12:14])[0]
                bitpix = struct.unpack(endian + "h", hdr[14:16])[0]
                offset = struct.unpack(endian + "q", hdr[168:176])[0]
            nd = dims[0]
            if not 1 <= nd <= 7 or any(d < 1 for d in dims[1:nd + 1]) or bitpix <= 0:
                raise BadItem(path, f"malformed NIfTI header (dim {dims}, bitpix {bitpix})")
            offset = max(int(offset), size)
            need = int(np.prod(dims[1:nd + 1], dtype=np.int64)) * bitpix // 8
            float_dtype = {16: endian + "f4", 64: endian + "f8"}.get(dtype_code)
            data = hdr[offset:] if len(hdr) > offset else b""
            if len(hdr) < offset:
                skip = f.read(offset - len(hdr))
                if len(skip) < offset - len(hdr):
                    raise BadItem(path, "truncated NIfTI: ends before the voxel data")
            got = 0
            rest = b""
            while True:
                chunk = data if data else f.read(1 << 22)
                data = b""
                if not chunk:
                    break
                got += len(chunk)
                if float_dtype is not None:
                    buf = rest + chunk
                    usable = len(buf) - len(buf) % (bitpix // 8)
                    n_nan += int((~np.isfinite(np.frombuffer(buf[:usable], float_dtype))).sum())
                    rest = buf[usable:]
    except (OSError, EOFError, zlib.error) as e:
        raise BadItem(path, f"corrupt or truncated gzip stream ({e})") from None
    if got < need:
        raise BadItem(path, f"truncated NIfTI: {offset + got} of {offset + need} bytes")
    if n_nan:
        raise BadItem(path, f"{n_nan} NaN/inf voxels")


def read_image_file(path: str | os.PathLike) -> sitk.Image:
    """Reads one image file with SimpleITK; BadItem when missing, truncated or corrupt."""
    path = str(path)
    if not os.path.isfile(path):
        raise BadItem(path, "file not found")
    if os.path.getsize(path) == 0:
        raise BadItem(path, "empty file")
    if path.lower().endswith((".nii", ".nii.gz")):
        verify_nifti(path)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise BadItem(path, f"unreadable or truncated image ({_first_line(e)})") from None


def sitk_to_volume(img: sitk.Image, source: str, *, labels: bool = False) -> Volume:
    """A 3D scalar SimpleITK image -> Volume (int16 HU when exact, else float32).

    With ``labels`` the voxels are returned as they are (integer label maps).
    """
    if img.GetDimension() != 3:
        raise BadItem(source, f"expected a 3D volume, got {img.GetDimension()}D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise BadItem(source, f"expected a scalar (grayscale) volume, got "
                              f"{img.GetNumberOfComponentsPerPixel()} components per voxel")
    try:
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        raise BadItem(source, f"cannot read voxels ({_first_line(e)})") from None
    if not labels:
        check_hu_array(arr, source)
        arr = as_hu_dtype(arr)
    else:
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)) or np.any(np.mod(arr, 1) != 0):
                raise BadItem(source, "label volume has non-integer or NaN values")
            arr = arr.astype(np.int32)
    sp = img.GetSpacing()
    vol = Volume(hu=arr, spacing_zyx=(float(sp[2]), float(sp[1]), float(sp[0])),
                 origin_xyz=tuple(float(v) for v in img.GetOrigin()),
                 direction=np.asarray(img.GetDirection(), np.float64).reshape(3, 3), source=source)
    check_volume_geometry(vol)
    return vol


def check_ct_values(vol: Volume) -> None:
    """Raises BadItem when the voxel values cannot be CT Hounsfield units.

    CT in HU contains air or the padding outside the reconstruction field (<= -500 HU) and tissue
    above it; a label map, an MR image or stored values without the DICOM rescale (0..4095) do not.
    """
    lo, hi = float(vol.hu.min()), float(vol.hu.max())
    if lo > -500.0:
        hint = " (stored values without RescaleIntercept?)" if lo >= 0 and hi <= 65535 else ""
        raise BadItem(vol.source, f"values {lo:g}..{hi:g} do not look like CT Hounsfield units: "
                                  f"no voxel at or below -500 HU (air){hint}")
    if hi - lo < 200.0:
        raise BadItem(vol.source, f"values {lo:g}..{hi:g} span too little for a CT scan in HU")


_NOT_DICOM = {".txt", ".json", ".xml", ".md", ".csv", ".nii", ".gz", ".png", ".jpg", ".html", ".pdf"}


def _dicom_files(folder: pathlib.Path) -> list[str]:
    """Files of a folder that may be DICOM slices (hidden files, DICOMDIR and documents excluded)."""
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
                  and p.suffix.lower() not in _NOT_DICOM)


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None, *,
                      spacing_rtol: float = 0.02) -> tuple[Volume, dict[str, str]]:
    """Reads one DICOM CT series from a folder through SimpleITK/GDCM (compressed syntaxes too).

    Slices are ordered by SimpleITK (GDCM sorts by ImagePositionPatient along the slice normal).
    Checks: the folder holds one series (or ``series_uid`` picks it), every file of the series
    decodes, Modality is CT, slice positions are evenly spaced (a gap = a missing slice) and
    distinct. Returns the Volume and a few header fields of the first slice (``modality``,
    ``study_uid``, ``series_uid``, ``patient_id``).
    """
    folder = pathlib.Path(folder)
    src = str(folder)
    if not folder.is_dir():
        raise BadItem(src, "DICOM folder not found")
    reader = sitk.ImageSeriesReader()
    try:
        ids = list(reader.GetGDCMSeriesIDs(src))
    except RuntimeError as e:
        raise BadItem(src, f"cannot scan the folder for DICOM series ({_first_line(e)})") from None
    if not ids:
        n = len(_dicom_files(folder))
        raise BadItem(src, f"no readable DICOM series ({n} files in the folder)")
    if series_uid is None:
        if len(ids) > 1:
            raise BadItem(src, f"{len(ids)} DICOM series in one folder ({', '.join(ids[:5])}); "
                               "pass series_uid to pick one")
        series_uid = ids[0]
    elif series_uid not in ids:
        raise BadItem(src, f"series {series_uid} not found (found {', '.join(ids[:5])})")
    files = list(reader.GetGDCMSeriesFileNames(src, series_uid))
    if len(files) < 2:
        raise BadItem(src, f"series {series_uid!r} has {len(files)} slice(s); a CT volume needs at least 2")
    all_files = _dicom_files(folder)
    if len(ids) == 1 and len(files) < len(all_files):
        skipped = sorted(set(map(os.path.normpath, all_files)) - set(map(os.path.normpath, files)))
        raise BadItem(skipped[0], f"not part of the series (unreadable or corrupt DICOM?); "
                                  f"{len(skipped)} such file(s) in {src}")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise BadItem(src, f"cannot decode the series ({_first_line(e)})") from None

    def meta(i: int, key: str) -> str:
        return reader.GetMetaData(i, key).strip() if reader.HasMetaDataKey(i, key) else ""

    info = {"modality": meta(0, "0008|0060"), "study_uid": meta(0, "0020|000d"),
            "series_uid": meta(0, "0020|000e") or series_uid, "patient_id": meta(0, "0010|0020")}
    if info["modality"] and info["modality"].upper() != "CT":
        raise BadItem(src, f"Modality is {info['modality']!r}, not CT")
    # Even spacing along the slice normal: a missing file shows up as a double gap.
    try:
        pos = np.array([[float(v) for v in meta(i, "0020|0032").split("\\")] for i in range(len(files))])
        cos = np.array([float(v) for v in meta(0, "0020|0037").split("\\")])
    except ValueError:
        raise BadItem(src, "missing or malformed ImagePositionPatient/ImageOrientationPatient") from None
    if pos.shape == (len(files), 3) and cos.shape == (6,):
        normal = np.cross(cos[:3], cos[3:])
        d = np.diff(pos @ normal)
        step = float(np.median(np.abs(d)))
        if step <= 1e-6 or np.any(np.abs(d) <= 1e-6):
            i = int(np.argmax(np.abs(d) <= 1e-6)) if d.size else 0
            raise BadItem(files[i + 1], "two slices at the same position (duplicate slice)")
        bad = np.flatnonzero(np.abs(np.abs(d) - step) > spacing_rtol * step + 1e-3)
        if bad.size:
            i = int(bad[0])
            raise BadItem(files[i], f"inconsistent slice spacing: {abs(d[i]):.3f} mm to the next slice "
                                    f"({files[i + 1]}) where the series has {step:.3f} mm (missing slice?)")
    vol = sitk_to_volume(img, src)
    return vol, info


def read_scan(path: str | os.PathLike, *, check_ct: bool = True) -> Volume:
    """Reads a CT scan (NIfTI, DICOM folder, MetaImage, NRRD) into a Volume of HU voxels.

    ``check_ct``: refuse volumes whose values are not plausibly CT Hounsfield units.
    Raises BadItem naming the path and the problem.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        vol, _ = read_dicom_series(p)
    else:
        name = p.name.lower()
        if not p.exists():
            raise BadItem(str(p), "no such file or folder")
        if name.endswith(".dcm"):
            raise BadItem(str(p), "a single DICOM file; pass the folder that holds the whole series")
        if not name.endswith(FILE_SUFFIXES):
            raise BadItem(str(p), f"unsupported scan format (expected a DICOM folder or one of "
                                  f"{', '.join(FILE_SUFFIXES)})")
        vol = sitk_to_volume(read_image_file(p), str(p))
    if check_ct:
        check_ct_values(vol)
    return vol
