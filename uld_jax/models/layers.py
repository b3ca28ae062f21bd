"""Convolution and pooling in two formulations with the same parameters and the same results.

``model.layer_impl`` picks one (:func:`resolve_impl`):

* ``'xla'``: XLA's own convolution, grouped convolution and ``reduce_window`` max pooling, what
  accelerators run (cuDNN and the TPU compiler handle all three well).
* ``'cpu'``: the same functions written as what XLA:CPU is fast at. On XLA:CPU the filter gradient
  of a 1x1 convolution, the gradient of a max pool (``select_and_scatter``) and the per-sample
  RPN's grouped convolution take several times their matrix-product equivalents; at the quick
  recipe's scale they were half of a training step (``benchmarks/bench_ops.py``, "layer
  formulations"; ``benchmarks/bench_model.py --layer-impls xla,cpu``). Here:

  - a 1x1, stride-1, unpadded convolution is a matrix product over the channels, so its gradients
    are matrix products too;
  - max pooling keeps XLA's forward; its gradient is built from the window's strided slices and
    interior pads, one axis at a time (W, then H). It goes, as XLA's does, to the row-major first
    maximum of each window, so the two agree exactly, ties included;
  - the per-sample 3x3 convolution (each sample its dataset's RPN kernel) is a sum over the 9
    shifts of per-sample matrix products instead of one grouped convolution.

  Other convolutions are XLA's in both. Only the summation order differs from ``'xla'``
  (``tests/test_model_layers.py``).
* ``'auto'`` (the default): ``'cpu'`` when JAX's default backend is the CPU, else ``'xla'``.

Both create their parameters with ``nn.Conv`` / the same shapes, so checkpoints and the ImageNet
mapping are shared.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "cpu")
_NHWC = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str) -> str:
    """``'auto'``: ``'cpu'`` on the CPU backend, ``'xla'`` elsewhere; ``'xla'``/``'cpu'`` as is."""
    if impl not in IMPLS:
        raise ValueError(f"model.layer_impl: unknown value {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def _ones(x) -> bool:
    return x is None or all(int(v) == 1 for v in x)


def cpu_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             precision=None, **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (``nn.Conv(conv_general_dilated=...)``): an NHWC /
    HWIO 1x1 convolution with stride 1, no padding, dilation or groups is a matrix product over
    the channels; any other goes to ``lax.conv_general_dilated`` unchanged."""
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    plain = (lhs.ndim == 4 and tuple(dn.lhs_spec) == (0, 3, 1, 2)
             and tuple(dn.rhs_spec) == (3, 2, 0, 1) and tuple(dn.out_spec) == (0, 3, 1, 2)
             and _ones(lhs_dilation) and _ones(rhs_dilation) and feature_group_count == 1
             and not kwargs.get("preferred_element_type"))
    if plain:
        strides = tuple(int(v) for v in window_strides)
        pads = padding
        if isinstance(padding, str):
            pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
        pads = tuple((int(lo), int(hi)) for lo, hi in pads)
        if rhs.shape[:2] == (1, 1) and strides == (1, 1) and pads == ((0, 0), (0, 0)):
            return lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    **kwargs)


def conv(features: int, kernel_size: tuple[int, int], impl: str, **kwargs) -> nn.Conv:
    """``nn.Conv(features, kernel_size, **kwargs)`` in the formulation ``impl`` ('xla' | 'cpu')."""
    if impl == "cpu":
        kwargs["conv_general_dilated"] = cpu_conv_general_dilated
    return nn.Conv(features, kernel_size, **kwargs)


def _axis_slices(xp: jax.Array, axis: int, k: int, s: int, n_out: int):
    """Yields (i, xp[..., i::s, ...] along ``axis``, n_out long) for the offsets i < k."""
    for i in range(k):
        start, stop, step = [0] * xp.ndim, list(xp.shape), [1] * xp.ndim
        start[axis], stop[axis], step[axis] = i, i + s * (n_out - 1) + 1, s
        yield i, lax.slice(xp, start, stop, step)


def _reduce_max(x, axis, k, s, pad):
    window, strides, pads = [1] * x.ndim, [1] * x.ndim, [(0, 0)] * x.ndim
    window[axis], strides[axis], pads[axis] = k, s, pad
    return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)


def axis_max_pool(x: jax.Array, axis: int, k: int, s: int, pad: tuple[int, int]) -> jax.Array:
    """1D max pooling of ``x`` along ``axis`` (window k, stride s, -inf padding ``pad``), with
    XLA's forward. Its gradient goes, as XLA's does, to the first maximum of each window, but is
    built from strided slices and interior pads instead of ``select_and_scatter``."""
    return _axis_max_pool(x, axis, k, s, pad, x.shape[axis])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _axis_max_pool(x, axis, k, s, pad, length):
    del length  # the backward's: the input's size along ``axis``
    return _reduce_max(x, axis, k, s, pad)


def _axis_max_pool_fwd(x, axis, k, s, pad, length):
    pads = [(0, 0)] * x.ndim
    pads[axis] = pad
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    n_out = (xp.shape[axis] - k) // s + 1
    # Each window's first maximum, as an offset in 0..k-1, found by one argmax over the window's
    # slices. Not by comparing with the pooled values in the backward: XLA may recompute ``x``'s
    # producer (a BatchNorm) in each fusion with different rounding, and equality would then fail.
    first = jnp.argmax(jnp.stack([sl for _, sl in _axis_slices(xp, axis, k, s, n_out)]), axis=0)
    return _reduce_max(x, axis, k, s, pad), first.astype(jnp.int8)


def _axis_max_pool_bwd(axis, k, s, pad, length, first, g):
    padded = length + pad[0] + pad[1]
    n_out = g.shape[axis]
    zero = jnp.zeros((), g.dtype)
    dxp = None
    for i in range(k):
        # The transpose of the strided slice at offset i: back to i, with s - 1 zeros between.
        config = [(0, 0, 0)] * g.ndim
        config[axis] = (i, padded - i - s * (n_out - 1) - 1, s - 1)
        term = lax.pad(jnp.where(first == i, g, zero), zero, config)
        dxp = term if dxp is None else dxp + term
    return (lax.slice_in_dim(dxp, pad[0], pad[0] + length, axis=axis),)


_axis_max_pool.defvjp(_axis_max_pool_fwd, _axis_max_pool_bwd)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]], impl: str) -> jax.Array:
    """2D max pooling of NHWC ``x`` (padding with -inf, as ``nn.max_pool``)."""
    if impl != "cpu":
        return nn.max_pool(x, window, strides=strides, padding=padding)
    # Along W, then along H: the gradient then reaches the row-major first maximum of each 2D
    # window (the first row holding the maximum, and its first column), as XLA's.
    x = axis_max_pool(x, 2, int(window[1]), int(strides[1]), tuple(padding[1]))
    return axis_max_pool(x, 1, int(window[0]), int(strides[0]), tuple(padding[0]))


def per_sample_conv3x3(x: jax.Array, kernels: jax.Array, impl: str) -> jax.Array:
    """'SAME' 3x3 convolution of each sample with its own kernel: x [B, h, w, C],
    kernels [B, 3, 3, C, R] -> [B, h, w, R]."""
    b, h, w, c = x.shape
    r = kernels.shape[-1]
    if impl != "cpu":
        # One grouped convolution: sample b's image is feature group b.
        k = kernels.transpose(1, 2, 3, 0, 4).reshape(3, 3, c, b * r)
        xg = x.transpose(1, 2, 0, 3).reshape(1, h, w, b * c)
        y = lax.conv_general_dilated(xg, k, (1, 1), "SAME", dimension_numbers=_NHWC,
                                     feature_group_count=b)
        return y.reshape(h, w, b, r).transpose(2, 0, 1, 3)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    terms = (jnp.einsum("bhwc,bcr->bhwr", xij, kernels[:, i, j])
             for i, xi in _axis_slices(xp, 1, 3, 1, h) for j, xij in _axis_slices(xi, 2, 3, 1, w))
    return functools.reduce(jnp.add, terms)
