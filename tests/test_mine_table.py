"""The mined-annotation table: provenance, canonical order, atomic writes, validation errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from uld_jax.mine import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overlay(n_extra: int = 0, step: int = 4000, reverse: bool = False) -> table.Overlay:
    rows = dict(
        dataset=np.array(["deeplesion"] * (3 + n_extra)),
        case_id=np.array(["000002_01_01", "000001_02_01", "000001_02_01"] + ["000003_01_01"] * n_extra),
        slice_index=np.array([7, 30, 12] + list(range(n_extra))),
        kind=np.array([table.KIND_MINED, table.KIND_IGNORE, table.KIND_UNLABELED] + [1] * n_extra),
        box=np.array([[10, 12, 30, 40], [50, 50, 70, 66], [0, 0, 0, 0]] + [[1, 1, 9, 9]] * n_extra,
                     np.float32),
        score=np.array([0.8, 0.9, np.nan] + [0.5] * n_extra, np.float32),
        expert=np.array([0, 2, -1] + [0] * n_extra),
        lesion_id=np.array([17, -1, -1] + [3] * n_extra),
    )
    if reverse:
        rows = {k: v[::-1] for k, v in rows.items()}
    meta = table.make_meta(checkpoint_step=step, config_hash=table.config_hash({"a": 1}),
                           theta=0.15, sigma=0.5, nrm_experts=["luna16", "lits", "nihln"])
    return table.build_overlay(**rows, meta=meta)


def test_roundtrip_order_and_provenance(tmp_path):
    ov = _overlay()
    # Canonical order: case, then slice, whatever the input order.
    assert ov.arrays["case_id"].tolist() == ["000001_02_01", "000001_02_01", "000002_01_01"]
    assert ov.arrays["slice_index"].tolist() == [12, 30, 7]
    p = tmp_path / "mined.npz"
    table.write_overlay(p, ov)
    back = table.read_overlay(p)
    assert back.equal_rows(ov)
    for f, (dtype, _) in table.FIELDS.items():
        assert back.arrays[f].dtype.kind == dtype.kind
    assert back.arrays["slice_index"].dtype == np.int32 and back.arrays["kind"].dtype == np.int8
    m = back.meta
    assert m["checkpoint_step"] == 4000 and m["theta"] == 0.15 and m["sigma"] == 0.5
    assert len(m["config_hash"]) == 16 and m["tool_version"].startswith("uld_jax")
    assert m["counts"] == {"mined": 1, "ignore": 1, "unlabeled_slices": 1}
    # The file is a plain npz (no pickle) with a 0-d JSON meta, per docs/formats.md.
    with np.load(p, allow_pickle=False) as z:
        assert z["meta"].shape == () and json.loads(str(z["meta"]))["sigma"] == 0.5
    # Same rows in another input order give identical arrays.
    assert _overlay(reverse=True).equal_rows(ov)


def test_config_hash_is_order_independent():
    assert table.config_hash({"a": 1, "b": [1, 2]}) == table.config_hash({"b": [1, 2], "a": 1})
    assert table.config_hash({"a": 1}) != table.config_hash({"a": 2})


def test_killed_writer_leaves_old_file_intact(tmp_path):
    p = tmp_path / "mined.npz"
    table.write_overlay(p, _overlay(step=1))
    before = p.read_bytes()
    # A child process writes a bigger table and is SIGKILLed after the temporary file is complete
    # but before the rename (the fsync is the last step before it).
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from test_mine_table import _overlay
        from uld_jax.mine import table
        ov = _overlay(n_extra=5000, step=2)
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        table.write_overlay({str(p)!r}, ov)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert p.read_bytes() == before
    assert table.read_overlay(p).meta["checkpoint_step"] == 1
    leftovers = [f for f in os.listdir(tmp_path) if f != "mined.npz"]
    assert leftovers and all(f.startswith(".mined.npz.") and f.endswith(".tmp") for f in leftovers)
    # The next write succeeds over it.
    table.write_overlay(p, _overlay(step=3))
    assert table.read_overlay(p).meta["checkpoint_step"] == 3


def test_failed_write_cleans_up(tmp_path, monkeypatch):
    p = tmp_path / "mined.npz"
    table.write_overlay(p, _overlay(step=1))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(table.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        table.write_overlay(p, _overlay(step=2))
    assert os.listdir(tmp_path) == ["mined.npz"]
    assert table.read_overlay(p).meta["checkpoint_step"] == 1


def _write_raw(path, **over):
    ov = _overlay()
    arrays = dict(ov.arrays)
    meta = json.dumps(ov.meta)
    for k, v in over.items():
        if k == "meta":
            meta = v
        elif v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(path, meta=np.array(meta), **arrays)


@pytest.mark.parametrize("over, field, msg", [
    (dict(kind=np.array([1, 2, 5], np.int8)), "kind", "5 is not"),
    (dict(dataset=np.array(["deeplesion", "kits", "deeplesion"])), "dataset", "'kits'"),
    (dict(box=np.array([[0, 0, 1, 1], [5, 5, 4, 9], [0, 0, 0, 0]], np.float32)), "box", "row 1"),
    (dict(slice_index=np.array([1, 2, 3], np.int64)), "slice_index", "dtype int64"),
    (dict(expert=np.array([0, 9, -1], np.int8)), "expert", "9 is not"),
    (dict(score=np.array([0.1, 0.2], np.float32)), "score", "2 rows"),
    (dict(lesion_id=None), "lesion_id", "missing"),
    (dict(meta=json.dumps({"theta": 0.15})), "meta", "missing provenance keys"),
    (dict(meta="{not json"), "meta", "not JSON"),
])
def test_reader_errors_name_file_and_field(tmp_path, over, field, msg):
    p = tmp_path / "bad.npz"
    _write_raw(p, **over)
    with pytest.raises(table.OverlayError, match=msg) as e:
        table.read_overlay(p)
    assert e.value.field == field and str(p) in str(e.value)


def test_reader_rejects_truncated_and_pickled(tmp_path):
    p = tmp_path / "m.npz"
    table.write_overlay(p, _overlay(n_extra=200))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(table.OverlayError, match="truncated or corrupt"):
        table.read_overlay(p)
    q = tmp_path / "obj.npz"
    _write_raw(q, case_id=np.array(["a", "b", "c"], dtype=object))
    with pytest.raises(table.OverlayError, match=str(q)):
        table.read_overlay(q)
    with pytest.raises(table.OverlayError, match="no such file"):
        table.read_overlay(tmp_path / "absent.npz")


def _mining_inputs(rng, n_patients=6, slices_per_patient=12, dim=8):
    from uld_jax.mine import run

    n = n_patients * slices_per_patient
    slices = run.SliceTable(
        dataset=np.array(["deeplesion"] * n),
        case_id=np.array([f"{p:06d}_01_01" for p in range(n_patients) for _ in range(slices_per_patient)]),
        slice_index=np.tile(np.arange(slices_per_patient) * 3, n_patients),
        patient_id=np.repeat(np.arange(n_patients) + 100, slices_per_patient),
    )
    lesion = rng.standard_normal((n_patients, dim)).astype(np.float32)
    lesion /= np.linalg.norm(lesion, axis=1, keepdims=True)
    key = np.arange(n_patients) * slices_per_patient + 2                # one key slice per patient
    ann = run.Annotations(slice=key, box=np.tile([[20, 20, 40, 40]], (n_patients, 1)),
                          lesion_id=np.arange(n_patients) + 5000, embedding=lesion)
    rows = []
    for s in range(n):
        p = s // slices_per_patient
        near = lesion[p] + 0.02 * rng.standard_normal(dim).astype(np.float32)
        far = rng.standard_normal(dim).astype(np.float32)
        rows.append((s, [20, 20, 40, 40], 0.9, 0, near))               # the lesion (or its twin)
        rows.append((s, [60, 60, 70, 70], 0.7, 0, far / np.linalg.norm(far)))
        rows.append((s, [80, 10, 90, 20], rng.uniform(0.3, 1.0), 1 + s % 3, far))
    props = run.Proposals(
        slice=np.array([r[0] for r in rows]), box=np.array([r[1] for r in rows], np.float32),
        score=np.array([r[2] for r in rows], np.float32), expert=np.array([r[3] for r in rows]),
        embedding=np.stack([r[4] for r in rows]).astype(np.float32))
    return slices, ann, props


def test_mine_overlay_end_to_end_roundtrip_and_order_independent(tmp_path):
    from uld_jax.mine import run

    rng = np.random.default_rng(0)
    slices, ann, props = _mining_inputs(rng)
    out = run.mine_overlay(slices, ann, props, checkpoint_step=4, config_hash="abc")
    a = out.overlay.arrays
    mined = a["kind"] == table.KIND_MINED
    # The lesion twin on every non-key slice is mined (72 slices - 6 key slices), never on a key
    # slice (it overlaps the annotation there), and it names its patient's annotated lesion.
    assert mined.sum() == 66
    assert np.all(a["lesion_id"][mined] == 5000 + np.array([int(c[:6]) for c in a["case_id"][mined]]))
    assert np.all(a["expert"][mined] == 0)
    ignore = a["kind"] == table.KIND_IGNORE
    assert ignore.sum() == np.sum((props.score > 0.5) & (props.expert > 0))
    assert np.sum(a["kind"] == table.KIND_UNLABELED) == 66
    p = tmp_path / "mined.npz"
    table.write_overlay(p, out.overlay)
    back = table.read_overlay(p)
    assert back.equal_rows(out.overlay) and back.meta["options"]["theta"] == 0.15
    # A run that saw the slices and proposals in another order (e.g. resumed in other chunks)
    # writes the same rows.
    perm_s = rng.permutation(len(slices))
    inv = np.argsort(perm_s)
    slices2 = run.SliceTable(*(None if getattr(slices, f.name) is None
                               else np.asarray(getattr(slices, f.name))[perm_s]
                               for f in __import__("dataclasses").fields(run.SliceTable)))
    perm_p = rng.permutation(props.slice.size)
    props2 = run.Proposals(inv[props.slice][perm_p], props.box[perm_p], props.score[perm_p],
                           props.expert[perm_p], props.embedding[perm_p])
    ann2 = run.Annotations(inv[ann.slice], ann.box, ann.lesion_id, ann.embedding)
    out2 = run.mine_overlay(slices2, ann2, props2, checkpoint_step=4, config_hash="abc")
    assert out2.overlay.equal_rows(out.overlay)
    # Options flow into the table: NRM as positives, a subset of experts.
    opts = run.MiningOptions(nrm_as_positive=True, nrm_experts=("lits",))
    out3 = run.mine_overlay(slices, ann, props, options=opts, checkpoint_step=4, config_hash="abc")
    k3 = out3.overlay.arrays["kind"]
    assert np.sum(k3 == table.KIND_IGNORE) == 0
    assert np.sum(k3 == table.KIND_MINED) == 66 + np.sum(
        (props.score > 0.5) & (props.expert == 2))


def test_empty_table_roundtrip(tmp_path):
    e = np.zeros(0)
    ov = table.build_overlay(dataset=np.array([], str), case_id=np.array([], str),
                             slice_index=e.astype(int), kind=e.astype(int),
                             box=np.zeros((0, 4)), score=e, expert=e.astype(int),
                             lesion_id=e.astype(int),
                             meta=table.make_meta(checkpoint_step=0, config_hash="h", theta=0.15,
                                                  sigma=0.5))
    table.write_overlay(tmp_path / "e.npz", ov)
    back = table.read_overlay(tmp_path / "e.npz")
    assert len(back) == 0 and back.meta["counts"]["mined"] == 0


def _split_chunk(slices, ann, props, keys):
    """The inputs restricted to slice keys ``keys`` (local keys 0..len(keys)-1)."""
    from uld_jax.mine import run

    local = np.full(len(slices), -1)
    local[keys] = np.arange(keys.size)
    a = np.isin(ann.slice, keys)
    p = np.isin(props.slice, keys)
    return (run.SliceTable(slices.dataset[keys], slices.case_id[keys], slices.slice_index[keys],
                           slices.patient_id[keys]),
            run.Annotations(local[ann.slice[a]], ann.box[a], ann.lesion_id[a], ann.embedding[a]),
            run.Proposals(local[props.slice[p]], props.box[p], props.score[p], props.expert[p],
                          props.embedding[p]))


def test_resumed_chunked_run_gives_the_same_table(tmp_path):
    from uld_jax.mine import run, store

    rng = np.random.default_rng(1)
    slices, ann, props = _mining_inputs(rng)
    whole = run.mine_overlay(slices, ann, props, checkpoint_step=4, config_hash="abc").overlay
    chunks = np.array_split(np.arange(len(slices)), 5)
    st = store.ChunkStore(tmp_path / "run", checkpoint_step=4, config_hash="abc", embedding_dim=8)
    for i in (0, 1, 3):                       # first session: chunks 0, 1, 3, then killed
        st.save(i, *_split_chunk(slices, ann, props, chunks[i]))
    with pytest.raises(store.StoreError, match=r"not mined yet: \[2, 4\]"):
        st.load(expected_chunks=5)
    with pytest.raises(store.StoreError, match="another run"):
        store.ChunkStore(tmp_path / "run", checkpoint_step=5, config_hash="abc", embedding_dim=8)
    st2 = store.ChunkStore(tmp_path / "run", checkpoint_step=4, config_hash="abc", embedding_dim=8)
    assert st2.done() == {0, 1, 3}
    for i in sorted(set(range(5)) - st2.done()):          # the resumed session
        st2.save(i, *_split_chunk(slices, ann, props, chunks[i]))
    resumed = run.mine_overlay(*st2.load(expected_chunks=5), checkpoint_step=4,
                               config_hash="abc").overlay
    assert resumed.equal_rows(whole) and len(resumed) > 0


def test_store_keeps_only_the_universal_experts_embeddings_on_disk(tmp_path):
    from uld_jax.mine import run, store

    rng = np.random.default_rng(3)
    slices, ann, props = _mining_inputs(rng, n_patients=2, slices_per_patient=3)
    expert = np.asarray(props.expert).copy()
    expert[::3] = 2                                   # some single-type (NRM) proposals
    emb = rng.normal(size=(len(expert), 8)).astype(np.float32)
    props = run.Proposals(props.slice, props.box, props.score, expert, emb)
    uni = expert == run.UNIVERSAL_EXPERT
    assert uni.any() and (~uni).any()
    st = store.ChunkStore(tmp_path / "r", checkpoint_step=1, config_hash="c", embedding_dim=8)
    st.save(0, slices, ann, props)
    with np.load(tmp_path / "r" / "chunk_000000.npz") as z:
        assert "p_embedding" not in z.files
        np.testing.assert_array_equal(z["p_embedding_universal"], emb[uni])
    _, _, back = st.load()
    np.testing.assert_array_equal(back.embedding[uni], emb[uni])
    assert not back.embedding[~uni].any()
    # a chunk whose embeddings do not match its universal rows is refused, naming the file
    with np.load(tmp_path / "r" / "chunk_000000.npz") as z:
        arrs = {k: z[k] for k in z.files}
    arrs["p_embedding_universal"] = arrs["p_embedding_universal"][1:]
    np.savez(tmp_path / "r" / "chunk_000000.npz", **arrs)
    with pytest.raises(store.StoreError, match="chunk_000000.npz: .* universal embeddings"):
        st.load()


def test_store_and_driver_errors(tmp_path):
    from uld_jax.mine import run, store

    rng = np.random.default_rng(2)
    slices, ann, props = _mining_inputs(rng, n_patients=2, slices_per_patient=3)
    st = store.ChunkStore(tmp_path / "r", checkpoint_step=1, config_hash="c", embedding_dim=8)
    st.save(0, slices, ann, props)
    (tmp_path / "r" / "chunk_000001.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(store.StoreError, match="chunk_000001.npz: unreadable chunk"):
        st.load()
    with pytest.raises(ValueError, match="outside"):
        st.save(2, slices, run.Annotations(ann.slice + 100, ann.box, ann.lesion_id,
                                           ann.embedding), props)
    bad = run.Proposals(props.slice + len(slices), props.box, props.score, props.expert,
                        props.embedding)
    with pytest.raises(ValueError, match="proposals.slice refers to slice keys outside"):
        run.mine_overlay(slices, ann, bad, checkpoint_step=1, config_hash="c")


def test_mining_slice_indices_every_5mm():
    from uld_jax.mine import run

    # 2 mm slices, 0..18 mm: 0, 5 -> 2.5 -> 3 (ties up), 10 -> 5, 15 -> 7.5 -> 8; plus key slice 4.
    np.testing.assert_array_equal(run.mining_slice_indices(10, include=[4]), [0, 3, 4, 5, 8])
    np.testing.assert_array_equal(run.mining_slice_indices(1), [0])
    assert run.mining_slice_indices(0).size == 0
    idx = run.mining_slice_indices(200)
    assert np.all(np.abs(np.diff(idx) * 2.0 - 5.0) <= 1.0)     # 4 or 6 mm apart
    with pytest.raises(ValueError, match="outside"):
        run.mining_slice_indices(5, include=[5])


def test_mam_location_term_worked_case():
    from uld_jax.mine import run
    # one patient, two Cases (studies); annotation on case a slice 10; proposals:
    #   p0 case a, slice 12 (4 mm away at 2 mm slices), 3 px (1.5 mm) off, same embedding -> near
    #   p1 case a, slice 10, 100 px (50 mm) off, same embedding -> far by its place alone
    #   p2 case b (another study), same place and embedding -> another frame: never compared
    slices = run.SliceTable(np.array(["deeplesion"] * 3), np.array(["a", "a", "b"]),
                            np.array([10, 12, 12]), np.array([7, 7, 7]),
                            pixel_mm=np.array([0.5, 0.5, 0.5]), slice_mm=np.array([2.0, 2.0, 2.0]))
    e = np.zeros((1, 4), np.float32)
    e[0, 0] = 1.0
    ann = run.Annotations(np.array([0]), np.array([[20.0, 20, 40, 40]]), np.array([5]), e)
    boxes = np.array([[23.0, 20, 43, 40], [120, 20, 140, 40], [20, 20, 40, 40]], np.float32)
    props = run.Proposals(np.array([1, 0, 2]), boxes, np.full(3, 0.9, np.float32),
                          np.full(3, run.UNIVERSAL_EXPERT, np.int8), np.repeat(e, 3, axis=0))
    rows = np.arange(3)
    paper = run.MiningOptions()
    g_a, v_a, g_p, v_p = run.mam_features(slices, ann, props, paper, rows)
    assert g_a.tolist() == [7] and g_p.tolist() == [7, 7, 7] and v_p.shape == (3, 4)
    loc = run.MiningOptions(location_mm=64.0)
    g_a, v_a, g_p, v_p = run.mam_features(slices, ann, props, loc, rows)
    assert g_p[0] == g_p[1] == g_a[0] != g_p[2]
    # place in mm / 64: annotation centre (15, 15) mm at z = 20 mm
    np.testing.assert_allclose(v_a[0, 4:], np.array([15.0, 15.0, 20.0]) / 64, rtol=1e-6)
    d = np.linalg.norm(v_p - v_a[0], axis=1)
    np.testing.assert_allclose(d[:2], [np.hypot(1.5, 4.0) / 64, 50.0 / 64], rtol=1e-5)
    out = run.mine_overlay(slices, ann, props, options=run.MiningOptions(location_mm=64.0),
                           checkpoint_step=1, config_hash="x")
    assert out.mined.tolist() == [True, False, False]
    assert run.mine_overlay(slices, ann, props, options=paper, checkpoint_step=1,
                            config_hash="x").mined.tolist() == [True, True, True]
    no_mm = run.SliceTable(slices.dataset, slices.case_id, slices.slice_index, slices.patient_id)
    with pytest.raises(ValueError, match="pixel_mm"):
        run.mam_features(no_mm, ann, props, loc, rows)


def test_yield_matched_theta_worked_case():
    """The location rule's theta raised to the paper's yield, on hand-placed proposals."""
    from uld_jax.mine import run
    # one patient; slices: a/10 (the annotation's), a/12, b/12 (another study), a/14; 0.5 mm px,
    # 2 mm slices. Annotation at (15, 15) mm on a/10, embedding e. Proposals:
    #   p0 a/12, 1.5 mm off, embedding e          paper 0       location hypot(1.5, 4) / 64
    #   p1 a/10, 50 mm off, embedding 0.2 from e  paper 0.2     location hypot(0.2, 50 / 64)
    #   p2 b/12, same place, embedding 0.2 from e paper 0.2     location: no annotation in b
    #   p3 a/14, 20 mm off, embedding e           paper 0       location hypot(20, 8) / 64
    slices = run.SliceTable(np.array(["deeplesion"] * 4), np.array(["a", "a", "b", "a"]),
                            np.array([10, 12, 12, 14]), np.array([7, 7, 7, 7]),
                            pixel_mm=np.full(4, 0.5), slice_mm=np.full(4, 2.0))
    e = np.array([1.0, 0, 0, 0], np.float32)
    f = np.array([0.98, np.sqrt(1 - 0.98 ** 2), 0, 0], np.float32)        # |e - f| = 0.2
    ann = run.Annotations(np.array([0]), np.array([[20.0, 20, 40, 40]]), np.array([5]), e[None])
    boxes = np.array([[23.0, 20, 43, 40], [120, 20, 140, 40], [20, 20, 40, 40],
                      [20, 60, 40, 80]], np.float32)
    emb = np.stack([e, f, f, e])
    props = run.Proposals(np.array([1, 0, 2, 3]), boxes, np.full(4, 0.9, np.float32),
                          np.full(4, run.UNIVERSAL_EXPERT, np.int8), emb)
    loc = run.MiningOptions(location_mm=64.0)
    # the paper's rule at 0.15 mines p0 and p3; the location rule p0 only, until theta passes p3's
    # distance, the smallest theta that mines two
    tm = run.yield_matched_theta(slices, ann, props, loc)
    d3 = np.float32(np.hypot(20.0, 8.0) / 64)
    assert tm["paper_mined"] == 2 and tm["mined"] == 2 and tm["reached"] and tm["paper_theta"] == 0.15
    np.testing.assert_allclose(tm["theta"], d3, rtol=1e-5)
    assert tm["theta"] > 0.15
    at = run.mine_overlay(slices, ann, props, options=dataclasses.replace(loc, theta=tm["theta"]),
                          checkpoint_step=1, config_hash="x")
    assert at.mined.tolist() == [True, False, False, True]
    below = float(np.nextafter(np.float32(tm["theta"]), np.float32(0)))
    assert run.mine_overlay(slices, ann, props, options=dataclasses.replace(loc, theta=below),
                            checkpoint_step=1, config_hash="x").mined.tolist() == [True] + [False] * 3
    # with p1 and p2 on the annotation's embedding the paper's rule mines all four; the location
    # rule reaches three at most (p2's study has no annotation): not reached, every match taken
    props4 = dataclasses.replace(props, embedding=np.stack([e, e, e, e]))
    tm4 = run.yield_matched_theta(slices, ann, props4, loc)
    assert tm4["paper_mined"] == 4 and tm4["mined"] == 3 and not tm4["reached"]
    np.testing.assert_allclose(tm4["theta"], 50 / 64, rtol=1e-5)
    # already at the paper's yield: theta unchanged
    props1 = run.Proposals(np.array([1]), boxes[:1], np.full(1, 0.9, np.float32),
                           np.full(1, run.UNIVERSAL_EXPERT, np.int8), emb[:1])
    tm1 = run.yield_matched_theta(slices, ann, props1, loc)
    assert tm1 == {"paper_theta": 0.15, "paper_mined": 1, "theta": 0.15, "mined": 1, "reached": True}
    with pytest.raises(ValueError, match="location_mm > 0"):
        run.yield_matched_theta(slices, ann, props, run.MiningOptions())
