"""Deterministic random streams.

Every random decision draws from a generator keyed by ``(seed, *keys)`` (strings and integers), so
a patient, a study or a scan is the same whatever else is generated, in whatever order: the paper
preset streams patient by patient and ``--tables-only`` gives the same tables as a full run.
"""

from __future__ import annotations

import zlib

import numpy as np


def _key_to_int(k) -> int:
    if isinstance(k, (int, np.integer)):
        if k < 0:
            raise ValueError(f"random stream keys must be non-negative integers or strings, got {k}")
        return int(k)
    return zlib.crc32(str(k).encode("utf-8"))


def stream(seed: int, *keys) -> np.random.Generator:
    """A numpy Generator determined only by ``seed`` and ``keys`` (ints >= 0 or strings)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed)] + [_key_to_int(k) for k in keys]))


def uid_digits(rng: np.random.Generator, n: int) -> str:
    """``n`` random decimal digits, the first non-zero (for DICOM-style UIDs)."""
    d = rng.integers(0, 10, size=n)
    d[0] = rng.integers(1, 10)
    return "".join(str(int(v)) for v in d)
