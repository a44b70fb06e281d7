"""MixUp as BiT fine-tunes with it: one lambda ~ Beta(alpha, alpha) per batch, the batch mixed with its reverse."""

import tensorflow as tf


def sample_beta(alpha, seed=None):
    """A float32 scalar lambda ~ Beta(alpha, alpha) for a Python number `alpha`; exactly 1.0 when alpha is 0.

    Sampled as X / (X + Y) with X, Y ~ Gamma(alpha), from TF's global random state, or statelessly
    (repeatably) from `seed`, a shape [2] integer tensor.
    """
    if alpha < 0:
        raise ValueError(f"MixUp alpha must be >= 0, got {alpha}")
    if alpha == 0:
        return tf.constant(1.0)
    # float64: at alpha 0.1 about 2e-4 of float32 gamma draws fall below 1e-38 and are clamped there.
    if seed is None:
        x, y = tf.unstack(tf.random.gamma([2], alpha, dtype=tf.float64))
    else:
        x, y = tf.unstack(tf.random.stateless_gamma([2], seed, alpha, dtype=tf.float64))
    return tf.cast(x / (x + y), tf.float32)


def mixup(images, labels, alpha, seed=None):
    """`(lam * images + (1 - lam) * reversed images, same for labels)` with one lambda for the batch.

    `images` is a float [batch, height, width, channels] batch and `labels` float one-hot or soft
    [batch, classes]; alpha 0 returns them unchanged. Works eagerly, in `tf.function` and in
    `tf.data.Dataset.map` on batched data, but not under XLA (`jit_compile`), which has no gamma sampler.
    """
    images = tf.convert_to_tensor(images)
    labels = tf.convert_to_tensor(labels)
    for name, x in (("images", images), ("labels", labels)):
        if not x.dtype.is_floating:
            raise TypeError(f"mixup needs float {name}, got {x.dtype.name}: convert them (labels to one-hot) first")
    if alpha == 0:
        return images, labels
    lam = sample_beta(alpha, seed)

    def mix(x):
        weight = tf.cast(lam, x.dtype)
        return weight * x + (1 - weight) * tf.reverse(x, axis=[0])

    return mix(images), mix(labels)
