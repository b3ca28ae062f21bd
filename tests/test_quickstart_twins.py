"""A finetune whose mined table holds the same rows as an earlier one's is that run, not trained
again (the quick start's ``same_rows`` and ``do_finetune``)."""

import json
import os

import numpy as np

from uld_jax import quickstart as qs
from uld_jax.mine import table
from uld_jax.quickstart_table import table1

MAM, NRM_EXPERT = table.KIND_MINED, 2


def _write(path, kinds, experts, *, step=360, score_nan_on_added=True):
    n = len(kinds)
    kinds = np.array(kinds)
    score = np.where(kinds == table.KIND_UNLABELED, np.nan, 0.7) if score_nan_on_added else \
        np.full(n, 0.7)
    rows = dict(dataset=np.array(["deeplesion"] * n), case_id=np.array(["000001_01_01"] * n),
                slice_index=np.arange(n), kind=kinds,
                box=np.where((kinds == table.KIND_UNLABELED)[:, None], 0.0,
                             np.array([[10, 10, 30, 30]], np.float32)).astype(np.float32),
                score=score.astype(np.float32), expert=np.array(experts),
                lesion_id=np.full(n, -1))
    meta = table.make_meta(checkpoint_step=step, config_hash="h", theta=0.15, sigma=0.5,
                           quickstart_subset=os.path.basename(path))
    table.write_overlay(path, table.build_overlay(**rows, meta=meta))
    return str(path)


def test_same_rows_ignores_provenance_and_nan_scores(tmp_path):
    a = _write(tmp_path / "a.npz", [MAM, table.KIND_UNLABELED], [0, -1])
    b = _write(tmp_path / "b.npz", [MAM, table.KIND_UNLABELED], [0, -1], step=999)
    assert qs.same_rows(a, b)                       # the meta differs, NaN scores on both
    c = _write(tmp_path / "c.npz", [MAM, table.KIND_UNLABELED, table.KIND_IGNORE], [0, -1, 2])
    assert not qs.same_rows(a, c)                   # one more row
    d = _write(tmp_path / "d.npz", [MAM, table.KIND_UNLABELED], [0, -1], score_nan_on_added=False)
    assert not qs.same_rows(a, d)                   # a score differs
    assert not qs.same_rows(a, str(tmp_path / "missing.npz"))


def _mined(q, with_nrm: bool):
    meld = q.run_dir("meld")
    os.makedirs(meld, exist_ok=True)
    kinds, experts = [MAM, table.KIND_UNLABELED], [0, -1]
    both = kinds + ([table.KIND_IGNORE] if with_nrm else [])
    _write(os.path.join(meld, "mined.npz"), both, experts + ([NRM_EXPERT] if with_nrm else []))
    _write(os.path.join(meld, "mined_mam.npz"), kinds, experts)
    _write(os.path.join(meld, "mined_nrm.npz"),
           [table.KIND_UNLABELED] + ([table.KIND_IGNORE] if with_nrm else []),
           [-1] + ([NRM_EXPERT] if with_nrm else []))


def test_finetune_twin_is_linked_not_trained(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(qs.subprocess, "call", lambda cmd, **kw: trained.append(cmd) or 0)
    q = qs.Quickstart(str(tmp_path / "qs"), qs.RECIPES["smoke"], quiet=True)
    _mined(q, with_nrm=False)                       # NRM marked nothing: both == MAM
    os.makedirs(q.run_dir("ft_both"))               # an interrupted training of ft_both
    q.do_finetune()
    assert len(trained) == 2 and not any("ft_both" in " ".join(c) for c in trained), trained
    assert os.path.islink(q.run_dir("ft_both")) and os.readlink(q.run_dir("ft_both")) == "ft_mam"
    with open(os.path.join(q.out, "state", "ft_both.json"), encoding="utf-8") as f:
        assert json.load(f)["same_as"] == "ft_mam"
    assert q.twins() == {"ft_both": "ft_mam"}

    # any later finetune is matched the same way: the control's table (the added slices, nothing
    # mined) is MELD + NRM's when NRM marked nothing; other options are another finetune
    none = _write(tmp_path / "mined_none.npz", [table.KIND_UNLABELED], [-1])
    q.finetune("ft_none", none)
    assert os.readlink(q.run_dir("ft_none")) == "ft_nrm" and len(trained) == 2
    q.finetune("ft_theta", os.path.join(q.run_dir("meld"), "mined.npz"), "--config.mine.theta=0.3")
    assert len(trained) == 3 and "--config.mine.theta=0.3" in trained[-1]
    os.remove(os.path.join(q.out, "state", "ft_theta.json"))
    os.remove(os.path.join(q.out, "state", "ft_none.json"))

    # mined again with an NRM region: the link goes and ft_both is trained
    for run in ("ft_mam", "ft_nrm", "ft_both"):
        os.remove(os.path.join(q.out, "state", f"{run}.json"))
    _mined(q, with_nrm=True)
    trained.clear()
    q.do_finetune()
    assert len(trained) == 3 and not os.path.islink(q.run_dir("ft_both"))
    assert q.twins() == {}


def test_table_notes_the_twin(tmp_path):
    out = tmp_path / "qs"
    t = {"fp_rates": [0.5, 1.0], "sensitivity": [0.1, 0.2], "mean": 0.15}
    for run in qs.RUNS:
        (out / "eval" / run).mkdir(parents=True)
        (out / "eval" / run / "results.json").write_text(json.dumps({"tables": {"released": t}}))
    md, js = table1(str(out), qs.RUNS, qs.ROW_NAMES, {}, twins={"ft_both": "ft_mam"})
    assert js["same_as"] == {"ft_both": "ft_mam"}
    assert ("MELD + MAM + NRM: its finetuning table holds the same rows as MELD + MAM's" in md
            and "`runs/ft_both` is that run" in md)
