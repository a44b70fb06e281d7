"""Detections in image files, with a detection run folder, its `.keras` model or its export, drawn as PNGs."""

import os

import keras
import tensorflow as tf

from bit_keras.checks import arg
from bit_keras.data import images as images_lib
from bit_keras.data.images import read_image
from bit_keras.data.pipeline import decode_and_resize
from bit_keras.detection import drawing
from bit_keras.detection.retinanet import load_detector


def detect(
    model: str,
    images: list[str],
    score_threshold: float = drawing.SHOWN_SCORE,
    out: str | None = None,
    max_pixels: int = images_lib.MAX_PIXELS,
    overwrite: bool = False,
):
    """`[{"image": path, "detections": [{"class", "label", "score", "box"}, ...], "picture": png}, ...]`, best
    first; `box` is (ymin, xmin, ymax, xmax) normalized to the image.

    `model` is a detection export directory (its `serving_bytes` signature decodes, resizes, detects and names),
    a finished `bit-keras finetune-detector` run folder or its `model.keras` (the detector carries its class names
    and input size), preprocessed the same way. Detections scoring at least `score_threshold` are kept. With `out`,
    each image is written there with its boxes and labels drawn, as `out/NAME.png` ("picture" in the result). A
    picture never replaces an input image, nor an existing file unless `overwrite` (the result's "replaced" then
    says so). Unreadable image files, those over `max_pixels` pixels and clashing pictures are a ValueError naming
    the file, before anything is detected or written.
    """
    number = isinstance(score_threshold, int | float) and not isinstance(score_threshold, bool)
    if not (number and 0 <= score_threshold <= 1):
        raise ValueError(f"{arg('score_threshold')} must be a number in [0, 1], got {score_threshold!r}")
    pictures = None if out is None else picture_paths(images, out, overwrite)
    encoded = [read_image(path, max_pixels) for path in images]
    found = _detector(model)(encoded)
    results = []
    for i, path in enumerate(images):
        keep = [j for j in range(int(found["count"][i])) if found["scores"][i][j] >= score_threshold]
        detections = [
            {
                "class": int(found["classes"][i][j]),
                "label": found["labels"][i][j],
                "score": float(found["scores"][i][j]),
                "box": [float(v) for v in found["boxes"][i][j]],
            }
            for j in keep
        ]
        result = {"image": str(path), "detections": detections}
        if pictures is not None:
            image = tf.io.decode_image(encoded[i], channels=3, expand_animations=False).numpy()
            names = [d["label"] for d in detections]
            drawn = drawing.draw_boxes(
                image, [d["box"] for d in detections], range(len(names)), names, [d["score"] for d in detections]
            )
            result["picture"], replaced = pictures[i], os.path.lexists(pictures[i])
            drawing.save_png(drawn, pictures[i])
            if replaced:
                result["replaced"] = True
        results.append(result)
    return results


def picture_paths(images: list[str], out: str, overwrite: bool = False) -> list[str]:
    """Where `detect` draws each of `images`: `out/NAME.png`. A ValueError naming the file when one would replace an
    input image, when two images would be drawn to one file, or (unless `overwrite`) when one exists."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} is not a folder: {arg('out')} names the folder the pictures are drawn in")
    inputs = {os.path.realpath(path): path for path in images}
    pictures, drawn = [], {}
    for path in images:
        picture = os.path.join(out, f"{os.path.splitext(os.path.basename(path))[0]}.png")
        real = os.path.realpath(picture)
        if real in inputs:
            raise ValueError(f"{picture}: drawing {path} there would replace the input image {inputs[real]}")
        if real in drawn:
            raise ValueError(f"{picture}: both {drawn[real]} and {path} would be drawn there; rename one")
        if os.path.lexists(picture) and not overwrite:
            raise ValueError(f"{picture} exists: pass {arg('overwrite')} to replace it, or choose another {arg('out')}")
        drawn[real] = path
        pictures.append(picture)
    return pictures


def _detector(model: str):
    """A function of encoded images -> {"boxes", "scores", "classes", "labels", "count"} (numpy, per image)."""
    model = str(model)
    if os.path.isdir(model) and os.path.exists(os.path.join(model, "saved_model.pb")):
        signatures = tf.saved_model.load(model).signatures
        if "serving_bytes" not in signatures or "detection_boxes" not in signatures["serving_bytes"].structured_outputs:
            raise ValueError(f"{model} is not a detection export (no detection serving_bytes signature)")

        def run_export(encoded):
            out = {k: v.numpy() for k, v in signatures["serving_bytes"](image_bytes=tf.constant(encoded)).items()}
            return {
                "boxes": out["detection_boxes"],
                "scores": out["detection_scores"],
                "classes": out["detection_classes"].astype(int) - 1,
                "labels": [[n.decode() for n in row] for row in out["detection_labels"]],
                "count": out["num_detections"].astype(int),
            }

        return run_export

    detector = load_detector(model)
    size, names = detector.image_size, detector.labels

    def run_model(encoded):
        images = tf.stack([decode_and_resize(data, size) for data in encoded])
        found = detector.decode_predictions(detector(images, training=False), images)
        out = {k: keras.ops.convert_to_numpy(v) for k, v in found.items()}
        labels = [[names[c] if c >= 0 else "" for c in row] for row in out["labels"]]
        return {
            "boxes": out["boxes"],
            "scores": out["confidence"],
            "classes": out["labels"],
            "labels": labels,
            "count": out["num_detections"],
        }

    return run_model


def print_table(results) -> None:
    """The detections of each image, one line each."""
    for result in results:
        found = result["detections"]
        print(f"{result['image']}: {len(found)} detection{'' if len(found) == 1 else 's'}", end="")
        replaced = ", replacing the file there" if result.get("replaced") else ""
        print(f" (drawn in {result['picture']}{replaced})" if "picture" in result else "")
        width = max((len(d["label"]) for d in found), default=0)
        for d in found:
            box = ", ".join(f"{v:.3f}" for v in d["box"])
            print(f"  {d['label']:<{width}}  {d['score']:.3f}  box (ymin, xmin, ymax, xmax) [{box}]")
