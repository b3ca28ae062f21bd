"""The one atomic file writer of the library.

A temporary file in the destination folder, created with the permissions a plain ``open(path, "w")``
gives (``0o666 & ~umask``; ``tempfile.mkstemp`` would give 0600), is written completely, then
``os.replace`` d onto the final name (atomic on POSIX). A writer killed at any point leaves the
previous file intact (at worst a stray ``.<name>.*.tmp`` in the folder, never read by anyone).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, BinaryIO, Callable


def _create_temp(folder: str, name: str) -> tuple[int, str]:
    """A new, uniquely named temporary file next to ``name``, created like ``open(path, "w")``
    would (mode ``0o666`` less the umask, applied by the kernel: no process-wide umask change)."""
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(
    path: str | os.PathLike,
    data: bytes | Callable[[BinaryIO], Any],
    *,
    fsync: bool = False,
    makedirs: bool = False,
) -> None:
    """Writes ``data`` (bytes, or a function that writes into the binary file it is given) to
    ``path`` through a temporary file in the same folder and a rename.

    ``fsync``: also flush the file to disk before the rename and fsync the folder after it (best
    effort), so that the new content survives a crash of the machine. ``makedirs``: create the
    folder first.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if makedirs:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        try:                                      # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = False,
                      **dumps_kwargs) -> None:
    """``json.dumps(obj, **dumps_kwargs)`` -> ``path`` via :func:`atomic_write`."""
    atomic_write(path, json.dumps(obj, **dumps_kwargs).encode(), fsync=fsync)


def atomic_write_figure(path: str | os.PathLike, fig: Any) -> str:
    """Lays out a matplotlib ``fig`` and writes it as a PNG at ``path`` through a temporary file and
    a rename (the folder is created); returns ``path``. The caller closes the figure."""
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), makedirs=True)
    return os.fspath(path)
