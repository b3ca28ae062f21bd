"""A restricted unpickler for annotation .pkl files (e.g. the released DeepLesion 1K test set).

Plain ``pickle.load`` executes arbitrary code named by the file. The annotation files only need
numpy arrays inside plain containers, so only the globals that rebuild a numpy array are admitted;
anything else raises :class:`UnsafePickleError` naming the file and the refused global.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import numpy as np

from uld_jax.io.atomic import atomic_write

# (module, name) pairs that rebuild numpy arrays and dtypes, under numpy 1.x and 2.x module names.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # None: resolved lazily from numpy._core (the numpy 1.x name numpy.core is deprecated).
    ("numpy.core.multiarray", "_reconstruct"): None,
    ("numpy._core.multiarray", "_reconstruct"): None,
    ("numpy.core.multiarray", "scalar"): None,
    ("numpy._core.multiarray", "scalar"): None,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("collections", "OrderedDict"): dict,
}


def _resolve(module: str, name: str) -> Any:
    """Imports an allowed numpy global by its canonical (numpy 2) location."""
    from numpy._core import multiarray  # numpy >= 2

    if name == "_reconstruct":
        return multiarray._reconstruct
    if name == "scalar":
        return multiarray.scalar
    raise KeyError((module, name))


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        key = (module, name)
        if key not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._source}: refused to load global {module}.{name} "
                "(only numpy arrays and plain containers are allowed)"
            )
        obj = _ALLOWED_GLOBALS[key]
        return obj if obj is not None else _resolve(module, name)


def safe_load(path: str | os.PathLike) -> Any:
    """Loads a pickle file admitting only numpy arrays, numbers, strings and plain containers."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise pickle.UnpicklingError(f"{path}: not a readable annotation pickle ({e})") from e


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Like :func:`safe_load` for in-memory bytes."""
    return _RestrictedUnpickler(io.BytesIO(data), source).load()


def atomic_dump(obj: Any, path: str | os.PathLike) -> None:
    """Pickles ``obj`` (numpy arrays + plain containers) to ``path`` via a temporary file + rename."""
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=4), makedirs=True)
