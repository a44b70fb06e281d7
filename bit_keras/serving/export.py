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
import shutil

import keras
import tensorflow as tf

from bit_keras.data.pipeline import decode_and_resize
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
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True, or --overwrite, to replace it)")
    if kind == "classification":
        if not model.num_classes:
            raise ValueError("a classification export needs a model with a head (num_classes > 0)")
        if class_names is None or len(class_names) != model.num_classes:
            got = "none" if class_names is None else len(class_names)
            raise ValueError(f"a classification export needs {model.num_classes} class names, got {got}")
        if not image_size:
            raise ValueError("a classification export needs image_size, the side the bytes signature resizes to")
        net = model
    features = keras.Model(model.input, model.pyramid_outputs["pre_logits"], name=f"{model.name}_feature_vector")
    if kind == "feature_vector":
        net = features

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with portable_ops():  # the SavedModel may be served on a GPU
            root = _reusable(net)
            if kind == "classification":
                root.feature_vector = _reusable(features)  # the backbone alone, for a new head
            signatures = {"serving_default": _serving_default(net, kind)}
            if kind == "classification":
                os.makedirs(tmp)
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
                signatures["serving_bytes"] = _serving_bytes(
                    net, root.labels, int(image_size), min(top_k, model.num_classes)
                )
            tf.saved_model.save(root, tmp, signatures=signatures)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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


def _replace_dir(src, dst):
    """Move directory `src` to `dst`, replacing what is there only once `src` is complete."""
    if os.path.exists(dst):
        old = f"{dst}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)
