"""The world's presets: how many patients/scans per dataset and the acquisition choices.

``tiny``  seconds, for the tests: a few patients per dataset, 256 x 256 matrices (small bodies, so
          pixels stay 0.5-1 mm), short sub-volumes.
``small`` minutes on 2 CPU cores, for the quick start and the ablation study: 512 x 512 like the
          real sets, mostly 5 mm DeepLesion series and 2-2.5 mm single-type scans.
``paper`` the real datasets' counts (4,427 patients, 10,594 studies and 32,735 marked lesions in
          DeepLesion; 888 LUNA16 scans; 131 LiTS volumes; 176 NIH-LN patients), streamed patient by
          patient; its tables alone (``--tables-only``) take minutes.
"""

from __future__ import annotations

import dataclasses


class PresetError(ValueError):
    """A preset name or value that cannot be used (message is one line)."""


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    dl_patients: int
    dl_studies_total: int | None       # exact total over patients (None: drawn freely)
    dl_marks_total: int | None         # exact number of DL_info rows (None: drawn freely)
    dl_max_studies: int
    dl_marks_mean: float               # mean marked lesions per study
    dl_extra_lesions: float            # mean unmarked lesions per patient beyond the marked ones
    dl_context_mm: tuple[float, float]  # sub-volume context each side of a key slice (mm)
    dl_intervals: tuple[tuple[float, float], ...]  # (slice interval mm, probability)
    luna_scans: int
    luna_intervals: tuple[tuple[float, float], ...]
    lits_volumes: int
    lits_intervals: tuple[tuple[float, float], ...]
    nihln_med: int
    nihln_abd: int
    nihln_interval: tuple[tuple[float, float], ...]
    matrix: int = 512
    body_scale: float = 1.0            # multiplies every patient's size (tiny: small bodies)
    cover_mm: float | None = None      # cap on the single-type scans' z coverage (mm)
    # DeepLesion patients' split: these fractions go to val and test (at least one patient each
    # when above 0), the rest to train; val 0 and test 1 make an evaluation-only world.
    dl_val_fraction: float = 0.15
    dl_test_fraction: float = 0.15
    # True: the radiologist's marking bias (DESIGN.md section 5): a candidate lesion is drawn with
    # weight long_diameter^1.3 * its type's conspicuity (x5 if marked at an earlier study). False:
    # a diagnostic world in which size and conspicuity play no part (only the earlier-study weight
    # stays), so the unmarked lesions are no harder to see than the marked ones.
    dl_mark_bias: bool = True

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise PresetError(f"preset {self.name!r}: {f.name} = {v} is negative")
        for f in ("dl_val_fraction", "dl_test_fraction"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise PresetError(f"preset {self.name!r}: {f} = {getattr(self, f)} is not in "
                                  "[0, 1]")
        if self.dl_val_fraction + self.dl_test_fraction > 1.0:
            raise PresetError(f"preset {self.name!r}: dl_val_fraction + dl_test_fraction = "
                              f"{self.dl_val_fraction + self.dl_test_fraction:g} > 1")
        if self.dl_patients < 3:
            raise PresetError(f"preset {self.name!r}: dl_patients = {self.dl_patients}; need >= 3 "
                              "for a train/val/test split")
        if self.dl_studies_total is not None and self.dl_studies_total < self.dl_patients:
            raise PresetError(f"preset {self.name!r}: dl_studies_total < dl_patients")
        if self.dl_marks_total is not None and self.dl_studies_total is not None \
                and self.dl_marks_total < self.dl_studies_total:
            raise PresetError(f"preset {self.name!r}: dl_marks_total < dl_studies_total")
        if self.matrix < 64:
            raise PresetError(f"preset {self.name!r}: matrix {self.matrix} < 64")


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", dl_patients=4, dl_studies_total=None, dl_marks_total=None, dl_max_studies=2,
        dl_marks_mean=1.6, dl_extra_lesions=4.0, dl_context_mm=(6.0, 9.0),
        dl_intervals=((5.0, 0.5), (2.0, 0.25), (1.0, 0.25)),
        luna_scans=3, luna_intervals=((2.5, 1.0),), lits_volumes=2, lits_intervals=((5.0, 1.0),),
        nihln_med=1, nihln_abd=1, nihln_interval=((5.0, 1.0),), matrix=256, body_scale=0.62,
        cover_mm=70.0),
    "small": Preset(
        name="small", dl_patients=72, dl_studies_total=None, dl_marks_total=None, dl_max_studies=3,
        dl_marks_mean=2.4, dl_extra_lesions=10.0, dl_context_mm=(10.0, 16.0),
        dl_intervals=((5.0, 0.7), (2.0, 0.1), (1.0, 0.2)),
        luna_scans=20, luna_intervals=((2.5, 0.7), (2.0, 0.3)), lits_volumes=10,
        lits_intervals=((5.0, 0.5), (2.5, 0.5)), nihln_med=5, nihln_abd=5,
        nihln_interval=((2.5, 0.5), (2.0, 0.5)), cover_mm=None),
    "paper": Preset(
        name="paper", dl_patients=4427, dl_studies_total=10594, dl_marks_total=32735, dl_max_studies=16,
        dl_marks_mean=3.09, dl_extra_lesions=9.0, dl_context_mm=(22.0, 40.0),
        dl_intervals=((5.0, 0.52), (1.0, 0.40), (2.0, 0.05), (3.0, 0.015), (2.5, 0.015)),
        luna_scans=888, luna_intervals=((2.5, 0.35), (1.25, 0.25), (0.625, 0.15), (2.0, 0.15),
                                        (1.0, 0.10)),
        lits_volumes=131, lits_intervals=((5.0, 0.2), (2.5, 0.2), (1.0, 0.3), (0.8, 0.15), (2.0, 0.15)),
        nihln_med=86, nihln_abd=90, nihln_interval=((1.25, 0.5), (1.0, 0.5))),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    p.validate()
    return p
