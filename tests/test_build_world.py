"""The whole chain on the synthetic tiny world: raw files -> readers -> build -> grain loader.

Skipped where the readers (data_prep.readers) or the world (data_prep.synthesize) are absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from uld_jax.core import DATASETS, Keys, Provenance
from uld_jax.ops import roi_align

pytest.importorskip("data_prep.synthesize", reason="needs the synthetic world (data_prep.synthesize)")
for _name in DATASETS:
    pytest.importorskip(f"data_prep.readers.{_name}", reason="needs the raw-format readers")


@pytest.fixture(scope="module")
def world_data(tiny_world, tmp_path_factory):
    from data_prep import build as build_lib
    out = tmp_path_factory.mktemp("world_data")
    report = build_lib.build(str(tiny_world), str(out), DATASETS, progress=False)
    return out, report


def test_every_dataset_builds_and_loads(world_data):
    from uld_jax import input_pipeline as ip
    from uld_jax import slice_data as sd
    out, report = world_data
    for name in DATASETS:
        info = report[name]
        assert info["num_cases"] > 0 and info["num_slices"] > 0 and info["num_skipped"] == 0, name
        c = ip.default_input_config("tiny")
        c.data_dir = str(out)
        c.datasets = (name,)
        c.global_batch_size = 4
        tables, _ = ip.load_tables(c)
        if len(tables[0]) == 0:
            continue
        batch = next(iter(ip.make_dataset(c, process_index=0, process_count=1)))
        valid = batch[Keys.IMAGE_VALID]
        for b in range(4):
            for g in np.flatnonzero(batch[Keys.BOX_VALID][b]):
                y1, x1, y2, x2 = batch[Keys.BOXES][b, g]
                assert 0 <= y1 < y2 <= c.image_size[0] and 0 <= x1 < x2 <= c.image_size[1]
                assert valid[b, int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))].any()
                m = np.asarray(roi_align.paste_masks(                  # the crop on the canvas
                    batch[Keys.MASKS][b, g][None], batch[Keys.MASK_BOXES][b, g][None],
                    *c.image_size))[0] >= 0.5
                if m.any() and batch[Keys.PROVENANCE][b, g] == Provenance.ORIGINAL:
                    ys, xs = np.nonzero(m)       # the mask lies inside its box (1 px tolerance)
                    assert ys.min() >= y1 - 1 and ys.max() + 1 <= y2 + 1
                    assert xs.min() >= x1 - 1 and xs.max() + 1 <= x2 + 1
        # Every stored slice decodes to the case's size.
        store = sd.SliceStore(sd.dataset_dir_for(out, name), name)
        cases = sd.load_cases(out, name)
        first = store.read([cases[0]["slice_start"]])[0]
        assert first.shape == (cases[0]["height"], cases[0]["width"])
