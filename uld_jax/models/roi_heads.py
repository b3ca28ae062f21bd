"""ROI heads of MELD: box head with per-dataset box regression, organ classification heads, the organ
gate, the mask head and the embedding head; plus equation 1 (score fusion).

Dataset-indexed outputs carry a dataset axis D and organ heads an axis H (``core.ORGAN_HEADS``:
whole body, lung, liver, lymph node). Parameters of dataset-indexed layers have D as an explicit
axis (``[..., D, ...]``) so that a dataset's slice of each output layer is one index of one array.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uld_jax.models import layers


def _mlp(x: jax.Array, dims: Sequence[int], prefix: str, dtype) -> jax.Array:
    for i, f in enumerate(dims):
        x = nn.relu(nn.Dense(f, dtype=dtype, name=f"{prefix}fc{i + 1}")(x))
    return x


class BoxHead(nn.Module):
    """ROI features [..., 7, 7, C] -> (shared feature [..., F], per-dataset deltas [..., D, 4]).

    Box-regression deltas are in the ROI box-coder's units (weights 10, 10, 5, 5).
    """

    dims: Sequence[int]
    num_datasets: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_feats: jax.Array):
        x = roi_feats.reshape(*roi_feats.shape[:-3], -1)
        x = _mlp(x, self.dims, "", self.dtype)
        k = self.param("box_kernel", nn.initializers.normal(0.001), (self.num_datasets, x.shape[-1], 4))
        bias = self.param("box_bias", nn.initializers.zeros, (self.num_datasets, 4))
        deltas = jnp.einsum("...f,dfk->...dk", x, k.astype(self.dtype)) + bias
        return x, deltas.astype(jnp.float32)


class OrganClassifierHeads(nn.Module):
    """H classification heads, each FC-dims[0], FC-dims[1], FC-D, on flattened ROI features.

    roi_feats [..., 7, 7, C] -> logits [..., H, D] (sigmoid: lesion vs not, per dataset).
    Weights are stacked on a leading H axis (``w1 [H, In, F1]``, ``w2 [H, F1, F2]``, ``out [H, F2, D]``).
    """

    num_heads: int
    num_datasets: int
    dims: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_feats: jax.Array) -> jax.Array:
        x = roi_feats.reshape(*roi_feats.shape[:-3], -1).astype(self.dtype)
        h = self.num_heads
        fan_in = x.shape[-1]
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        y = None
        for i, f in enumerate(self.dims):
            w = self.param(f"fc{i + 1}_kernel", init, (h, fan_in, f)).astype(self.dtype)
            b = self.param(f"fc{i + 1}_bias", nn.initializers.zeros, (h, f))
            y = jnp.einsum("...i,hif->...hf", x, w) if i == 0 else jnp.einsum("...hi,hif->...hf", y, w)
            y = nn.relu(y + b)
            fan_in = f
        w = self.param("out_kernel", nn.initializers.normal(0.01), (h, fan_in, self.num_datasets))
        b = self.param("out_bias", nn.initializers.zeros, (h, self.num_datasets))
        return (jnp.einsum("...hi,hid->...hd", y, w.astype(self.dtype)) + b).astype(jnp.float32)


class OrganGate(nn.Module):
    """FC-dims[0], FC-dims[1], FC-(H-1) on flattened ROI features -> gate logits [..., H-1].

    ``organ_weights`` turns them into w = [1, sigmoid(logits)] (w0 = 1 for the whole-body head).
    """

    num_gated: int
    dims: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_feats: jax.Array) -> jax.Array:
        x = roi_feats.reshape(*roi_feats.shape[:-3], -1)
        x = _mlp(x, self.dims, "", self.dtype)
        return nn.Dense(self.num_gated, dtype=self.dtype, name="out")(x).astype(jnp.float32)


def organ_weights(gate_logits: jax.Array | None, num_heads: int, batch_shape) -> jax.Array:
    """Gate weights of all H heads [..., H]: ``w0 = 1`` and ``w_i = sigmoid(gate_i)``.

    ``gate_logits`` [..., H-1], or None (no gate: every head weighs 1).
    """
    if gate_logits is None:
        return jnp.ones((*batch_shape, num_heads), jnp.float32)
    one = jnp.ones((*gate_logits.shape[:-1], 1), jnp.float32)
    return jnp.concatenate([one, jax.nn.sigmoid(gate_logits)], axis=-1)


def fuse_scores(head_scores: jax.Array, weights: jax.Array) -> jax.Array:
    """Equation 1: ``s = sum_i w_i s_i / sum_i w_i``. head_scores, weights [..., H] -> [...].

    w0 = 1 keeps the denominator >= 1.
    """
    return jnp.sum(weights * head_scores, axis=-1) / jnp.sum(weights, axis=-1)


class MaskHead(nn.Module):
    """Mask R-CNN mask head: ROI features [N, 14, 14, C] -> class-agnostic mask logits [N, 28, 28]."""

    num_convs: int
    conv_dim: int
    dtype: Any = jnp.float32
    impl: str = "xla"                  # models/layers.py: 'xla' | 'cpu'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        for i in range(self.num_convs):
            x = nn.relu(layers.conv(self.conv_dim, (3, 3), self.impl, padding=[(1, 1), (1, 1)],
                                    dtype=self.dtype, kernel_init=nn.initializers.kaiming_normal(),
                                    name=f"conv{i + 1}")(x))
        x = nn.relu(nn.ConvTranspose(self.conv_dim, (2, 2), strides=(2, 2), dtype=self.dtype,
                                     kernel_init=nn.initializers.kaiming_normal(), name="deconv")(x))
        x = layers.conv(1, (1, 1), self.impl, dtype=self.dtype,
                        kernel_init=nn.initializers.normal(0.001), name="logits")(x)
        return x[..., 0].reshape(*lead, *x.shape[1:3]).astype(jnp.float32)


class EmbeddingHead(nn.Module):
    """Box-head feature [..., F] -> (L2-normalised embedding [..., E], type-probe logits [..., T]).

    The type probe (a linear classifier on the unit embedding, scaled by 1/temperature) lets the
    coarse lesion-type / organ labels shape the embedding (``losses.embedding_loss``).

    With ``num_proxies`` > 0 the head also owns ``proxies`` [num_proxies, E], one learnt unit
    vector per lesion identity (hashed into the table, ``losses.embedding_identity``); called with
    ``proxies=True`` it returns a third output, the cosine logits [..., num_proxies] of the
    embedding against every proxy divided by the temperature (a normalised-softmax identity
    classifier: the views of one lesion, on neighbouring slices and under augmentation, are pulled
    to one point, different lesions apart). Training only; inference never computes them.

    With ``location`` the head also reads where the ROI lies on the canvas, ``loc`` [..., 4] (see
    :func:`box_location`), through a linear map added to its first layer: within a patient's
    volume the same lesion sits at the same place on neighbouring slices, as LesaNet's body-part
    labels place a lesion in the body.
    """

    dim: int
    hidden: int
    num_types: int
    temperature: float
    dtype: Any = jnp.float32
    num_proxies: int = 0
    location: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, proxies: bool = False, loc: jax.Array | None = None):
        h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        if self.location:
            if loc is None:
                raise ValueError("EmbeddingHead(location=True) needs the ROIs' loc")
            h = h + nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name="loc")(
                loc.astype(h.dtype))
        x = nn.relu(h)
        e = nn.Dense(self.dim, dtype=self.dtype, name="fc2")(x).astype(jnp.float32)
        e = e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, -1, keepdims=True), 1e-12))
        probe = nn.Dense(self.num_types, use_bias=False, name="type_probe")(e) / self.temperature
        if self.num_proxies > 0:
            w = self.param("proxies", nn.initializers.normal(1.0), (self.num_proxies, self.dim),
                           jnp.float32)
            if proxies:
                w = w * jax.lax.rsqrt(jnp.maximum(jnp.sum(w * w, -1, keepdims=True), 1e-12))
                return e, probe, (e @ w.T) / self.temperature
        elif proxies:
            raise ValueError("EmbeddingHead(proxies=True) needs num_proxies > 0")
        return e, probe


def box_location(boxes: jax.Array, image_h: int, image_w: int) -> jax.Array:
    """[..., 4] boxes [y1, x1, y2, x2] (pixels of an image_h x image_w canvas) -> [..., 4] location
    features: the centre relative to the canvas centre and the log size, in canvas units
    (``(cy / H - 1/2, cx / W - 1/2, log(h / H), log(w / W))``, sizes floored at one pixel)."""
    boxes = boxes.astype(jnp.float32)
    hw = jnp.asarray([image_h, image_w], jnp.float32)
    c = 0.5 * (boxes[..., :2] + boxes[..., 2:]) / hw - 0.5
    size = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 1.0) / hw
    return jnp.concatenate([c, jnp.log(size)], axis=-1)
