"""Region proposal networks, one per dataset, on the shared stride-4 features.

Every parameter has a leading dataset axis ``D`` (parameter row d is dataset d's RPN). At inference
all D RPNs are computed (one wide 3x3 convolution, then per-dataset 1x1 outputs as an einsum); in
training each sample runs its own dataset's RPN only, so a sample of dataset d back-propagates into
row d only.

Output layout matches the anchors of ``anchor_grid`` (row-major cells, then the A shapes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uld_jax.models import layers


class DatasetRPN(nn.Module):
    """features [B, h, w, C] -> (objectness logits, deltas).

    * ``dataset_id=None`` (inference): every dataset's RPN, ``[B, D, h*w*A]`` and
      ``[B, D, h*w*A, 4]``.
    * ``dataset_id`` [B] (training): only each sample's own RPN, ``[B, h*w*A]`` and
      ``[B, h*w*A, 4]``. Its parameters are gathered per sample (row ``dataset_id[b]``), which gives
      exactly the values and gradients of computing all D and selecting, at 1/D of the RPN's cost
      (the 3x3 convolutions of all D RPNs are a third of the paper config's training FLOPs).
    """

    num_datasets: int
    num_anchors: int
    conv_dim: int
    dtype: Any = jnp.float32
    impl: str = "xla"                  # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, x: jax.Array, dataset_id: jax.Array | None = None):
        b, h, w, c = x.shape
        d, a, r = self.num_datasets, self.num_anchors, self.conv_dim
        conv_k = self.param("conv_kernel", nn.initializers.normal(0.01), (d, 3, 3, c, r))
        conv_b = self.param("conv_bias", nn.initializers.zeros, (d, r))
        cls_k = self.param("cls_kernel", nn.initializers.normal(0.01), (d, r, a))
        cls_b = self.param("cls_bias", nn.initializers.zeros, (d, a))
        box_k = self.param("box_kernel", nn.initializers.normal(0.01), (d, r, a * 4))
        box_b = self.param("box_bias", nn.initializers.zeros, (d, a * 4))
        x = x.astype(self.dtype)
        if dataset_id is None:
            k = conv_k.transpose(1, 2, 3, 0, 4).reshape(3, 3, c, d * r).astype(self.dtype)
            y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = nn.relu(y.reshape(b, h, w, d, r) + conv_b.astype(self.dtype))
            logits = jnp.einsum("bhwdr,dra->bdhwa", y, cls_k.astype(self.dtype)) + \
                cls_b[None, :, None, None]
            deltas = jnp.einsum("bhwdr,dra->bdhwa", y, box_k.astype(self.dtype)) + \
                box_b[None, :, None, None]
            return (logits.reshape(b, d, h * w * a).astype(jnp.float32),
                    deltas.reshape(b, d, h * w * a, 4).astype(jnp.float32))
        # Each sample's own RPN kernel ([B, 3, 3, C, R]): one grouped convolution or 9 per-sample
        # matrix products (models/layers.py).
        y = layers.per_sample_conv3x3(x, conv_k[dataset_id].astype(self.dtype), self.impl)
        y = nn.relu(y + conv_b[dataset_id][:, None, None, :].astype(self.dtype))
        logits = jnp.einsum("bhwr,bra->bhwa", y, cls_k[dataset_id].astype(self.dtype)) + \
            cls_b[dataset_id][:, None, None, :]
        deltas = jnp.einsum("bhwr,bra->bhwa", y, box_k[dataset_id].astype(self.dtype)) + \
            box_b[dataset_id][:, None, None, :]
        return (logits.reshape(b, h * w * a).astype(jnp.float32),
                deltas.reshape(b, h * w * a, 4).astype(jnp.float32))
