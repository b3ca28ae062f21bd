"""The synthetic CT world: a seeded generator of CT scans of a plausible human trunk, with lesions
that keep their identity across studies, written in the released on-disk formats of DeepLesion,
LUNA16, LiTS and NIH-LN (docs/formats.md) together with the complete truth.

Modules:
  rng        deterministic random streams keyed by (seed, dataset, patient, study, ...)
  presets    the tiny / small / paper presets and their validation
  anatomy    the trunk phantom: patient geometry in mm, tissue labels, vessel/airway/bowel trees, HU
  lesions    lesion types, sizes, placement, growth across studies, ellipsoid geometry
  scanner    acquisition protocols (pixel spacing, slice interval, kernel, contrast phase) and the
             rendering of a scan grid (partial volume, blur, kernel noise)
  cohort     patients, studies, series, key slices, sub-volumes and the DeepLesion label policy
  writers    one writer per on-disk format, plus the truth tables
  stats      the world's distributions next to the real files'
  preview    PNG mosaics with every lesion outlined
"""
