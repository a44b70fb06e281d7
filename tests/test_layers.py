"""The building blocks against plain numpy, and their serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bit_keras.models.layers import (
    GN_EPSILON,
    WS_EPSILON,
    GroupNorm,
    PreActBottleneck,
    StandardizedConv2D,
    portable_ops,
)
from tests.reference_bit import conv2d, group_norm, standardize


def test_standardized_conv_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 6)).astype(np.float32)
    layer = StandardizedConv2D(8, 3, strides=2, use_bias=False)
    layer.build(x.shape)
    kernel = (0.05 * rng.standard_normal((3, 3, 6, 8)) + 0.3).astype(np.float32)  # offset: centering matters
    layer.kernel.assign(kernel)
    expected = conv2d(x.astype(np.float64), standardize(kernel, WS_EPSILON), 2)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    assert layer.epsilon == 1e-10


@pytest.mark.parametrize("offset", [0.0, 0.3, 3.0])
def test_fused_and_portable_standardization_agree(offset):
    """The CPU's FusedBatchNorm path, the portable path and the XLA-compiled fused path: same kernels and
    kernel gradients as float64, for kernels with an offset too (XLA lowers batch norm with a one-pass variance)."""
    rng = np.random.default_rng(3)
    layer = StandardizedConv2D(16, 3)
    kernel = tf.constant((0.05 * rng.standard_normal((3, 3, 8, 16)) + offset).astype(np.float32))
    upstream = tf.constant(rng.standard_normal(kernel.shape).astype(np.float32))
    expected = standardize(kernel.numpy(), WS_EPSILON)
    mean, std = (
        expected.mean(axis=(0, 1, 2)),
        np.sqrt(kernel.numpy().astype(np.float64).var(axis=(0, 1, 2)) + WS_EPSILON),
    )
    g = upstream.numpy().astype(np.float64)  # d/dk of sum(g * standardize(k)), closed form
    expected_grad = (g - g.mean(axis=(0, 1, 2)) - expected * (g * expected).mean(axis=(0, 1, 2))) / std
    assert np.abs(mean).max() < 1e-12

    def value_and_grad():
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            standardized = layer.standardize(kernel)
        return standardized, tape.gradient(standardized, kernel, output_gradients=upstream)

    def graph_ops(fn):
        return {op.type for op in tf.function(fn).get_concrete_function().graph.get_operations()}

    assert "FusedBatchNormV3" in graph_ops(lambda: layer.standardize(kernel))  # this CPU-only host: fused
    with portable_ops():
        assert "FusedBatchNormV3" not in graph_ops(lambda: layer.standardize(kernel))
        portable = value_and_grad()
    for value, grad in (value_and_grad(), portable, tf.function(value_and_grad, jit_compile=True)()):
        np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=2e-6 * (1 + 10 * offset))
        np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=0, atol=2e-5 * np.abs(expected_grad).max())


def test_standardized_conv_epsilon_is_a_constructor_argument():
    layer = StandardizedConv2D(4, 1, epsilon=1e-8, name="c")
    clone = StandardizedConv2D.from_config(layer.get_config())
    assert clone.epsilon == 1e-8 and clone.filters == 4 and clone.name == "c"


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_group_norm_matches_numpy(offset):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 7, 64)) + offset).astype(np.float32)
    layer = GroupNorm()
    layer.build(x.shape)
    gamma, beta = rng.uniform(0.2, 1, 64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    expected = group_norm(x.astype(np.float64), gamma, beta, 32, GN_EPSILON)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=0, atol=2e-5)


def test_keras_group_normalization_default_epsilon_is_not_bits():
    """Why GN epsilon is pinned: Keras' default (1e-3) measurably differs from BiT's 1e-5."""
    x = np.random.default_rng(2).standard_normal((1, 4, 4, 64)).astype(np.float32) * 0.05
    ours = GroupNorm()(x)
    keras_default = keras.layers.GroupNormalization(groups=32)(x)
    assert keras.layers.GroupNormalization(groups=32).epsilon == 1e-3
    assert np.abs(np.asarray(ours) - np.asarray(keras_default)).max() > 1e-2


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        GroupNorm()(np.zeros((1, 2, 2, 48), np.float32))


def test_standardization_mixed_precision_reads_the_float32_kernel():
    """Under a mixed policy the kernel is standardized from its float32 values, not from Keras' 16-bit autocast
    copy: a kernel with a large offset loses its deviations when rounded to bfloat16 first."""
    rng = np.random.default_rng(5)
    kernel = (1e-3 * rng.standard_normal((3, 3, 4, 8)) + 1.0).astype(np.float32)  # bfloat16: 1 + 1e-3 -> 1
    x = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)
    layer = StandardizedConv2D(8, 3, use_bias=False, dtype="mixed_bfloat16")
    layer.build(x.shape)
    layer.kernel.assign(kernel)
    expected = conv2d(
        np.asarray(tf.cast(x, tf.bfloat16), np.float64),
        np.asarray(tf.cast(standardize(kernel, WS_EPSILON), tf.bfloat16), np.float64),
        1,
    )
    out = np.asarray(layer(x), np.float64)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-2 * np.abs(expected).max())  # bfloat16 output


def test_group_norm_mixed_precision_keeps_float32_statistics():
    x = (np.random.default_rng(3).standard_normal((1, 8, 8, 64)) * 300 + 1000).astype(np.float32)
    out = GroupNorm(dtype="mixed_bfloat16")(x)
    assert out.dtype == "bfloat16"
    reference = np.asarray(GroupNorm()(x))
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=3e-2)


@pytest.mark.parametrize(
    "cin,filters,strides,has_proj",
    [(64, 32, 1, True), (128, 32, 2, True), (64, 64, 1, True), (128, 32, 1, False)],
)
def test_bottleneck_projection_only_when_shape_changes(cin, filters, strides, has_proj):
    unit = PreActBottleneck(filters, strides=strides)
    out = unit(np.zeros((1, 8, 8, cin), np.float32))
    assert (unit.proj is not None) == has_proj
    assert tuple(out.shape) == (1, 8 // strides, 8 // strides, 4 * filters)
    assert unit.compute_output_shape((1, 8, 8, cin)) == (1, 8 // strides, 8 // strides, 4 * filters)


def test_bottleneck_matches_numpy_unit():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 8, 64)).astype(np.float32)
    unit = PreActBottleneck(32, strides=2)
    unit.build(x.shape)
    for weight in unit.weights:
        weight.assign(
            rng.uniform(0.2, 1.0, weight.shape).astype(np.float32)
            if "gamma" in weight.path
            else 0.05 * rng.standard_normal(weight.shape).astype(np.float32)
        )
    w = {v.path.split("/", 1)[1]: np.asarray(v, np.float64) for v in unit.weights}
    xd = x.astype(np.float64)

    def gn_relu(t, name):
        return np.maximum(group_norm(t, w[f"{name}/gamma"], w[f"{name}/beta"], 32, GN_EPSILON), 0)

    def conv(t, name, stride=1, pad=0):
        t = np.pad(t, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        return conv2d(t, standardize(w[f"{name}/kernel"], WS_EPSILON), stride)

    p = gn_relu(xd, "norm_a")
    shortcut = conv(p, "proj", 2)  # projection from p, with the stride
    y = conv(gn_relu(conv(p, "conv_a"), "norm_b"), "conv_b", 2, pad=1)
    expected = conv(gn_relu(y, "norm_c"), "conv_c") + shortcut
    out = np.asarray(unit(x))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("normalization", ["group", "batch"])
def test_bottleneck_config_round_trip(normalization):
    unit = PreActBottleneck(32, strides=2, normalization=normalization, weight_standardization=False, name="u")
    config = unit.get_config()
    clone = PreActBottleneck.from_config(config)
    assert clone.get_config() == config
    assert config["filters"] == 32 and config["strides"] == 2 and config["normalization"] == normalization
