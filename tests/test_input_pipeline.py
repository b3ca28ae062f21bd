"""uld_jax.input_pipeline: built datasets -> batches; checked against the known voxels of the Cases."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import input_pipeline as ip
from uld_jax.core import DATASET_ID, Keys, Provenance, decode_image
from uld_jax.ops import roi_align

H = W = 64


def _window(hu):
    """The batch's value for ``hu`` (decoded): windowed, then rounded to the batch's fixed point."""
    return float(decode_image(ip.encode_image(ip.window(np.asarray([hu], np.int16))))[0])


def _canvas(batch, b):
    """[G, H, W] whole-image masks of sample b: the batch's crops pasted over their mask boxes by
    the model's paste rule (``roi_align.paste_masks``), thresholded at 0.5."""
    return np.asarray(roi_align.paste_masks(batch[Keys.MASKS][b], batch[Keys.MASK_BOXES][b],
                                            H, W)) >= 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    luna = [cf.make_case("luna16", k, num_slices=10, height=48, width=40, lesion_slices=(k % 10,),
                         negatives=tuple({(k + 3) % 10, (k + 6) % 10}), split="train")
            for k in range(8)]
    # DeepLesion: key slices at the volume ends (edge replication) and one with an ignore region.
    dl = [cf.make_case("deeplesion", k, num_slices=7, height=40, width=48,
                       lesion_slices=((0,), (6,), (3,), (1,))[k], negatives=(),
                       ignore_boxes=(((3, [30, 35, 36, 44]),) if k == 2 else ()))
          for k in range(4)]
    for name, cases in (("luna16", luna), ("deeplesion", dl)):
        build_lib.build("/raw", str(out), [name], reader_lookup=lambda n, c=cases: cf.ListReader(c),
                        chunk_slices=30, progress=False)
    cases = {c.case_id: (k, c) for k, c in enumerate(luna)}
    cases.update({c.case_id: (k, c) for k, c in enumerate(dl)})
    return out, cases


def _config(out, **kw):
    c = ip.default_input_config("tiny")
    c.data_dir = str(out)
    c.datasets = ("deeplesion", "luna16")
    c.image_size = (H, W)
    c.pixel_mm = 0.8
    c.global_batch_size = 4
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _batches(c, n, **kw):
    it = iter(ip.make_dataset(c, process_index=kw.pop("process_index", 0),
                              process_count=kw.pop("process_count", 1), **kw))
    return [next(it) for _ in range(n)], it


def _lookup(tables, batch, b):
    t = [tb for tb in tables if tb.dataset_id == int(batch[Keys.DATASET_ID][b])][0]
    row = int(batch[Keys.SAMPLE_ID][b])
    return t, row, str(t.case_id[t.case_row[row]]), int(t.slice_index[row])


def test_shapes_dtypes_and_padding(data):
    out, _ = data
    c = _config(out)
    (batch,), _ = _batches(c, 1)
    G, R, B = c.max_boxes, c.max_ignore, 4
    M = c.mask_crop
    expect = {Keys.IMAGE: ((B, H, W, 9), np.int16), Keys.IMAGE_VALID: ((B, H, W), np.bool_),
              Keys.DATASET_ID: ((B,), np.int32), Keys.BOXES: ((B, G, 4), np.float32),
              Keys.BOX_VALID: ((B, G), np.bool_), Keys.MASKS: ((B, G, M, M), np.uint8),
              Keys.MASK_BOXES: ((B, G, 4), np.float32),
              Keys.PROVENANCE: ((B, G), np.int32), Keys.LESION_TYPE: ((B, G), np.int32),
              Keys.LESION_ID: ((B, G), np.int64), Keys.ORGAN_TARGET: ((B, G, 3), np.float32),
              Keys.ORGAN_VALID: ((B, G, 3), np.bool_), Keys.IGNORE_BOXES: ((B, R, 4), np.float32),
              Keys.IGNORE_VALID: ((B, R), np.bool_), Keys.SAMPLE_ID: ((B,), np.int64),
              Keys.IS_KEY_SLICE: ((B,), np.bool_), Keys.PIXEL_MM: ((B,), np.float32)}
    assert set(batch) == set(expect)
    for k, (shape, dtype) in expect.items():
        assert batch[k].shape == shape and batch[k].dtype == dtype, k
    img, valid = decode_image(batch[Keys.IMAGE]), batch[Keys.IMAGE_VALID]
    assert np.all(img[~valid] == ip.PAD_VALUE) and np.all(batch[Keys.IMAGE][~valid] == ip.PAD_CODE)
    assert valid.any(axis=(1, 2)).all() and not valid.all()       # 48x40 / 40x48 slices in 64x64
    assert np.all(batch[Keys.BOXES][~batch[Keys.BOX_VALID]] == 0)
    assert np.all(batch[Keys.LESION_ID][~batch[Keys.BOX_VALID]] == -1)
    assert np.all(batch[Keys.MASKS][~batch[Keys.BOX_VALID]] == 0)
    assert np.all(batch[Keys.MASK_BOXES][~batch[Keys.BOX_VALID]] == 0)


def test_boxes_and_masks_land_on_lesion_pixels_under_augmentation(data):
    out, _ = data
    c = _config(out)
    batches, _ = _batches(c, 6)
    lesion = _window(cf.LESION_HU)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    checked = 0
    for batch in batches:
        for b in range(4):
            assert 0.8 / 1.2 - 1e-5 <= batch[Keys.PIXEL_MM][b] <= 0.8 / 0.8 + 1e-5
            centre = decode_image(batch[Keys.IMAGE][b, :, :, 4])
            valid = batch[Keys.IMAGE_VALID][b]
            for g in np.flatnonzero(batch[Keys.BOX_VALID][b]):
                y1, x1, y2, x2 = batch[Keys.BOXES][b, g]
                inner = (yy > y1 + 1) & (yy < y2 - 1) & (xx > x1 + 1) & (xx < x2 - 1)
                near = (yy > y1 - 3) & (yy < y2 + 3) & (xx > x1 - 3) & (xx < x2 + 3)
                outer = near & ~((yy > y1 - 1) & (yy < y2 + 1) & (xx > x1 - 1) & (xx < x2 + 1)) & valid
                assert inner.any() and outer.any()
                np.testing.assert_allclose(centre[inner], lesion, atol=1e-3)
                assert np.all(np.abs(centre[outer] - lesion) > 50)
                m = _canvas(batch, b)[g]
                assert m[inner].all() and not m[outer].any()
                checked += 1
    assert checked >= 10
    # Augmentation changed the geometry between samples.
    assert len({round(float(v), 4) for bt in batches for v in bt[Keys.PIXEL_MM]}) > 5


def test_context_channels_are_the_neighbour_slices_with_edge_replication(data):
    out, cases = data
    c = _config(out, augment=False)
    tables, _ = ip.load_tables(c)
    batches, _ = _batches(c, 5)
    edge_seen = 0
    for batch in batches:
        for b in range(4):
            _, _, cid, z = _lookup(tables, batch, b)
            k, case = cases[cid]
            n = case.slices.shape[0]
            valid = batch[Keys.IMAGE_VALID][b]
            bg = valid & ~_canvas(batch, b).any(axis=0)
            ys, xs = np.nonzero(bg)
            y, x = ys[0], xs[0]                  # top-left visible pixel: background on every slice
            expect = [_window(cf.slice_hu(k, int(np.clip(z + d, 0, n - 1)))) for d in range(-4, 5)]
            np.testing.assert_allclose(decode_image(batch[Keys.IMAGE][b, y, x]), expect, atol=1e-5)
            ys, xs = np.nonzero(valid)
            crop = batch[Keys.IMAGE][b, ys.min():ys.max() + 1, xs.min():xs.max() + 1, 4]
            # an exact copy at scale 1 (then in the batch's fixed point)
            np.testing.assert_array_equal(crop, ip.encode_image(ip.window(case.slices[z])))
            edge_seen += z < 4 or z > n - 5
            assert batch[Keys.PIXEL_MM][b] == pytest.approx(0.8)
    assert edge_seen > 0
    assert ip.context_indices(0, 7, 2.0).tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert ip.context_indices(2, 7, 1.0).tolist() == [0, 0, 0, 0, 2, 4, 6, 6, 6]


def test_ignore_regions_go_to_ignore_boxes(data):
    out, _ = data
    c = _config(out, datasets=("deeplesion",), augment=False, mix=False, shuffle=False, num_epochs=1)
    batches, _ = _batches(c, 1)
    b = batches[0]
    assert b[Keys.IGNORE_VALID].sum() == 1 and np.all(b[Keys.PROVENANCE][b[Keys.BOX_VALID]] == Provenance.ORIGINAL)
    i = int(np.flatnonzero(b[Keys.IGNORE_VALID].any(axis=1))[0])
    y1, x1, y2, x2 = b[Keys.IGNORE_BOXES][i][b[Keys.IGNORE_VALID][i]][0]
    assert (y2 - y1, x2 - x1) == pytest.approx((6, 9))


def test_iterator_state_round_trip_and_determinism(data):
    out, _ = data
    c = _config(out)
    first, it = _batches(c, 2)
    state = it.get_state()
    cont = [next(it) for _ in range(3)]
    it2 = iter(ip.make_dataset(c, process_index=0, process_count=1))
    it2.set_state(state)
    again = [next(it2) for _ in range(3)]
    for a, b in zip(cont, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    same, _ = _batches(c, 2)
    for a, b in zip(first, same):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other, _ = _batches(_config(out, seed=1), 2)
    assert not all(np.array_equal(a[Keys.IMAGE], b[Keys.IMAGE]) for a, b in zip(first, other))


def test_worker_processes_give_the_same_batches(data):
    out, _ = data
    c0 = _config(out, num_workers=0)
    c1 = _config(out, num_workers=1)
    ref, _ = _batches(c0, 3)
    it = iter(ip.make_dataset(c1, process_index=0, process_count=1))
    try:
        got = [next(it) for _ in range(2)]
        state = it.get_state()
        got.append(next(it))
    finally:
        it.close()
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a[Keys.IMAGE], b[Keys.IMAGE])
        np.testing.assert_array_equal(a[Keys.SAMPLE_ID], b[Keys.SAMPLE_ID])
    it2 = iter(ip.make_dataset(c1, process_index=0, process_count=1))
    try:
        it2.set_state(state)
        np.testing.assert_array_equal(next(it2)[Keys.IMAGE], ref[2][Keys.IMAGE])
    finally:
        it2.close()


def _epoch_set(ds, epoch):
    n = ds.per_process
    return [tuple(ds[epoch * n + j][:2]) for j in range(n)]


def test_epoch_mixing_and_process_sharding(data):
    out, _ = data
    c = _config(out)
    tables, _ = ip.load_tables(c)
    full = ip.EpochMixDataset(tables, seed=3)
    dl, luna = tables
    n_pos_luna = int((luna.has_original() | luna.is_key_slice).sum())
    assert full.epoch_length == len(dl) + 2 * n_pos_luna
    assert ip.steps_per_epoch(c, tables, process_count=1) == full.epoch_length // 4
    assert ip.steps_per_epoch(c, tables, process_count=2) == (full.epoch_length // 2) // 2
    e0, e1 = _epoch_set(full, 0), _epoch_set(full, 1)
    for ep in (e0, e1):
        assert len(set(ep)) == len(ep)                      # without replacement
        luna_rows = [r for t, r in ep if t == 1]
        assert sum(luna.has_original()[luna_rows]) == n_pos_luna
        assert sum(~luna.has_original()[luna_rows]) == n_pos_luna
        assert sorted(r for t, r in ep if t == 0) == list(range(len(dl)))
    neg = lambda ep: {r for t, r in ep if t == 1 and not luna.has_original()[r]}  # noqa: E731
    assert neg(e0) != neg(e1)                                # lesion-free slices re-drawn per epoch
    shards = [ip.EpochMixDataset(tables, seed=3, process_index=p, process_count=3) for p in range(3)]
    for e in (0, 1):
        parts = [_epoch_set(s, e) for s in shards]
        flat = [x for p in parts for x in p]
        assert len(set(flat)) == len(flat)                   # disjoint
        assert set(flat) <= set(_epoch_set(full, e))
        assert len(flat) == 3 * (full.epoch_length // 3)
    # Through the whole pipeline: two processes with half the global batch each.
    a, _ = _batches(c, 2, process_index=0, process_count=2)
    b, _ = _batches(c, 2, process_index=1, process_count=2)
    ids = lambda bs: {(int(d), int(s)) for x in bs for d, s in zip(x[Keys.DATASET_ID], x[Keys.SAMPLE_ID])}  # noqa: E731
    assert a[0][Keys.IMAGE].shape[0] == 2 and not ids(a) & ids(b)
    # A sample's augmentation depends on its place in the epoch, not on the process layout.
    (one,), _ = _batches(c, 1)
    for k, (src, j) in enumerate([(a[0], 0), (b[0], 0), (a[0], 1), (b[0], 1)]):
        np.testing.assert_array_equal(one[Keys.IMAGE][k], src[Keys.IMAGE][j])


def test_evaluation_order_covers_every_sample_once_with_padding(data):
    out, _ = data
    c = _config(out, datasets=("luna16",), mix=False, shuffle=False, augment=False, num_epochs=1,
                global_batch_size=5)
    tables, _ = ip.load_tables(c)
    n = len(tables[0])
    batches = list(ip.make_dataset(c, process_index=0, process_count=1))
    ids = np.concatenate([b[Keys.SAMPLE_ID] for b in batches])
    assert len(batches) == -(-n // 5)
    np.testing.assert_array_equal(ids[:n], np.arange(n))
    assert np.all(ids[n:] == -1)
    pad = batches[-1]
    assert not pad[Keys.IMAGE_VALID][ids[-5:] == -1].any()
    assert DATASET_ID["luna16"] in pad[Keys.DATASET_ID]


def test_default_configs():
    tiny, paper = ip.default_input_config("tiny"), ip.default_input_config("paper")
    assert tiny.image_size == (160, 160) and tiny.max_boxes == 8 and tiny.pixel_mm == 2.0
    assert paper.image_size == (512, 512) and paper.pixel_mm == pytest.approx(0.8)
    with pytest.raises(ValueError, match="variant"):
        ip.default_input_config("huge")


def test_placement_geometry_matches_boxes():
    rng = np.random.default_rng(0)
    img = np.zeros((30, 20, 1), np.float32)
    img[10:15, 4:9, 0] = 100
    for _ in range(20):
        p = ip.choose_placement(30, 20, 0.8, 0.8, (48, 48), rng)
        out, valid = ip.warp_image(img, p, (48, 48))
        boxes, keep = ip.warp_boxes(np.array([[10, 4, 15, 9]]), p, 30, 20, (48, 48))
        assert keep[0]
        y1, x1, y2, x2 = boxes[0]
        ys, xs = np.nonzero(out[:, :, 0] > 50)               # pixels mostly inside the lesion
        assert ys.min() + 0.5 >= y1 - 0.5 and ys.max() + 0.5 <= y2 + 0.5
        assert xs.min() + 0.5 >= x1 - 0.5 and xs.max() + 0.5 <= x2 + 0.5
        area = (out[:, :, 0][valid] / 100.0).sum()
        assert area == pytest.approx((y2 - y1) * (x2 - x1), rel=0.05)


def test_window_lut_equals_window():
    hu = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16).reshape(256, 256)
    np.testing.assert_array_equal(ip.window_lut(hu), ip.window(hu))
    assert ip.window(np.array([-2000, -1024, 3071, 5000], np.int16)).tolist() == [-50, -50, 205, 205]


def test_bilinear_warp_matches_pillow():
    """An independent implementation (Pillow's affine transform) gives the same interior pixels."""
    from PIL import Image
    rng = np.random.default_rng(1)
    img = rng.normal(0, 50, (37, 45, 1)).astype(np.float32)
    p = ip.Placement(1.13, -3.7, 5.2)
    out, valid = ip.warp_image(img, p, (40, 50))
    ref = Image.fromarray(img[:, :, 0], mode="F").transform(
        (50, 40), Image.Transform.AFFINE, (1 / p.scale, 0, -p.tx / p.scale, 0, 1 / p.scale, -p.ty / p.scale),
        resample=Image.Resampling.BILINEAR)
    inner = np.zeros_like(valid)
    inner[3:-3, 8:-8] = True
    inner &= valid
    np.testing.assert_allclose(out[:, :, 0][inner], np.asarray(ref)[inner], atol=1e-3)


def test_iterator_checkpoint_with_orbax(data, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    out, _ = data
    c = _config(out)
    _, it = _batches(c, 1)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"),
                                 item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = [next(it) for _ in range(2)]
    it2 = iter(ip.make_dataset(c, process_index=0, process_count=1))
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    for a in want:
        b = next(it2)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # The plain JSON helpers do the same.
    ip.save_iterator_state(it2, str(tmp_path / "state.json"))
    nxt = next(it2)
    ip.restore_iterator_state(it, str(tmp_path / "state.json"))
    np.testing.assert_array_equal(next(it)[Keys.IMAGE], nxt[Keys.IMAGE])


def test_table_store_mismatch_fails_loudly(data):
    out, _ = data
    c = _config(out, datasets=("luna16",))
    tables, stores = ip.load_tables(c)
    tables[0].case_slice_start = tables[0].case_slice_start + 1      # a corrupted table
    loader = ip.SampleLoader(tables, stores, c)
    with pytest.raises(ValueError, match="uld_luna16_slices.*the sample table expects 'luna16_case0000'"):
        loader.map(np.array([0, 0, 0]))


@pytest.mark.multidevice
def test_global_arrays_over_a_device_mesh(data):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    out, _ = data
    if jax.device_count() < 8:
        pytest.skip("needs 8 (forced host) devices")
    c = _config(out, global_batch_size=8)
    (batch,), _ = _batches(c, 1)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    g = ip.to_global_arrays(batch, NamedSharding(mesh, P("data")))
    assert g[Keys.IMAGE].shape == (8, H, W, 9) and len(g[Keys.IMAGE].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(g[Keys.BOXES]), batch[Keys.BOXES])


def test_antialiased_shrink_keeps_geometry_and_mean():
    rng = np.random.default_rng(2)
    img = rng.normal(0, 100, (101, 87, 2)).astype(np.float32)
    img[40:60, 30:50] = 500
    p = ip.Placement(0.3, 3.0, 5.0)
    out, valid = ip.warp_image_antialiased(img, p, (40, 40))
    _, valid_ref = ip.warp_image(img, p, (40, 40))
    np.testing.assert_array_equal(valid, valid_ref)
    # The plateau stays where the box transform puts it; noise is averaged down (no aliasing).
    (b,), _ = ip.warp_boxes(np.array([[40, 30, 60, 50]]), p, 101, 87, (40, 40))
    y1, x1, y2, x2 = b
    inner = out[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
    assert inner.size and np.all(np.abs(inner - 500) < 1e-3)
    bg = out[valid & (np.arange(40)[:, None] > y2 + 2)][:, 0]
    assert bg.std() < 100 / 2.0              # 3x3 averaging shrinks the noise ~3x; plain sampling would not


def test_image_boxes_map_back_to_the_sample_table(data):
    out, _ = data
    c = _config(out, augment=False, pixel_mm=1.1)        # a real rescale (0.8 mm slices)
    tables, _ = ip.load_tables(c)
    batches, _ = _batches(c, 3)
    n = 0
    for batch in batches:
        for b in range(4):
            t, row, _, _ = _lookup(tables, batch, b)
            p = ip.unaugmented_placement(t, row, c)
            assert batch[Keys.PIXEL_MM][b] == pytest.approx(0.8 / p.scale)
            les = t.sample_lesions(row)
            want = les["boxes"][les["provenance"] == Provenance.ORIGINAL]
            got = batch[Keys.BOXES][b][batch[Keys.BOX_VALID][b]]
            np.testing.assert_allclose(ip.image_boxes_to_slice(got, p), want, atol=1e-4)
            np.testing.assert_allclose(ip.slice_boxes_to_image(want, p), got, atol=1e-4)
            n += len(want)
    assert n > 3


def test_positives_beyond_max_boxes_become_ignore_regions(tmp_path, caplog):
    boxes = [[2 + 6 * i, 3, 6 + 6 * i, 9] for i in range(5)]
    case = cf.make_case("lits", 0, num_slices=4, height=40, width=20, lesion_slices=(2,) * 5,
                        boxes=boxes, negatives=())
    build_lib.build("/raw", str(tmp_path), ["lits"], reader_lookup=lambda n: cf.ListReader([case]),
                    progress=False)
    c = _config(tmp_path, datasets=("lits",), max_boxes=3, max_ignore=8, augment=False, mix=False,
                shuffle=False, num_epochs=1, global_batch_size=1)
    with caplog.at_level("WARNING"):
        (b,) = list(ip.make_dataset(c, process_index=0, process_count=1))
    assert b[Keys.BOX_VALID].sum() == 3 and b[Keys.IGNORE_VALID].sum() == 2
    kept = np.concatenate([b[Keys.BOXES][0][:3], b[Keys.IGNORE_BOXES][0][:2]])
    np.testing.assert_allclose(kept - kept[0] + np.asarray(boxes[0]), np.asarray(boxes, np.float32))
    assert "max_boxes=3" in caplog.text


def _centre_slice(batch, b, k, n):
    """The slice index whose background HU the centre channel of sample b shows (case number k)."""
    valid = batch[Keys.IMAGE_VALID][b]
    ys, xs = np.nonzero(valid & ~_canvas(batch, b).any(axis=0))
    v = decode_image(batch[Keys.IMAGE][b, ys[0], xs[0], 4])
    hits = [z for z in range(n) if abs(_window(cf.slice_hu(k, z)) - v) < 1e-3]
    assert len(hits) == 1
    return hits[0]


def test_key_slice_z_jitter_recentres_within_the_lesion(data):
    out, cases = data
    kw = dict(datasets=("deeplesion",), negative_ratio=0.0)
    off, _ = _batches(_config(out, **kw), 12)
    on, _ = _batches(_config(out, z_jitter=2.0, **kw), 12)
    still, _ = _batches(_config(out, z_jitter=2.0, augment=False, **kw), 3)
    tables, _ = ip.load_tables(_config(out, **kw))
    t = tables[0]
    assert t.is_key_slice.all()
    shifts = []
    for b_off, b_on in zip(off, on):
        # the jitter has its own random stream: the placement, boxes and masks are unchanged
        np.testing.assert_array_equal(b_on[Keys.BOXES], b_off[Keys.BOXES])
        np.testing.assert_array_equal(b_on[Keys.SAMPLE_ID], b_off[Keys.SAMPLE_ID])
        for b in range(4):
            _, row, cid, z = _lookup(tables, b_on, b)
            k, case = cases[cid]
            n = case.slices.shape[0]
            assert _centre_slice(b_off, b, k, n) == z
            # reach by hand: 2.0 x half the short side (6 px x 0.8 mm) / 2 mm slices = 2 slices
            box = t.sample_lesions(row)["boxes"][0]
            reach = int(2.0 * 0.5 * min(box[2] - box[0], box[3] - box[1]) * 0.8 / 2.0)
            assert reach == 2
            zc = _centre_slice(b_on, b, k, n)
            assert abs(zc - z) <= reach
            shifts.append(zc - z)
    assert len(set(shifts)) >= 3         # 48 draws of 5 shifts (some clipped at the volume ends)
    for batch in still:                  # no augmentation, no jitter
        for b in range(4):
            _, _, cid, z = _lookup(tables, batch, b)
            k, case = cases[cid]
            assert _centre_slice(batch, b, k, case.slices.shape[0]) == z


def test_image_boxes_in_slice_clips_and_flags_boxes_outside_the_slice():
    # golden case worked by hand: input = 2 * slice + (10, 4); the slice is 20 x 30 pixels
    p = ip.Placement(scale=2.0, ty=10.0, tx=4.0)
    boxes = np.float32([[[0, 4, 8, 20],        # slice y -5..-1: wholly above the slice
                         [6, 0, 30, 24],       # slice (-2, -2, 10, 10): clipped at the corner
                         [12, 8, 20, 64]],     # slice (1, 2, 5, 30): inside, touching x = 30
                        [[50, 10, 70, 20],     # slice y 20..30: wholly below (row 20 is the edge)
                         [14, 70, 20, 90],     # slice x 33..43: wholly right of the slice
                         [10, 4, 50, 64]]])    # slice (0, 0, 20, 30): the whole slice
    sb, inside = ip.image_boxes_in_slice(boxes, p, 20, 30)
    assert sb.shape == (2, 3, 4) and sb.dtype == np.float32
    np.testing.assert_allclose(sb, [[[0, 0, 0, 8], [0, 0, 10, 10], [1, 2, 5, 30]],
                                    [[20, 3, 20, 8], [2, 30, 5, 30], [0, 0, 20, 30]]])
    np.testing.assert_array_equal(inside, [[False, True, True], [False, False, True]])


def test_image_fixed_point_round_trip():
    # every windowed value the pipeline can make (HU -1024..3071 minus the mean, interpolated)
    x = np.linspace(-ip.PIXEL_MEAN - 1, 255.0 - ip.PIXEL_MEAN + 1, 100_001, dtype=np.float32)
    code = ip.encode_image(x)
    assert code.dtype == ip.IMAGE_DTYPE == np.int16
    back = decode_image(code)
    assert back.dtype == np.float32
    assert np.abs(back - x).max() <= 0.5 / ip.IMAGE_SCALE + 1e-6      # 1/128 unit: 0.13 HU
    assert decode_image(np.int16([ip.PAD_CODE]))[0] == ip.PAD_VALUE
    f = np.float32([[1.25, -3.0]])
    assert decode_image(f) is f                     # float32 images pass through, not copied
    np.testing.assert_array_equal(decode_image(f.astype(np.float64)), f)
    import jax.numpy as jnp
    np.testing.assert_array_equal(np.asarray(decode_image(jnp.asarray(code))), back)
