"""The detection export: a `bit_keras.detection.retinanet.RetinaNet` as a SavedModel with the TF Object Detection
API's signatures (written like the classification exports, `bit_keras.serving.export`)."""

import os

import keras
import tensorflow as tf

from bit_keras.data.pipeline import decode_and_resize
from bit_keras.detection.retinanet import BOX_ENCODING
from bit_keras.serving.export import IMAGES, add_labels, check_out, write_saved_model


def export_detector(model, out: str | os.PathLike, *, overwrite: bool = False):
    """Write a `bit_keras.detection.retinanet.RetinaNet` as a SavedModel directory at `out`, with the class names
    and input size it carries; returns `out`.

    Signatures, with the TF Object Detection API's output names so that its serving clients work:

    - `serving_default`: `images`, float32 RGB in [0, 1] of any size (resized to the detector's side without
      keeping the aspect ratio) -> `detection_boxes` [batch, 100, 4] normalized (ymin, xmin, ymax, xmax),
      `detection_scores`, `detection_classes` (float32 class ids counted from 1, as the API's label maps; 0 pads)
      and `num_detections`, after per-class non-max suppression of scores above 0.05 (of the whole batch at
      once); and the raw outputs before it, `raw_detection_boxes` [batch, anchors, 4] (decoded, normalized) and
      `raw_detection_scores` [batch, anchors, classes] (sigmoid);
    - `serving_bytes`: `image_bytes`, a [batch] string tensor of encoded JPEG/PNG/GIF/BMP images -> the same
      plus `detection_labels`, the class names (from the `labels.txt` asset; the class ids where the model has no
      names).

    Written like `export`: a temporary directory renamed into place; an existing `out` is refused unless
    `overwrite`.
    """
    out = os.path.abspath(os.fspath(out))
    check_out(out, overwrite)
    size = model.image_size
    convert = keras.utils.bounding_boxes.convert_format

    def detections(images):
        outputs = model(images, training=False)
        found = model.decode_predictions(outputs, images)
        found_boxes = convert(found["boxes"], model.bounding_box_format, "rel_yxyx", height=size, width=size)
        anchors = tf.concat(list(model.anchor_generator(images).values()), axis=0)
        raw_boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
            anchors,
            outputs["bbox_regression"],
            model.anchor_generator.bounding_box_format,
            "rel_yxyx",
            encoded_format=BOX_ENCODING,
            image_shape=(size, size, 3),
        )
        valid = found["labels"] >= 0
        return {
            "detection_boxes": tf.where(valid[..., None], found_boxes, 0.0),
            "detection_scores": tf.where(valid, found["confidence"], 0.0),
            "detection_classes": tf.cast(found["labels"] + 1, tf.float32),  # -1 (padding) -> 0
            "num_detections": tf.cast(found["num_detections"], tf.float32),
            "raw_detection_boxes": raw_boxes,
            "raw_detection_scores": tf.sigmoid(outputs["cls_logits"]),
        }

    def build(tmp):
        root = tf.train.Checkpoint()
        root.variables = [v.value for v in model.variables]
        add_labels(root, tmp, model.labels)

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
