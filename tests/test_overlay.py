"""uld_jax.overlay: mined rows merged into a sample table without touching the slice store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import input_pipeline as ip
from uld_jax import overlay as ov
from uld_jax import slice_data as sd
from uld_jax.core import Keys, Provenance


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ovl")
    cases = [cf.make_case("deeplesion", k, num_slices=8, height=40, width=40, lesion_slices=(3,),
                          negatives=(), split="train" if k < 3 else "val") for k in range(4)]
    build_lib.build("/raw", str(out), ["deeplesion"], reader_lookup=lambda n: cf.ListReader(cases),
                    progress=False)
    return out, cases


def _rows():
    return [
        # A mined positive on the key slice of case 0, an ignore region on a new slice of case 1,
        # an added unlabeled slice of case 2, and a row of a validation case (other split).
        dict(dataset="deeplesion", case_id="deeplesion_case0000", slice_index=3, kind=1,
             box=[20, 25, 30, 33], score=0.9, expert=1, lesion_id=7),
        dict(dataset="deeplesion", case_id="deeplesion_case0001", slice_index=6, kind=2,
             box=[5, 5, 15, 12], score=0.8, expert=2, lesion_id=-1),
        dict(dataset="deeplesion", case_id="deeplesion_case0002", slice_index=0, kind=3,
             box=[0, 0, 0, 0], score=0.0, expert=-1, lesion_id=-1),
        dict(dataset="deeplesion", case_id="deeplesion_case0003", slice_index=5, kind=3,
             box=[0, 0, 0, 0], score=0.0, expert=-1, lesion_id=-1),
    ]


def _store_stat(out):
    d = sd.table_dir(os.path.join(out, "deeplesion"), "deeplesion", "slices")
    return sorted((f, os.stat(os.path.join(d, f)).st_mtime_ns, os.path.getsize(os.path.join(d, f)))
                  for f in os.listdir(d))


def test_write_overlay_validates_rows(data, tmp_path):
    out, _ = data
    p = ov.write_overlay(str(tmp_path / "a.npz"), _rows(), {"theta": 0.15, "step": 4000}, data_dir=str(out))
    cols, meta = ov.read_overlay(p)
    assert meta["theta"] == 0.15 and "created" in meta
    assert cols["kind"].tolist() == [1, 2, 3, 3] and cols["box"].shape == (4, 4)
    assert [f for f in os.listdir(tmp_path) if "tmp" in f] == []
    bad = [
        (dict(_rows()[0], case_id="deeplesion_case0099"), "row 1 .*unknown case id 'deeplesion_case0099'"),
        (dict(_rows()[0], slice_index=8), "row 1 .*slice index 8 outside 0..7"),
        (dict(_rows()[0], box=[20, 25, 50, 33]), "outside the 40x40 slice"),
        (dict(_rows()[0], box=[20, 25, 10, 33]), "field 'box': row 1: .* y2 > y1"),
        (dict(_rows()[0], kind=4), "field 'kind': row 1: 4 is not"),
        (dict(_rows()[0], dataset="mnist"), "field 'dataset': row 1: 'mnist' is not one of"),
    ]
    for row, msg in bad:
        with pytest.raises(ov.OverlayError, match=msg):
            ov.write_overlay(str(tmp_path / "b.npz"), [_rows()[1], row], {}, data_dir=str(out))
        assert not (tmp_path / "b.npz").exists()
    with pytest.raises(ov.OverlayError, match="needs data_dir"):
        ov.write_overlay(str(tmp_path / "c.npz"), _rows(), {})
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ov.OverlayError, match="junk.npz: not a readable overlay"):
        ov.read_overlay(str(tmp_path / "junk.npz"))


def test_overlay_merged_at_load_time(data, tmp_path):
    out, _ = data
    before = _store_stat(out)
    p = ov.write_overlay(str(tmp_path / "a.npz"), _rows(), {"theta": 0.15}, data_dir=str(out))
    base = sd.load_sample_table(out, "deeplesion", "train")
    t = sd.load_sample_table(out, "deeplesion", "train", overlays=[p])
    assert len(base) == 3 and len(t) == 5                 # + slice 6 of case 1, slice 0 of case 2
    assert t.added.tolist() == [False, False, False, True, True]
    s0 = t.sample_lesions(0)
    assert s0["provenance"].tolist() == [Provenance.ORIGINAL, Provenance.MINED]
    np.testing.assert_array_equal(s0["boxes"][1], [20, 25, 30, 33])
    assert s0["lesion_id"][1] == 7 and s0["expert"][1] == 1 and s0["score"][1] == pytest.approx(0.9)
    s3 = t.sample_lesions(3)
    assert t.case_id[t.case_row[3]] == "deeplesion_case0001" and t.slice_index[3] == 6
    assert s3["provenance"].tolist() == [Provenance.IGNORE]
    assert t.z_mm[3] == pytest.approx(100.0 + 6 * 2.0)
    assert len(t.sample_lesions(4)["boxes"]) == 0
    val = sd.load_sample_table(out, "deeplesion", "val", overlays=[p])
    assert len(val) == 2 and val.added.sum() == 1
    assert _store_stat(out) == before                      # slice store untouched

    # Through the loader (no mixing): mined box as MINED, ignore region in ignore_boxes.
    c = ip.default_input_config("tiny")
    c.update(dict(data_dir=str(out), datasets=("deeplesion",), overlays=(p,), image_size=(48, 48),
                  pixel_mm=0.8, mix=False, shuffle=False, augment=False, num_epochs=1,
                  global_batch_size=5))
    (batch,) = list(ip.make_dataset(c, process_index=0, process_count=1))
    assert batch[Keys.SAMPLE_ID].tolist() == [0, 1, 2, 3, 4]
    assert batch[Keys.PROVENANCE][0, :2].tolist() == [Provenance.ORIGINAL, Provenance.MINED]
    assert batch[Keys.BOX_VALID].sum(axis=1).tolist() == [2, 1, 1, 0, 0]
    assert batch[Keys.IGNORE_VALID].sum(axis=1).tolist() == [0, 0, 0, 1, 0]
    np.testing.assert_allclose(batch[Keys.IGNORE_BOXES][3, 0], np.array([5, 5, 15, 12]) + 4)
    assert not batch[Keys.MASKS][0, 1].any()               # mined rows carry no mask

    # Training mixing draws added slices per epoch: added_ratio * key slices.
    m = ip.EpochMixDataset([t], seed=0, added_ratio=0.5)
    assert m.epoch_length == 3 + 2


def test_merge_overlays_is_versioned_and_atomic(data, tmp_path):
    out, _ = data
    before = _store_stat(out)
    p = ov.write_overlay(str(tmp_path / "a.npz"), _rows(), {"theta": 0.15}, data_dir=str(out))
    path = ov.merge_overlays(str(out), "deeplesion", [p], "round1")
    info = json.loads(open(os.path.join(path, "overlay_info.json"), encoding="utf-8").read())
    assert info["overlays"][0]["meta"]["theta"] == 0.15 and len(info["overlays"][0]["sha256"]) == 64
    assert info["counts"]["train"] == {"samples": 5, "added_samples": 2, "rows": 2}
    merged = sd.load_sample_table(out, "deeplesion", "train", version="round1")
    live = sd.load_sample_table(out, "deeplesion", "train", overlays=[p])
    np.testing.assert_array_equal(merged.slice_index, live.slice_index)
    np.testing.assert_array_equal(merged.added, live.added)
    for k in live.lesions:
        np.testing.assert_array_equal(merged.lesions[k], live.lesions[k])
    with pytest.raises(ov.OverlayError, match="immutable"):
        ov.merge_overlays(str(out), "deeplesion", [p], "round1")
    # A second round on top of the first.
    q = ov.write_overlay(str(tmp_path / "b.npz"), [_rows()[2]], {}, data_dir=str(out))
    ov.merge_overlays(str(out), "deeplesion", [q], "round2", base_version="round1")
    r2 = sd.load_sample_table(out, "deeplesion", "train", version="round2")
    assert len(r2) == 5                                     # slice 0 of case 2 already added
    assert [d for d in os.listdir(os.path.join(out, "deeplesion", "overlays")) if d.startswith(".")] == []
    assert _store_stat(out) == before
    with pytest.raises(FileNotFoundError, match="no merged overlay table named 'nope'"):
        sd.load_sample_table(out, "deeplesion", "train", version="nope")


def test_add_slices_every_5mm(data):
    out, cases = data
    t = sd.load_sample_table(out, "deeplesion", "train")
    m = ov.add_slices(t, every_mm=5.0)          # 2 mm slices, 0 / 5 / 10 / 15 mm -> slices 0, 3, 5, (8: none)
    got = sorted((str(m.case_id[m.case_row[s]]), int(m.slice_index[s])) for s in range(len(m)))
    expect = sorted({(c.case_id, z) for c in cases if c.split == "train" for z in (0, 3, 5)})
    assert got == expect
    key = [s for s in range(len(m)) if m.is_key_slice[s]]
    assert len(key) == 3 and all(len(m.sample_lesions(s)["boxes"]) == 1 for s in key)
    assert m.added.sum() == len(m) - 3


def test_overlay_cli(data, tmp_path, capsys):
    out, _ = data
    p = ov.write_overlay(str(tmp_path / "a.npz"), _rows(), {"theta": 0.15}, data_dir=str(out))
    assert ov.main(["show", p]) == 0
    shown = capsys.readouterr().out
    assert "deeplesion: mined 1, ignore 1, added slices 2" in shown and '"theta": 0.15' in shown
    assert ov.main(["merge", "--data", str(out), "--dataset", "deeplesion", "--name", "cli1", p]) == 0
    assert os.path.isfile(os.path.join(out, "deeplesion", "overlays", "cli1", "overlay_info.json"))
    assert ov.main(["merge", "--data", str(out), "--dataset", "deeplesion", "--name", "cli1", p]) == 1
    assert "immutable" in capsys.readouterr().err


def test_mining_pass_over_added_slices(data):
    out, cases = data
    c = ip.default_input_config("tiny")
    c.update(dict(data_dir=str(out), datasets=("deeplesion",), image_size=(48, 48), pixel_mm=0.8,
                  mix=False, shuffle=False, augment=False, num_epochs=1, global_batch_size=4))
    tables, stores = ip.load_tables(c)
    tables = [ov.add_slices(t, every_mm=5.0) for t in tables]
    batches = list(ip.make_dataset(c, tables=tables, stores=stores, process_index=0, process_count=1))
    ids = np.concatenate([b[Keys.SAMPLE_ID] for b in batches])
    assert sorted(ids[ids >= 0].tolist()) == list(range(len(tables[0])))
    by_id = {cs.case_id: cs for cs in cases}
    t = tables[0]
    for b in batches:
        for i, s in enumerate(b[Keys.SAMPLE_ID]):
            if s < 0:
                continue
            case = by_id[t.case_id[t.case_row[s]]]
            z = int(t.slice_index[s])
            valid = b[Keys.IMAGE_VALID][i]
            ys, xs = np.nonzero(valid)
            crop = b[Keys.IMAGE][i, ys.min():ys.max() + 1, xs.min():xs.max() + 1, 4]
            np.testing.assert_array_equal(crop, ip.encode_image(ip.window(case.slices[z])))


def test_slices_with_mined_positives_are_drawn_every_epoch(data, tmp_path):
    out, _ = data
    # a mined positive on an added (non-key) slice of case 1, and 3 plain added slices
    rows = [dict(dataset="deeplesion", case_id="deeplesion_case0001", slice_index=6, kind=1,
                 box=[5, 5, 15, 12], score=0.9, expert=0, lesion_id=3)]
    rows += [dict(dataset="deeplesion", case_id=f"deeplesion_case000{k}", slice_index=0, kind=3,
                  box=[0, 0, 0, 0], score=0.0, expert=-1, lesion_id=-1) for k in range(3)]
    p = ov.write_overlay(str(tmp_path / "m.npz"), rows, {"theta": 0.15}, data_dir=str(out))
    t = sd.load_sample_table(out, "deeplesion", "train", overlays=(p,))
    mined_row = int(np.flatnonzero(t.added & t.has_provenance(Provenance.MINED))[0])
    assert t.has_provenance(Provenance.MINED).sum() == 1 and not t.has_original()[mined_row]

    def drawn(mined_as_base, epochs=6):
        ds = ip.EpochMixDataset([t], seed=0, added_ratio=1 / 3, mined_as_base=mined_as_base)
        return ds.composition()[0], [ds.epoch_elements(e)[:, 1].tolist() for e in range(epochs)]

    comp, epochs = drawn(True)
    # 3 key slices + the mined slice are base positives; one of the 3 other added slices per epoch
    assert comp == {"positive": 4, "negative": 0, "added": 1, "added_pool": 3}
    assert all(mined_row in e for e in epochs)
    comp, epochs = drawn(False)
    # without: the mined slice is one of 4 added slices, one drawn per epoch
    assert comp == {"positive": 3, "negative": 0, "added": 1, "added_pool": 4}
    assert sum(mined_row in e for e in epochs) < 6
