"""The detection export: a `bit_keras.detection.retinanet.RetinaNet` as a SavedModel with the TF Object Detection
API's signatures (written like the classification exports, `bit_keras.serving.export`)."""

import os

import keras
import tensorflow as tf

from bit_keras.data.pipeline import decode_and_resize
from bit_keras.detection.retinanet import MAX_DETECTIONS
from bit_keras.serving.export import IMAGES, add_labels, check_out, write_saved_model


def export_detector(model: keras.Model, out: str | os.PathLike, class_names: list[str], overwrite: bool = False):
    """Write a `bit_keras.detection.retinanet.RetinaNet` as a SavedModel directory at `out`; returns `out`.

    Signatures, with the TF Object Detection API's output names so that its serving clients work:

    - `serving_default`: `images`, float32 RGB in [0, 1] of any size (resized to the detector's side without
      keeping the aspect ratio) -> `detection_boxes` [batch, 100, 4] normalized (ymin, xmin, ymax, xmax),
      `detection_scores`, `detection_classes` (float32 class ids counted from 1, as the API's label maps; 0 pads)
      and `num_detections`, after per-class non-max suppression of scores above 0.05; and the raw outputs
      before it, `raw_detection_boxes` [batch, anchors, 4] (decoded, normalized) and `raw_detection_scores`
      [batch, anchors, classes] (sigmoid);
    - `serving_bytes`: `image_bytes`, a [batch] string tensor of encoded JPEG/PNG/GIF/BMP images -> the same
      plus `detection_labels`, the class names (from the `labels.txt` asset).

    Written like `export`: a temporary directory renamed into place; an existing `out` is refused unless
    `overwrite`.
    """
    out = os.path.abspath(os.fspath(out))
    check_out(out, overwrite)
    if len(class_names) != model.num_classes:
        raise ValueError(f"a detector of {model.num_classes} classes needs as many class names, got {len(class_names)}")
    size = model.image_size

    def detections(images):
        outputs = model(images, training=False)
        # One image at a time: keras-hub's non-max suppression needs a static batch size.
        found = tf.map_fn(
            lambda one: tf.nest.map_structure(
                lambda x: x[0], model.decode(tf.nest.map_structure(lambda x: x[None], one))
            ),
            outputs,
            fn_output_signature={
                "boxes": tf.TensorSpec([MAX_DETECTIONS, 4], tf.float32),
                "scores": tf.TensorSpec([MAX_DETECTIONS], tf.float32),
                "classes": tf.TensorSpec([MAX_DETECTIONS], tf.int32),
                "num_detections": tf.TensorSpec([], tf.int32),
            },
        )
        raw_boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
            model.anchors(), outputs["boxes"], "yxyx", "yxyx", encoded_format="center_yxhw"
        )
        return {
            "detection_boxes": found["boxes"],
            "detection_scores": found["scores"],
            "detection_classes": tf.cast(found["classes"] + 1, tf.float32),  # -1 (padding) -> 0
            "num_detections": tf.cast(found["num_detections"], tf.float32),
            "raw_detection_boxes": raw_boxes / float(size),
            "raw_detection_scores": tf.sigmoid(outputs["classes"]),
        }

    def build(tmp):
        root = tf.train.Checkpoint()
        root.variables = [v.value for v in model.variables]
        add_labels(root, tmp, class_names)

        @tf.function(input_signature=[IMAGES])
        def serve(images):
            return detections(tf.image.resize(images, (size, size)))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve_bytes(image_bytes):
            images = tf.map_fn(
                lambda data: decode_and_resize(data, size),
                image_bytes,
                fn_output_signature=tf.TensorSpec([size, size, 3]),
            )
            found = detections(images)
            classes = tf.cast(found["detection_classes"], tf.int64) - 1
            return found | {"detection_labels": tf.where(classes >= 0, root.labels.lookup(classes), "")}

        return root, {"serving_default": serve, "serving_bytes": serve_bytes}

    write_saved_model(out, build)
    return out
