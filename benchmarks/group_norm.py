"""GroupNorm + ReLU alone: bit_keras's fused XLA kernel against Keras' `GroupNormalization`, on TensorFlow.

    python benchmarks/group_norm.py

Times forward and forward + backward of every GroupNorm + ReLU of a BiT architecture at the training batch
and resolution (the shapes R50x1 normalizes), each layer's median summed, with the largest deviation of
each from a float64 reference. Both use BiT's epsilon (1e-5; Keras' default is 1e-3).
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the benchmarks package

from benchmarks import architecture, harness
from benchmarks.peers import bit_keras_tf


def reference(x, gamma, beta, groups=32, epsilon=1e-5):
    """float64 GroupNorm + ReLU."""
    import numpy as np

    n, h, w, c = x.shape
    g = x.astype(np.float64).reshape(n, h, w, groups, c // groups)
    normalized = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + epsilon)
    return np.maximum(normalized.reshape(x.shape) * gamma + beta, 0)


def measure(layer_fn, shapes, repeats, warmup):
    """(forward ms, forward + backward ms, worst max abs error / max abs output) summed over the shapes."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    forward_ms = backward_ms = worst = 0.0
    for shape in shapes:
        x = tf.constant((rng.standard_normal(shape) + 0.5).astype(np.float32))  # an offset: pre-activations have one
        layer = layer_fn()
        layer.build(shape)
        gamma, beta = rng.uniform(0.5, 1.5, shape[-1]), rng.normal(0, 0.1, shape[-1])
        layer.set_weights([gamma.astype(np.float32), beta.astype(np.float32)])
        upstream = tf.constant(rng.standard_normal(shape).astype(np.float32))

        forward = tf.function(lambda layer=layer, x=x: layer(x, training=True))

        @tf.function
        def both(layer=layer, x=x, upstream=upstream):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, [x, *layer.trainable_weights], output_gradients=upstream)

        expected = reference(x.numpy(), gamma, beta)
        worst = max(worst, float(np.abs(forward().numpy() - expected).max() / np.abs(expected).max()))
        forward_ms += harness.median_ms(lambda forward=forward: forward().numpy(), repeats, warmup)
        backward_ms += harness.median_ms(lambda both=both: [g.numpy() for g in both()], repeats, warmup)
    return forward_ms, backward_ms, worst


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="R50x1", help="architecture whose GroupNorm shapes are timed")
    p.add_argument("--batch", type=harness.positive_int, default=8, help="batch")
    p.add_argument("--resolution", type=harness.positive_int, default=128, help="image size")
    first = "untimed calls first (tracing, compilation)"
    harness.add_repetition_flags(p, "timed repetitions per layer", first, "TensorFlow's intra- and inter-op threads")
    args = p.parse_args(argv)
    import keras
    import tensorflow as tf

    from bit_keras.models.layers import GN_EPSILON, GroupNorm

    bit_keras_tf.set_threads(args.threads)
    shapes = architecture.group_norm_shapes(args.model, args.batch, args.resolution)

    def keras_layer():
        norm = keras.layers.GroupNormalization(groups=32, epsilon=GN_EPSILON)
        return keras.Sequential([norm, keras.layers.ReLU()])

    candidates = {
        "bit_keras GroupNorm(relu=True): one XLA kernel": lambda: GroupNorm(relu=True),
        "keras.layers.GroupNormalization(epsilon=1e-5) + ReLU": keras_layer,
    }
    print(
        f"## GroupNorm + ReLU: {args.model}'s {len(shapes)} layers at batch {args.batch}, {args.resolution}px, "
        f"{args.threads} threads (TensorFlow {tf.__version__}, Keras {keras.__version__})\n"
    )
    print("| | forward, ms | forward + backward, ms | max abs error / max output vs float64 |")
    print("|---|---|---|---|")
    for name, make in candidates.items():
        forward_ms, both_ms, worst = measure(make, shapes, args.repeats, args.warmup)
        print(f"| {name} | {forward_ms:.0f} | {both_ms:.0f} | {worst:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
