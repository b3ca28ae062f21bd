"""Side-by-side mosaic of the real chest CT (../shared/data/real/ct/chest_ct_dicom) and a synthetic
chest rendered with the same pixel spacing, slice thickness and a lung kernel.

    python -m data_prep.world.compare --out compare.png [--seed 0] [--patient 1]

Columns: real (lung window), synthetic (lung window), real (soft-tissue window), synthetic
(soft-tissue window); rows: five levels from the apex to the liver dome. Also prints median HU and
noise (std) in a few tissues of both, so the look can be judged in numbers too.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import SimpleITK as sitk
from PIL import Image

from data_prep.world import anatomy as A
from data_prep.world import rng as wrng
from data_prep.world import scanner as S
from data_prep.world.stats import real_data_dir

LEVELS_MM = (30.0, 90.0, 150.0, 210.0, 260.0)   # depth below the apex of the synthetic rows


def _win(x, level, width):
    return (np.clip((x - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)


def load_real_chest():
    d = real_data_dir() / "ct" / "chest_ct_dicom"
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(d)))
    img = r.Execute()
    return sitk.GetArrayFromImage(img)[::-1].astype(np.float32), img.GetSpacing()  # superior first


def render_synthetic(seed: int, patient: int, px: float, thickness: float) -> np.ndarray:
    body = A.grow_tubes(A.sample_body(seed, ("compare", patient)), seed)
    proto = S.sample_protocol(wrng.stream(seed, "compare", patient), body, thickness, kernel="sharp", phase=2)
    proto["px"] = px
    grid = S.make_grid(body, proto, np.array(LEVELS_MM) * body.s, thickness)
    return S.render(body, grid, seed, ("compare", patient))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patient", type=int, default=1)
    a = ap.parse_args(argv)
    real, sp = load_real_chest()
    syn = render_synthetic(a.seed, a.patient, sp[0], sp[2])
    n = real.shape[0]
    picks = [int(round(f * (n - 1))) for f in (0.05, 0.25, 0.45, 0.65, 0.83)]
    rows = [np.concatenate([_win(real[k], -600, 1500), _win(s, -600, 1500), _win(real[k], 40, 400),
                            _win(s, 40, 400)], 1) for k, s in zip(picks, syn)]
    Image.fromarray(np.concatenate(rows, 0)).save(a.out)
    from scipy import ndimage

    for name, arr in (("real", real[picks[2]]), ("synthetic", syn[2])):
        lung = arr[(arr > -980) & (arr < -500)]
        soft_m = (arr > -50) & (arr < 150)
        hp = arr - ndimage.gaussian_filter(arr, 2.0)
        noise = 1.4826 * np.median(np.abs(hp[soft_m] - np.median(hp[soft_m])))
        print(f"{name:9s} lung median {np.median(lung):6.0f} HU   soft tissue median "
              f"{np.median(arr[soft_m]):5.0f} HU   high-pass noise in soft tissue {noise:5.1f} HU")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
