"""Resumable storage of a mining run's per-chunk model outputs.

The mining driver runs MELD over the training slices chunk by chunk (a chunk = a fixed set of
slices, e.g. the cases of a few patients). After each chunk it saves that chunk's slice rows,
annotation embeddings and every expert's proposals with :meth:`ChunkStore.save` (atomic: a killed
run leaves whole chunks only). A restarted run skips :meth:`ChunkStore.done` chunks; when all are
there, :meth:`ChunkStore.load` concatenates them (in chunk-id order) for
:func:`uld_jax.mine.run.mine_overlay`, whose output does not depend on row order, so a resumed run
writes the same table as an uninterrupted one.

Layout: ``<dir>/store.json`` (checkpoint step, config hash, embedding size; a resume with another
checkpoint or config is refused) and ``<dir>/chunk_<id:06d>.npz``. Slice keys inside a chunk are
local (0..S_chunk-1) and are offset on load.
"""

from __future__ import annotations

import json
import os
import re
import zipfile

import numpy as np

from uld_jax.io.atomic import atomic_write_json
from uld_jax.mine import run, table

_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.npz$")


class StoreError(ValueError):
    """A store that cannot be resumed or read; the message names the file."""


class ChunkStore:
    """Per-chunk outputs of one mining run (one checkpoint, one config)."""

    def __init__(self, directory: str | os.PathLike, *, checkpoint_step: int, config_hash: str,
                 embedding_dim: int):
        self.dir = os.fspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.meta = {"checkpoint_step": int(checkpoint_step), "config_hash": str(config_hash),
                     "embedding_dim": int(embedding_dim)}
        path = os.path.join(self.dir, "store.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError as e:
                    raise StoreError(f"{path}: not JSON ({e})") from e
            if old != self.meta:
                raise StoreError(f"{path}: this store was written by another run {old}; "
                                 f"refusing to resume with {self.meta} (use a new directory)")
        else:
            atomic_write_json(path, self.meta, fsync=True)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "ChunkStore":
        """An existing store, with the checkpoint, config and embedding size of its ``store.json``
        (for reading a finished run: reports, exports)."""
        path = os.path.join(os.fspath(directory), "store.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: not a mining chunk store (no store.json); mine "
                                    "first with `python -m uld_jax.mine --workdir RUN`")
        with open(path, encoding="utf-8") as f:
            try:
                m = json.load(f)
            except json.JSONDecodeError as e:
                raise StoreError(f"{path}: not JSON ({e})") from e
        try:
            return cls(directory, checkpoint_step=m["checkpoint_step"],
                       config_hash=m["config_hash"], embedding_dim=m["embedding_dim"])
        except (KeyError, TypeError) as e:
            raise StoreError(f"{path}: missing or bad key {e}") from e

    def _path(self, chunk_id: int) -> str:
        return os.path.join(self.dir, f"chunk_{int(chunk_id):06d}.npz")

    def done(self) -> set[int]:
        """Ids of the chunks saved completely."""
        return {int(m.group(1)) for n in os.listdir(self.dir) if (m := _CHUNK_RE.match(n))}

    def save(self, chunk_id: int, slices: run.SliceTable, annotations: run.Annotations,
             proposals: run.Proposals) -> None:
        """Saves one chunk atomically; slice keys are local to the chunk (0..len(slices)-1)."""
        d = self.meta["embedding_dim"]
        n = len(slices)
        for name, keys in (("annotations", annotations.slice), ("proposals", proposals.slice)):
            keys = np.asarray(keys)
            if keys.size and (keys.min() < 0 or keys.max() >= n):
                raise ValueError(f"chunk {chunk_id}: {name}.slice outside 0..{n - 1}")
        p_expert = np.asarray(proposals.expert, np.int8)
        # Only the universal expert's proposals are embedded (MAM's input); the single-type experts'
        # rows (NRM's input) carry no embedding on disk and are zero again when loaded.
        uni = p_expert == run.UNIVERSAL_EXPERT
        p_emb = proposals.embedding
        if p_emb is None:
            p_emb = np.zeros((int(uni.sum()), d), np.float32)
        else:
            p_emb = np.asarray(p_emb, np.float32).reshape(-1, d)[uni]
        arrays = {
            "s_dataset": np.asarray(slices.dataset).astype(str),
            "s_case_id": np.asarray(slices.case_id).astype(str),
            "s_slice_index": np.asarray(slices.slice_index, np.int32),
            "s_patient_id": np.asarray(slices.patient_id, np.int64),
            "a_slice": np.asarray(annotations.slice, np.int64),
            "a_box": np.asarray(annotations.box, np.float32).reshape(-1, 4),
            "a_lesion_id": np.asarray(annotations.lesion_id, np.int64),
            "a_embedding": np.asarray(annotations.embedding, np.float32).reshape(-1, d),
            "p_slice": np.asarray(proposals.slice, np.int64),
            "p_box": np.asarray(proposals.box, np.float32).reshape(-1, 4),
            "p_score": np.asarray(proposals.score, np.float32),
            "p_expert": p_expert,
            "p_embedding_universal": p_emb,
        }
        for f in ("pixel_mm", "slice_mm"):          # optional (MAM's location term)
            v = getattr(slices, f)
            if v is not None:
                arrays["s_" + f] = np.asarray(v, np.float32)
        table.atomic_write_npz(self._path(chunk_id), arrays)

    def load(self, expected_chunks: int | None = None
             ) -> tuple[run.SliceTable, run.Annotations, run.Proposals]:
        """All saved chunks, concatenated in chunk-id order with slice keys offset.

        ``expected_chunks``: if given, raises :class:`StoreError` listing the missing ids unless
        chunks 0..expected_chunks-1 are all there.
        """
        ids = sorted(self.done())
        if expected_chunks is not None:
            missing = sorted(set(range(expected_chunks)) - set(ids))
            if missing:
                raise StoreError(f"{self.dir}: chunks not mined yet: {missing[:20]}"
                                 f"{' ...' if len(missing) > 20 else ''}")
        parts: dict[str, list[np.ndarray]] = {}
        offset = 0
        for i in ids:
            path = self._path(i)
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrs = {k: z[k] for k in z.files}
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
                raise StoreError(f"{path}: unreadable chunk ({e}); delete it to mine it again") from e
            if "p_embedding_universal" in arrs:       # the universal rows' embeddings only
                d = self.meta["embedding_dim"]
                uni = arrs["p_expert"] == run.UNIVERSAL_EXPERT
                emb = arrs.pop("p_embedding_universal")
                if emb.shape != (int(uni.sum()), d):
                    raise StoreError(f"{path}: {emb.shape[0]} universal embeddings for "
                                     f"{int(uni.sum())} universal proposals; delete it to mine it again")
                full = np.zeros((uni.shape[0], d), np.float32)
                full[uni] = emb
                arrs["p_embedding"] = full
            arrs["a_slice"] = arrs["a_slice"] + offset
            arrs["p_slice"] = arrs["p_slice"] + offset
            offset += arrs["s_case_id"].shape[0]
            for k, v in arrs.items():
                parts.setdefault(k, []).append(v)
        d = self.meta["embedding_dim"]
        empty = {"a_box": (0, 4), "p_box": (0, 4), "a_embedding": (0, d), "p_embedding": (0, d)}

        def cat(k):
            return np.concatenate(parts[k]) if k in parts else np.zeros(empty.get(k, (0,)))

        # the slices' pixel size and spacing, when every chunk has them (older stores do not)
        mm = {f: cat("s_" + f) if len(parts.get("s_" + f, ())) == len(ids) and ids else None
              for f in ("pixel_mm", "slice_mm")}
        slices = run.SliceTable(cat("s_dataset"), cat("s_case_id"), cat("s_slice_index"),
                                cat("s_patient_id"), **mm)
        ann = run.Annotations(cat("a_slice"), cat("a_box"), cat("a_lesion_id"), cat("a_embedding"))
        props = run.Proposals(cat("p_slice"), cat("p_box"), cat("p_score"), cat("p_expert"),
                              cat("p_embedding"))
        return slices, ann, props
