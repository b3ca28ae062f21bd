"""DenseNet backbone truncated after dense block 3 (MULAN), in torchvision's module naming.

Module names follow torchvision's ``features.*`` (``conv0``, ``norm0``, ``denseblockK.denselayerJ.
{norm1, conv1, norm2, conv2}``, ``transitionK.{norm, conv}``) so that ImageNet weights map one to
one (``uld_jax.models.pretrained``). ``transition3.norm`` (BN, then ReLU) is kept as the output
normalisation of block 3; ``transition3.conv``, block 4, ``norm5`` and the classifier are dropped.

BatchNorm (``bn_mode``):

* ``'frozen'``: always normalises with the stored statistics (ImageNet's after loading); scale and
  bias still train. The paper's setting: batches of 4 slices per device are too small for batch
  statistics, so MULAN (maskrcnn-benchmark) freezes them.
* ``'batch'``: batch statistics in training (``mutable=['batch_stats']`` updates the running
  averages), running averages at eval; used by the from-scratch ``tiny`` variant.

Strides: conv0 2, pool0 4 (block 1), transition1 8 (block 2), transition2 16 (block 3).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uld_jax.models import layers


class _BN:
    """BatchNorm with the frozen/batch policy above (builds an ``nn.BatchNorm`` named ``name``)."""

    def __init__(self, mode: str, momentum: float, dtype: Any = jnp.float32, name: str = "bn"):
        self.mode, self.momentum, self.dtype, self.name = mode, momentum, dtype, name

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        use_running = (not train) or self.mode == "frozen"
        return nn.BatchNorm(use_running_average=use_running, momentum=self.momentum, epsilon=1e-5,
                            dtype=self.dtype, name=self.name)(x)


def _conv(features: int, k: int, stride: int = 1, name: str | None = None, dtype=jnp.float32,
          impl: str = "xla"):
    return layers.conv(features, (k, k), impl, strides=(stride, stride),
                       padding=[(k // 2, k // 2)] * 2, use_bias=False, dtype=dtype,
                       kernel_init=nn.initializers.kaiming_normal(), name=name)


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(bn_size*growth)-BN-ReLU-conv3x3(growth); returns the ``growth`` new maps."""

    growth_rate: int
    bn_size: int
    bn_mode: str
    bn_momentum: float
    dtype: Any = jnp.float32
    impl: str = "xla"               # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(_BN(self.bn_mode, self.bn_momentum, self.dtype, name="norm1")(x, train))
        y = _conv(self.bn_size * self.growth_rate, 1, name="conv1", dtype=self.dtype,
                  impl=self.impl)(y)
        y = nn.relu(_BN(self.bn_mode, self.bn_momentum, self.dtype, name="norm2")(y, train))
        return _conv(self.growth_rate, 3, name="conv2", dtype=self.dtype, impl=self.impl)(y)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: int
    bn_mode: str
    bn_momentum: float
    dtype: Any = jnp.float32
    impl: str = "xla"               # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        feats = [x]
        for j in range(self.num_layers):
            new = DenseLayer(self.growth_rate, self.bn_size, self.bn_mode, self.bn_momentum,
                             self.dtype, self.impl, name=f"denselayer{j + 1}")(
                                 jnp.concatenate(feats, -1), train)
            feats.append(new)
        return jnp.concatenate(feats, -1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1(C/2)-avgpool2. Returns (BN-ReLU'd input, downsampled output)."""

    out_features: int
    bn_mode: str
    bn_momentum: float
    dtype: Any = jnp.float32
    impl: str = "xla"               # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        a = nn.relu(_BN(self.bn_mode, self.bn_momentum, self.dtype, name="norm")(x, train))
        y = _conv(self.out_features, 1, name="conv", dtype=self.dtype, impl=self.impl)(a)
        return a, nn.avg_pool(y, (2, 2), strides=(2, 2))


class DenseNetStem(nn.Module):
    """conv0 7x7/2, norm0, ReLU, maxpool 3x3/2, dense block 1, transition 1, dense block 2,
    transition 2. x: [N, H, W, 3] -> dict of

    * ``c2``: [N, H/4, W/4, C1] block-1 output after transition1's BN-ReLU (FPN lateral input),
    * ``c3``: [N, H/8, W/8, C2] block-2 output after transition2's BN-ReLU,
    * ``t2``: [N, H/16, W/16, C2/2] transition-2 output (input of block 3; fused across images).
    """

    growth_rate: int
    block_layers: tuple[int, int, int]
    num_init_features: int
    bn_size: int
    bn_mode: str
    bn_momentum: float
    dtype: Any = jnp.float32
    impl: str = "xla"               # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        bn = lambda name: _BN(self.bn_mode, self.bn_momentum, self.dtype, name=name)  # noqa: E731
        x = _conv(self.num_init_features, 7, 2, name="conv0", dtype=self.dtype,
                  impl=self.impl)(x.astype(self.dtype))
        x = nn.relu(bn("norm0")(x, train))
        x = layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), self.impl)
        c = self.num_init_features
        out = {}
        for k in (1, 2):
            x = self._block(k, x, train)
            c = c + self.block_layers[k - 1] * self.growth_rate
            a, x = Transition(c // 2, self.bn_mode, self.bn_momentum, self.dtype, self.impl,
                              name=f"transition{k}")(x, train)
            c = c // 2
            out["c2" if k == 1 else "c3"] = a
        out["t2"] = x
        return out

    def _block(self, k: int, x, train):
        return DenseBlock(self.block_layers[k - 1], self.growth_rate, self.bn_size, self.bn_mode,
                          self.bn_momentum, self.dtype, self.impl, name=f"denseblock{k}")(x, train)


class DenseNetBlock3(nn.Module):
    """Dense block 3 and transition3's BN-ReLU: [N, H/16, W/16, C] -> [N, H/16, W/16, C4]."""

    growth_rate: int
    num_layers: int
    bn_size: int
    bn_mode: str
    bn_momentum: float
    dtype: Any = jnp.float32
    impl: str = "xla"               # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = DenseBlock(self.num_layers, self.growth_rate, self.bn_size, self.bn_mode,
                       self.bn_momentum, self.dtype, self.impl, name="denseblock3")(x, train)
        # transition3.norm, i.e. the pre-activation of the (dropped) transition 3.
        return nn.relu(_TransitionNormOnly(self.bn_mode, self.bn_momentum, self.dtype,
                                           name="transition3")(x, train))


class _TransitionNormOnly(nn.Module):
    """The ``norm`` of a transition, without its conv (transition3 of the truncated DenseNet)."""

    bn_mode: str
    bn_momentum: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        return _BN(self.bn_mode, self.bn_momentum, self.dtype, name="norm")(x, train)


def densenet_channels(growth_rate: int, block_layers, num_init_features: int) -> dict[str, int]:
    """Channels of c2, c3, t2 and c4 (block-3 output) for a DenseNet configuration."""
    c1 = num_init_features + block_layers[0] * growth_rate
    t1 = c1 // 2
    c2 = t1 + block_layers[1] * growth_rate
    t2 = c2 // 2
    c3 = t2 + block_layers[2] * growth_rate
    return {"c2": c1, "c3": c2, "t2": t2, "c4": c3}

