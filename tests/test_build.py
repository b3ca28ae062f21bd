"""data_prep.build: Cases -> TFDS slice store / case table / sample table (resume, atomicity, bad input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import build as build_lib
from data_prep import case_factory as cf
from data_prep.types import BadItem
from uld_jax import slice_data as sd
from uld_jax.core import DATASET_ID, Provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases():
    out = []
    for k in range(5):
        # Case 3 has coarser pixels, as a reader makes them for a field of view wider than 512 px.
        out.append(cf.make_case("luna16", k, num_slices=6 + k, split="train" if k < 4 else "test",
                                lesion_slices=(2,), negatives=(0, 4), pixel_mm=0.9 if k == 3 else 0.8))
    return out


def _build(out, cases, dataset="luna16", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("chunk_slices", 15)
    return build_lib.build("/raw", str(out), [dataset], reader_lookup=lambda n: cf.ListReader(cases), **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    cases = _cases()
    report = _build(out, cases)
    return out, cases, report


def test_tfds_layout_and_counts(built):
    import tensorflow_datasets as tfds
    out, cases, report = built
    info = report["luna16"]
    assert info["num_cases"] == 5 and info["num_slices"] == sum(c.slices.shape[0] for c in cases)
    ddir = os.path.join(out, "luna16")
    train = tfds.data_source("uld_luna16_samples", data_dir=ddir, split="train")
    assert len(train) == sum(len(c.sample_slices) for c in cases if c.split == "train")
    b = tfds.builder_from_directory(sd.table_dir(ddir, "luna16", "slices"))
    assert b.info.file_format.value == "array_record"
    assert b.info.splits["slices"].num_examples == info["num_slices"]
    assert len(b.info.splits["slices"].shard_lengths) > 1          # several chunks -> several shards
    assert not os.path.exists(os.path.join(out, ".incomplete-luna16"))


def test_slice_store_holds_each_slice_once_exactly(built):
    out, cases, _ = built
    cases_tab = sd.load_cases(out, "luna16")
    store = sd.SliceStore(os.path.join(out, "luna16"), "luna16")
    assert len(store) == sum(c.slices.shape[0] for c in cases)
    by_id = {c.case_id: c for c in cases}
    for rec in cases_tab:
        case = by_id[sd._text(rec["case_id"])]
        idx = rec["slice_start"] + np.arange(rec["num_slices"])
        got = np.stack(store.read(idx))
        np.testing.assert_array_equal(got, case.slices)
        again = store.read(idx[::-1], case.case_id, np.arange(rec["num_slices"])[::-1])   # cache hits
        np.testing.assert_array_equal(np.stack(again[::-1]), case.slices)
        with pytest.raises(ValueError, match="the sample table expects"):
            store.read(idx[:1], case.case_id, [1])          # a cached record, but the wrong slice
        meta = store.read_records(idx[-1:])[0]
        assert sd._text(meta["case_id"]) == case.case_id and meta["slice_index"] == rec["num_slices"] - 1
        np.testing.assert_allclose(rec["z_mm"], case.z_mm)


def test_sample_table_contents(built):
    out, cases, _ = built
    t = sd.load_sample_table(out, "luna16", "train")
    assert set(t.case_id) == {c.case_id for c in cases if c.split == "train"}
    assert t.dataset_id == DATASET_ID["luna16"]
    by_id = {c.case_id: c for c in cases}
    for s in range(len(t)):
        case = by_id[t.case_id[t.case_row[s]]]
        z = int(t.slice_index[s])
        les = t.sample_lesions(s)
        truth = [l for l in case.lesions if l.slice_index == z]
        assert len(les["boxes"]) == len(truth)
        assert t.z_mm[s] == pytest.approx(case.z_mm[z])
        for i, l in enumerate(truth):
            np.testing.assert_array_equal(les["boxes"][i], l.box)
            assert les["provenance"][i] == Provenance.ORIGINAL
            np.testing.assert_array_equal(les["organ_target"][i], l.organ_target)
            crop = sd.decode_mask(les["mask_rect"][i], les["mask"][i])
            y0, x0, y1, x1 = les["mask_rect"][i]
            full = np.zeros(case.slices.shape[1:], bool)
            full[y0:y1, x0:x1] = crop
            np.testing.assert_array_equal(full, l.mask)
    assert len(sd.load_sample_table(out, "luna16", "test")) == 3


def test_codecs_roundtrip():
    rng = np.random.default_rng(0)
    hu = rng.integers(-32768, 32767, size=(37, 29), dtype=np.int16)
    np.testing.assert_array_equal(sd.decode_slice(sd.encode_slice(hu), 37, 29), hu)
    with pytest.raises(ValueError, match="int16"):
        sd.encode_slice(hu.astype(np.float32))
    m = np.zeros((20, 30), bool)
    m[3:9, 4:17] = rng.random((6, 13)) > 0.3
    rect, data = sd.encode_mask(m)
    full = np.zeros_like(m)
    full[rect[0]:rect[2], rect[1]:rect[3]] = sd.decode_mask(rect, data)
    np.testing.assert_array_equal(full, m)


def test_reading_needs_no_tensorflow(built):
    out, _, _ = built
    code = f"""
import sys
from uld_jax import input_pipeline as ip
c = ip.default_input_config('tiny'); c.data_dir = {str(out)!r}; c.datasets = ('luna16',)
c.image_size = (48, 48); c.pixel_mm = 0.8
batch = next(iter(ip.make_dataset(c, process_index=0, process_count=1)))
assert batch['image'].shape == (2, 48, 48, 9)
print('TF_LOADED' if 'tensorflow' in sys.modules else 'NO_TF')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "NO_TF"


def test_killed_build_resumes_without_rewriting_chunks(tmp_path):
    cases = _cases()
    with pytest.raises(KeyboardInterrupt):
        build_lib.build_dataset("/raw", str(tmp_path), "luna16", reader_lookup=lambda n: cf.ListReader(cases),
                                chunk_slices=15, progress=False, _stop_after_chunks=1)
    assert not os.path.exists(tmp_path / "luna16")          # nothing that looks complete
    with pytest.raises(FileNotFoundError, match="no complete build"):
        sd.load_sample_table(tmp_path, "luna16", "train")
    tmp = tmp_path / ".incomplete-luna16"
    prog = json.loads((tmp / "progress.json").read_text(encoding="utf-8"))
    assert len(prog["chunks"]) == 1
    chunk0 = tmp / "chunks" / "chunk-00000.slices"
    ino = os.stat(chunk0).st_ino
    done = {c["case_id"] for c in json.loads((tmp / "chunks" / prog["chunks"][0]["cases_file"]).read_text(encoding="utf-8"))}
    info = _build(tmp_path, cases)["luna16"]
    assert info["resumed_chunks"] == 1
    expect_new = sum(c.slices.shape[0] for c in cases if c.case_id not in done)
    assert info["slices_written_this_run"] == expect_new
    (shard0,) = (tmp_path / "luna16" / "uld_luna16_slices" / "1.0.0").glob(
        "uld_luna16_slices-slices.array_record-00000-of-*")
    assert os.stat(shard0).st_ino == ino                      # the finished chunk was not rewritten
    # Same content as an uninterrupted build.
    fresh = tmp_path / "fresh"
    _build(fresh, cases)
    for split in ("train", "test"):
        a = sd.load_sample_table(tmp_path, "luna16", split)
        b = sd.load_sample_table(fresh, "luna16", split)
        np.testing.assert_array_equal(a.slice_index, b.slice_index)
        np.testing.assert_array_equal(a.case_id, b.case_id)
        np.testing.assert_array_equal(a.lesions["boxes"], b.lesions["boxes"])
    sa = sd.SliceStore(tmp_path / "luna16", "luna16")
    sb = sd.SliceStore(fresh / "luna16", "luna16")
    idx = np.arange(len(sb))
    assert all(np.array_equal(x, y) for x, y in zip(sa.read(idx), sb.read(idx)))


def test_build_killed_in_finalize_leaves_nothing_complete(tmp_path, monkeypatch):
    cases = _cases()
    real = sd.write_table

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing the case table")

    monkeypatch.setattr(sd, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, cases)
    assert not os.path.exists(tmp_path / "luna16")
    monkeypatch.setattr(sd, "write_table", real)
    info = _build(tmp_path, cases)["luna16"]
    assert info["status"] == "built" and info["slices_written_this_run"] == 0
    assert _build(tmp_path, cases)["luna16"]["status"] == "already_built"


def _bad_cases():
    good = _cases()[:3]
    float_case = cf.make_case("luna16", 10)
    float_case.slices = float_case.slices.astype(np.float32)
    box_case = cf.make_case("luna16", 11)
    box_case.lesions[0].box = np.array([40, 30, 60, 45], np.float32)    # beyond the 48 x 40 slice
    z_case = cf.make_case("luna16", 12)
    z_case.z_mm = z_case.z_mm[::-1].copy()
    dup = cf.make_case("luna16", 1)
    spacing = cf.make_case("luna16", 13, pixel_mm=0.5)
    reader_bad = BadItem("LUNA16/subset0/1.2.3.mhd", "truncated .raw file (1000 of 2000 bytes)")
    return [good[0], reader_bad, float_case, good[1], box_case, z_case, dup, spacing, good[2]]


def test_bad_item_stops_build_with_its_message(tmp_path, monkeypatch, capsys):
    items = _bad_cases()
    with pytest.raises(BadItem, match="truncated .raw file"):
        _build(tmp_path, items)
    assert not os.path.exists(tmp_path / "luna16")
    # The good case before the bad item was kept: a rerun with skip_bad resumes from it.
    resumed = _build(tmp_path, items, skip_bad=True)["luna16"]
    assert resumed["resumed_chunks"] == 1 and resumed["num_cases"] == 3
    with pytest.raises(BadItem, match=r"int16"):
        _build(tmp_path / "b", [i for i in items if not isinstance(i, BadItem)])
    monkeypatch.setattr(build_lib, "default_reader_lookup", lambda n: cf.ListReader(items))
    rc = build_lib.main(["--raw", "/raw", "--out", str(tmp_path / "cli"), "--datasets", "luna16",
                         "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "LUNA16/subset0/1.2.3.mhd: truncated .raw file" in err and "--skip-bad" in err


def test_skip_bad_lists_every_skipped_item(tmp_path):
    info = _build(tmp_path, _bad_cases(), skip_bad=True)["luna16"]
    assert info["num_cases"] == 3 and info["num_skipped"] == 6
    lines = (tmp_path / "luna16" / "skipped_items.tsv").read_text(encoding="utf-8").strip().splitlines()
    assert lines[0] == "where\tproblem" and len(lines) == 7
    text = "\n".join(lines)
    for needle in ("truncated .raw file", "int16", "outside the 48x40 slice", "not strictly increasing",
                   "duplicate case_id", "inconsistent spacing"):
        assert needle in text, needle
    assert "luna16_case0011" in text and "synthetic://luna16/11" in text
    report = json.loads((tmp_path / "build_report.json").read_text(encoding="utf-8"))
    assert len(report["luna16"]["skipped"]) == 6


def test_unknown_dataset_and_missing_reader(tmp_path):
    with pytest.raises(build_lib.BuildError, match="unknown dataset"):
        build_lib.build("/raw", str(tmp_path), ["mnist"], progress=False)
    rc = build_lib.main(["--raw", "/raw", "--out", str(tmp_path), "--datasets", "mnist"])
    assert rc == 1


_SLOW_BUILD = """
import sys, time
from data_prep import build, case_factory as cf
class Stalls(cf.ListReader):
    def iter_cases(self, *a, **k):
        for i, c in enumerate(super().iter_cases(*a, **k)):
            if i == 6:              # two chunks (cases 0-2, 3-5) are written; wait to be killed
                time.sleep(120)
            yield c
cases = [cf.make_case('luna16', k, num_slices=6 + k % 3, split='train') for k in range(12)]
build.build('/raw', sys.argv[1], ['luna16'], reader_lookup=lambda n: Stalls(cases), chunk_slices=14,
            progress=False)
"""


def test_sigkilled_build_resumes(tmp_path):
    import signal
    import time
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    prog = tmp_path / ".incomplete-luna16" / "progress.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if prog.exists() and len(json.loads(prog.read_text(encoding="utf-8"))["chunks"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (tmp_path / "luna16").exists()
    done = len(json.loads(prog.read_text(encoding="utf-8"))["chunks"])
    cases = [cf.make_case("luna16", k, num_slices=6 + k % 3, split="train") for k in range(12)]
    info = _build(tmp_path, cases, chunk_slices=14)["luna16"]
    assert info["resumed_chunks"] == done == 2
    assert info["num_cases"] == 12 and info["num_slices"] == sum(c.slices.shape[0] for c in cases)
    assert info["slices_written_this_run"] < info["num_slices"]
    t = sd.load_sample_table(tmp_path, "luna16", "train")
    store = sd.SliceStore(tmp_path / "luna16", "luna16")
    by_id = {c.case_id: c for c in cases}
    for c in range(len(t.case_id)):
        idx = t.case_slice_start[c] + np.arange(t.case_num_slices[c])
        np.testing.assert_array_equal(np.stack(store.read(idx)), by_id[t.case_id[c]].slices)
