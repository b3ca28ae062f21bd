"""uld_jax.mine.external: a mining run's targets exported with their crops, embedded elsewhere and
read back for MAM (python -m uld_jax.mine --embeddings), on the driver tests' tiny built dataset and
real orbax checkpoint."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from data_prep import case_factory as cf
from uld_jax import slice_data as sd
from uld_jax.core import DATASET_ID
from uld_jax.mine import driver, external, report, store, table

from test_mine_driver import world  # noqa: F401  (the module-scoped fixture)


def _store(world):
    return os.path.join(str(world["run"]), "mining", "step_4")


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("ext") / "targets.npz")
    assert external.main(["--store", _store(world), "--out", out, "--crop_px", "24",
                          "--context", "1"]) == 0
    with np.load(out, allow_pickle=False) as z:
        t = {k: z[k] for k in z.files}
    return out, t


def test_export_rows_crops_and_csv(world, exported):  # noqa: F811
    out, t = exported
    slices, ann, props = store.ChunkStore.open(_store(world)).load()
    uni = np.flatnonzero(props.expert == DATASET_ID["deeplesion"])
    n_a = len(ann.slice)
    assert n_a == 6 and uni.size > 0
    assert t["kind"].tolist() == ["annotation"] * n_a + ["proposal"] * uni.size
    np.testing.assert_array_equal(t["index"], np.r_[np.arange(n_a), np.arange(uni.size)])
    keys = np.r_[ann.slice, props.slice[uni]]
    np.testing.assert_array_equal(t["case_id"], slices.case_id[keys])
    np.testing.assert_array_equal(t["slice_index"], slices.slice_index[keys])
    np.testing.assert_array_equal(t["box"], np.r_[ann.box, props.box[uni]])
    np.testing.assert_allclose(t["pixel_mm"], 0.8)
    assert t["crop"].shape == (n_a + uni.size, 3, 24, 24) and t["crop"].dtype == np.int16
    assert str(t["fingerprint"]) == external.fingerprint(external.targets(slices, ann, props))
    # every crop against the Case's slices read here and cut by hand (independent of crops())
    cases = {sd._text(c["case_id"]): c for c in sd.load_cases(str(world["data"]), "deeplesion")}
    st = sd.SliceStore(os.path.join(str(world["data"]), "deeplesion"), "deeplesion")
    for i in range(len(t["kind"])):
        c = cases[str(t["case_id"][i])]
        z = int(t["slice_index"][i])
        y1, x1, y2, x2 = t["box"][i].astype(np.float64)          # uld_jax.core's box format
        cx, cy = int(np.floor((x1 + x2) / 2 - 12)), int(np.floor((y1 + y2) / 2 - 12))
        for k, dz in enumerate((-1, 0, 1)):
            zz = min(max(z + dz, 0), int(c["num_slices"]) - 1)
            (img,) = st.read([int(c["slice_start"]) + zz])
            big = np.pad(img, 100, constant_values=-1024)
            want = big[cy + 100:cy + 124, cx + 100:cx + 124]
            np.testing.assert_array_equal(t["crop"][i, k], want)
        np.testing.assert_allclose(t["crop_box"][i], [y1 - cy, x1 - cx, y2 - cy, x2 - cx],
                                   rtol=0, atol=1e-4)
    # the annotated lesions (case_factory: 6 x 8 px rectangles of LESION_HU, exactly the box's
    # pixels) fill their crop box on the crop's middle slice
    for i in np.flatnonzero(t["kind"] == "annotation"):
        b = np.round(t["crop_box"][i]).astype(int)
        assert (b[2] - b[0], b[3] - b[1]) == (6, 8)
        assert np.all(t["crop"][i, 1, b[0]:b[2], b[1]:b[3]] == cf.LESION_HU)
        assert not np.any(t["crop"][i, 1, b[0] - 1, b[1]:b[3]] == cf.LESION_HU)
    with open(os.path.splitext(out)[0] + ".csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(t["kind"]) and rows[0]["kind"] == "annotation"
    assert rows[-1]["case_id"] == t["case_id"][-1] and float(rows[-1]["x2"]) == pytest.approx(
        float(t["box"][-1, 3]), abs=0.01)


def _write_embeddings(path, t, planted_row=None, **overrides):
    """Annotations along e1, proposals along e2 (sqrt(2) apart), except ``planted_row`` of the
    proposals: e1 + 0.1 e2 before normalisation (0.0996 from every annotation)."""
    d = 5
    kind = t["kind"]
    a = np.tile(np.eye(d)[0] * 3.0, ((kind == "annotation").sum(), 1))     # any length
    p = np.tile(np.eye(d)[1], ((kind == "proposal").sum(), 1))
    if planted_row is not None:
        p[planted_row] = np.eye(d)[0] + 0.1 * np.eye(d)[1]
    arrays = {"annotation": a, "proposal": p, "fingerprint": t["fingerprint"], **overrides}
    np.savez(path, **arrays)
    return path


def test_mam_on_external_embeddings(world, exported, tmp_path, capsys):  # noqa: F811
    _, t = exported
    props = store.ChunkStore.open(_store(world)).load()[2]
    uni = np.flatnonzero(props.expert == DATASET_ID["deeplesion"])
    # a proposal of annotation 0's patient on a slice without annotations (target row n_a + j)
    n_a = int((t["kind"] == "annotation").sum())
    annotated = set(zip(t["case_id"][:n_a], t["slice_index"][:n_a]))
    j = next(j for j in range(uni.size) if t["patient_id"][n_a + j] == t["patient_id"][0]
             and (t["case_id"][n_a + j], t["slice_index"][n_a + j]) not in annotated)
    r = n_a + j
    emb = _write_embeddings(str(tmp_path / "emb.npz"), t, planted_row=j)
    out = str(tmp_path / "mined_ext.npz")
    rc = driver.main(["--workdir", str(world["run"]), "--chunk_slices", "8", "--progress", "off",
                      "--embeddings", emb, "--out", out, "--location_mm", "0"])
    assert rc == 0, capsys.readouterr().err
    ov = table.read_overlay(out)
    a = ov.arrays
    mined = np.flatnonzero(a["kind"] == table.KIND_MINED)
    assert mined.size == 1
    (m,) = mined
    assert a["case_id"][m] == t["case_id"][r] and a["slice_index"][m] == t["slice_index"][r]
    np.testing.assert_array_equal(a["box"][m], t["box"][r])
    info = ov.meta["external_embeddings"]
    assert info["path"] == os.path.abspath(emb) and info["dim"] == 5 and len(info["sha256"]) == 64
    # no inference ran again: the store was complete
    assert '"chunks_mined_now": 0' in capsys.readouterr().out
    # the report reads the same vectors back (normalised) from the table's provenance
    _, _, ann, props2 = report.load_run_outputs(out)
    np.testing.assert_allclose(ann.embedding, np.tile(np.eye(5)[0], (n_a, 1)), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(props2.embedding[uni], axis=1), 1.0, atol=1e-6)
    # ... and refuses a file changed since
    _write_embeddings(emb, t)
    with pytest.raises(external.EmbeddingsError, match="changed since"):
        report.load_run_outputs(out)
    # with every proposal along e2, nothing is mined
    out2 = str(tmp_path / "mined_none.npz")
    assert driver.main(["--workdir", str(world["run"]), "--chunk_slices", "8", "--progress",
                        "off", "--embeddings", emb, "--out", out2, "--location_mm", "0"]) == 0
    assert table.read_overlay(out2).counts()["mined"] == 0


@pytest.mark.parametrize("change, message", [
    ({"fingerprint": np.asarray("0" * 64)}, "'fingerprint'"),
    ({"proposal": np.ones((2, 5))}, "'proposal' has shape (2, 5)"),
    ({"annotation": np.zeros((6, 5))}, "'annotation' row 0 is zero or not finite"),
    ({"annotation": np.ones((6, 4))}, "'annotation' has 4 columns, 'proposal' 5"),
])
def test_bad_embeddings_files_are_refused(world, exported, tmp_path, capsys, change, message):  # noqa: F811
    _, t = exported
    emb = _write_embeddings(str(tmp_path / "bad.npz"), t, **change)
    out = str(tmp_path / "never.npz")
    assert driver.main(["--workdir", str(world["run"]), "--chunk_slices", "8", "--progress", "off",
                        "--embeddings", emb, "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {emb}: ") and message in err and err.count("\n") == 1
    assert not os.path.exists(out)


def test_missing_key_and_missing_store(world, exported, tmp_path, capsys):  # noqa: F811
    _, t = exported
    emb = str(tmp_path / "nokey.npz")
    np.savez(emb, annotation=np.ones((6, 5)), fingerprint=t["fingerprint"])
    assert driver.main(["--workdir", str(world["run"]), "--chunk_slices", "8", "--progress", "off",
                        "--embeddings", emb]) == 1
    assert "no array 'proposal'" in capsys.readouterr().err
    # a missing file is refused before any inference: no new store is started
    assert driver.main(["--workdir", str(world["run"]), "--progress", "off", "--store_dir",
                        str(tmp_path / "new_store"), "--embeddings",
                        str(tmp_path / "absent.npz")]) == 1
    assert "absent.npz: no such embeddings file" in capsys.readouterr().err
    assert not (tmp_path / "new_store").exists()
    assert external.main(["--store", str(tmp_path / "nostore"), "--out",
                          str(tmp_path / "t.npz")]) == 1
    assert "not a mining chunk store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        external.main(["--store", _store(world), "--out", str(tmp_path / "t.npz"), "--crop_px",
                       "0", "--radiomic", str(tmp_path / "r.npz")])
    assert not os.path.exists(tmp_path / "t.npz")


def test_rows_only_export(world, exported, tmp_path, capsys):  # noqa: F811
    """--crop_px 0: the same rows and fingerprint, no crops (and no build needed)."""
    _, t = exported
    out = str(tmp_path / "rows.npz")
    assert external.main(["--store", _store(world), "--out", out, "--crop_px", "0",
                          "--data_dir", str(tmp_path / "no_build_here")]) == 0
    assert "no crops" in capsys.readouterr().out
    with np.load(out, allow_pickle=False) as z:
        assert "crop" not in z.files and str(z["fingerprint"]) == str(t["fingerprint"])
        np.testing.assert_array_equal(z["box"], t["box"])


def test_radiomic_features_golden_case():
    """Hand-worked: a 2 x 2 px box of 100 HU on 0 HU (pixel centres 2.5 and 3.5 lie in [2, 4]),
    10 HU above and -10 HU below it, 0.5 mm pixels (sides 1 mm and 1.5 mm)."""
    crop = np.zeros((2, 3, 8, 8), np.int16)
    crop[:, 1, 2:4, 2:4] = 100
    crop[:, 0, 2:4, 2:4] = 10
    crop[:, 2, 2:4, 2:4] = -10
    t = {"crop": crop, "crop_box": np.asarray([[2, 2, 4, 4], [2, 2, 5, 4]], np.float32),
         "pixel_mm": np.asarray([0.5, 0.5], np.float32),
         "kind": np.asarray(["annotation", "proposal"]), "fingerprint": np.asarray("f")}
    f = external.radiomic_features(t)
    # box 0: 4 pixels of 100; ring = the 4 x 4 grown box minus them, all 0
    np.testing.assert_allclose(f[0], [100, 0, 100, np.log(1.0), np.log(1.0), 10, -10])
    # box 1 ([y1, x1, y2, x2] = [2, 2, 5, 4]): rows 2-4, columns 2-3 -> 4 of 100 and 2 of 0 (row 4)
    # the ring (grown: |x - 3| <= 2, |y - 3.5| <= 3, minus the box) is all 0 HU
    v = np.r_[[100.0] * 4, 0, 0]
    np.testing.assert_allclose(f[1], [v.mean(), v.std(), v.mean(), np.log(1.5), np.log(1.0),
                                      20 / 3, -20 / 3])
    e = external.radiomic_embedding(t)
    assert e["annotation"].shape == (1, 7) and e["proposal"].shape == (1, 7)
    assert str(e["fingerprint"]) == "f"


def test_radiomic_file_is_a_valid_embeddings_file(world, tmp_path, capsys):  # noqa: F811
    out, emb = str(tmp_path / "t.npz"), str(tmp_path / "rad.npz")
    assert external.main(["--store", _store(world), "--out", out, "--crop_px", "16",
                          "--radiomic", emb]) == 0
    assert "radiomic embeddings (7-D)" in capsys.readouterr().out
    slices, ann, props = store.ChunkStore.open(_store(world)).load()
    ann2, props2, info = external.load_embeddings(emb, slices, ann, props)
    assert info["dim"] == 7 and ann2.embedding.shape == (6, 7)
    np.testing.assert_allclose(np.linalg.norm(ann2.embedding, axis=1), 1.0, atol=1e-6)
