"""TF-Hub-style Reusable SavedModels of BiT models, with TF Serving signatures.

An export loads with `hub.KerasLayer(path, trainable=True)` (tf_keras), `hub.load` / `tf.saved_model.load`,
`bit_keras.SavedModelLayer` (Keras 3) and TF Serving. The loaded object is callable as
`obj(images, training=False|True)` on float32 RGB images in [0, 1] of shape [batch, height, width, 3]
(all three dynamic), and has `variables`, `trainable_variables` and `regularization_losses`, the
Reusable SavedModel interface. Signatures:

- `serving_default`: `images` -> `feature_vector` [batch, features], or `logits` and `probabilities`
  [batch, classes] (classification);
- `serving_bytes` (classification): `image_bytes`, a [batch] string tensor of encoded JPEG/PNG/GIF/BMP
  images (what TF Serving's REST API delivers from `{"b64": ...}`), each decoded to RGB and resized to
  `image_size` x `image_size` without keeping the aspect ratio (BiT's evaluation preprocessing) ->
  `classes` (top-k ids), `labels` (their names, from the `labels.txt` asset) and `probabilities`.

A classification export also holds its backbone as `obj.feature_vector`, itself a Reusable SavedModel
object (`hub.KerasLayer(hub.load(path).feature_vector, trainable=True)`, or
`SavedModelLayer(path, member="feature_vector")`), so any classifier can be re-headed.
"""

import os

import keras
import tensorflow as tf

from bit_keras import files
from bit_keras.checks import check_int
from bit_keras.data.pipeline import decode_and_resize
from bit_keras.detection.retinanet import MAX_DETECTIONS
from bit_keras.models.layers import portable_ops

KINDS = ("feature_vector", "classification")
IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
LABELS_ASSET = "labels.txt"


def export(
    model: keras.Model,
    out: str | os.PathLike,
    kind: str = "feature_vector",
    class_names: list[str] | None = None,
    image_size: int | None = None,
    top_k: int = 5,
    overwrite: bool = False,
) -> str:
    """Write `model` (a `bit_keras.BiT`) as a Reusable SavedModel directory at `out`; returns `out`.

    `kind="feature_vector"` exports the pooled pre-logits (any head is dropped); `"classification"`
    needs a head and `class_names` (one per class) and adds the `serving_bytes` signature, which
    resizes images to `image_size` (required there). The export is written to a temporary directory
    beside `out` and renamed into place; an existing `out` is refused unless `overwrite`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_int("top_k", top_k)
    check_int("image_size", image_size)
    out = os.path.abspath(os.fspath(out))
    _check_out(out, overwrite)
    if kind == "classification":
        if not model.num_classes:
            raise ValueError("a classification export needs a model with a head (num_classes > 0)")
        if class_names is None or len(class_names) != model.num_classes:
            got = "none" if class_names is None else len(class_names)
            raise ValueError(f"a classification export needs {model.num_classes} class names, got {got}")
        if not image_size:
            raise ValueError("a classification export needs image_size, the side the bytes signature resizes to")
        net = model
    features = keras.Model(model.input, model.features["pre_logits"], name=f"{model.name}_feature_vector")
    if kind == "feature_vector":
        net = features

    def build(tmp):
        root = _reusable(net)
        if kind == "classification":
            root.feature_vector = _reusable(features)  # the backbone alone, for a new head
        signatures = {"serving_default": _serving_default(net, kind)}
        if kind == "classification":
            _add_labels(root, tmp, class_names)
            signatures["serving_bytes"] = _serving_bytes(
                net, root.labels, int(image_size), min(top_k, model.num_classes)
            )
        return root, signatures

    _write_saved_model(out, build)
    return out


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
    _check_out(out, overwrite)
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
        _add_labels(root, tmp, class_names)

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

    _write_saved_model(out, build)
    return out


def _write_saved_model(out, build):
    """`build(tmp)` -> (root, signatures), saved to a temporary directory beside `out`, then renamed to `out`."""
    with files.replacing(out) as tmp, portable_ops():  # the SavedModel may be served on a GPU
        root, signatures = build(tmp)
        tf.saved_model.save(root, tmp, signatures=signatures)


def _add_labels(root, tmp, class_names):
    """`class_names` as the `labels.txt` asset of the export and `root.labels`, a table from class id to name."""
    os.makedirs(tmp, exist_ok=True)
    labels_path = os.path.join(tmp, LABELS_ASSET)
    with open(labels_path, "w", encoding="utf-8") as f:
        f.writelines(f"{name}\n" for name in class_names)
    root.labels_asset = tf.saved_model.Asset(labels_path)
    root.labels = tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(
            root.labels_asset,
            tf.int64,
            tf.lookup.TextFileIndex.LINE_NUMBER,
            tf.string,
            tf.lookup.TextFileIndex.WHOLE_LINE,
        ),
        default_value="",
    )


def _reusable(net):
    """The root object: `__call__` traced for training False and True, the variables, no regularization losses."""
    root = tf.train.Checkpoint()

    @tf.function
    def call(images, training=False):
        return net(images, training=training)

    for training in (False, True):
        call.get_concrete_function(IMAGES, training=training)
    root.__call__ = call
    # The tf.Variables under the Keras ones: TF1-style loaders (saved_model_cli, TF Serving) restore only those.
    root.variables = [v.value for v in net.variables]
    root.trainable_variables = [v.value for v in net.trainable_variables]
    root.regularization_losses = []
    return root


def _serving_default(net, kind):
    @tf.function(input_signature=[IMAGES])
    def serve(images):
        outputs = net(images, training=False)
        if kind == "feature_vector":
            return {"feature_vector": outputs}
        return {"logits": outputs, "probabilities": tf.nn.softmax(outputs)}

    return serve


def _serving_bytes(net, labels, image_size, k):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        images = tf.map_fn(
            lambda data: decode_and_resize(data, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3]),
        )
        probabilities = tf.nn.softmax(net(images, training=False))
        top = tf.math.top_k(probabilities, k=k)
        classes = tf.cast(top.indices, tf.int64)
        return {"classes": classes, "labels": labels.lookup(classes), "probabilities": top.values}

    return serve_bytes


def _check_out(out, overwrite):
    """Refuse an existing `out` unless `overwrite`, and never replace what is not a SavedModel (or empty)."""
    if not os.path.exists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True, or --overwrite, to replace it)")
    if not os.path.isdir(out) or (os.listdir(out) and not os.path.exists(os.path.join(out, "saved_model.pb"))):
        raise FileExistsError(f"{out} exists and is not a SavedModel export: not replacing it; choose another --out")
