"""Small built datasets (the four formats' cases from data_prep.case_factory) for training tests."""

from __future__ import annotations

import pathlib

from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax.core import DATASETS


def build_small_world(out: pathlib.Path, cases_per_dataset: int = 4) -> pathlib.Path:
    """Every dataset: ``cases_per_dataset`` train cases (one lesion slice, one lesion-free slice)
    and one val case, 48 x 40 pixels of 0.8 mm; built with data_prep.build into ``out``."""
    for d, name in enumerate(DATASETS):
        cases = [cf.make_case(name, k, num_slices=8, height=48, width=40,
                              lesion_slices=((k + d) % 8,), negatives=((k + d + 4) % 8,),
                              split="train") for k in range(cases_per_dataset)]
        cases.append(cf.make_case(name, 100 + d, num_slices=8, height=48, width=40,
                                  lesion_slices=(3,), negatives=(6,), split="val"))
        build_lib.build("/raw", str(out), [name], reader_lookup=lambda n, c=cases: cf.ListReader(c),
                        chunk_slices=64, progress=False)
    return out
