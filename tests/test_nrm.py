"""NRM golden cases: overlap with existing and mined annotations, sigma boundary, experts, positives."""

from __future__ import annotations

import numpy as np
import pytest

from uld_jax.core import DATASET_ID, Provenance
from uld_jax.mine import nrm, overlap

DL, LUNA, LITS, LN = (DATASET_ID[n] for n in ("deeplesion", "luna16", "lits", "nihln"))


def _case():
    # Slice 1 carries an existing annotation, slice 2 a mined positive, slice 3 nothing.
    existing_slice = np.array([1])
    existing_box = np.array([[10, 10, 30, 30]], np.float32)
    mined_slice = np.array([2])
    mined_box = np.array([[50, 50, 70, 70]], np.float32)
    rows = [
        # slice, box, score, expert,         expected suspicious (all experts, sigma 0.5)
        (1, [25, 25, 40, 40], 0.90, LUNA, False),   # 0: overlaps the existing annotation
        (1, [60, 60, 80, 80], 0.90, LUNA, True),    # 1: elsewhere on slice 1
        (1, [30, 30, 45, 45], 0.90, LITS, True),    # 2: touches the annotation's corner only
        (1, [60, 10, 80, 30], 0.50, LITS, False),   # 3: score == sigma: not above it
        (1, [60, 10, 80, 30], 0.5000001, LITS, True),  # 4: just above sigma
        (2, [55, 55, 75, 75], 0.95, LN, False),     # 5: overlaps the mined positive
        (3, [55, 55, 75, 75], 0.95, LN, True),      # 6: same place, other slice
        (3, [10, 10, 30, 30], 0.99, DL, False),     # 7: universal expert: never suspicious
        (3, [90, 90, 99, 99], 0.20, LUNA, False),   # 8: low score
    ]
    slc = np.array([r[0] for r in rows])
    box = np.array([r[1] for r in rows], np.float32)
    score = np.array([r[2] for r in rows], np.float64)
    expert = np.array([r[3] for r in rows])
    expect = np.array([r[4] for r in rows])
    return slc, box, score, expert, expect, existing_slice, existing_box, mined_slice, mined_box


def _run(**kw):
    slc, box, score, expert, expect, es, eb, ms, mb = _case()
    return nrm.nrm(slc, box, score, expert, existing_slice=es, existing_box=eb,
                   mined_slice=ms, mined_box=mb, **kw), expect, expert


def test_golden_all_experts():
    res, expect, _ = _run()
    np.testing.assert_array_equal(res.suspicious, expect)
    assert res.provenance == Provenance.IGNORE


def test_mined_positives_explain_proposals_only_when_given():
    slc, box, score, expert, expect, es, eb, _, _ = _case()
    res = nrm.nrm(slc, box, score, expert, existing_slice=es, existing_box=eb)
    expect = expect.copy()
    expect[5] = True                    # nothing mined on slice 2: the lymph node is suspicious
    np.testing.assert_array_equal(res.suspicious, expect)


def test_expert_subset_and_as_positive():
    res, expect, expert = _run(experts=("lits",))
    np.testing.assert_array_equal(res.suspicious, expect & (expert == LITS))
    res, expect, expert = _run(experts=("luna16", "nihln"), as_positive=True)
    np.testing.assert_array_equal(res.suspicious, expect & np.isin(expert, [LUNA, LN]))
    assert res.provenance == Provenance.MINED
    res, _, _ = _run(experts=())
    assert not res.suspicious.any()


def test_sigma_sweep_is_monotone_and_overlap_threshold():
    counts = [int(_run(sigma=s)[0].suspicious.sum()) for s in (0.0, 0.3, 0.5, 0.9, 0.99)]
    assert counts == sorted(counts, reverse=True)
    assert counts[-1] == 0
    # With overlap_iou 0.2, proposal 0 (IoU 25/(400+225-25) = 0.0417 with the annotation) is
    # no longer explained.
    res, expect, _ = _run(overlap_iou=0.2)
    expect = expect.copy()
    expect[0] = True
    np.testing.assert_array_equal(res.suspicious, expect)


def test_dedupe_keeps_highest_score():
    slc = np.array([4, 4, 4])
    box = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    score = np.array([0.7, 0.9, 0.8])
    expert = np.array([LUNA, LN, LITS])
    empty = np.zeros((0, 4), np.float32)
    res = nrm.nrm(slc, box, score, expert, existing_slice=np.zeros(0), existing_box=empty,
                  dedupe_iou=0.5)
    np.testing.assert_array_equal(res.suspicious, [False, True, True])
    res = nrm.nrm(slc, box, score, expert, existing_slice=np.zeros(0), existing_box=empty)
    assert res.suspicious.all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="single-type"):
        nrm.expert_ids(("deeplesion",))
    with pytest.raises(ValueError, match="differ in length"):
        nrm.nrm(np.zeros(2), np.zeros((1, 4)), np.zeros(2), np.zeros(2),
                existing_slice=np.zeros(0), existing_box=np.zeros((0, 4)))


def test_same_key_join_against_brute_force():
    rng = np.random.default_rng(0)
    qk = rng.integers(0, 30, 400)
    rk = rng.integers(0, 30, 120)
    qb = rng.uniform(0, 100, (400, 2))
    qb = np.concatenate([qb, qb + rng.uniform(0, 30, (400, 2))], 1)
    rb = rng.uniform(0, 100, (120, 2))
    rb = np.concatenate([rb, rb + rng.uniform(0, 30, (120, 2))], 1)
    got = overlap.max_iou_same_key(qk, qb, rk, rb)

    def iou(a, b):
        ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ih * iw
        u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / u if u > 0 else 0.0

    want = np.array([max([iou(qb[i], rb[j]) for j in range(120) if rk[j] == qk[i]] or [0.0])
                     for i in range(400)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
