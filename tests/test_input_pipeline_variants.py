"""Table 4's pipeline variants: merged dataset ids (one expert for all datasets) and positive-only
datasets (a whole-canvas ignore region, no lesion-free draws, no negatives in the targets)."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep import build as build_lib
from data_prep import case_factory as cf
from uld_jax import input_pipeline as ip
from uld_jax.core import DATASET_ID, Keys

from test_input_pipeline import H, W, _config as _pipeline_config  # noqa: E402



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    luna = [cf.make_case("luna16", k, num_slices=8, height=48, width=40, lesion_slices=(k % 8,),
                         negatives=((k + 3) % 8, (k + 5) % 8), split="train") for k in range(4)]
    dl = [cf.make_case("deeplesion", k, num_slices=6, height=40, width=48, lesion_slices=(2,),
                       negatives=(4,)) for k in range(3)]
    for name, cases in (("luna16", luna), ("deeplesion", dl)):
        build_lib.build("/raw", str(out), [name], reader_lookup=lambda n, c=cases: cf.ListReader(c),
                        chunk_slices=30, progress=False)
    return out


def _config(out, **kw):
    """The pipeline tests' input config (two datasets, 64 px canvas) with a batch of 2."""
    return _pipeline_config(out, **{"global_batch_size": 2, **kw})


def _examples(c, tables, stores):
    """Every sample of every table through the loader: [(table, row, example)]."""
    loader = ip.SampleLoader(tables, stores, c)
    return [(t, r, loader.map(np.array([t, r, r], np.int64)))
            for t, tb in enumerate(tables) for r in range(len(tb))]


def test_merged_dataset_ids_are_zero(data):
    for merge in (False, True):
        c = _config(data, merge_datasets=merge)
        tables, stores = ip.load_tables(c)
        for t, _, ex in _examples(c, tables, stores):
            want = 0 if merge else DATASET_ID[tables[t].dataset]
            assert int(ex[Keys.DATASET_ID]) == want
    # the batches of a merged pipeline mix both datasets under id 0
    c = _config(data, merge_datasets=True)
    batch = next(iter(ip.make_dataset(c, process_index=0, process_count=1)))
    assert np.all(batch[Keys.DATASET_ID] == 0)


def test_positive_only_whole_canvas_region_and_no_lesion_free_draws(data):
    c = _config(data, positive_only=("luna16",), max_ignore=2)
    tables, stores = ip.load_tables(c)
    region = np.array([-H, -W, 2 * H, 2 * W], np.float32)
    seen = 0
    for t, _, ex in _examples(c, tables, stores):
        if tables[t].dataset == "luna16":
            assert ex[Keys.IGNORE_VALID][0] and np.array_equal(ex[Keys.IGNORE_BOXES][0], region)
            seen += 1
        else:
            assert not ex[Keys.IGNORE_VALID].any()
    assert seen == len(tables[1])
    # the mixing draws only luna16's lesion slices; DeepLesion keeps its negatives
    comp = ip.epoch_composition(c, tables)
    base = ip.epoch_composition(_config(data), tables)
    assert comp["luna16"]["negative"] == 0 and base["luna16"]["negative"] > 0
    assert comp["luna16"]["positive"] == base["luna16"]["positive"] == 4
    assert comp["deeplesion"] == base["deeplesion"] and comp["deeplesion"]["negative"] == 3
    ds = ip.EpochMixDataset(tables, seed=0, positive_only=("luna16",))
    for epoch in range(3):
        el = ds.epoch_elements(epoch)
        rows = el[el[:, 0] == 1, 1]
        assert len(rows) == 4 and tables[1].has_original()[rows].all()
    # the steps per epoch follow the smaller epoch
    assert ip.steps_per_epoch(c, tables, process_count=1) < ip.steps_per_epoch(_config(data), tables,
                                                                                 process_count=1)


def test_config_checks(data):
    c = _config(data)
    ip.check_config(c, 4)
    with pytest.raises(ValueError, match="model.num_datasets=1"):
        ip.check_config(_config(data, merge_datasets=True), 4)
    ip.check_config(_config(data, merge_datasets=True), 1)
    with pytest.raises(ValueError, match="merge_datasets=True for one expert"):
        ip.check_config(c, 1)                               # luna16's id 1 has no expert
    with pytest.raises(ValueError, match="positive_only: unknown"):
        ip.check_config(_config(data, positive_only=("luna",)))
    with pytest.raises(ValueError, match="positive_only: unknown"):
        ip.load_tables(_config(data, positive_only=("luna",)))
    with pytest.raises(ValueError, match="config.mask_crop: 0"):
        ip.check_config(_config(data, mask_crop=0))
    # the trainer's task reports a mismatch as a ConfigError before building anything
    from configs import meld
    from uld_jax import tasks, train

    cfg = meld.get_config("tiny")
    cfg.data.merge_datasets = True
    with pytest.raises(train.ConfigError, match="model.num_datasets=1"):
        tasks.build_task(cfg)
    cfg.model.num_datasets, cfg.model.num_organ_heads, cfg.model.use_gate = 1, 1, False
    tasks.check_model_data(cfg)
    assert tasks._dataset_names(cfg) == ("merged",)


def test_positive_only_sample_has_no_negatives_in_training_targets(data):
    """MELD's training forward on a positive-only LUNA16 slice samples only positive anchors and
    ROIs; the same slice without the option (and a DeepLesion slice) has negatives."""
    import jax

    from uld_jax import losses
    from uld_jax.models.config import model_config
    from uld_jax.models.meld import MELD

    cfg = model_config("tiny")
    cfg.unlock()
    cfg.image_size = H
    cfg.num_datasets, cfg.num_organ_heads, cfg.use_gate = 1, 1, False
    cfg.use_mask = cfg.use_embedding = False
    cfg.backbone.block_layers = (1, 1, 1)                  # a smaller graph: faster to compile
    cfg.rpn.pre_nms_train, cfg.rpn.post_nms_train = 128, 16
    model = MELD(cfg)
    # zero parameters: the sampled targets depend on the boxes, not on the weights (and no
    # initialiser has to be compiled)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0, impl="rbg")},
                                               jax.numpy.zeros((1, H, W, 9)), method=MELD.init_all))
    variables = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    fwd = jax.jit(lambda v, b: model.apply(v, b, train=True, rngs={"sample": jax.random.key(0)},
                                           mutable=["batch_stats"])[0])
    tables, stores = ip.load_tables(_config(data))
    luna_row = int(np.flatnonzero(tables[1].has_original())[0])
    dl_row = int(np.flatnonzero(tables[0].has_original())[0])
    for positive_only in ((), ("luna16",)):
        c = _config(data, merge_datasets=True, positive_only=positive_only, augment=False)
        loader = ip.SampleLoader(tables, stores, c)
        exs = [loader.map(np.array([1, luna_row, 0])), loader.map(np.array([0, dl_row, 1]))]
        batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
        out = fwd(variables, batch)
        total, _ = losses.meld_loss(out, batch, cfg)
        assert np.isfinite(float(total))
        rpn, roi = np.asarray(out["rpn_labels"]), np.asarray(out["roi_labels"])
        assert (rpn[0] == 1).any() and (roi[0] == 1).any()          # the lesion still teaches
        assert (rpn[1] == 0).any() and (roi[1] == 0).any()          # DeepLesion has negatives
        if positive_only:
            assert not (rpn[0] == 0).any() and not (roi[0] == 0).any()
        else:
            assert (rpn[0] == 0).any() and (roi[0] == 0).any()
