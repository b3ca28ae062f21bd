"""mine.suppression: lesion cross-sections found on a run's own mining slices, by group."""

import numpy as np
import pytest

from uld_jax.core import DATASET_ID
from uld_jax.mine import quality, run, suppression

UNI = DATASET_ID["deeplesion"]
OTHER = DATASET_ID["luna16"]


def _golden():
    """Two Cases: A's key slice 4 holds marked L0 and unmarked L1, its slice 1 (not a key slice)
    unmarked L2; B's key slice 5 holds marked L3 and unmarked L4, which no detection hits."""
    truth = quality.LesionTruth(
        case_id=np.asarray(["A", "A", "A", "B", "B"]),
        box3d=np.asarray([[3, 10, 10, 6, 30, 30],      # L0: z 3..6, centre 4.5: full extent
                          [3, 50, 50, 6, 70, 70],      # L1
                          [0, 10, 50, 2, 30, 70],      # L2: slice 1 (zc 1.5) at extent 0.87
                          [4, 20, 20, 7, 40, 40],      # L3
                          [4, 60, 60, 7, 80, 80]], np.float64),   # L4
        lesion_id=np.arange(5, dtype=np.int64),
        marked=np.asarray([True, False, False, True, False]))
    slices = run.SliceTable(dataset=np.asarray(["deeplesion"] * 3),
                            case_id=np.asarray(["A", "A", "B"]),
                            slice_index=np.asarray([4, 1, 5]), patient_id=np.asarray([1, 1, 2]))
    ann = run.Annotations(slice=np.asarray([0, 2]),
                          box=np.asarray([[10, 10, 30, 30], [20, 20, 40, 40]], np.float64),
                          lesion_id=np.asarray([0, 3]), embedding=np.zeros((2, 4), np.float32))
    # (slice, box, score, expert)
    rows = [(0, [11, 11, 29, 29], 0.9, UNI),      # L0
            (0, [52, 52, 68, 68], 0.3, UNI),      # L1, best
            (0, [55, 55, 65, 65], 0.1, UNI),      # L1 again, lower
            (0, [80, 80, 100, 100], 0.5, UNI),    # on no lesion
            (1, [12, 52, 28, 68], 0.6, UNI),      # L2
            (1, [100, 100, 120, 120], 0.2, UNI),  # on no lesion
            (2, [21, 21, 39, 39], 0.8, UNI),      # L3
            (2, [0, 0, 8, 8], 0.4, UNI),          # on no lesion
            (2, [61, 61, 79, 79], 0.99, OTHER),   # L4, but another expert's: not counted
            (2, [90, 0, 110, 20], 0.95, OTHER)]   # another expert's, on no lesion: not counted
    props = run.Proposals(slice=np.asarray([r[0] for r in rows]),
                          box=np.asarray([r[1] for r in rows], np.float64),
                          score=np.asarray([r[2] for r in rows], np.float32),
                          expert=np.asarray([r[3] for r in rows]))
    return truth, slices, ann, props


def test_thresholds_at_rates_golden():
    bg = np.asarray([0.5, 0.2, 0.4])
    t = suppression.thresholds_at_rates(bg, 3, [0.0, 1 / 3, 2 / 3, 1.0, 2.0])
    assert t[0] == np.inf and t[3] == -np.inf and t[4] == -np.inf
    assert 0.4 < t[1] <= np.nextafter(0.4, 1) and 0.2 < t[2] <= np.nextafter(0.2, 1)
    # ties are kept out together: two detections at 0.5 and one allowed -> both excluded
    t2 = suppression.thresholds_at_rates(np.asarray([0.5, 0.5, 0.1]), 1, [1.0])
    assert t2[0] > 0.5


def test_found_by_group_golden():
    truth, slices, ann, props = _golden()
    r = suppression.found_by_group(truth, slices, ann, props, rates=(0.0, 1 / 3, 2 / 3, 1.0))
    assert r["num_slices"] == 3 and r["num_key_slices"] == 2 and r["num_background"] == 3
    g = r["groups"]
    assert g["key_marked"]["n"] == 2 and g["key_marked"]["found"] == [0.0, 1.0, 1.0, 1.0]
    # L1 (0.3) is found once two detections on no lesion per three slices are allowed; L4 never
    assert g["key_unmarked"]["n"] == 2 and g["key_unmarked"]["found"] == [0.0, 0.0, 0.5, 0.5]
    assert g["key_unmarked"]["found_mean"] == pytest.approx(0.25)
    assert g["key_unmarked"]["median_score"] == pytest.approx(0.15)   # (0.3 + 0) / 2
    assert g["other_unmarked"]["n"] == 1 and g["other_unmarked"]["found"] == [0.0, 1.0, 1.0, 1.0]
    assert g["other_marked"]["n"] == 0 and np.isnan(g["other_marked"]["found_mean"])
    md = suppression.markdown({"run": r})
    assert "| run | key_unmarked | 2 | 0.0 | 0.0 | 50.0 | 50.0 | 25.0 | 0.150 |" in md


def test_the_pole_of_a_lesion_is_not_a_cross_section():
    truth, slices, ann, props = _golden()
    # L2 spans z 0..2 and slice 1's centre 1.5 is at extent 0.87; a lesion on z 1..1.52 is at
    # extent 0.08 there (its pole) and left out
    truth.box3d[2] = [1.0, 10, 50, 1.52, 30, 70]
    r = suppression.found_by_group(truth, slices, ann, props)
    assert r["groups"]["other_unmarked"]["n"] == 0


def test_cli_errors_name_the_store(tmp_path, capsys):
    with pytest.raises(SystemExit):
        suppression.main(["--store", "nodir", "--truth", str(tmp_path),
                          "--data_dir", str(tmp_path)])
    assert "expected NAME=DIR" in capsys.readouterr().err
    truth, *_ = _golden()
    with pytest.raises(FileNotFoundError, match="--store a=.*missing: no such chunk store"):
        suppression.measure({"a": str(tmp_path / "missing")}, truth)
