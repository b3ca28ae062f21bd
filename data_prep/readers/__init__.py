"""Readers of the four raw dataset formats (docs/formats.md) and of CT scans for inference.

Each dataset module (``deeplesion``, ``luna16``, ``lits``, ``nihln``) provides
``iter_cases(raw_root, *, skip_bad=False, bad_items=None, pixel_mm=0.8, slice_mm=2.0)`` yielding
preprocessed :class:`data_prep.types.Case` records, and ``check(raw_root, ...)`` listing every
problem of the raw folder as :class:`data_prep.types.BadItem` without preprocessing.
``raw_root`` is the folder that holds the dataset folders (``DeepLesion/``, ``LUNA16/``, ``LiTS/``,
``NIH-LN/``).
"""

# dataset name (uld_jax.core.DATASETS) -> its folder under the raw root
DATASET_FOLDERS: dict[str, str] = {
    "deeplesion": "DeepLesion",
    "luna16": "LUNA16",
    "lits": "LiTS",
    "nihln": "NIH-LN",
}


def reader_module(dataset: str):
    """The reader module of a dataset name."""
    import importlib

    if dataset not in DATASET_FOLDERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_FOLDERS)}")
    return importlib.import_module(f"data_prep.readers.{dataset}")
