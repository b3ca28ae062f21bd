"""ImageNet DenseNet-121 loading: a generated state dict with torchvision's real names and shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from uld_jax.models import pretrained as pt
from uld_jax.models.config import model_config
from uld_jax.models.meld import MELD


def _torchvision_densenet121_names() -> dict[str, tuple[int, ...]]:
    """Written independently of the loader's helper: the torchvision layer list, block by block."""
    out = {"features.conv0.weight": (64, 3, 7, 7)}
    bn = lambda p, c: out.update({f"{p}.{s}": (c,) for s in  # noqa: E731
                                  ("weight", "bias", "running_mean", "running_var")}
                                 | {f"{p}.num_batches_tracked": ()})
    bn("features.norm0", 64)
    channels = 64
    for block, layers in zip((1, 2, 3, 4), (6, 12, 24, 16)):
        for j in range(layers):
            p = f"features.denseblock{block}.denselayer{j + 1}"
            bn(p + ".norm1", channels + 32 * j)
            out[p + ".conv1.weight"] = (4 * 32, channels + 32 * j, 1, 1)
            bn(p + ".norm2", 4 * 32)
            out[p + ".conv2.weight"] = (32, 4 * 32, 3, 3)
        channels += 32 * layers
        if block < 4:
            bn(f"features.transition{block}.norm", channels)
            out[f"features.transition{block}.conv.weight"] = (channels // 2, channels, 1, 1)
            channels //= 2
    bn("features.norm5", channels)
    out["classifier.weight"] = (1000, 1024)
    out["classifier.bias"] = (1000,)
    return out


@pytest.fixture(scope="module")
def paper_shapes():
    cfg = model_config("paper")
    model = MELD(cfg)
    image = jnp.zeros((1, 64, 64, 9))
    return jax.eval_shape(lambda: model.init({"params": jax.random.key(0, impl="rbg")}, image,
                                             method=MELD.init_all))


def _state(seed=0):
    rng = np.random.default_rng(seed)
    names = _torchvision_densenet121_names()
    return {k: (rng.standard_normal(s).astype(np.float32) if s else np.array(7, np.int64))
            for k, s in names.items()}


def test_helper_list_matches_architecture():
    assert pt.densenet121_state_dict_shapes() == _torchvision_densenet121_names()
    # DenseNet-121 has 7,978,856 trainable parameters.
    n = sum(int(np.prod(s)) for k, s in _torchvision_densenet121_names().items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n == 7_978_856


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_load_converts_layouts(tmp_path, paper_shapes, fmt):
    state = _state()
    path = tmp_path / f"densenet121.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        # legacy torchvision names ('norm.1') must be accepted too
        legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
                  for k, v in state.items()}
        np.savez(path, **legacy)
    v = pt.load_densenet_imagenet(paper_shapes, path)
    stem = v["params"]["backbone"]["backbone"]
    w = state["features.conv0.weight"]
    np.testing.assert_array_equal(stem["conv0"]["kernel"][2, 5, 1, 17], w[17, 1, 2, 5])
    k = stem["denseblock2"]["denselayer3"]["conv2"]["kernel"]
    assert k.shape == (3, 3, 128, 32)
    np.testing.assert_array_equal(k[0, 2, 100, 7],
                                  state["features.denseblock2.denselayer3.conv2.weight"][7, 100, 0, 2])
    bs = v["batch_stats"]["backbone"]["backbone_block3"]
    np.testing.assert_array_equal(bs["denseblock3"]["denselayer24"]["norm1"]["var"],
                                  state["features.denseblock3.denselayer24.norm1.running_var"])
    np.testing.assert_array_equal(bs["transition3"]["norm"]["mean"],
                                  state["features.transition3.norm.running_mean"])
    np.testing.assert_array_equal(
        v["params"]["backbone"]["backbone"]["transition2"]["norm"]["scale"],
        state["features.transition2.norm.weight"])
    # heads and FPN keep what they had
    assert v["params"]["cls_heads"]["out_kernel"] is paper_shapes["params"]["cls_heads"]["out_kernel"]


def test_errors_list_missing_unexpected_misshaped(tmp_path, paper_shapes):
    state = _state()
    del state["features.denseblock1.denselayer2.norm2.running_var"]
    state["features.extra.weight"] = np.zeros(3, np.float32)
    state["features.transition1.conv.weight"] = np.zeros((100, 256, 1, 1), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(pt.PretrainedWeightsError) as e:
        pt.load_densenet_imagenet(paper_shapes, path)
    msg = str(e.value)
    assert "missing (1)" in msg and "features.denseblock1.denselayer2.norm2.running_var" in msg
    assert "unexpected (1)" in msg and "features.extra.weight" in msg
    assert "mis-shaped (1)" in msg and "features.transition1.conv.weight" in msg
    assert "classifier" not in msg and "norm5" not in msg  # dropped by design, not errors


def test_tiny_config_is_rejected(tmp_path):
    cfg = model_config("tiny")
    model = MELD(cfg)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0, impl="rbg")},
                                               jnp.zeros((1, 32, 32, 9)), method=MELD.init_all))
    path = tmp_path / "w.safetensors"
    save_file(_state(), str(path))
    with pytest.raises(pt.PretrainedWeightsError, match="mis-shaped"):
        pt.load_densenet_imagenet(shapes, path)
