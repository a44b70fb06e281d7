"""bit_keras on Keras' JAX backend: the model (also with weight standardization folded), the tracing context that
replaces the JAX fast path's hand-written group norm gradient by autodiff, and float32's deviation at JAX's default
matmul precision. Its steps are `keras_jax`'s."""

from benchmarks.peers import keras_jax


def build(arch, num_classes, folded=False):
    """`bit_keras.create_model(arch)`, randomly initialized; `fold_weight_standardization()` of it when `folded`."""
    import bit_keras

    model = bit_keras.create_model(arch, num_classes=num_classes)
    return model.fold_weight_standardization() if folded else model


def autodiff_group_norm():
    """Traced under this, the group norm's gradient is autodiff's (`portable_ops`)."""
    from bit_keras.models.layers import portable_ops

    return portable_ops()


def float32_precision_deviation(model, images):
    """max |logits at JAX's default matmul precision - logits at "highest"| / max |the latter|, with a random head
    (BiT's starts at zero): GPUs run float32 convolutions in TF32 by default."""
    import jax
    import numpy as np

    head = model.output_dense
    head.kernel.assign(np.random.default_rng(1).normal(0, 0.01, head.kernel.shape).astype(np.float32))
    trainable, non_trainable = keras_jax.variable_values(model)
    logits = {}
    for precision in ("default", "highest"):
        with jax.default_matmul_precision(precision):  # a new function each: jit caches traces by function
            logits[precision] = np.asarray(keras_jax.predictor(model)(trainable, non_trainable, images), np.float64)
    return float(np.abs(logits["default"] - logits["highest"]).max() / np.abs(logits["highest"]).max())
