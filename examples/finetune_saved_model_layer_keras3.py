"""Fine-tune a bit_keras (or any Reusable) SavedModel in Keras 3 with `bit_keras.SavedModelLayer`.

    bit-keras finetune && bit-keras export --run runs/digits-BiT-R14x0.5-mnist5k --kind feature_vector
    python examples/finetune_saved_model_layer_keras3.py exports/digits-BiT-R14x0.5-mnist5k/feature_vector

`hub.KerasLayer` is a tf_keras layer and cannot go into a Keras 3 model; `SavedModelLayer` can, and its
weights train with any Keras optimizer and save into `.keras` files. A classification export's backbone
is `SavedModelLayer(path, member="feature_vector")`, ready for a new head.
"""

import argparse

import keras
import numpy as np
from sklearn.datasets import load_digits

import bit_keras


def digits():
    data = load_digits()
    images = np.repeat(np.repeat(data.images / 16.0, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=-1)
    return images.astype(np.float32), data.target


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "export", help="a feature_vector export (or a classification export with --member feature_vector)"
    )
    parser.add_argument("--member", default=None, help="a Reusable object inside the export, e.g. feature_vector")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train_examples", type=int, default=600)
    parser.add_argument("--out", default="finetuned_saved_model_layer.keras", help="where to save the model")
    args = parser.parse_args()

    images, labels = digits()
    n = args.train_examples
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            bit_keras.SavedModelLayer(args.export, member=args.member),
            keras.layers.Dense(10, kernel_initializer="zeros"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-4),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(images[:n], labels[:n], batch_size=32, epochs=args.epochs)
    _, accuracy = model.evaluate(images[n:], labels[n:], verbose=0)
    model.save(args.out)
    print(f"test accuracy {accuracy:.4f}; saved {args.out}")


if __name__ == "__main__":
    main()
