"""uld_jax.mine.driver: checkpoint -> slices every 5 mm -> jitted inference in resumable chunks ->
MAM + NRM -> an overlay the pipeline loads (a tiny built dataset and a real orbax checkpoint of a
randomly initialised tiny MELD)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import meld as meld_config
from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import input_pipeline as ip
from uld_jax import slice_data as sd
from uld_jax import train
from uld_jax.core import DATASET_ID, Keys, Provenance
from uld_jax.mine import driver, store, table
from uld_jax.mine import run as mrun

STEPS_PER_EPOCH = 1          # so that the epoch-4 checkpoint is step 4
SAVED_STEPS = (2, 4, 6)


def tiny_config(data_dir: str):
    c = meld_config.get_config("tiny")
    c.data.data_dir = str(data_dir)
    c.data.datasets = ("deeplesion",)
    c.data.image_size = (64, 64)
    c.data.pixel_mm = 0.8
    c.data.val_split = ""
    c.model.image_size = 64
    c.batch_size = 8
    c.checkpoint.async_save = False
    return c


def save_checkpoints(workdir: str, config, steps=SAVED_STEPS, seed: int = 1) -> None:
    """Real orbax checkpoints (the training loop's layout) of a randomly initialised MELD."""
    from uld_jax.models import meld
    model = meld.MELD(config.model)
    variables = meld.init_variables(model, seed=seed)
    params = variables["params"]
    other = {k: v for k, v in variables.items() if k != "params"}
    tx, _ = train.make_optimizer(config.optimizer, STEPS_PER_EPOCH)
    cfg_json = json.loads(config.to_json_best_effort())
    cfg_json["_derived"] = {"steps_per_epoch": STEPS_PER_EPOCH, "total_steps": max(steps),
                            "mesh_devices": 8, "process_count": 1}
    mngr = train.make_checkpoint_manager(workdir, config.checkpoint, STEPS_PER_EPOCH)
    for s in steps:
        state = {"step": np.int32(s), "params": params, "other": other,
                 "opt_state": tx.init(params)}
        mngr.save(s, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data_iter=train.IteratorStateSave({}),
            config=ocp.args.JsonSave(cfg_json)))
    mngr.wait_until_finished()
    mngr.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("minedrv")
    data = root / "data"
    # 4 patients x 2 studies (cases), 12 slices of 2 mm (0..22 mm: slices 0, 3, 5, 8, 10 every
    # 5 mm, plus the key slice 5); 6 training cases, 2 validation cases.
    cases = [cf.make_case("deeplesion", k, num_slices=12, height=40, width=40, lesion_slices=(5,),
                          negatives=(), patient=f"{k // 2:06d}", split="train" if k < 6 else "val")
             for k in range(8)]
    build_lib.build("/raw", str(data), ["deeplesion"], reader_lookup=lambda n: cf.ListReader(cases),
                    progress=False)
    config = tiny_config(data)
    run_dir = root / "run"
    save_checkpoints(str(run_dir), config)
    summary = driver.mine(str(run_dir), driver.DriverOptions(chunk_slices=8, progress=False))
    return {"root": root, "data": data, "run": run_dir, "config": config, "summary": summary,
            "cases": cases}


def test_driver_writes_a_valid_overlay_with_provenance(world):
    s = world["summary"]
    assert s["step"] == 4                                      # epoch 4, not the latest (6)
    assert s["slices"] == 6 * 5 and s["chunks_total"] == 4 and s["chunks_done"] == 4
    assert s["slices_per_s"] > 0
    ov = table.read_overlay(s["out"])
    assert s["out"] == os.path.join(world["run"], "mined.npz")
    m = ov.meta
    saved = train.load_checkpoint_config(str(world["run"]), 4)
    saved.pop("_derived")
    assert m["checkpoint_step"] == 4 and m["config_hash"] == table.config_hash(saved)
    assert m["theta"] == 0.15 and m["sigma"] == 0.5 and m["created"] and m["tool_version"]
    assert m["mining"]["every_mm"] == 5.0 and m["slices_mined"] == 30
    assert m["num_annotations"] == 6                           # one key-slice lesion per case
    assert m["counts"] == ov.counts() == s["counts"]
    a = ov.arrays
    # Every training case's slices every 5 mm without an annotation are offered as unlabeled.
    unl = a["kind"] == table.KIND_UNLABELED
    assert unl.sum() == 6 * 4 and set(a["slice_index"][unl].tolist()) == {0, 3, 8, 10}
    assert np.all(np.isin(a["case_id"], [c.case_id for c in world["cases"][:6]]))
    boxed = ~unl
    assert np.all(a["box"][boxed, 2] <= 40) and np.all(a["box"][boxed, :2] >= 0)
    mined = a["kind"] == table.KIND_MINED
    assert np.all(a["expert"][mined] == DATASET_ID["deeplesion"])
    # The matched annotation is a lesion of the same patient (case_factory: lesion id = case * 100).
    case_no = np.asarray([int(c[len("deeplesion_case"):]) for c in a["case_id"][mined]], int)
    assert np.all(a["lesion_id"][mined] % 100 == 0)
    assert np.all(a["lesion_id"][mined] // 100 // 2 == case_no // 2)
    # The library's MAM rule is the paper's (the command line adds the location term, below); the
    # store keeps each slice's pixel size and spacing for it.
    assert m["options"]["location_mm"] == 0.0
    with open(os.path.join(world["run"], "mining", "step_4", "store.json"), encoding="utf-8") as f:
        sm = json.load(f)
    slices, _, _ = store.ChunkStore(os.path.join(world["run"], "mining", "step_4"),
                                    checkpoint_step=sm["checkpoint_step"],
                                    config_hash=sm["config_hash"],
                                    embedding_dim=sm["embedding_dim"]).load()
    np.testing.assert_allclose(slices.pixel_mm, 0.8)
    np.testing.assert_allclose(slices.slice_mm, 2.0)
    assert np.all(a["expert"][a["kind"] == table.KIND_IGNORE] > 0)


def test_mined_overlay_merges_and_the_loader_yields_its_rows(world):
    out = world["summary"]["out"]
    ov = table.read_overlay(out)
    base = sd.load_sample_table(world["data"], "deeplesion", "train")
    t = sd.load_sample_table(world["data"], "deeplesion", "train", overlays=[out])
    assert len(base) == 6 and len(t) == 30 and t.added.sum() == 24
    c = ip.default_input_config("tiny")
    c.update(dict(data_dir=str(world["data"]), datasets=("deeplesion",), overlays=(out,),
                  image_size=(64, 64), pixel_mm=0.8, mix=False, shuffle=False, augment=False,
                  num_epochs=1, global_batch_size=10))
    G, R = int(c.max_boxes), int(c.max_ignore)
    n_mined = n_ign = 0
    for b in ip.make_dataset(c, process_index=0, process_count=1):
        for i, row in enumerate(b[Keys.SAMPLE_ID]):
            if row < 0:
                continue
            cid, z = str(t.case_id[t.case_row[row]]), int(t.slice_index[row])
            on = (ov.arrays["case_id"] == cid) & (ov.arrays["slice_index"] == z)
            k_m = int(np.sum(on & (ov.arrays["kind"] == table.KIND_MINED)))
            k_i = int(np.sum(on & (ov.arrays["kind"] == table.KIND_IGNORE)))
            n_orig = int(t.is_key_slice[row])
            prov = b[Keys.PROVENANCE][i][b[Keys.BOX_VALID][i]]
            want_m = min(n_orig + k_m, G) - n_orig
            assert int(np.sum(prov == Provenance.MINED)) == want_m
            assert int(b[Keys.IGNORE_VALID][i].sum()) == min(max(n_orig + k_m - G, 0) + k_i, R)
            n_mined += want_m
            n_ign += k_i
    assert n_mined + n_ign > 0
    # Training mixing: key slices + added_ratio x as many of the 24 added slices, redrawn per epoch.
    m = ip.EpochMixDataset([t], seed=0, added_ratio=0.5)
    assert m.epoch_length == 6 + 3
    e0 = {int(r) for _, r in m.epoch_elements(0)}
    e1 = {int(r) for _, r in m.epoch_elements(1)}
    assert e0 != e1 and set(range(6)) <= e0 & e1


def test_interrupted_run_resumes_to_the_same_table(world):
    run_dir = str(world["run"])
    sdir = os.path.join(world["root"], "resume_store")
    out = os.path.join(world["root"], "resumed.npz")
    opts = dict(chunk_slices=8, progress=False, store_dir=sdir, out=out)
    s1 = driver.mine(run_dir, driver.DriverOptions(max_chunks=1, **opts))
    assert s1["out"] is None and s1["chunks_done"] == 1 and not os.path.exists(out)
    s2 = driver.mine(run_dir, driver.DriverOptions(max_chunks=2, **opts))
    assert s2["out"] is None and s2["chunks_done"] == 3 and s2["chunks_mined_now"] == 2
    s3 = driver.mine(run_dir, driver.DriverOptions(**opts))
    assert s3["chunks_mined_now"] == 1 and s3["out"] == out
    assert table.read_overlay(out).equal_rows(table.read_overlay(world["summary"]["out"]))
    # Another checkpoint step refuses to resume a store of step 4.
    with pytest.raises(store.StoreError, match="another run"):
        driver.mine(run_dir, driver.DriverOptions(step=6, **opts))


def _plant(src: str, dst: str) -> dict:
    """Copies a chunk store and plants known embeddings and scores (see the test below)."""
    shutil.copytree(src, dst)
    st_meta = json.load(open(os.path.join(dst, "store.json"), encoding="utf-8"))
    d = st_meta["embedding_dim"]
    e1, e2 = np.eye(d, dtype=np.float32)[0], np.eye(d, dtype=np.float32)[1]
    planted = {}
    for name in sorted(os.listdir(dst)):
        if not name.startswith("chunk_"):
            continue
        path = os.path.join(dst, name)
        with np.load(path) as z:
            arr = {k: z[k] for k in z.files}
        arr["a_embedding"][:] = e1
        uni = arr["p_expert"] == DATASET_ID["deeplesion"]
        emb = np.zeros((len(uni), d), np.float32)              # the store keeps universal rows only
        emb[uni] = e2                                          # sqrt(2) from every annotation
        arr["p_score"][~uni] = 0.2                             # below every sigma tried
        if name == "chunk_000000.npz":
            ann_slices = set(arr["a_slice"].tolist())
            pat = arr["s_patient_id"]
            a0 = 0
            cand = np.flatnonzero(uni & ~np.isin(arr["p_slice"], list(ann_slices))
                                  & (pat[arr["p_slice"]] == pat[arr["a_slice"][a0]]))
            j = int(cand[0])
            emb[j] = e1 + np.float32(0.1) * e2                 # 0.1 from annotation 0
            s_j = int(arr["p_slice"][j])
            single = np.flatnonzero(~uni & ~np.isin(arr["p_slice"], list(ann_slices) + [s_j]))
            k = int(single[0])
            arr["p_score"][k] = 0.7
            s_k = int(arr["p_slice"][k])
            planted = {"mined_box": arr["p_box"][j], "mined_slice": int(arr["s_slice_index"][s_j]),
                       "mined_case": str(arr["s_case_id"][s_j]),
                       "lesion_id": int(arr["a_lesion_id"][a0]),
                       "ignore_box": arr["p_box"][k], "ignore_expert": int(arr["p_expert"][k]),
                       "ignore_slice": int(arr["s_slice_index"][s_k]),
                       "ignore_case": str(arr["s_case_id"][s_k])}
        arr["p_embedding_universal"] = emb[uni]
        table.atomic_write_npz(path, arr)
    return planted


def test_theta_and_sigma_on_planted_embeddings(world, capsys):
    run_dir = str(world["run"])
    sdir = os.path.join(world["root"], "planted_store")
    planted = _plant(os.path.join(run_dir, "mining", "step_4"), sdir)

    def mined_with(theta, sigma, name):
        out = os.path.join(world["root"], name)
        rc = driver.main(["--workdir", run_dir, "--chunk_slices", "8", "--progress", "off",
                          "--store_dir", sdir, "--out", out, "--theta", str(theta),
                          "--sigma", str(sigma), "--location_mm", "0"])
        assert rc == 0
        return table.read_overlay(out)

    ov = mined_with(0.15, 0.5, "a.npz")
    printed = capsys.readouterr().out
    assert "mined positives 1, ignore regions 1" in printed
    a = ov.arrays
    (m,) = np.flatnonzero(a["kind"] == table.KIND_MINED)
    assert a["case_id"][m] == planted["mined_case"] and a["slice_index"][m] == planted["mined_slice"]
    np.testing.assert_array_equal(a["box"][m], planted["mined_box"])
    assert a["lesion_id"][m] == planted["lesion_id"] and ov.meta["theta"] == 0.15
    (g,) = np.flatnonzero(a["kind"] == table.KIND_IGNORE)
    np.testing.assert_array_equal(a["box"][g], planted["ignore_box"])
    assert a["expert"][g] == planted["ignore_expert"]
    # theta below the planted distance (0.1): nothing mined; sigma above 0.7: nothing suspicious.
    c = mined_with(0.05, 0.8, "b.npz").counts()
    assert c["mined"] == 0 and c["ignore"] == 0 and c["unlabeled_slices"] == ov.counts()["unlabeled_slices"]
    assert mined_with(0.15, 0.1, "c.npz").counts()["ignore"] > 1     # the 0.2 scores now count
    # the command line's default adds MAM's location term (64 mm), compared within a Case
    out = os.path.join(world["root"], "d.npz")
    assert driver.main(["--workdir", run_dir, "--chunk_slices", "8", "--progress", "off",
                        "--store_dir", sdir, "--out", out]) == 0
    d = table.read_overlay(out)
    assert d.meta["options"]["location_mm"] == driver.DEFAULT_LOCATION_MM == 64.0
    # --theta_from paper_yield: theta raised until the location rule mines the paper rule's one
    out = os.path.join(world["root"], "e.npz")
    assert driver.main(["--workdir", run_dir, "--chunk_slices", "8", "--progress", "off",
                        "--store_dir", sdir, "--out", out, "--theta_from", "paper_yield"]) == 0
    e = table.read_overlay(out)
    tc = e.meta["theta_calibration"]
    assert tc["theta_from"] == "paper_yield" and tc["paper_theta"] == 0.15
    assert tc["paper_mined"] == 1 and tc["mined"] == 1 and tc["reached"]
    assert e.meta["theta"] == e.meta["options"]["theta"] == tc["theta"] >= 0.15
    (m,) = np.flatnonzero(e.arrays["kind"] == table.KIND_MINED)
    np.testing.assert_array_equal(e.arrays["box"][m], planted["mined_box"])


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    assert driver.main(["--workdir", str(tmp_path / "nothing"), "--progress", "off"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert driver.main(["--workdir", str(world["run"]), "--step", "5", "--progress", "off"]) == 1
    assert "no step 5" in capsys.readouterr().err
    assert driver.main(["--workdir", str(world["run"]), "--nrm_experts", "deeplesion"]) == 1
    assert "single-type" in capsys.readouterr().err
    assert driver.main(["--workdir", str(world["run"]), "--theta_from", "paper_yield",
                        "--location_mm", "0", "--progress", "off"]) == 1
    assert "theta_from='paper_yield' needs MAM's location term" in capsys.readouterr().err


def test_one_expert_model_has_no_nrm_experts(world, tmp_path, capsys):
    """A model trained with data.merge_datasets (one expert) cannot run NRM's single-type experts:
    the driver says so before mining anything."""
    c = tiny_config(world["data"])
    c.model.num_datasets, c.model.num_organ_heads, c.model.use_gate = 1, 1, False
    c.data.merge_datasets = True
    save_checkpoints(str(tmp_path / "run"), c, steps=(4,))
    assert driver.main(["--workdir", str(tmp_path / "run"), "--progress", "off"]) == 1
    err = capsys.readouterr().err
    assert "no NRM expert ['luna16', 'lits', 'nihln']" in err and "('deeplesion',)" in err
    assert not (tmp_path / "run" / "mining").exists()


def _finetune_config(world):
    from configs import finetune
    c = finetune.get_config("tiny")
    c.data.data_dir = str(world["data"])
    c.data.datasets = ("deeplesion",)
    c.data.image_size = (64, 64)
    c.data.pixel_mm = 0.8
    c.data.val_split = ""
    c.model.image_size = 64
    c.batch_size = 8
    c.checkpoint.async_save = False
    c.init_from.workdir = str(world["run"])
    c.data.overlays = (world["summary"]["out"],)
    return c


def test_finetune_config_consumes_the_mined_overlay(world):
    from configs import finetune
    from uld_jax import tasks
    p = finetune.get_config("paper")
    assert p.init_from.epoch == 4 and p.num_epochs == 4 and p.data.added_ratio == 0.5
    sched = train.make_lr_schedule(p.optimizer, 10)
    assert float(sched(0)) == pytest.approx(1e-5) and float(sched(19)) == pytest.approx(1e-5)
    assert float(sched(20)) == pytest.approx(1e-6) and float(sched(39)) == pytest.approx(1e-6)
    c = _finetune_config(world)
    data = tasks.build_data(c)
    assert data.steps_per_epoch == (6 + 3) // 8            # key slices + 0.5 x as many added
    it = data.train_iter(0, 1)
    batches = [next(it) for _ in range(3)]
    prov = np.concatenate([b[Keys.PROVENANCE][b[Keys.BOX_VALID]] for b in batches])
    n_ignore = sum(int(b[Keys.IGNORE_VALID].sum()) for b in batches)
    assert np.sum(prov == Provenance.ORIGINAL) > 0
    assert np.sum(prov == Provenance.MINED) + n_ignore > 0   # the mined rows reach training
    ids = np.concatenate([b[Keys.SAMPLE_ID] for b in batches])
    assert np.any(ids >= 6)                                  # added (unlabeled) slices drawn


@pytest.mark.slow
def test_finetune_trains_from_the_checkpoint_on_the_overlay(world, tmp_path):
    c = _finetune_config(world)
    c.total_steps = 2
    c.log_every_steps = 1
    out = train.train_and_evaluate(c, str(tmp_path / "ft"))
    assert out["step"] == 2 and np.isfinite(out["train"]["loss"])
    # Started from the MELD run's epoch-2 checkpoint (tiny finetune: init_from.epoch = 2).
    _, src = train.load_checkpoint_state(str(world["run"]), 2)
    _, ft = train.load_checkpoint_state(str(tmp_path / "ft"), 2)
    a = jax_leaves(src["params"])
    b = jax_leaves(ft["params"])
    assert len(a) == len(b)
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) < 0.1   # moved a little
    assert int(ft["step"]) == 2


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_quality_report_on_planted_truth(world, tmp_path):
    from uld_jax.mine import quality, report
    run_dir = str(world["run"])
    sdir = str(tmp_path / "store")
    pl = _plant(os.path.join(run_dir, "mining", "step_4"), sdir)
    out = str(tmp_path / "mined.npz")
    driver.mine(run_dir, driver.DriverOptions(chunk_slices=8, progress=False, store_dir=sdir,
                                              out=out))
    # Truth: the marked key-slice lesion of every training case, plus two unmarked lesions exactly
    # under the planted mined box and the planted suspicious region.
    case_id, box3d, marked = [], [], []
    for c in world["cases"][:6]:
        (les,) = c.lesions
        y1, x1, y2, x2 = les.box
        case_id.append(c.case_id)
        box3d.append([les.slice_index, y1, x1, les.slice_index + 1, y2, x2])
        marked.append(True)
    for case, z, b in ((pl["mined_case"], pl["mined_slice"], pl["mined_box"]),
                       (pl["ignore_case"], pl["ignore_slice"], pl["ignore_box"])):
        case_id.append(case)
        box3d.append([z, b[0], b[1], z + 1, b[2], b[3]])
        marked.append(False)
    truth = quality.LesionTruth(np.asarray(case_id), np.asarray(box3d, np.float64),
                                np.arange(len(case_id), dtype=np.int64), np.asarray(marked))
    ov, slices, ann, props = report.load_run_outputs(out)
    rep = report.quality_report(truth, ov, slices, ann, props, thetas=(0.05, 0.15),
                                sigmas=(0.1, 0.5, 0.8))
    q = rep["quality"]
    assert q["n_mined"] == 1 and q["precision"] == 1.0 and q["n_mined_on_unmarked"] == 1
    assert q["n_unmarked_visible"] == 2 and q["recall_unmarked"] == 0.5
    assert q["n_suspicious"] == 1 and q["suspicious_true_fraction"] == 1.0
    th = {r["theta"]: r for r in rep["theta_sweep"]}
    assert th[0.05]["n_mined"] == 0 and th[0.15]["n_mined"] == 1 and th[0.15]["precision"] == 1.0
    sg = {r["sigma"]: r for r in rep["sigma_sweep"]}
    assert sg[0.8]["n_suspicious"] == 0 and sg[0.5]["n_suspicious"] == 1
    assert sg[0.1]["n_suspicious"] > 1 and sg[0.1]["suspicious_true_fraction"] < 1.0
    md, js = report.write_report(rep, str(tmp_path / "rep"))
    text = open(md, encoding="utf-8").read()
    assert "| mined positives | 1 |" in text and "theta sweep" in text and "sigma sweep" in text
    assert "theta_calibration" not in rep["provenance"] and "paper's yield" not in text
    # MAM at the paper's yield (the location term, theta raised): the report carries its theta
    out_y = str(tmp_path / "mined_yield.npz")
    driver.mine(run_dir, driver.DriverOptions(
        chunk_slices=8, progress=False, store_dir=sdir, out=out_y, theta_from="paper_yield",
        mining=mrun.MiningOptions(location_mm=64.0)))
    ov_y, slices, ann, props = report.load_run_outputs(out_y)
    rep_y = report.quality_report(truth, ov_y, slices, ann, props, thetas=(0.15,), sigmas=(0.5,),
                                  location_mms=())
    tc = rep_y["provenance"]["theta_calibration"]
    assert tc["paper_mined"] == 1 and rep_y["provenance"]["theta"] == tc["theta"] >= 0.15
    assert rep_y["quality"]["n_mined"] == 1 and rep_y["quality"]["precision"] == 1.0
    assert (f"MAM theta {tc['theta']:.3f} is matched to the paper's yield: the paper's "
            "embedding-only rule mines 1 positives at theta 0.15, the location rule 1 here."
            ) in report.format_markdown(rep_y)
    back = json.load(open(js, encoding="utf-8"))
    assert back["theta_sweep"][0]["precision"] is None            # nan (nothing mined) -> null
    assert back["quality"]["n_mined"] == 1
    # the figure (Fig. 5 analog): a real PNG, NaN precisions (nothing mined) drawn as gaps
    from PIL import Image

    png = report.plot_sweeps(rep, str(tmp_path / "rep.png"))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 200
        assert len(np.unique(np.asarray(im.convert("L")))) > 10     # something is drawn
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_truth_csv_reader(tmp_path):
    from uld_jax.mine import report
    p = tmp_path / "deeplesion_lesions.csv"
    p.write_text("subvolume,x1,y1,z1,x2,y2,z2,lesion_id,patient,study,series,split,lesion_type,"
                 "coarse_type,organ,long_diameter_mm,marked,dl_row\n"
                 "000001_01_01_010-020,5,6,12,9,10,14,7,1,1,1,train,liver_tumour,4,liver,12.0,1,3\n"
                 "000001_01_01_010-020,1,2,11,3,4,11,8,1,1,1,train,lung_nodule,5,lung,4.0,0,-1\n"
                 "000002_01_01_001-009,1,2,3,3,4,5,9,2,1,1,val,lung_nodule,5,lung,4.0,0,-1\n")
    t = report.load_truth_csv(str(p), "train")
    assert list(t) == ["000001_01_01_010-020"]
    d = t["000001_01_01_010-020"]
    np.testing.assert_array_equal(d["boxes"][0], [5, 6, 12, 9, 10, 14])
    assert d["lesion_id"].tolist() == [7, 8] and d["marked"].tolist() == [True, False]
    bad = tmp_path / "bad.csv"
    bad.write_text("subvolume,x1\nA,1\n")
    with pytest.raises(ValueError, match="bad.csv: header lacks"):
        report.load_truth_csv(str(bad))


def test_report_frames_map_world_truth_onto_built_cases(tmp_path_factory):
    """On the synthetic world (skipped until data_prep.synthesize is in the checkout): every marked
    lesion of the truth, mapped into its built Case, lies under its DL_info annotation box (RECIST
    extent +- 5 px) on the annotation's key slice."""
    pytest.importorskip("data_prep.synthesize")
    from data_prep import synthesize
    from uld_jax.mine import quality, report
    world_dir = tmp_path_factory.mktemp("world") / "tiny"
    synthesize.synthesize(preset="tiny", seed=0, out=world_dir)
    data = tmp_path_factory.mktemp("wdata")
    build_lib.build(str(world_dir), str(data), ["deeplesion"], pixel_mm=1.6, progress=False)
    frames = report.frames_from_build(str(data), str(world_dir / "DeepLesion" / "DL_info.csv"))
    checked = 0
    for split in ("train", "val", "test"):
        truth = report.truth_in_case_frames(
            report.load_truth_csv(str(world_dir / "truth" / "deeplesion_lesions.csv"), split), frames)
        t = sd.load_sample_table(data, "deeplesion", split)
        for s in range(len(t)):
            cid, z = str(t.case_id[t.case_row[s]]), int(t.slice_index[s])
            for b in t.sample_lesions(s)["boxes"]:
                mine_ = np.flatnonzero((truth.case_id == cid) & truth.marked)
                cy = (truth.box3d[mine_, 1] + truth.box3d[mine_, 4]) / 2
                cx = (truth.box3d[mine_, 2] + truth.box3d[mine_, 5]) / 2
                under = ((b[0] <= cy) & (cy <= b[2]) & (b[1] <= cx) & (cx <= b[3])
                         & (truth.box3d[mine_, 0] <= z + 0.5) & (z + 0.5 <= truth.box3d[mine_, 3]))
                assert under.any(), (cid, z, b, truth.box3d[mine_])
                checked += 1
    assert checked > 0
    assert isinstance(frames[next(iter(frames))], quality.CaseFrame)


def test_one_device_and_eight_devices_mine_the_same(world):
    """The batch is sharded over the local mesh: 1 device x 3 slices per call gives the outputs of
    8 devices x 1 slice per call (up to float reassociation)."""
    import jax
    if jax.local_device_count() < 8:
        pytest.skip("needs 8 (forced host) devices")
    run_dir = str(world["run"])
    sdir = os.path.join(world["root"], "one_device_store")
    out = os.path.join(world["root"], "one_device.npz")
    s = driver.mine(run_dir, driver.DriverOptions(chunk_slices=8, progress=False, store_dir=sdir,
                                                  out=out, num_devices=1, batch_per_device=3))
    assert s["out"] == out

    def load(d):
        m = json.load(open(os.path.join(d, "store.json"), encoding="utf-8"))
        return store.ChunkStore(d, **m).load()

    s1, a1, p1 = load(sdir)
    s8, a8, p8 = load(os.path.join(run_dir, "mining", "step_4"))
    np.testing.assert_array_equal(s1.case_id, s8.case_id)
    np.testing.assert_array_equal(s1.slice_index, s8.slice_index)
    np.testing.assert_array_equal(a1.lesion_id, a8.lesion_id)
    np.testing.assert_allclose(a1.embedding, a8.embedding, atol=1e-4)
    assert len(p1.slice) == len(p8.slice)
    np.testing.assert_array_equal(p1.expert, p8.expert)
    np.testing.assert_allclose(p1.box, p8.box, atol=1e-2)
    np.testing.assert_allclose(p1.score, p8.score, atol=1e-4)
    np.testing.assert_allclose(p1.embedding, p8.embedding, atol=1e-4)
    assert table.read_overlay(out).counts() == world["summary"]["counts"]


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_same_table(world):
    """``python -m uld_jax.mine`` killed (SIGKILL) after some chunks, then rerun: same table."""
    import signal
    import subprocess
    import sys
    import time
    run_dir = str(world["run"])
    sdir = os.path.join(world["root"], "killed_store")
    out = os.path.join(world["root"], "killed.npz")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "uld_jax.mine", "--workdir", run_dir, "--chunk_slices", "8",
           "--store_dir", sdir, "--out", out, "--progress", "off"]
    env = dict(os.environ, PYTHONPATH=repo)
    proc = subprocess.Popen(cmd + ["--debug_sleep_per_chunk_s", "30"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 300:
        if os.path.isdir(sdir) and any(n.startswith("chunk_") for n in os.listdir(sdir)):
            break
        assert proc.poll() is None, "the mining run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [n for n in os.listdir(sdir) if n.startswith("chunk_")]
    assert 1 <= len(done) < 4 and not os.path.exists(out)
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"mined now: {30 - 8 * len(done)} slices" in r.stdout
    assert table.read_overlay(out).equal_rows(table.read_overlay(world["summary"]["out"]))


def test_oracle_table_from_a_mining_run(world, tmp_path):
    """uld_jax.mine.oracle on the run's chunk store: every planted lesion cross-section on the mined
    slices that no annotation covers becomes a mined positive; the run's added slices are kept."""
    from uld_jax.mine import oracle, quality
    src = world["summary"]["out"]
    case_id, box3d, marked = [], [], []
    for c in world["cases"][:6]:           # the marked key-slice lesions: covered, never mined
        (les,) = c.lesions
        y1, x1, y2, x2 = les.box
        case_id.append(c.case_id)
        box3d.append([les.slice_index - 1, y1, x1, les.slice_index + 2, y2, x2])
        marked.append(True)
    # an unmarked lesion on slices [2, 10) of case 0: mined slices 3, 5 and 8 (0 and 10 miss it)
    case_id.append(world["cases"][0].case_id)
    box3d.append([2, 20, 20, 10, 30, 30])     # away from the annotation's [4, 3, 10, 11]
    marked.append(False)
    truth = quality.LesionTruth(np.asarray(case_id), np.asarray(box3d, np.float64),
                                np.arange(len(case_id), dtype=np.int64) + 500, np.asarray(marked))
    out = str(tmp_path / "mined_oracle.npz")
    s = oracle.write_oracle(src, truth, str(world["data"]), out, reach={"unmarked": 1})
    assert s["oracle_boxes"] == 3 and s["as"] == "positive"
    assert s["oracle_on_unmarked"] == 3 and s["oracle_lesions"] == 1
    assert s["quality"]["precision"] == 1.0 and s["quality"]["n_unmarked_found"] == 1
    assert s["reach"] == {"unmarked": 1}
    assert json.load(open(str(tmp_path / "mined_oracle.json"), encoding="utf-8")) == s
    ov, src_ov = table.read_overlay(out), table.read_overlay(src)
    a, b = ov.arrays, src_ov.arrays
    unl = a["kind"] == table.KIND_UNLABELED
    assert s["added_slices"] == unl.sum() == np.sum(b["kind"] == table.KIND_UNLABELED) == 24
    for f in ("case_id", "slice_index"):
        np.testing.assert_array_equal(a[f][unl], b[f][b["kind"] == table.KIND_UNLABELED])
    m = a["kind"] == table.KIND_MINED
    assert m.sum() == 3 and not np.any(a["kind"] == table.KIND_IGNORE)
    assert set(a["case_id"][m]) == {world["cases"][0].case_id}
    assert a["slice_index"][m].tolist() == [3, 5, 8] and set(a["lesion_id"][m]) == {506}
    f = np.sqrt(1 - ((np.array([3.5, 5.5, 8.5]) - 6) / 4) ** 2)
    np.testing.assert_allclose(a["box"][m], np.stack([25 - 5 * f, 25 - 5 * f, 25 + 5 * f,
                                                      25 + 5 * f], 1), rtol=1e-6)
    assert np.all(a["expert"][m] == DATASET_ID["deeplesion"])
    assert ov.meta["oracle"]["source"] == os.path.abspath(src) and ov.meta["theta"] is None
    # the data pipeline takes it as it takes MAM's table
    t = sd.load_sample_table(world["data"], "deeplesion", "train", overlays=[out])
    assert len(t) == 30 and t.added.sum() == 24
    # the same boxes as ignore regions of no expert (a perfect NRM)
    ign = str(tmp_path / "mined_oracle_nrm.npz")
    s2 = oracle.write_oracle(src, truth, str(world["data"]), ign, as_kind="ignore")
    a2 = table.read_overlay(ign).arrays
    k2 = a2["kind"] == table.KIND_IGNORE
    assert s2["as"] == "ignore" and k2.sum() == 3 and not np.any(a2["kind"] == table.KIND_MINED)
    np.testing.assert_array_equal(a2["box"][k2], a["box"][m])
    assert np.all(a2["expert"][k2] == -1) and s2["quality"]["suspicious_true_fraction"] == 1.0
    # labels only (for training from scratch): no added slice
    lab = str(tmp_path / "mined_oracle_scratch.npz")
    s3 = oracle.write_oracle(src, truth, str(world["data"]), lab, with_added=False)
    a3 = table.read_overlay(lab).arrays
    assert s3["added_slices"] == 0 and a3["kind"].tolist() == [table.KIND_MINED] * 3
    with pytest.raises(ValueError, match="as_kind 'both'"):
        oracle.write_oracle(src, truth, str(world["data"]), ign, as_kind="both")


def test_exposure_counts_the_negatives_a_table_keeps_out(world, tmp_path, capsys):
    """uld_jax.mine.exposure on the run's checkpoint: a region over each training key slice's whole
    canvas holds (nearly) every sampled negative of those slices, and none of the added slices';
    the counts follow the epoch's make-up (6 key slices, added_ratio x 6 added ones)."""
    from uld_jax.mine import exposure
    src = table.read_overlay(world["summary"]["out"]).arrays
    unl = src["kind"] == table.KIND_UNLABELED
    train_cases = [c for c in world["cases"] if c.split == "train"]
    n = len(train_cases)
    rows = {"dataset": np.array(["deeplesion"] * n), "case_id": np.array([c.case_id for c in
                                                                            train_cases]),
            "slice_index": np.full(n, 5, np.int32), "kind": np.full(n, table.KIND_IGNORE, np.int8),
            "box": np.tile(np.array([[0, 0, 40, 40]], np.float32), (n, 1)),
            "score": np.ones(n, np.float32), "expert": np.full(n, -1, np.int8),
            "lesion_id": np.full(n, -1, np.int64)}
    rows = {k: np.concatenate([v, src[k][unl]]) for k, v in rows.items()}
    ov = table.build_overlay(**rows, meta=table.make_meta(checkpoint_step=0, config_hash="t",
                                                          theta=None, sigma=None))
    path = str(tmp_path / "canvas.npz")
    table.write_overlay(path, ov)
    # 3 batches of 4 = one epoch: the 6 key slices and added_ratio (1.0) x 6 added slices
    res = exposure.measure(str(world["run"]), path, batches=3, batch_size=4, added_ratio=1.0)
    key, added = res["counts"]["key"], res["counts"]["added"]
    assert key["slices"] == 6 and added["slices"] == 6
    assert key["ignore_regions"] == key["slices_with_regions"] == 6
    assert added["ignore_regions"] == added["slices_with_regions"] == 0
    assert added["roi_negatives_in_region"] == added["anchor_negatives_in_region"] == 0
    assert added["roi_negatives"] > 0 and added["anchor_negatives"] > 0
    assert added["roi_positives"] == added["anchor_positives"] == 0
    assert key["roi_positives"] > 0 and key["anchor_positives"] > 0
    # the region is the 40 x 40 slice inside the 64 x 64 image: anchors and ROIs reaching over the
    # padding by more than half their area are outside it
    fr = exposure.fractions(res)["key"]
    assert fr["anchor_negatives_in_region"] > 0.8 and fr["roi_negatives_in_region"] > 0.8
    assert fr["anchor_negative_loss_in_region"] > 0.8 and fr["roi_negative_loss_in_region"] > 0.8
    for k in ("roi_negative_loss", "anchor_negative_loss"):
        assert 0 < key[f"{k}_in_region"] <= key[k] and added[f"{k}_in_region"] == 0 < added[k]
    assert 0 <= key["regions_covered"] <= key["ignore_regions"]
    assert key["roi_negatives_covering"] <= key["roi_negatives_in_region"]
    assert res["step"] == max(SAVED_STEPS) and res["added_ratio"] == 1.0
    # the tool's rule is training's: with the regions left on, no sampled negative lies in one
    import jax
    from uld_jax import inference
    loaded = inference.load_model(workdir=str(world["run"]))
    cfg = exposure.input_config(loaded.data_config, str(world["data"]), path, 4, 0, 0.0)
    batch = next(iter(ip.make_dataset(cfg)))
    iobb = float(loaded.model_config.roi.ignore_iobb)
    got = {keep: jax.device_get(exposure._counter(loaded.model, loaded.model_config, iobb, keep)(
        loaded.variables, batch, jax.random.key(0))) for keep in (False, True)}
    assert got[False]["roi_negatives_in_region"].sum() > 0
    assert got[False]["anchor_negatives_in_region"].sum() > 0
    assert got[True]["roi_negatives_in_region"].sum() == 0
    assert got[True]["anchor_negatives_in_region"].sum() == 0
    assert got[True]["roi_negative_loss_in_region"].sum() == 0
    assert got[True]["anchor_negative_loss_in_region"].sum() == 0
    assert got[False]["roi_negative_loss_in_region"].sum() > 0
    # the CLI: a markdown table, the JSON written; a missing table is a one-line error naming it
    out = str(tmp_path / "exposure.json")
    assert exposure.main(["--workdir", str(world["run"]), "--overlay", path, "--batches", "3",
                          "--added_ratio", "1.0", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| key | 6 | 6 | 6 |" in printed and "| added | 6 | 0 | 0 | 0 |" in printed
    assert json.load(open(out, encoding="utf-8"))["counts"] == res["counts"]
    assert exposure.main(["--workdir", str(world["run"]), "--overlay",
                          str(tmp_path / "none.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.npz" in err and "no such file" in err


@pytest.mark.slow          # a diagnostic option; the default sampling's counts are tested above
def test_exposure_under_another_sampling(world, tmp_path, capsys):
    """--sample: the same checkpoint's training forward drawing more anchors and ROIs; the sampled
    counts follow the sizes given (every slice fills its samples: the tiny RPN keeps 64 proposals),
    the result records the sizes, the checkpoint's own config is untouched, and a key that is not a
    sampling size or a bad value is a one-line error naming it."""
    from uld_jax import inference
    from uld_jax.mine import exposure
    path = world["summary"]["out"]
    base = inference.load_model(workdir=str(world["run"])).model_config
    runs = {}
    for name, sample in (("default", []), ("dense", ["--sample", "roi.batch_per_image=32",
                                                     "--sample", "rpn.batch_per_image=64"])):
        out = str(tmp_path / f"{name}.json")
        assert exposure.main(["--workdir", str(world["run"]), "--overlay", path, "--batches", "2",
                              "--added_ratio", "0", "--out", out, *sample]) == 0
        runs[name] = json.load(open(out, encoding="utf-8"))
    capsys.readouterr()
    for name, (rois, anchors) in (("default", (base.roi.batch_per_image, base.rpn.batch_per_image)),
                                  ("dense", (32, 64))):
        k = runs[name]["counts"]["key"]
        assert k["slices"] == 8
        assert k["roi_positives"] + k["roi_negatives"] == rois * 8
        assert k["anchor_positives"] + k["anchor_negatives"] == anchors * 8
        assert runs[name]["sampling"]["roi.batch_per_image"] == rois
        assert runs[name]["sampling"]["rpn.post_nms_train"] == base.rpn.post_nms_train
    # the rebuilt model has its own config; the loaded one is not changed in place
    loaded = inference.load_model(workdir=str(world["run"]))
    dense = exposure.with_sampling(loaded, {"roi.batch_per_image": 32, "rpn.post_nms_train": 48})
    assert (loaded.model_config.roi.batch_per_image, loaded.model_config.rpn.post_nms_train) == (
        base.roi.batch_per_image, base.rpn.post_nms_train) == (16, 64)
    assert (dense.model.cfg.roi.batch_per_image, dense.model_config.rpn.post_nms_train) == (32, 48)
    assert dense.variables is loaded.variables
    assert exposure.with_sampling(loaded, {}) is loaded
    assert exposure.parse_sampling(["roi.positive_fraction=0.5", "rpn.pre_nms_train=100"]) == {
        "roi.positive_fraction": 0.5, "rpn.pre_nms_train": 100}
    for bad, words in ((["roi.fg_iou=0.3"], ("roi.fg_iou", "roi.batch_per_image")),
                       (["roi.batch_per_image=2.5"], ("2.5", "integer")),
                       (["roi.positive_fraction=1.5"], ("(0, 1]",)),
                       (["rpn.batch_per_image=0"], ("> 0",)),
                       (["roi.batch_per_image"], ("KEY=VALUE",)),
                       (["rpn.batch_per_image=8", "rpn.batch_per_image=9"], ("given twice",))):
        assert exposure.main(["--workdir", str(world["run"]), "--overlay", path,
                              *[x for b in bad for x in ("--sample", b)]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(w in err for w in words), err


def test_suppression_reads_the_driver_store(world):
    """mine.suppression on a real chunk store: the key slices are those the driver annotated, and
    every training case's marked key-slice lesion is one key_marked cross-section."""
    from uld_jax.mine import quality, suppression
    case_id, box3d = [], []
    for c in world["cases"][:6]:
        (les,) = c.lesions
        y1, x1, y2, x2 = les.box
        case_id.append(c.case_id)
        box3d.append([les.slice_index - 1, y1, x1, les.slice_index + 2, y2, x2])
    truth = quality.LesionTruth(np.asarray(case_id), np.asarray(box3d, np.float64),
                                np.arange(6, dtype=np.int64), np.ones(6, bool))
    sdir = os.path.join(world["run"], "mining", "step_4")
    res = suppression.measure({"run": sdir}, truth, rates=(0.5, 1.0))["run"]
    assert res["num_slices"] == 30 and res["num_key_slices"] == 6
    assert res["groups"]["key_marked"]["n"] == 6
    assert res["groups"]["key_unmarked"]["n"] == 0 and res["groups"]["other_unmarked"]["n"] == 0
    assert res["groups"]["other_marked"]["n"] == 0     # z 4..7 holds no slice of 0, 3, 8, 10
    slices, ann, props = store.ChunkStore.open(sdir).load()
    direct = suppression.found_by_group(truth, slices, ann, props, rates=(0.5, 1.0))
    assert json.dumps(res["groups"]) == json.dumps(direct["groups"])   # NaN of the empty groups
    assert res["store"] == os.path.abspath(sdir) and res["checkpoint_step"] == 4
