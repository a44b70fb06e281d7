"""Small data and settings shared by the fine-tuning tests (in-process and in subprocess scripts)."""

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["top", "middle", "bottom"]


def stripes(n_per_class, size=8, seed=0, classes=3):
    """uint8 RGB images whose bright horizontal stripe (top, middle or bottom third) is the class, plus noise
    (horizontal, so that the training flips keep the class)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    images = rng.integers(0, 60, size=(len(labels), size, size, 3))
    third = size // classes
    for i, c in enumerate(labels):
        images[i, c * third : (c + 1) * third] += 150
    order = rng.permutation(len(labels))
    return images[order].astype(np.uint8), labels[order]


def stripes_data(n_train=8, n_test=4, classes=3):
    from bit_keras.data import sources

    x, y = stripes(n_train, seed=0, classes=classes)
    x_test, y_test = stripes(n_test, seed=1, classes=classes)
    names = CLASSES if classes == 3 else [f"class{c}" for c in range(classes)]
    return sources.from_arrays(x, y, x_test, y_test, class_names=names, name="stripes")


def write_image_folder(root, n_per_class=8, size=8):
    """`stripes` as PNG files in root/CLASS/NN.png."""
    import tensorflow as tf

    x, y = stripes(n_per_class, size=size)
    for i, (image, label) in enumerate(zip(x, y)):
        folder = os.path.join(root, CLASSES[label])
        os.makedirs(folder, exist_ok=True)
        tf.io.write_file(os.path.join(folder, f"{i:02d}.png"), tf.io.encode_png(image))
    return root


def weights_of(model):
    return {w.path: np.array(w.numpy()) for w in model.weights}
