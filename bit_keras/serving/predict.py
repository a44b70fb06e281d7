"""Top-k predictions for image files, with a classification export (SavedModel, ONNX or TFLite file) or anything
the model resolver accepts."""

import os

import numpy as np
import tensorflow as tf

from bit_keras.checks import arg, check_int
from bit_keras.data import images as images_lib
from bit_keras.data.pipeline import decode_and_resize
from bit_keras.models.resolve import read_labels, resolve_model
from bit_keras.serving import formats


def predict(
    model: str,
    images: list[str],
    top_k: int = 5,
    labels: str | None = None,
    image_size: int | None = None,
    cache_dir: str | None = None,
    max_pixels: int = images_lib.MAX_PIXELS,
) -> list[dict]:
    """`[{"image": path, "predictions": [{"class", "label", "probability"}, ...]}, ...]`, best first.

    `model` is a classification export directory (its `serving_bytes` signature does the decoding,
    resizing and label lookup, and returns at most the top-k it was exported with), a classification `.onnx` or
    `.tflite` file (its input side from the file, its class names from `NAME.labels.txt` beside it), or what
    `bit_keras.models.resolve.resolve_model` accepts (a `.keras` file, a run folder, a zoo checkpoint name, ...),
    preprocessed the same way: decoded to RGB, resized to `image_size` without keeping the aspect ratio.
    Unreadable image files, and those over `max_pixels` pixels, are a ValueError naming the file.
    """
    check_int("top_k", top_k)
    check_int("image_size", image_size)
    encoded = [images_lib.read_image(path, max_pixels) for path in images]
    saved_model = os.path.isdir(str(model)) and os.path.exists(os.path.join(model, "saved_model.pb"))
    if (saved_model or formats.file_format(model)) and (labels or image_size):
        raise ValueError(
            f"{model} is an export: it has its own labels and image size (leave {arg('labels')} and "
            f"{arg('image_size')} out)"
        )
    if saved_model:
        signatures = tf.saved_model.load(model).signatures
        if "serving_bytes" not in signatures:
            raise ValueError(f"{model} is not a classification export (no serving_bytes signature)")
        out = signatures["serving_bytes"](image_bytes=tf.constant(encoded))
        classes, names = out["classes"].numpy(), out["labels"].numpy()
        probabilities = out["probabilities"].numpy()
        names = [[n.decode() for n in row] for row in names]
    elif formats.file_format(model):
        loaded = formats.load(model)
        if "probabilities" not in loaded.outputs:
            raise ValueError(f"{model} is not a classification export (no probabilities output)")
        names_path = formats.labels_path(model)
        if not os.path.exists(names_path):
            raise FileNotFoundError(f"{names_path} does not exist (the class names export writes beside {model})")
        class_names = read_labels(names_path)
        batch = tf.stack([decode_and_resize(data, loaded.image_size) for data in encoded]).numpy()
        scores = loaded.run(batch)["probabilities"]
        classes = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        probabilities = np.take_along_axis(scores, classes, axis=1)
        names = [[class_names[c] for c in row] for row in classes]
    else:
        offline = f"pass {arg('model')} a local .npz, .keras file, run folder or export"
        source = resolve_model(model, labels=labels, image_size=image_size, cache_dir=cache_dir, offline=offline)
        if not source.model.num_classes:
            raise ValueError(f"{model} has no classification head")
        if not source.image_size:
            raise ValueError(f"the input size of {model} is unknown: pass {arg('image_size')}")
        batch = tf.stack([decode_and_resize(data, source.image_size) for data in encoded])
        top = tf.math.top_k(tf.nn.softmax(source.model(batch, training=False)), k=min(top_k, source.model.num_classes))
        classes, probabilities = top.indices.numpy(), top.values.numpy()
        class_names = source.class_names or [f"class {i}" for i in range(source.model.num_classes)]
        names = [[class_names[c] for c in row] for row in classes]
    return [
        {
            "image": str(path),
            "predictions": [
                {"class": int(c), "label": n, "probability": float(p)}
                for c, n, p in list(zip(classes[i], names[i], probabilities[i]))[:top_k]
            ],
        }
        for i, path in enumerate(images)
    ]
