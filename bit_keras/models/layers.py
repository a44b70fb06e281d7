"""BiT building blocks: weight-standardized convolution, normalization and the pre-activation bottleneck.

Written with `keras.ops` for every backend; fast paths compute the same formulas: on TensorFlow an XLA-compiled
group norm and weight standardization as FusedBatchNormV3 (TensorFlow imported only there), on JAX a group norm
with a hand-written gradient.
"""

import contextlib
import contextvars
import functools

import keras
from keras import layers, ops

from bit_keras.defaults import NORMALIZATIONS

GN_GROUPS = 32  # BiT: 32 groups everywhere
GN_EPSILON = 1e-5  # official BiT; Keras' GroupNormalization defaults to 1e-3 (moves logits by ~2e-4)
WS_EPSILON = 1e-10  # official big_transfer code; timm uses 1e-8, big_vision's non-paper bit.py 1e-5
BN_EPSILON = 1e-5  # only for the paper's BatchNorm ablation
BN_MOMENTUM = 0.9

_PORTABLE = contextvars.ContextVar("bit_keras_portable_ops", default=False)
DATA_FORMATS = ("channels_last", "channels_first")


def standardize_data_format(data_format=None) -> str:
    """`data_format`, or Keras' image data format when None; a one-line error for anything else."""
    data_format = keras.config.image_data_format() if data_format is None else str(data_format).lower()
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    return data_format


@contextlib.contextmanager
def portable_ops():
    """Trace BiT layers with plain ops that are exact on every device and that every consumer runs (no fused
    weight standardization, no XLA-compiled group norm, on JAX no hand-written group norm gradient): for graphs
    saved to run elsewhere (`bit_keras.export` and `BiT.export` use it; a plain `tf.saved_model.save` of a BiT
    model should too), and to measure what the fast paths gain. It applies where a function is traced: JAX
    reuses a jitted function's trace whatever the context."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def _tensorflow_fast_paths():
    """Whether the TensorFlow fast paths apply: Keras on TensorFlow, outside `portable_ops`."""
    return keras.backend.backend() == "tensorflow" and not _PORTABLE.get()


def _fused_standardization():
    """Whether weight standardization may use FusedBatchNorm: TensorFlow on CPU-only hosts, outside `portable_ops`.
    (cuDNN's batch norm refuses or clamps epsilons below 1e-5; BiT's is 1e-10.)"""
    if not _tensorflow_fast_paths():
        return False
    import tensorflow as tf

    return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def _moments(x, axes):
    """Mean and biased variance over `axes` (kept), two-pass: mean((x - mean)^2), exact for large-mean inputs where
    E[x^2] - E[x]^2 cancels (the ops of `tf.nn.moments`)."""
    if keras.backend.backend() == "tensorflow":  # tf.nn.moments itself: keras.ops' twin drifts in micro-batch loops
        import tensorflow as tf

        return tf.nn.moments(x, axes=axes, keepdims=True)
    mean = ops.mean(x, axis=axes, keepdims=True)
    return mean, ops.mean(ops.square(x - ops.stop_gradient(mean)), axis=axes, keepdims=True)


@keras.saving.register_keras_serializable(package="bit_keras")
class StandardizedConv2D(layers.Conv2D):
    """`Conv2D` whose kernel is standardized per output channel before every convolution.

    Statistics run over height, width and input channels with the biased variance:
    `(w - mean) / sqrt(var + epsilon)`, exactly as the official BiT code.
    """

    def __init__(self, filters, kernel_size, epsilon=WS_EPSILON, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self.epsilon = epsilon

    def add_weight(self, *args, **kwargs):
        # The kernel reaches `standardize` in float32 under mixed policies: Keras' 16-bit autocast copy would
        # round away the deviations of a kernel with a large mean (1 + 1e-3 is 1 in bfloat16) before the statistics.
        if kwargs.get("name") == "kernel":
            kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    def standardize(self, kernel):
        """`kernel` standardized per output channel, in float32 (float64 under a float64 policy)."""
        # float32 statistics even under 16-bit policies: var + 1e-10 is meaningless in 16-bit floats.
        kernel = ops.cast(kernel, statistics_dtype(self.compute_dtype))
        if kernel.dtype == "float32" and _fused_standardization():
            return _fused_standardize(kernel, self.epsilon)
        mean, variance = _moments(kernel, (0, 1, 2))
        return (kernel - mean) * ops.rsqrt(variance + self.epsilon)

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, ops.cast(self.standardize(kernel), self.compute_dtype))

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _fused_standardize(kernel, epsilon):
    """`StandardizedConv2D.standardize`'s formula as one training-mode FusedBatchNormV3 of a (1, h*w, in, out) view
    each way (TensorFlow's CPU kernel: two-pass, biased variance, eps inside the sqrt), about twice as fast as plain
    ops."""
    import tensorflow as tf

    # Centred first, as XLA lowers it with a one-pass variance.
    kernel -= tf.stop_gradient(tf.reduce_mean(kernel, axis=(0, 1, 2), keepdims=True))
    h, w, inputs, outputs = kernel.shape
    standardized, *_ = tf.raw_ops.FusedBatchNormV3(
        x=tf.reshape(kernel, (1, h * w, inputs, outputs)),
        scale=tf.ones((outputs,)),
        offset=tf.zeros((outputs,)),
        mean=tf.zeros((0,)),
        variance=tf.zeros((0,)),
        epsilon=epsilon,
        is_training=True,
    )
    return tf.reshape(standardized, kernel.shape)


@keras.saving.register_keras_serializable(package="bit_keras")
class GroupNorm(layers.Layer):
    """Group normalization over channels-last images, as BiT: biased variance, eps inside the sqrt.

    Ours rather than Keras' `GroupNormalization`: that one computes the variance as E[x^2] - E[x]^2,
    which loses ~4e-5 of the logits in float32 on BiT's large-mean residual stream; this is two-pass,
    and on TensorFlow one XLA kernel (plain ops under `portable_ops`). `relu=True` applies the ReLU that
    follows every GroupNorm in BiT in that kernel. Channels-first inputs (`data_format`) are normalized
    channels-last, between two transposes.
    """

    def __init__(self, groups=GN_GROUPS, epsilon=GN_EPSILON, relu=False, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups
        self.epsilon = epsilon
        self.relu = relu
        self.data_format = standardize_data_format(data_format)

    def build(self, input_shape):
        size = input_shape[1 if self.data_format == "channels_first" else -1]
        if size % self.groups:
            raise ValueError(f"{self.name}: {size} channels do not split into {self.groups} groups")
        # autocast=False: the affine step runs in float32 with the statistics, then casts once.
        self.gamma = self.add_weight(shape=(size,), initializer="ones", name="gamma", autocast=False)
        self.beta = self.add_weight(shape=(size,), initializer="zeros", name="beta", autocast=False)

    def call(self, inputs):
        if _tensorflow_fast_paths():
            group_norm = _xla_group_norm()
        elif keras.backend.backend() == "jax" and not _PORTABLE.get():
            group_norm = _jax_group_norm()
        else:
            group_norm = _group_norm
        channels_first = self.data_format == "channels_first"
        x = ops.transpose(inputs, (0, 2, 3, 1)) if channels_first else inputs
        x = group_norm(x, self.gamma, self.beta, self.groups, self.epsilon, self.relu, self.compute_dtype)
        return ops.transpose(x, (0, 3, 1, 2)) if channels_first else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = {"groups": self.groups, "epsilon": self.epsilon, "relu": self.relu, "data_format": self.data_format}
        return {**super().get_config(), **config}


def statistics_dtype(dtype) -> str:
    """The dtype of group-norm and weight-standardization statistics under a compute `dtype`: float64 for float64,
    else float32 (16-bit sums over a whole group would overflow or round)."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def _grouped(tensor, groups):
    """Channels-last `tensor` in its statistics dtype, as (batch, pixels, groups, channels per group)."""
    shape = ops.shape(tensor)
    x = ops.cast(tensor, statistics_dtype(tensor.dtype))
    return ops.reshape(x, (shape[0], -1, groups, shape[-1] // groups))


def _group_norm_parts(inputs, gamma, beta, groups, epsilon):
    """The grouped float32 inputs, each group's mean and 1/std, and the per-channel scale and shift they give."""
    x = _grouped(inputs, groups)
    group = (1, 1, groups, gamma.shape[0] // groups)
    mean, variance = _moments(x, (1, 3))
    inverse_std = ops.rsqrt(variance + epsilon)
    scale = inverse_std * ops.reshape(ops.cast(gamma, x.dtype), group)
    return x, mean, inverse_std, scale, ops.reshape(ops.cast(beta, x.dtype), group) - mean * scale


def _group_norm(inputs, gamma, beta, groups, epsilon, relu, dtype):
    """GroupNorm (then ReLU) of channels-last `inputs`, statistics and affine step in `statistics_dtype`."""
    x, _, _, scale, shift = _group_norm_parts(inputs, gamma, beta, groups, epsilon)
    return _scale_shift(x, scale, shift, relu, ops.shape(inputs), dtype)


def _scale_shift(x, scale, shift, relu, shape, dtype):
    x = x * scale + shift
    return ops.cast(ops.reshape(ops.relu(x) if relu else x, shape), dtype)


@functools.cache
def _xla_group_norm():
    """`_group_norm` as one XLA kernel (TensorFlow): as plain TF ops each step is a pass over memory, and GroupNorm +
    ReLU dominated R50x1's inference time (the README's performance section measures the fusion).
    XLA-must-compile functions stop ONNX converters and TF Serving's GPU builds: `portable_ops` turns it off."""
    import tensorflow as tf

    compiled = tf.function(_group_norm, jit_compile=True)

    def group_norm(inputs, gamma, beta, *args):  # tensors, not variables: one trace per shape and dtype
        tensors = inputs, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta)
        if tf.executing_eagerly():  # through its concrete function: eager calls at many shapes are not "retracing"
            return compiled.get_concrete_function(*tensors, *args)(*tensors)
        return compiled(*tensors, *args)

    return group_norm


@functools.cache
def _jax_group_norm():
    """`_group_norm` with its gradient written out (JAX): autodiff keeps float32 activation-sized residuals for the
    backward pass; this keeps only the inputs (bfloat16 under mixed precision) and per-group statistics, and
    recomputes the normalized values inside the backward pass's fused kernels."""
    import jax

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
    def group_norm(inputs, gamma, beta, groups, epsilon, relu, dtype):
        return _group_norm(inputs, gamma, beta, groups, epsilon, relu, dtype)

    def forward(inputs, gamma, beta, groups, epsilon, relu, dtype):
        x, mean, inverse_std, scale, shift = _group_norm_parts(inputs, gamma, beta, groups, epsilon)
        outputs = _scale_shift(x, scale, shift, relu, ops.shape(inputs), dtype)
        return outputs, (inputs, gamma, mean, inverse_std, scale, shift)

    def backward(groups, epsilon, relu, dtype, residuals, grad):
        inputs, gamma, mean, inverse_std, scale, shift = residuals
        x = _grouped(inputs, groups)
        grad = _grouped(grad, groups)
        if relu:  # the forward pass's ReLU, on the same pre-activation
            grad = ops.where(x * scale + shift > 0, grad, 0.0)
        normalized = (x - mean) * inverse_std
        d_normalized = grad * ops.reshape(ops.cast(gamma, x.dtype), (1, 1, groups, -1))
        d_inputs = inverse_std * (  # biased variance: dx = (g - mean(g) - x^ mean(g x^)) / std over each group
            d_normalized
            - ops.mean(d_normalized, axis=(1, 3), keepdims=True)
            - normalized * ops.mean(d_normalized * normalized, axis=(1, 3), keepdims=True)
        )
        d_gamma = ops.reshape(ops.sum(grad * normalized, axis=(0, 1)), gamma.shape)
        d_beta = ops.reshape(ops.sum(grad, axis=(0, 1)), gamma.shape)
        return ops.cast(ops.reshape(d_inputs, ops.shape(inputs)), inputs.dtype), d_gamma, d_beta

    group_norm.defvjp(forward, backward)

    def call(inputs, gamma, beta, *args):  # arrays, not Keras variables
        return group_norm(inputs, ops.convert_to_tensor(gamma), ops.convert_to_tensor(beta), *args)

    return call


@keras.saving.register_keras_serializable(package="bit_keras")
class BatchNormReLU(layers.BatchNormalization):
    """`BatchNormalization` then ReLU: the BatchNorm ablation's counterpart of `GroupNorm(relu=True)`."""

    def call(self, inputs, training=None, mask=None):
        return ops.relu(super().call(inputs, training=training, mask=mask))


def norm_relu_layer(kind, name, groups=GN_GROUPS, dtype=None, data_format=None):
    """The normalization of a BiT variant followed by ReLU: `"group"` (the paper's) or `"batch"` (ablation)."""
    if kind == "group":
        return GroupNorm(groups, relu=True, data_format=data_format, name=name, dtype=dtype)
    if kind == "batch":
        axis = 1 if standardize_data_format(data_format) == "channels_first" else -1
        return BatchNormReLU(axis=axis, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name, dtype=dtype)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {kind!r}")


def conv_layer(filters, kernel_size, name, strides=1, weight_standardization=True, dtype=None, data_format=None):
    """A bias-free VALID convolution, weight-standardized unless the ablation turns it off."""
    conv = StandardizedConv2D if weight_standardization else layers.Conv2D
    return conv(
        filters,
        kernel_size,
        strides=strides,
        padding="valid",
        data_format=data_format,
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
        dtype=dtype,
    )


@keras.saving.register_keras_serializable(package="bit_keras")
class PreActBottleneck(layers.Layer):
    """ResNet-v2 bottleneck unit as in BiT, with `filters` bottleneck channels and `4 * filters` outputs.

    `p = relu(norm_a(x))`; shortcut = 1x1 conv with the stride on `p` when the stride or the channel
    count changes, else `x`; branch = conv_a 1x1 -> norm_b, relu -> pad 1, conv_b 3x3 with the stride
    -> norm_c, relu -> conv_c 1x1; output = branch + shortcut.
    """

    def __init__(
        self,
        filters,
        strides=1,
        normalization="group",
        weight_standardization=True,
        groups=GN_GROUPS,
        data_format=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.normalization = normalization
        self.weight_standardization = weight_standardization
        self.groups = groups
        self.data_format = fmt = standardize_data_format(data_format)
        norm_kind, ws, dtype = normalization, weight_standardization, self.dtype_policy
        self.norm_a = norm_relu_layer(norm_kind, "norm_a", groups, dtype, fmt)
        self.conv_a = conv_layer(filters, 1, "conv_a", 1, ws, dtype, fmt)
        self.norm_b = norm_relu_layer(norm_kind, "norm_b", groups, dtype, fmt)
        # Explicit symmetric padding: 'same' pads (0, 1) at stride 2 on even sizes, unlike the official code.
        self.pad_b = layers.ZeroPadding2D(1, data_format=fmt, name="pad_b", dtype=dtype)
        self.conv_b = conv_layer(filters, 3, "conv_b", strides, ws, dtype, fmt)
        self.norm_c = norm_relu_layer(norm_kind, "norm_c", groups, dtype, fmt)
        self.conv_c = conv_layer(4 * filters, 1, "conv_c", 1, ws, dtype, fmt)
        self.proj = None

    def build(self, input_shape):
        channels_first = self.data_format == "channels_first"
        if self.strides > 1 or input_shape[1 if channels_first else -1] != 4 * self.filters:
            self.proj = conv_layer(
                4 * self.filters,
                1,
                "proj",
                self.strides,
                self.weight_standardization,
                self.dtype_policy,
                self.data_format,
            )
            self.proj.build(input_shape)
        self.norm_a.build(input_shape)
        self.conv_a.build(input_shape)
        mid = self._shape(input_shape[0], self._spatial(input_shape), self.filters)
        self.norm_b.build(mid)
        padded = [None if size is None else size + 2 for size in self._spatial(input_shape)]  # pad_b's output
        self.conv_b.build(self._shape(input_shape[0], padded, self.filters))
        strided = self._shape(input_shape[0], self._spatial(self.compute_output_shape(input_shape)), self.filters)
        self.norm_c.build(strided)
        self.conv_c.build(strided)

    def call(self, inputs, training=None):
        preact = self.norm_a(inputs, training=training)
        shortcut = inputs if self.proj is None else self.proj(preact)  # projection sees p, not x
        x = self.conv_a(preact)
        x = self.norm_b(x, training=training)
        x = self.conv_b(self.pad_b(x))
        x = self.norm_c(x, training=training)
        return self.conv_c(x) + shortcut

    def compute_output_shape(self, input_shape):
        def down(size):
            return None if size is None else (size - 1) // self.strides + 1

        return self._shape(input_shape[0], [down(size) for size in self._spatial(input_shape)], 4 * self.filters)

    def _spatial(self, shape):
        return list(shape[2:4] if self.data_format == "channels_first" else shape[1:3])

    def _shape(self, batch, spatial, channels):
        return (batch, channels, *spatial) if self.data_format == "channels_first" else (batch, *spatial, channels)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "normalization": self.normalization,
            "weight_standardization": self.weight_standardization,
            "groups": self.groups,
            "data_format": self.data_format,
        }
