"""Variants of bit_keras's training step on TensorFlow, one per lever, for `training_levers.py`.

A variant is a `+`-joined set of lever names (`saved_stats+onednn`); `current` is the code as it is. Each lever
sets some of `Settings`' fields: environment variables read at TensorFlow's start, how the group norm's statistics
and gradient are computed, what each `PreActBottleneck` compiles with XLA, and whether the whole step is compiled.
Nothing in bit_keras is changed: units and group norms are rebuilt as subclasses of its classes, with its weights.
"""

import dataclasses
import functools

# Auto-clustering of the ops XLA can fuse: convolutions and matmuls stay out (Eigen / oneDNN).
AUTOJIT_FUSIBLE = "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit --tf_xla_ops_to_cluster=FUSIBLE"


@dataclasses.dataclass(frozen=True)
class Settings:
    env: tuple = ()  # (name, value) pairs set before TensorFlow starts
    gradient: str = "autodiff"  # "saved": written-out backward pass from the input and per-group statistics
    stats: str = "grouped"  # how the per-group sums run: "grouped", "channels", "transposed"
    fuse_pad: bool = False  # norm_b, its ReLU and pad_b (conv_b's input) in one XLA kernel
    unit_jit: bool = False  # each PreActBottleneck under jit_compile (its convolutions too)
    step_jit: bool = False  # the whole training step under jit_compile
    portable: bool = False  # traced under bit_keras's portable_ops (plain ops: for auto-clustering to fuse)


LEVERS = {
    "current": ("the code as it is", {}),
    "unit_cluster": ("lever 1: norm_b + ReLU + pad_b (conv_b's input) in one XLA kernel", {"fuse_pad": True}),
    "autojit": (
        "lever 1: TF auto-clustering of fusible ops (GN, ReLU, pads, adds, WS; convolutions out), plain GN ops",
        {"env": (("TF_XLA_FLAGS", AUTOJIT_FUSIBLE),), "portable": True},
    ),
    "saved_stats": ("lever 2: GN gradient written out from the input and per-group mean, 1/std", {"gradient": "saved"}),
    "channel_sums": ("lever 3: group sums as per-channel sums over pixels, then per group", {"stats": "channels"}),
    "transposed": ("lever 3: group sums over a (batch, group, pixels, channels) transpose", {"stats": "transposed"}),
    "onednn": ("lever 4: TF_ENABLE_ONEDNN_OPTS=1 (oneDNN convolutions)", {"env": (("TF_ENABLE_ONEDNN_OPTS", "1"),)}),
    "no_onednn": ("lever 4: TF_ENABLE_ONEDNN_OPTS=0", {"env": (("TF_ENABLE_ONEDNN_OPTS", "0"),)}),
    "unit_jit": ("lever 5: each PreActBottleneck under jit_compile", {"unit_jit": True}),
    "step_jit": ("lever 5: the whole training step under jit_compile", {"step_jit": True}),
}


def settings(spec):
    """The `Settings` of a variant spec (`"saved_stats+onednn"`); ValueError naming an unknown lever."""
    merged = {}
    for name in spec.split("+"):
        if name not in LEVERS:
            raise ValueError(f"unknown lever {name!r}; levers: {', '.join(LEVERS)}")
        for key, value in LEVERS[name][1].items():
            merged[key] = merged.get(key, ()) + value if key == "env" else value
    return Settings(**merged)


# ----------------------------------------------------------------------------- group norm kernels


def _grouped(x, groups):
    """Channels-last `x` as float32 (batch, pixels, groups, channels per group)."""
    import tensorflow as tf

    return tf.reshape(tf.cast(x, tf.float32), (tf.shape(x)[0], -1, groups, x.shape[-1] // groups))


def _group_sum(t, stats):
    """(batch, 1, groups, 1) sums of a grouped tensor, reduced as `stats` says."""
    import tensorflow as tf

    if stats == "grouped":
        return tf.reduce_sum(t, (1, 3), keepdims=True)
    if stats == "channels":  # contiguous channel vectors summed over the pixels first
        return tf.reduce_sum(tf.reduce_sum(t, 1, keepdims=True), 3, keepdims=True)
    return tf.transpose(tf.reduce_sum(tf.transpose(t, (0, 2, 1, 3)), (2, 3), keepdims=True), (0, 2, 1, 3))


def _statistics(x, stats, epsilon):
    """Two-pass per-group mean and 1/sqrt(biased variance + epsilon); "grouped" is bit_keras's `tf.nn.moments`."""
    import tensorflow as tf

    if stats == "grouped":
        mean, variance = tf.nn.moments(x, (1, 3), keepdims=True)
    else:
        count = tf.cast(tf.shape(x)[1] * x.shape[3], tf.float32)
        mean = _group_sum(x, stats) / count
        variance = _group_sum(tf.square(x - tf.stop_gradient(mean)), stats) / count
    return mean, tf.math.rsqrt(variance + epsilon)


def _pad(y, pad):
    import tensorflow as tf

    return tf.pad(y, [[0, 0], [pad, pad], [pad, pad], [0, 0]]) if pad else y


def _affine(x, gamma, beta, mean, inverse_std):
    import tensorflow as tf

    group = (1, 1, x.shape[2], x.shape[3])
    scale = inverse_std * tf.reshape(gamma, group)
    return scale, tf.reshape(beta, group) - mean * scale


def _forward(inputs, gamma, beta, groups, epsilon, relu, dtype, pad, stats):
    """GroupNorm (+ ReLU, + zero padding) of channels-last `inputs`, and its per-group mean and 1/std."""
    import tensorflow as tf

    x = _grouped(inputs, groups)
    mean, inverse_std = _statistics(x, stats, epsilon)
    scale, shift = _affine(x, gamma, beta, mean, inverse_std)
    y = x * scale + shift
    y = tf.cast(tf.reshape(tf.nn.relu(y) if relu else y, tf.shape(inputs)), dtype)
    return _pad(y, pad), mean, inverse_std


def _backward(inputs, gamma, beta, mean, inverse_std, grad, groups, relu, pad, stats):
    """The gradients of `_forward` w.r.t. inputs, gamma and beta, the normalized values recomputed from `inputs`."""
    import tensorflow as tf

    if pad:
        grad = grad[:, pad:-pad, pad:-pad, :]
    x, grad = _grouped(inputs, groups), _grouped(grad, groups)
    scale, shift = _affine(x, gamma, beta, mean, inverse_std)
    if relu:
        grad = tf.where(x * scale + shift > 0, grad, 0.0)
    normalized = (x - mean) * inverse_std
    d_normalized = grad * tf.reshape(gamma, (1, 1, x.shape[2], x.shape[3]))
    count = tf.cast(tf.shape(x)[1] * x.shape[3], tf.float32)
    d_inputs = inverse_std * (  # biased variance: dx = (g - mean(g) - x^ mean(g x^)) / std over each group
        d_normalized
        - _group_sum(d_normalized, stats) / count
        - normalized * (_group_sum(d_normalized * normalized, stats) / count)
    )
    d_gamma = tf.reshape(tf.reduce_sum(grad * normalized, (0, 1)), tf.shape(gamma))
    d_beta = tf.reshape(tf.reduce_sum(grad, (0, 1)), tf.shape(gamma))
    return tf.cast(tf.reshape(d_inputs, tf.shape(inputs)), inputs.dtype), d_gamma, d_beta


@functools.cache
def group_norm_kernel(gradient, stats):
    """`fn(inputs, gamma, beta, groups, epsilon, relu, dtype, pad)`: GroupNorm (+ ReLU, + padding) as XLA kernels,
    its gradient by autodiff of the forward kernel or (`gradient="saved"`) a backward kernel of its own that keeps
    only the input and the per-group statistics."""
    import tensorflow as tf

    forward = tf.function(_forward, jit_compile=True)
    backward = tf.function(_backward, jit_compile=True)

    def autodiff(inputs, gamma, beta, groups, epsilon, relu, dtype, pad):
        return forward(inputs, gamma, beta, groups, epsilon, relu, dtype, pad, stats)[0]

    def saved(inputs, gamma, beta, groups, epsilon, relu, dtype, pad):
        @tf.custom_gradient
        def group_norm(x, g, b):
            y, mean, inverse_std = forward(x, g, b, groups, epsilon, relu, dtype, pad, stats)
            return y, lambda dy: backward(x, g, b, mean, inverse_std, dy, groups, relu, pad, stats)

        return group_norm(inputs, gamma, beta)

    kernel = saved if gradient == "saved" else autodiff

    def call(inputs, gamma, beta, *args):
        return kernel(inputs, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta), *args)

    return call


# ----------------------------------------------------------------------------- layers and the model


def _normalize(norm, x, options, pad=0):
    """`norm` (a bit_keras GroupNorm) applied to `x` with the variant's kernel, or as itself."""
    if options.gradient == "autodiff" and options.stats == "grouped" and not pad:
        return norm(x)
    kernel = group_norm_kernel(options.gradient, options.stats)
    return kernel(x, norm.gamma, norm.beta, norm.groups, norm.epsilon, norm.relu, norm.compute_dtype, pad)


@functools.cache
def layer_classes():
    """`(LeverUnit, LeverGroupNorm)`: bit_keras's PreActBottleneck and GroupNorm calling the variant's kernels."""
    import tensorflow as tf

    from bit_keras.models.layers import GroupNorm, PreActBottleneck

    class LeverGroupNorm(GroupNorm):
        options = Settings()

        def call(self, inputs):
            options = self.options
            if options.gradient == "autodiff" and options.stats == "grouped":
                return super().call(inputs)
            kernel = group_norm_kernel(options.gradient, options.stats)
            return kernel(inputs, self.gamma, self.beta, self.groups, self.epsilon, self.relu, self.compute_dtype, 0)

    class LeverUnit(PreActBottleneck):
        options = Settings()

        def call(self, inputs, training=None):
            if self.options.unit_jit:
                if not hasattr(self, "_compiled"):
                    self._compiled = tf.function(self._unit, jit_compile=True)
                return self._compiled(inputs)
            return self._unit(inputs)

        def _unit(self, inputs):
            options = self.options
            preact = _normalize(self.norm_a, inputs, options)
            shortcut = inputs if self.proj is None else self.proj(preact)
            x = self.conv_a(preact)
            if options.fuse_pad:
                x = _normalize(self.norm_b, x, options, pad=1)
            else:
                x = self.pad_b(_normalize(self.norm_b, x, options))
            x = self.conv_b(x)
            x = _normalize(self.norm_c, x, options)
            return self.conv_c(x) + shortcut

    return LeverUnit, LeverGroupNorm


def rebuild(model, options):
    """`model` (a bit_keras `BiTImageClassifier`) as a functional model whose units and group norms are the
    variant's, holding the same weights; `model` itself when the variant changes no layer."""
    import keras

    from bit_keras.models.layers import GroupNorm, PreActBottleneck

    layer_fields = ("gradient", "stats", "fuse_pad", "unit_jit")
    if all(getattr(options, f) == getattr(Settings(), f) for f in layer_fields):
        return model
    unit_class, norm_class = layer_classes()
    x = inputs = keras.Input(model.input.shape[1:], dtype=model.input.dtype, name="images")
    backbone = model.backbone  # a chain of layers, as the classifier's head after it
    for layer in [*backbone.layers[1:], *(layer for layer in model.layers[1:] if layer is not backbone)]:
        replacement = {PreActBottleneck: unit_class, GroupNorm: norm_class}.get(type(layer))
        if replacement:
            new = replacement.from_config(layer.get_config())
            new.options = options
            x = new(x)
            new.set_weights(layer.get_weights())
        else:
            x = layer(x)
    return keras.Model(inputs, x, name=model.name)
