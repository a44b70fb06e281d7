"""Fine-tune a bit_keras feature-vector export with `hub.KerasLayer` in tf_keras (no bit_keras import).

    bit-keras finetune && bit-keras export --run runs/digits-BiT-R14x0.5-mnist5k --kind feature_vector
    python examples/finetune_hub_keras_layer_tf_keras.py exports/digits-BiT-R14x0.5-mnist5k/feature_vector

Trains the backbone and a new Dense head on scikit-learn's digits (32x32 RGB) for a few epochs and
prints the test accuracy, as one would with the official TF Hub BiT modules.
"""

import argparse

import numpy as np
import tensorflow_hub as hub
import tf_keras
from sklearn.datasets import load_digits


def digits():
    data = load_digits()
    images = np.repeat(np.repeat(data.images / 16.0, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=-1)
    return images.astype(np.float32), data.target  # float32 RGB in [0, 1], the export's input convention


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", help="a feature_vector export directory")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train_examples", type=int, default=600)
    args = parser.parse_args()

    images, labels = digits()
    n = args.train_examples
    model = tf_keras.Sequential(
        [
            tf_keras.Input((32, 32, 3)),
            hub.KerasLayer(args.export, trainable=True),  # trainable=False: a linear probe
            tf_keras.layers.Dense(10, kernel_initializer="zeros"),  # BiT's zero-initialized head
        ]
    )
    model.compile(
        tf_keras.optimizers.SGD(0.003, momentum=0.9),
        tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images[:n], labels[:n], batch_size=32, epochs=args.epochs)
    _, accuracy = model.evaluate(images[n:], labels[n:], verbose=0)
    print(f"test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
