"""2.5D DenseNet-FPN with 3D context fusion (MULAN / 3DCE).

The 9 input slices form 3 three-channel images (slices 0-2, 3-5, 6-8; the central image is the
middle one). The images share the backbone: they are folded into the batch (``[B, H, W, 9] ->
[3B, H, W, 3]``, image k of sample b at row ``3b + k``). Context fusion concatenates the three
images' feature maps on channels and maps them with a 1x1 convolution onto the central image's
features, twice:

1. after transition 2 (stride 16): block 3 then runs once per sample, not per image;
2. after the FPN at stride 4: the top-down path adds the (already fused) stride-16 features, upsampled,
   to each image's stride-8 and stride-4 laterals; the three stride-4 maps are fused again.

The fusion kernels are initialised to pass the central image through unchanged (identity on its
channels, zero on the others), so an ImageNet-initialised backbone starts as the 2D network of the
central image. ``context_fusion=False`` runs the central image only (the 2D ablation).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uld_jax.core import decode_image
from uld_jax.models import densenet, layers


def _central_identity_init(num_images: int, channels: int):
    """Kernel init [1, 1, num_images * channels, channels]: identity on the central image's block."""

    def init(key, shape, dtype=jnp.float32):
        del key
        assert shape == (1, 1, num_images * channels, channels), shape
        k = jnp.zeros(shape, dtype)
        c0 = (num_images // 2) * channels
        return k.at[0, 0, c0:c0 + channels, :].set(jnp.eye(channels, dtype=dtype))

    return init


class ContextFusion(nn.Module):
    """[num_images * B, h, w, C] (image-minor rows) -> [B, h, w, C] by a 1x1 conv over the concat."""

    num_images: int = 3
    dtype: Any = jnp.float32
    impl: str = "xla"                  # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        b = n // self.num_images
        x = x.reshape(b, self.num_images, h, w, c).transpose(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return layers.conv(c, (1, 1), self.impl, use_bias=True, dtype=self.dtype,
                           kernel_init=_central_identity_init(self.num_images, c), name="conv")(x)


def _up2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling of [N, h, w, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class DenseNetFPN(nn.Module):
    """image [B, H, W, S] (S = 9 slices, H and W multiples of 16) -> stride-4 features
    [B, H/4, W/4, fpn_dim]."""

    cfg: Any  # the model ConfigDict
    dtype: Any = jnp.float32
    impl: str = "xla"                  # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, image: jax.Array, train: bool) -> jax.Array:
        cfg, bc = self.cfg, self.cfg.backbone
        b, h, w, s = image.shape
        if h % 16 or w % 16:
            raise ValueError(f"image side must be a multiple of 16, got {h}x{w}")
        if s % 3:
            raise ValueError(f"number of slices must be a multiple of 3, got {s}")
        n_img = s // 3
        image = decode_image(image) * cfg.input_scale     # the pipeline's int16, or a float image
        if cfg.context_fusion:
            # [B, H, W, n_img, 3] -> [B, n_img, H, W, 3] -> [B * n_img, H, W, 3]
            x = image.reshape(b, h, w, n_img, 3).transpose(0, 3, 1, 2, 4).reshape(b * n_img, h, w, 3)
        else:
            c0 = (n_img // 2) * 3
            x, n_img = image[..., c0:c0 + 3], 1
        stem = densenet.DenseNetStem(bc.growth_rate, tuple(bc.block_layers), bc.num_init_features,
                                     bc.bn_size, bc.bn_mode, bc.bn_momentum, self.dtype,
                                     self.impl, name="backbone")
        f = stem(x, train)
        t2 = f["t2"]
        if n_img > 1:
            t2 = ContextFusion(n_img, self.dtype, self.impl, name="fuse_t2")(t2)
        c4 = densenet.DenseNetBlock3(bc.growth_rate, bc.block_layers[2], bc.bn_size, bc.bn_mode,
                                     bc.bn_momentum, self.dtype, self.impl,
                                     name="backbone_block3")(t2, train)
        d = cfg.fpn_dim
        def lat(name):
            return layers.conv(d, (1, 1), self.impl, dtype=self.dtype, name=name)
        p4 = lat("lateral4")(c4)                                    # [B, H/16, W/16, d]
        p4 = jnp.repeat(p4, n_img, axis=0)                          # to every image
        p3 = lat("lateral3")(f["c3"]) + _up2(p4)                    # [nB, H/8, W/8, d]
        p2 = lat("lateral2")(f["c2"]) + _up2(p3)                    # [nB, H/4, W/4, d]
        if n_img > 1:
            p2 = ContextFusion(n_img, self.dtype, self.impl, name="fuse_fpn")(p2)
        return layers.conv(d, (3, 3), self.impl, padding=[(1, 1), (1, 1)], dtype=self.dtype,
                           name="output")(p2)
