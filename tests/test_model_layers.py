"""models/layers.py: the 'cpu' formulations against XLA's ops and plain-numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import meld as meld_config
from uld_jax.core import Keys
from uld_jax.models import layers
from uld_jax.models.fake_batch import synthetic_batch
from uld_jax.models.fpn import DenseNetFPN
from uld_jax.models.rpn import DatasetRPN


def _np_conv_same(x, k):
    """'SAME' stride-1 convolution, a loop over the kernel taps: x [h, w, C], k [kh, kw, C, R]."""
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = x.shape[:2]
    out = np.zeros((h, w, k.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += xp[i:i + h, j:j + w] @ k[i, j]
    return out


def _np_max_pool(x, window, strides, padding):
    """Max pooling of x [N, H, W, C] and the gradient of sum(g * pool(x)): each window's gradient
    to its row-major first maximum (loops)."""
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, strides, padding
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-np.inf)
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    arg = np.zeros(y.shape + (2,), int)
    for a in range(ho):
        for b in range(wo):
            win = xp[:, a * sh:a * sh + kh, b * sw:b * sw + kw]          # [N, kh, kw, C]
            flat = win.transpose(0, 3, 1, 2).reshape(x.shape[0], x.shape[3], -1)
            first = flat.argmax(-1)                                       # row-major first max
            y[:, a, b] = flat.max(-1)
            arg[:, a, b, :, 0] = a * sh + first // kw - pt
            arg[:, a, b, :, 1] = b * sw + first % kw - pl
    return y, arg


def test_resolve_impl():
    assert layers.resolve_impl("xla") == "xla"
    assert layers.resolve_impl("cpu") == "cpu"
    assert layers.resolve_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="model.layer_impl.*'gpu'"):
        layers.resolve_impl("gpu")


@pytest.mark.parametrize("kernel,padding,strides", [
    ((1, 1), "SAME", (1, 1)), ((1, 1), [(0, 0), (0, 0)], (1, 1)),   # matrix product
    ((3, 3), [(1, 1), (1, 1)], (1, 1)), ((1, 1), "SAME", (2, 2)),   # XLA's convolution
])
def test_cpu_conv_equals_xla_conv_values_and_gradients(kernel, padding, strides):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 10, 12, 5)), jnp.float32)
    mods = {impl: layers.conv(7, kernel, impl, strides=strides, padding=padding)
            for impl in ("xla", "cpu")}
    v = mods["xla"].init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, mods["cpu"].init(jax.random.key(0), x)) == \
        jax.tree.map(jnp.shape, v)                                     # the same parameters
    g = jnp.asarray(rng.normal(size=mods["xla"].apply(v, x).shape), jnp.float32)

    def loss(impl):
        return lambda v, x: jnp.sum(mods[impl].apply(v, x) * g)
    out = {impl: mods[impl].apply(v, x) for impl in mods}
    grads = {impl: jax.grad(loss(impl), argnums=(0, 1))(v, x) for impl in mods}
    np.testing.assert_allclose(out["cpu"], out["xla"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads["cpu"]), jax.tree.leaves(grads["xla"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # The 1x1 stride-1 convolution is a matrix product: no convolution left in the program.
    jaxpr = str(jax.make_jaxpr(jax.grad(loss("cpu")))(v, x))
    assert ("conv_general_dilated" in jaxpr) == (kernel != (1, 1) or strides != (1, 1))


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 9, 11, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),   # the stem's pool, odd sides
    ((1, 8, 8, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((1, 7, 6, 2), (3, 2), (1, 2), ((1, 0), (0, 1))),
])
def test_max_pool_gradient_goes_to_the_first_maximum_as_xla(shape, window, strides, padding):
    rng = np.random.default_rng(1)
    # Rounded ReLU outputs: many ties (zeros and repeated integers) inside the windows.
    x = np.maximum(np.round(rng.normal(size=shape) * 2), 0).astype(np.float32)
    y_ref, arg = _np_max_pool(x.astype(np.float64), window, strides, padding)
    g = rng.normal(size=y_ref.shape).astype(np.float32)
    dx_ref = np.zeros(shape)
    n, ho, wo, c = y_ref.shape
    for b in range(n):
        for a in range(ho):
            for w in range(wo):
                for ch in range(c):
                    i, j = arg[b, a, w, ch]
                    dx_ref[b, i, j, ch] += g[b, a, w, ch]
    for impl in ("xla", "cpu"):
        f = lambda v: layers.max_pool(v, window, strides, padding, impl)  # noqa: E731
        y, vjp = jax.vjp(f, jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(y), y_ref)
        np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), dx_ref, rtol=1e-6,
                                   atol=1e-6, err_msg=impl)


def test_per_sample_conv_against_numpy_and_xla():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 6, 7, 4)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 4, 5)).astype(np.float32)
    ref = np.stack([_np_conv_same(x[b].astype(np.float64), k[b].astype(np.float64))
                    for b in range(3)])
    g = rng.normal(size=ref.shape).astype(np.float32)
    grads = {}
    for impl in ("xla", "cpu"):
        y = layers.per_sample_conv3x3(jnp.asarray(x), jnp.asarray(k), impl)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4, err_msg=impl)
        grads[impl] = jax.grad(lambda x, k: jnp.sum(layers.per_sample_conv3x3(x, k, impl) * g),
                               argnums=(0, 1))(jnp.asarray(x), jnp.asarray(k))
    for a, b in zip(grads["cpu"], grads["xla"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_backbone_and_rpn_gradients_agree_across_layer_impls():
    """The backbone (batch-statistics BatchNorm before the max pool, as in training) and the
    per-sample RPN: the same parameters give the same outputs and gradients with either
    formulation, jitted (float32, up to summation order). This is where XLA's fusion can change
    the rounding of a recomputed BatchNorm between the forward and the backward."""
    cfg = meld_config.get_config("tiny").model
    image = jnp.asarray(synthetic_batch(2, 64, max_boxes=2, num_datasets=4,
                                        lesion_sizes=(8, 20))[Keys.IMAGE])
    dataset_id = jnp.asarray([1, 3])
    results = {}
    for impl in ("xla", "cpu"):
        backbone = DenseNetFPN(cfg, jnp.float32, impl)
        rpn = DatasetRPN(cfg.num_datasets, 15, cfg.rpn.conv_dim, jnp.float32, impl)
        if not results:
            # rbg keys: XLA compiles the backbone's many threefry draws ~10x slower on CPU.
            v_bb = backbone.init(jax.random.key(0, impl="rbg"), image, train=False)
            v_rpn = rpn.init(jax.random.key(1, impl="rbg"),
                             backbone.apply(v_bb, image, train=False), dataset_id)

        def f(p_bb, p_rpn):
            feat, _ = backbone.apply({**v_bb, "params": p_bb}, image, train=True,
                                     mutable=["batch_stats"])
            logits, deltas = rpn.apply({"params": p_rpn}, feat, dataset_id)
            return jnp.sum(jnp.tanh(logits)) + jnp.sum(deltas ** 2) + jnp.sum(feat ** 2)
        results[impl] = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(v_bb["params"],
                                                                     v_rpn["params"])
    (lx, gx), (lc, gc) = results["xla"], results["cpu"]
    np.testing.assert_allclose(float(lc), float(lx), rtol=1e-5)
    flat_x, flat_c = jax.tree.leaves(gx), jax.tree.leaves(gc)
    assert len(flat_x) == len(flat_c) > 20
    # Per parameter, relative to its largest gradient; a parameter whose gradient is ~0 (a bias
    # in front of a batch-statistics BatchNorm) against the largest gradient of the model.
    top = max(float(jnp.max(jnp.abs(b))) for b in flat_x)
    for a, b in zip(flat_c, flat_x):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-3 * top)
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=2e-4)
