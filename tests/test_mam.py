"""MAM: hand-built golden cases, the bucket plan, the NumPy reference, multi-device sharding."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from uld_jax.mine import mam


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _golden():
    """Four patients, rows deliberately interleaved. theta = 0.25 keeps every distance exact."""
    # Annotations: rows 0,1 patient 10; row 2 patient 20 (no proposals); row 3 patient 40.
    ann_patient = np.array([10, 40, 20, 10])
    ann_emb = np.array(
        [[0, 0, 0, 0],        # row 0: patient 10, lesion a0
         [0, 0, 1, 0],        # row 1: patient 40
         [0, 1, 0, 0],        # row 2: patient 20 (never has proposals)
         [1, 0, 0, 0]],       # row 3: patient 10, lesion a1
        dtype=np.float32)
    prop_patient = np.array([10, 30, 10, 40, 10, 10, 30])
    prop_emb = np.array(
        [[0.25, 0, 0, 0],     # 0: distance to a0 exactly theta -> no match
         [0, 0, 0, 0],        # 1: patient 30 has no annotation -> never matches
         [0.125, 0, 0, 0],    # 2: a0 at 0.125 -> match row 0
         [0, 0, 1, 0],        # 3: identical to patient 40's lesion -> match row 1, distance 0
         [0.875, 0, 0, 0],    # 4: a1 at 0.125 -> match row 3
         [0.5, 0, 0, 0],      # 5: a0 and a1 both at 0.5: tie, first row (0) is nearest, no match
         [0, 1, 0, 0]],       # 6: equals patient 20's lesion but belongs to patient 30 -> no match
        dtype=np.float32)
    expect_lesion = np.array([-1, -1, 0, 1, 3, -1, -1])
    expect_nearest = np.array([0, -1, 0, 1, 3, 0, -1])
    expect_distance = np.array([0.25, np.inf, 0.125, 0.0, 0.125, 0.5, np.inf], dtype=np.float32)
    return ann_patient, ann_emb, prop_patient, prop_emb, expect_lesion, expect_nearest, expect_distance


@pytest.mark.parametrize("impl", ["jit", "reference"])
def test_golden_matches(impl):
    ap, ae, pp, pe, lesion, nearest, distance = _golden()
    fn = mam.mam_match if impl == "jit" else mam.mam_match_reference
    r = fn(ap, ae, pp, pe, theta=0.25)
    np.testing.assert_array_equal(r.lesion, lesion)
    np.testing.assert_array_equal(r.nearest, nearest)
    np.testing.assert_array_equal(r.distance, distance)          # exact: dyadic values
    np.testing.assert_array_equal(r.matched, lesion >= 0)


def test_theta_boundary_default_theta():
    """distance == float32(0.15) does not match; one float32 step closer does."""
    t = np.float32(mam.DEFAULT_THETA)
    below = np.nextafter(t, np.float32(0))
    ann_emb = np.zeros((1, 3), np.float32)
    prop_emb = np.array([[t, 0, 0], [below, 0, 0], [0, t, 0]], np.float32)
    r = mam.mam_match(np.zeros(1), ann_emb, np.zeros(3), prop_emb)
    assert r.distance[0] == t and r.distance[1] == below
    np.testing.assert_array_equal(r.lesion, [-1, 0, -1])
    assert np.all(r.matched == (r.distance < t))


def test_no_annotations_or_no_proposals_anywhere():
    e = np.zeros((0, 8), np.float32)
    r = mam.mam_match(np.zeros(0), e, np.array([1, 2]), np.ones((2, 8), np.float32))
    np.testing.assert_array_equal(r.lesion, [-1, -1])
    assert np.all(np.isinf(r.distance))
    r = mam.mam_match(np.array([1]), np.ones((1, 8), np.float32), np.zeros(0), e)
    assert r.lesion.shape == (0,) and r.distance.shape == (0,)


def _skewed_world(seed=0, n_patients=60, dim=16, theta=0.15):
    """Random unit embeddings, lognormal per-patient counts, planted near-duplicates away from theta."""
    rng = np.random.default_rng(seed)
    n_ann = np.minimum(rng.lognormal(1.0, 0.9, n_patients).astype(int), 40)
    n_prop = np.minimum(rng.lognormal(3.5, 1.0, n_patients).astype(int), 900)
    n_ann[:4] = 0              # patients with proposals but no annotation
    n_prop[4:8] = 0            # patients with annotations but no proposal
    pid = rng.permutation(10_000)[:n_patients]                  # arbitrary, unsorted ids
    ap = np.repeat(pid, n_ann)
    pp = np.repeat(pid, n_prop)
    ae = _unit(rng.standard_normal((ap.size, dim)))
    pe = _unit(rng.standard_normal((pp.size, dim)))
    # Plant near-duplicates: a third of the proposals of annotated patients near one of their
    # lesions, at distances spread over [0, 2 theta] but never within 1e-3 of theta.
    for i in np.flatnonzero(rng.random(pp.size) < 0.33):
        rows = np.flatnonzero(ap == pp[i])
        if rows.size == 0:
            continue
        target = ae[rng.choice(rows)]
        d = rng.uniform(0, 2 * theta)
        if abs(d - theta) < 1e-3:
            d += 2e-3
        noise = rng.standard_normal(dim).astype(np.float32)
        noise -= noise.dot(target) * target
        noise /= np.linalg.norm(noise)
        pe[i] = target + d * noise                                # not unit: distance exactly ~d
    perm = rng.permutation(pp.size)
    return ap, ae, pp[perm], pe[perm]


def test_jit_equals_reference_with_several_buckets_and_chunks():
    ap, ae, pp, pe = _skewed_world()
    stats = {}
    r = mam.mam_match(ap, ae, pp, pe, max_buckets=3, chunk_bytes=100_000, stats=stats,
                      compile_cost_pairs=0)
    ref = mam.mam_match_reference(ap, ae, pp, pe)
    # The case exercises several buckets, several chunks per bucket and padded tiles.
    assert len(stats["buckets"]) == 3
    assert any(n > batch for n, batch, _, _ in stats["buckets"])
    assert any(n % batch for n, batch, _, _ in stats["buckets"])
    # Exact agreement on every decision and lesion (no pair lies within rounding of theta or a tie).
    np.testing.assert_array_equal(r.lesion, ref.lesion)
    np.testing.assert_array_equal(r.nearest, ref.nearest)
    np.testing.assert_allclose(r.distance, ref.distance, rtol=0, atol=2e-6)
    assert mam.count_disagreements(r, ref, mam.DEFAULT_THETA)["mismatch"] == 0
    assert 0 < r.matched.sum() < r.lesion.size
    # Patients without annotations never match and have no nearest lesion.
    no_ann = ~np.isin(pp, ap)
    assert no_ann.any() and np.all(r.lesion[no_ann] == -1) and np.all(np.isinf(r.distance[no_ann]))
    # A sweep over theta is a re-threshold of the same distances.
    for theta in (0.05, 0.2):
        np.testing.assert_array_equal(
            r.rethreshold(theta).lesion, mam.mam_match_reference(ap, ae, pp, pe, theta).lesion)


def test_plan_buckets_covers_every_proposal_once():
    rng = np.random.default_rng(1)
    n_ann = rng.integers(0, 30, 500)
    n_prop = rng.lognormal(4, 1.2, 500).astype(int)
    bs = mam.plan_buckets(n_ann, n_prop, dim=256, tile=64, max_buckets=4, chunk_bytes=8 << 20,
                          num_devices=8, compile_cost_pairs=0)
    assert 1 <= len(bs) <= 4
    # Every proposal of every eligible patient is in exactly one tile; nothing else is.
    covered = np.zeros(500, np.int64)
    for b in bs:
        assert np.all(b.tile_count >= 1) and np.all(b.tile_count <= b.tile)
        assert np.all(b.tile_offset % b.tile == 0)
        np.add.at(covered, b.tile_patient, b.tile_count)
        assert np.all(n_ann[b.tile_patient] <= b.a_pad) and b.a_pad % 2 == 0
        assert b.batch % 8 == 0
        assert b.batch * 4 * (b.tile * 256 + b.a_pad * 256 + b.tile * b.a_pad) <= 8 << 20
    eligible = (n_ann > 0) & (n_prop > 0)
    np.testing.assert_array_equal(covered, np.where(eligible, n_prop, 0))
    # Little padding: under 1.8x the real work here, against > 3x for one shape.
    real = int(np.sum(np.where(eligible, n_ann * n_prop, 0)))
    assert sum(b.padded_work for b in bs) < 1.8 * real
    assert eligible.sum() * mam._round_up(n_prop.max(), 8) * n_ann.max() > 3 * real
    # A compilation price trades buckets for padding: fewer programs, more padded work.
    few = mam.plan_buckets(n_ann, n_prop, dim=256, max_buckets=4, compile_cost_pairs=1e6)
    assert len(few) < len(bs)
    assert sum(b.padded_work for b in few) > sum(b.padded_work for b in bs)


def test_kernel_jit_equals_eager_and_ignores_padding_values():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 8, 16)).astype(np.float32)
    p = rng.standard_normal((3, 24, 16)).astype(np.float32)
    av = rng.random((3, 8)) < 0.6
    av[2] = False                                          # a patient with no valid lesion
    pv = rng.random((3, 24)) < 0.8
    theta = np.float32(5.0)
    eager = mam.nearest_lesion(a, av, p, pv, theta)
    jitted = jax.jit(mam.nearest_lesion)(a, av, p, pv, theta)
    for x, y in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Garbage in padded rows changes nothing.
    a2 = np.where(av[..., None], a, 1e3).astype(np.float32)
    p2 = np.where(pv[..., None], p, -7.0).astype(np.float32)
    for x, y in zip(eager, jax.jit(mam.nearest_lesion)(a2, av, p2, pv, theta)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    slot, dist, matched = (np.asarray(v) for v in eager)
    assert np.all(slot[~pv] == -1) and np.all(np.isinf(dist[~pv])) and not matched[~pv].any()
    assert np.all(slot[2] == -1) and not matched[2].any()
    assert np.all(av[np.arange(3)[:, None].repeat(24, 1)[slot >= 0], slot[slot >= 0]])


@pytest.mark.multidevice
def test_sharded_equals_single_device():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    ap, ae, pp, pe = _skewed_world(seed=3, n_patients=40)
    single = mam.mam_match(ap, ae, pp, pe, devices=devices[:1], chunk_bytes=300_000)
    sharded = mam.mam_match(ap, ae, pp, pe, devices=devices, chunk_bytes=300_000)
    for x, y in zip(single, sharded):
        np.testing.assert_array_equal(x, y)
    fn, batch_sharding, _ = mam._compiled_kernel(tuple(devices))
    assert batch_sharding.mesh.shape[mam.MESH_AXIS] == len(devices)


def test_select_mined_positives_overlap_and_dedupe():
    # Proposals 0-3 all matched (distances below), on slices 5 and 6.
    res = mam.MamResult(
        lesion=np.array([0, 0, 0, 0, -1]),
        distance=np.array([0.05, 0.10, 0.02, 0.08, 0.9], np.float32),
        nearest=np.array([0, 0, 0, 0, 0]),
    )
    prop_slice = np.array([5, 5, 6, 6, 6])
    prop_box = np.array([
        [10, 10, 20, 20],   # 0: overlaps the annotation on slice 5 -> already marked
        [40, 40, 50, 50],   # 1: slice 5, elsewhere -> mined
        [10, 10, 20, 20],   # 2: same place on slice 6 (no annotation there) -> mined
        [11, 11, 21, 21],   # 3: duplicate of 2 (IoU 0.68) but farther -> dropped
        [60, 60, 70, 70],   # 4: not matched
    ], np.float32)
    ann_slice = np.array([5])
    ann_box = np.array([[19, 19, 30, 30]], np.float32)       # 1x1 px intersection with proposal 0
    keep = mam.select_mined_positives(res, prop_slice=prop_slice, prop_box=prop_box,
                                      ann_slice=ann_slice, ann_box=ann_box)
    np.testing.assert_array_equal(keep, [False, True, True, False, False])
    # Touching edges only is no overlap; an IoU threshold relaxes the rule.
    ann_box_touch = np.array([[20, 20, 30, 30]], np.float32)
    keep = mam.select_mined_positives(res, prop_slice=prop_slice, prop_box=prop_box,
                                      ann_slice=ann_slice, ann_box=ann_box_touch)
    assert keep[0]
    keep = mam.select_mined_positives(res, prop_slice=prop_slice, prop_box=prop_box,
                                      ann_slice=ann_slice, ann_box=ann_box, overlap_iou=0.5)
    assert keep[0]
    # Re-threshold: theta 0.06 keeps 0.05 and 0.02 only (0 overlaps -> only 2).
    keep = mam.select_mined_positives(res, prop_slice=prop_slice, prop_box=prop_box,
                                      ann_slice=ann_slice, ann_box=ann_box, theta=0.06)
    np.testing.assert_array_equal(keep, [False, False, True, False, False])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        mam.mam_match(np.zeros(1), np.zeros((1, 4)), np.zeros(1), np.zeros((1, 5)))
    with pytest.raises(ValueError, match="one patient id per embedding row"):
        mam.mam_match(np.zeros(2), np.zeros((1, 4)), np.zeros(1), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        mam.mam_match(np.zeros(1), np.full((1, 4), np.nan), np.zeros(1), np.zeros((1, 4)))


def test_patient_ids_any_integers():
    """Huge or negative patient ids (the sorting path) give the same result as small ones."""
    ap, ae, pp, pe = _skewed_world(seed=4, n_patients=20)
    base = mam.mam_match(ap, ae, pp, pe)
    for f in (lambda x: x * 10**12, lambda x: -x - 1):
        r = mam.mam_match(f(ap), ae, f(pp), pe)
        for x, y in zip(base, r):
            np.testing.assert_array_equal(x, y)
