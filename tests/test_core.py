"""Box-format conversions and the restricted unpickler."""

import pickle

import numpy as np
import pytest

from uld_jax import core
from uld_jax.io import safe_pickle


def test_inclusive_round_trip_and_size_convention():
    # A box covering pixel columns 10..19 and rows 5..7 (inclusive) is 10 wide and 3 high.
    b = np.array([10, 5, 19, 7], float)
    internal = core.inclusive_xyxy_to_internal(b)
    np.testing.assert_array_equal(internal, [5, 10, 8, 20])
    assert internal[3] - internal[1] == 10 and internal[2] - internal[0] == 3
    np.testing.assert_array_equal(core.internal_to_inclusive_xyxy(internal), b)


def test_deeplesion_box_is_one_based():
    # MULAN subtracts 1 from the 1-based DL_info boxes.
    internal = core.deeplesion_box_to_internal(np.array([[1.0, 1.0, 1.0, 1.0]]))
    np.testing.assert_array_equal(internal, [[0, 0, 1, 1]])
    np.testing.assert_allclose(core.internal_to_deeplesion_box(internal), [[1, 1, 1, 1]])


def test_volume_box_round_trip():
    b = np.array([[211.0, 166.0, 13.0, 270.0, 221.0, 22.0]])
    internal = core.volume_box_to_internal(b)
    np.testing.assert_array_equal(internal, [[13, 166, 211, 23, 222, 271]])
    np.testing.assert_array_equal(core.internal_to_volume_box(internal), b)


def test_safe_pickle_loads_real_1k_test_set(real_data):
    d = safe_pickle.safe_load(real_data / "deeplesion" / "DeepLesion_manual_1K_test_release.pkl")
    assert set(d) == {"val", "test"}
    assert len(d["val"]) == 200 and len(d["test"]) == 800
    assert sum(len(v) for v in d["val"].values()) == 1292
    assert sum(len(v) for v in d["test"].values()) == 4155
    assert all(v.shape[1] == 6 for v in d["test"].values() if len(v))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_safe_pickle_refuses_code(tmp_path):
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"a": _Evil()}))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil\.pkl.*builtins\.print"):
        safe_pickle.safe_load(p)


def test_safe_pickle_round_trip_atomic(tmp_path):
    obj = {"test": {"x": np.arange(12.0).reshape(2, 6)}, "n": [1, 2.5, "s"]}
    p = tmp_path / "sub" / "t.pkl"
    safe_pickle.atomic_dump(obj, p)
    back = safe_pickle.safe_load(p)
    np.testing.assert_array_equal(back["test"]["x"], obj["test"]["x"])
    assert back["n"] == [1, 2.5, "s"]
    assert [f.name for f in p.parent.iterdir()] == ["t.pkl"]


def test_truncated_pickle_names_file(tmp_path):
    p = tmp_path / "trunc.pkl"
    p.write_bytes(pickle.dumps({"a": np.zeros(100)})[:50])
    with pytest.raises(pickle.UnpicklingError, match="trunc.pkl"):
        safe_pickle.safe_load(p)
