"""Preprocessing goldens: each against a hand-worked case or an independent numpy/scipy reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from data_prep import preprocess as pp


def test_window_hu_endpoints_and_clip():
    hu = np.array([-2000, -1024, 1023.5, 3071, 5000], np.float32)
    np.testing.assert_allclose(pp.window_hu(hu), [0.0, 0.0, 127.5, 255.0, 255.0], atol=1e-4)
    assert pp.window_hu(np.zeros((2, 3), np.int16)).dtype == np.float32


def test_body_crop_golden_and_speck_removed():
    img = np.full((3, 60, 70), -1024, np.int16)
    img[1, 10:30, 5:45] = 40          # body on one slice only: the union over slices counts
    img[0, 55, 65] = 500              # isolated speck (noise outside the body): removed
    img[2, 40:43, 0:70] = 100         # a thin (3 px) table edge: removed by the opening
    assert pp.body_crop(img, margin=2) == (8, 32, 3, 47)
    assert pp.body_crop(img, margin=0) == (10, 30, 5, 45)
    assert pp.body_crop(np.full((4, 5), -1024)) == (0, 4, 0, 5)  # nothing: whole image


def test_slice_positions_anchor_and_range():
    np.testing.assert_allclose(pp.slice_positions(0.0, 10.0, 2.0), [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(pp.slice_positions(0.0, 10.0, 2.0, anchor_mm=5.0), [1, 3, 5, 7, 9])
    np.testing.assert_allclose(pp.slice_positions(-3.0, -3.0, 2.0), [-3.0])


def test_box_maps_exactly_under_scale_and_crop():
    plan = pp.plan_resampling((100, 100), (0.4, 0.4), np.arange(5) * 2.0, (10, 90, 20, 80),
                              pixel_mm=0.8, slice_mm=2.0)
    assert plan.scale_yx == (0.5, 0.5) and plan.out_hw == (40, 30) and plan.crop_yx == (10, 20)
    np.testing.assert_allclose(plan.map_boxes([30, 40, 50, 60]), [10, 10, 20, 20])
    np.testing.assert_allclose(plan.map_points_xy([[40, 30]]), [[10, 10]])
    np.testing.assert_allclose(plan.out_z, [0, 2, 4, 6, 8])


def test_max_side_caps_the_long_side():
    plan = pp.plan_resampling((600, 300), (0.8, 0.8), np.arange(3.0), None, pixel_mm=0.8, max_side=512)
    assert plan.out_hw == (512, 256)
    assert plan.pixel_mm == pytest.approx(600 * 0.8 / 512)


def test_resample_volume_matches_scipy_trilinear():
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(7, 40, 50)).astype(np.int16)
    src_z = np.cumsum(np.full(7, 1.5)) + 3.0
    plan = pp.plan_resampling((40, 50), (0.55, 0.7), src_z, (3, 37, 6, 47), pixel_mm=0.8, slice_mm=2.0)
    out = pp.resample_volume(vol, plan)
    # Independent reference: scipy's trilinear map_coordinates (edge replication) at the output
    # voxel centres expressed in source index coordinates.
    zi = (plan.out_z - src_z[0]) / 1.5
    yi = (np.arange(plan.out_hw[0]) + 0.5) / plan.scale_yx[0] + 3 - 0.5
    xi = (np.arange(plan.out_hw[1]) + 0.5) / plan.scale_yx[1] + 6 - 0.5
    grid = np.meshgrid(zi, yi, xi, indexing="ij")
    ref = ndimage.map_coordinates(vol.astype(np.float64), grid, order=1, mode="nearest")
    assert out.shape == ref.shape and out.dtype == np.int16
    np.testing.assert_allclose(out, np.rint(ref), atol=1)


def test_linear_ramp_reproduced_exactly_in_mm():
    # HU = 10 * y_mm + 3 * x_mm + 5 * z_mm is linear, so linear resampling reproduces it exactly
    # (away from the replicated edges) at the output pixel centres' physical positions.
    sp = (0.5, 0.5)
    yy, xx = np.meshgrid((np.arange(64) + 0.5) * sp[0], (np.arange(64) + 0.5) * sp[1], indexing="ij")
    src_z = np.arange(9) * 1.25
    vol = np.stack([np.rint(10 * yy + 3 * xx + 5 * z) for z in src_z]).astype(np.int16)
    plan = pp.plan_resampling((64, 64), sp, src_z, None, pixel_mm=0.8, slice_mm=2.0)
    out = pp.resample_volume(vol, plan)
    oy = (np.arange(plan.out_hw[0]) + 0.5) * 0.8
    ox = (np.arange(plan.out_hw[1]) + 0.5) * 0.8
    expect = 10 * oy[None, :, None] + 3 * ox[None, None, :] + 5 * plan.out_z[:, None, None]
    inner = (slice(None), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(out[inner], expect[inner], atol=1.01)


def test_bright_cube_lands_inside_mapped_box():
    vol = np.full((10, 80, 90), -1000, np.int16)
    vol[:, 20:41, 30:61] = 1000      # rows 20..40, cols 30..60 inclusive
    box_src = np.array([20, 30, 41, 61], float)
    plan = pp.plan_resampling((80, 90), (0.6, 0.6), np.arange(10) * 2.5, (5, 75, 10, 85), pixel_mm=0.8)
    out = pp.resample_volume(vol, plan)
    bright = out[2] > 0
    got = pp.mask_box(bright)
    np.testing.assert_allclose(got, plan.map_boxes(box_src), atol=1.0)
    lab = np.zeros_like(vol, dtype=np.int32)
    lab[:, 20:41, 30:61] = 3
    lab_out = pp.resample_labels(lab, plan)
    np.testing.assert_array_equal(lab_out[2] == 3, bright)
    secs = pp.label_sections(lab_out)
    assert {s[0] for s in secs} == {3} and len(secs) == lab_out.shape[0]


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_reorientation_recovers_canonical_array(perm):
    rng = np.random.default_rng(1)
    canon = rng.integers(0, 100, size=(4, 5, 6))          # [z, y, x], direction = identity
    sp_c = (3.0, 0.7, 0.9)
    origin_c = np.array([10.0, -20.0, 30.0])
    for flips in itertools.product([False, True], repeat=3):
        # The file stores index axis a = canonical axis perm[a], reversed where flips[a].
        d = np.zeros((3, 3))
        arr = canon
        for a in range(3):
            d[perm[a], a] = -1.0 if flips[a] else 1.0
        # build the stored array: stored index axis a <- canonical axis perm[a]
        arr = np.transpose(canon, [2 - perm[2 - n] for n in range(3)])
        for a in range(3):
            if flips[a]:
                arr = np.flip(arr, axis=2 - a)
        sp_ijk = np.array(sp_c[::-1])[list(perm)]
        # origin = world of stored index 0 = canonical index (n-1 on flipped axes)
        corner = np.zeros(3)
        for a in range(3):
            if flips[a]:
                corner[perm[a]] = canon.shape[::-1][perm[a]] - 1
        origin = origin_c + corner * np.array(sp_c[::-1])
        src_axis, flip = pp.canonical_axes(d)
        back = pp.reorient_array(arr, src_axis, flip)
        np.testing.assert_array_equal(back, canon)
        shape, sp, org, dn = pp.canonical_geometry(arr.shape, tuple(sp_ijk[::-1]), origin, d)
        assert shape == canon.shape
        np.testing.assert_allclose(sp, sp_c)
        np.testing.assert_allclose(org, origin_c)
        np.testing.assert_allclose(dn, np.eye(3))


def test_oblique_direction_refused():
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    with pytest.raises(ValueError, match="oblique"):
        pp.canonical_axes(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))


def test_recist_box_and_ellipse_area():
    # long axis 40 px at 30 degrees, short axis 20 px perpendicular, centred at (60, 50)
    ang = np.deg2rad(30)
    u = np.array([np.cos(ang), np.sin(ang)])
    v = np.array([-np.sin(ang), np.cos(ang)])
    c = np.array([60.0, 50.0])
    rec = np.stack([c - 20 * u, c + 20 * u, c - 10 * v, c + 10 * v])
    centre, a, b, angle = pp.recist_ellipse(rec)
    np.testing.assert_allclose(centre, c)
    assert (a, b) == pytest.approx((20, 10)) and angle == pytest.approx(ang)
    m = pp.recist_mask((120, 120), rec)
    assert abs(m.sum() - np.pi * 20 * 10) / (np.pi * 200) < 0.02
    # the mask's extent equals the analytic ellipse's bounding box (within a pixel)
    half_w = np.sqrt((20 * np.cos(ang)) ** 2 + (10 * np.sin(ang)) ** 2)
    half_h = np.sqrt((20 * np.sin(ang)) ** 2 + (10 * np.cos(ang)) ** 2)
    np.testing.assert_allclose(pp.mask_box(m), [c[1] - half_h, c[0] - half_w, c[1] + half_h, c[0] + half_w], atol=1.0)
    np.testing.assert_allclose(pp.recist_to_box(rec, pad=5),
                               [rec[:, 1].min() - 5, rec[:, 0].min() - 5, rec[:, 1].max() + 5, rec[:, 0].max() + 5])


def test_sphere_sections_golden():
    plan = pp.plan_resampling((100, 100), (0.5, 0.5), np.arange(0, 21.0), None, pixel_mm=0.5, slice_mm=2.0)
    secs = pp.sphere_sections((50.0, 40.0), 10.0, 10.0, plan)   # 10 mm sphere centred at z = 10 mm
    assert [k for k, _, _ in secs] == [3, 4, 5, 6, 7]           # z = 6..14 mm (|dz| < 5 mm)
    k, box, mask = secs[0]                                       # dz = 4 mm -> r = 3 mm = 6 px
    np.testing.assert_allclose(box, [44, 34, 56, 46])
    assert abs(mask.sum() - np.pi * 36) < 0.1 * np.pi * 36
    _, box_c, mask_c = secs[2]                                   # dz = 0 -> r = 10 px
    np.testing.assert_allclose(box_c, [40, 30, 60, 50])
    assert abs(mask_c.sum() - np.pi * 100) / (np.pi * 100) < 0.03


def test_patient_split_deterministic_80_20():
    ids = [f"patient-{i}" for i in range(3000)]
    splits = [pp.patient_split(i) for i in ids]
    assert splits == [pp.patient_split(i) for i in ids]
    frac = splits.count("test") / len(splits)
    assert 0.17 < frac < 0.23
    assert set(splits) == {"train", "test"}
