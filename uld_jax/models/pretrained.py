"""Load ImageNet DenseNet-121 weights (torchvision / timm naming) into MELD's Flax variables.

The file is a local ``.safetensors`` or ``.npz`` holding a PyTorch state dict of arrays, e.g.
``features.conv0.weight [64, 3, 7, 7]``, ``features.denseblock1.denselayer1.norm1.running_mean``,
``features.transition2.conv.weight``, ``classifier.weight``. torchvision and timm use the same
``features.*`` names; the pre-0.3 torchvision names ``norm.1`` / ``conv.2`` and a leading
``module.`` (DataParallel) are accepted too.

Mapping (the Flax modules are named after torchvision's, see ``densenet.py``):

* conv ``weight [O, I, kh, kw]`` -> ``params/.../kernel [kh, kw, I, O]``;
* BN ``weight``/``bias`` -> ``params/.../scale``/``bias``; ``running_mean``/``running_var`` ->
  ``batch_stats/.../mean``/``var``; ``num_batches_tracked`` is dropped.
* dropped by the truncation after dense block 3: ``features.transition3.conv``,
  ``features.denseblock4``, ``features.norm5``, ``classifier`` (``transition3.norm`` is used as the
  BN-ReLU after block 3).

Any other mismatch -- a backbone variable without a weight, a weight the backbone does not have, or
a wrong shape -- raises :class:`PretrainedWeightsError` listing all of them.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Mapping

import numpy as np

# Flax module prefixes (inside MELD's 'backbone' = DenseNetFPN) that hold DenseNet layers.
_STEM = ("backbone", "backbone")
_BLOCK3 = ("backbone", "backbone_block3")
_DROPPED = re.compile(
    r"^(features\.transition3\.conv\.|features\.denseblock4\.|features\.norm5\.|classifier\.)"
    r"|\.num_batches_tracked$")
_LEGACY = re.compile(r"(denselayer\d+)\.(norm|relu|conv)\.([12])\.")


class PretrainedWeightsError(ValueError):
    """The weights file does not match the backbone (names and shapes are listed)."""


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` or ``.npz`` state dict into ``{name: array}`` (normalised names)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        raw = load_file(str(path))
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    else:
        raise PretrainedWeightsError(f"{path}: expected a .safetensors or .npz file")
    out = {}
    for k, v in raw.items():
        name = k[len("module."):] if k.startswith("module.") else k
        out[_LEGACY.sub(r"\1.\2\3.", name)] = np.asarray(v)
    return out


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _torch_name(collection: str, path: tuple) -> str | None:
    """Flax (collection, path) -> torchvision name, or None when not a DenseNet variable."""
    if path[:2] == _STEM:
        mods = path[2:-1]
    elif path[:2] == _BLOCK3:
        mods = path[2:-1]
    else:
        return None
    leaf = path[-1]
    suffix = {("params", "kernel"): "weight", ("params", "scale"): "weight",
              ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
              ("batch_stats", "var"): "running_var"}[(collection, leaf)]
    return "features." + ".".join(mods) + "." + suffix


def _convert(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        return np.transpose(arr, (2, 3, 1, 0))  # OIHW -> HWIO
    return arr


def load_densenet_imagenet(variables: Mapping, path: str | pathlib.Path) -> dict:
    """Returns a copy of MELD ``variables`` ({'params', 'batch_stats'}) with every DenseNet weight
    replaced by the file's (converted) values; other variables (FPN, heads, fusion) are untouched.

    ``variables`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves (only shapes are read for the
    DenseNet part). Raises :class:`PretrainedWeightsError` listing missing, unexpected and
    mis-shaped names.
    """
    state = read_state_dict(path)
    targets: dict[str, tuple[str, tuple, Any]] = {}
    for col in ("params", "batch_stats"):
        for p, leaf in _flatten(variables.get(col, {})).items():
            name = _torch_name(col, p)
            if name is not None:
                targets[name] = (col, p, leaf)
    missing = sorted(n for n in targets if n not in state)
    unexpected = sorted(n for n in state if n not in targets and not _DROPPED.search(n))
    misshaped = []
    for n, (_, p, leaf) in sorted(targets.items()):
        if n in state:
            got = _convert(state[n], p[-1]).shape
            if tuple(got) != tuple(leaf.shape):
                misshaped.append(f"{n}: file {tuple(state[n].shape)} -> {tuple(got)}, "
                                 f"model {tuple(leaf.shape)} ({'/'.join(p)})")
    if missing or unexpected or misshaped:
        lines = [f"{path}: weights do not match the DenseNet backbone"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {x}" for x in items)
        raise PretrainedWeightsError("\n".join(lines))
    new = {col: _unfreeze(variables[col]) for col in variables}
    for n, (col, p, leaf) in targets.items():
        node = new[col]
        for k in p[:-1]:
            node = node[k]
        dtype = getattr(leaf, "dtype", np.float32)
        node[p[-1]] = _convert(state[n], p[-1]).astype(dtype)
    return new


def _unfreeze(tree):
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def densenet121_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of torchvision's ``densenet121().state_dict()`` (all 4 blocks, norm5 and
    classifier), written out from the architecture: growth 32, bn_size 4, 64 initial features,
    blocks (6, 12, 24, 16), compression 0.5, 1000 classes."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int):
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{s}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["features.conv0.weight"] = (64, 3, 7, 7)
    bn("features.norm0", 64)
    c = 64
    for k, n in enumerate((6, 12, 24, 16), start=1):
        for j in range(1, n + 1):
            p = f"features.denseblock{k}.denselayer{j}"
            bn(f"{p}.norm1", c)
            shapes[f"{p}.conv1.weight"] = (128, c, 1, 1)
            bn(f"{p}.norm2", 128)
            shapes[f"{p}.conv2.weight"] = (32, 128, 3, 3)
            c += 32
        if k < 4:
            bn(f"features.transition{k}.norm", c)
            shapes[f"features.transition{k}.conv.weight"] = (c // 2, c, 1, 1)
            c //= 2
    bn("features.norm5", c)
    shapes["classifier.weight"] = (1000, c)
    shapes["classifier.bias"] = (1000,)
    return shapes
