"""``python -m uld_jax.evaluate --workdir``: inference of a checkpointed tiny MELD over a built TFDS
split, then the offline evaluation (key slices against the sample table; LUNA16 in world mm)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import detect_helpers
from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import core, inference, input_pipeline as ip
from uld_jax.core import Keys
from uld_jax.evaluate import __main__ as ev_main
from uld_jax.evaluate import from_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return detect_helpers.shared_workdir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built_eval")
    cases = [cf.make_case("deeplesion", k, num_slices=8, height=40, width=44, split="test",
                          lesion_slices=(3,) if k % 2 else (2, 5), negatives=()) for k in range(3)]
    build_lib.build("/raw", str(out), ["deeplesion"], reader_lookup=lambda n: cf.ListReader(cases),
                    progress=False)
    return str(out), cases


def test_keyslice_from_workdir_cli(workdir, built, tmp_path, capsys):
    data, cases = built
    rc = ev_main.main(["--workdir", workdir, "--data", data, "--split", "test", "--out",
                       str(tmp_path / "ev"), "--batch-size", "4", "--no-plot"])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(tmp_path / "ev" / "results.json"))
    assert res["protocol"] == "keyslice"
    n_keys = sum(len(c.key_slices) for c in cases)
    assert res["info"]["counts"]["images"] == n_keys
    assert res["info"]["counts"]["truths"] == sum(len(c.lesions) for c in cases)
    sens = res["tables"]["keyslice"]["sensitivity"]
    assert len(sens) == 6 and all(0.0 <= s <= 1.0 for s in sens)


def test_split_detections_are_the_predictors_in_stored_slice_pixels(workdir, built):
    """Independent check of the mapping: the same images through the Predictor directly, boxes mapped
    with the placement computed here from the case's stored size and the config."""
    data, cases = built
    loaded = inference.cached_model(os.path.abspath(workdir), None, None, None)
    sd = from_workdir.infer_split(loaded, data, "deeplesion", "test", batch_size=4, progress=False)
    t = sd.table
    assert len(sd.boxes) == len(t) == sum(len(c.sample_slices) for c in cases)
    cfg = from_workdir._eval_input_config(loaded, data, "deeplesion", "test", 4)
    loader = ip.SampleLoader([t], [ip.load_tables(cfg)[1][0]], cfg)
    pred = inference.cached_predictor(loaded, 4, "deeplesion", False)   # the same compiled function
    for row in range(len(t)):
        ex = loader.map(np.array([0, row, row]))
        imgs = np.repeat(ex[Keys.IMAGE][None], 4, axis=0)
        val = np.repeat(ex[Keys.IMAGE_VALID][None], 4, axis=0)
        out = pred(imgs, val)
        keep = out["valid"][0]
        h, w = t.case_hw[t.case_row[row]]
        size = cfg.image_size
        s = min(float(t.case_pixel_mm[t.case_row[row]]) / cfg.pixel_mm, size[0] / h, size[1] / w)
        ty, tx = np.floor((size[0] - h * s) / 2 + 1e-6), np.floor((size[1] - w * s) / 2 + 1e-6)
        want = (out["boxes"][0][keep] - [ty, tx, ty, tx]) / s
        want = np.clip(want, 0, [h, w, h, w])
        np.testing.assert_allclose(sd.boxes[row], want, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(sd.scores[row], out["scores"][0][keep], rtol=1e-6)
    truth, predd = from_workdir.keyslice_dicts(sd)
    for c in cases:
        for les in c.lesions:
            name = f"{c.case_id}:{les.slice_index}"
            assert any(np.allclose(b, core.internal_to_inclusive_xyxy(les.box)) for b in truth[name])


def test_workdir_errors_are_one_line(built, tmp_path, capsys):
    data, _ = built
    rc = ev_main.main(["--workdir", str(tmp_path / "nope"), "--data", data])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "checkpoints" in err and len(err.splitlines()) == 1
