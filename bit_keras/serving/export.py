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

`format="onnx"` / `"tflite"` writes one file instead (`bit_keras.serving.formats`). Every graph is traced under
`portable_ops` and checked after saving (`check_portable`): no XLA-compiled function, no training-mode
FusedBatchNorm.
"""

import os
import shutil

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from bit_keras import files
from bit_keras.checks import arg, check_int
from bit_keras.data.pipeline import decode_and_resize
from bit_keras.defaults import EXPORT_FORMATS as FORMATS
from bit_keras.models import download
from bit_keras.models.bit import BiT
from bit_keras.models.layers import portable_ops
from bit_keras.models.resolve import ResolvedModel
from bit_keras.serving import formats

KINDS = ("feature_vector", "classification")
IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
LABELS_ASSET = "labels.txt"
DEFAULT_IMAGE_SIZE = 224  # BiT's upstream (pretraining) resolution


def export(
    model: keras.Model,
    out: str | os.PathLike,
    kind: str | None = None,
    class_names: list[str] | None = None,
    image_size: int | None = None,
    top_k: int = 5,
    overwrite: bool = False,
    format: str = "saved_model",
) -> str:
    """Write `model` (a `bit_keras.BiTImageClassifier`; an earlier `BiT` is upgraded) at `out`; returns `out`.

    What the export is and needs comes from the model; the arguments override it. `kind`: "classification" when it
    has a head, else "feature_vector" (the pooled pre-logits; any head is dropped); a classification needs
    `class_names` (one per class: the model's own by default). `format="saved_model"`: a Reusable SavedModel
    directory (above); a classification's adds the `serving_bytes` signature, resizing images to `image_size` (the
    model's input size by default) and returning the `top_k` best. `"onnx"` / `"tflite"`: one file (`out` ends in
    `.onnx` / `.tflite`) taking images of side `image_size`, checked by running it against `model`; a classifier's
    class names go beside it (`NAME.labels.txt`). Written to a temporary name beside `out` and renamed into place;
    an existing `out` is refused unless `overwrite`. `export_inputs` finds `class_names` and `image_size` for a
    resolved model whose own are unknown.
    """
    if isinstance(model, BiT):
        model = model.to_classifier()
    kind = kind or ("classification" if model.num_classes else "feature_vector")
    class_names = model.class_names if class_names is None and kind == "classification" else class_names
    image_size = model.image_size if image_size is None else image_size
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    check_int("top_k", top_k)
    check_int("image_size", image_size)
    out = os.path.abspath(os.fspath(out))
    suffix = formats.SUFFIXES.get(format)
    if suffix and not out.endswith(suffix):
        raise ValueError(f"format={format!r} writes one file: out must end in {suffix}, got {out}")
    check_out(out, overwrite, file=bool(suffix))
    if kind == "classification" and not model.num_classes:
        raise ValueError("a classification export needs a model with a head (num_classes > 0)")
    missing = []
    if kind == "classification" and (class_names is None or len(class_names) != model.num_classes):
        missing.append(f"{model.num_classes} class names (got {'none' if class_names is None else len(class_names)})")
    if not image_size and (suffix or kind == "classification"):
        missing.append(f"image_size (the side {'of its input' if suffix else 'the bytes signature resizes to'})")
    if missing:
        raise ValueError(f"a {kind} {format} export needs {' and '.join(missing)}")
    if suffix and model.policy:
        raise ValueError(f"format={format!r} exports float32 models only: {model.name} computes in {model.policy}")
    if format == "onnx" and model.count_params() * 4 >= formats.ONNX_LIMIT:
        raise ValueError(
            f"{model.name} has {model.count_params() * 4 / 1e9:.1f} GB of weights: over the 2 GiB of one ONNX file "
            "(protobuf's limit); export it as a SavedModel"
        )
    net = model
    features = keras.Model(model.input, model.features["pre_logits"], name=f"{model.name}_feature_vector")
    if kind == "feature_vector":
        net = features
    if suffix:
        _write_file(out, net, kind, int(image_size), class_names, format)
        return out

    def build(tmp):
        root = _reusable(net)
        if kind == "classification":
            root.feature_vector = _reusable(features)  # the backbone alone, for a new head
        signatures = {"serving_default": _serving_default(net, kind)}
        if kind == "classification":
            add_labels(root, tmp, class_names)
            signatures["serving_bytes"] = _serving_bytes(
                net, root.labels, int(image_size), min(top_k, model.num_classes)
            )
        return root, signatures

    write_saved_model(out, build)
    return out


def export_inputs(
    source: ResolvedModel, kind: str, format: str = "saved_model"
) -> tuple[list[str] | None, int | None, list[str]]:
    """`(class_names, image_size, notes)` for `export(source.model, out, kind, class_names, image_size,
    format=format)`, `source` being a `resolve_model` result; `notes` say which defaults were taken.

    Class names, for a classification only (a feature vector downloads nothing): the given or known ones; a zoo
    checkpoint's label file that cannot be downloaded (`label_names` fails within seconds) gives "0".."N-1" and
    a note. The image size, where the export has one (a classification, or an ONNX/TFLite file): the given or
    known one; for an architecture or a bare `.npz`, BiT's upstream 224 and a note. Whatever is still missing is
    one ValueError naming all of it.
    """
    class_names = image_size = None
    notes, missing = [], []
    if kind == "classification" and source.model.num_classes:
        try:
            class_names = source.class_names
        except download.DownloadError as err:
            class_names = [str(i) for i in range(source.model.num_classes)]
            notes.append(f'class names "0".."{len(class_names) - 1}": {err}')
        if class_names is None:
            missing.append(f"labels ({arg('labels', 'FILE')}, one class name per line)")
    if kind == "classification" or format != "saved_model":
        image_size = source.image_size
        if image_size is None and source.spec_kind in ("architecture", "npz"):
            image_size = DEFAULT_IMAGE_SIZE
            notes.append(
                f"image size {image_size}, BiT's upstream resolution ({source.name} records none): "
                f"pass {arg('image_size')} for another"
            )
        if image_size is None:
            missing.append(f"{arg('image_size')} (the side images are resized to)")
    if missing:
        raise ValueError(f"{source.name}: the export needs {' and '.join(missing)}")
    return class_names, image_size, notes


def check_portable(saved_model: str | os.PathLike, name: str | None = None) -> None:
    """A RuntimeError naming the first function of the SavedModel directory `saved_model` (called `name` in the
    message) that XLA must compile (`_XlaMustCompile`: tf2onnx leaves it unconverted, TF Serving's GPU builds
    reportedly fail on it) or that holds a training-mode FusedBatchNorm (cuDNN clamps its epsilon)."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    for meta_graph in proto.meta_graphs:
        _check_graph(meta_graph.graph_def, name or os.fspath(saved_model))


def _check_graph(graph, name):
    """`check_portable` of one GraphDef: its nodes and every function of its library."""
    bodies = [("the top-level graph", graph.node, {})]
    bodies += [(f"function {f.signature.name}", f.node_def, f.attr) for f in graph.library.function]
    for owner, nodes, attrs in bodies:
        found = ["XLA must compile it (_XlaMustCompile)"] if _flag(attrs, "_XlaMustCompile") else []
        for node in nodes:
            if _flag(node.attr, "_XlaMustCompile"):
                found.append(f"it calls {node.attr['f'].func.name or node.name} with _XlaMustCompile")
            if node.op.startswith("FusedBatchNorm") and _flag(node.attr, "is_training", default=True):
                found.append(f"it holds a training-mode {node.op} ({node.name})")
        if found:
            raise RuntimeError(
                f"{name}: {owner}: {found[0]}, which not every consumer runs (trace under "
                "bit_keras.models.layers.portable_ops): not exported"
            )


def _flag(attrs, key, default=False):
    """A boolean attribute of a node or function (TensorFlow leaves out those at their default)."""
    return attrs[key].b if key in attrs else default


def write_saved_model(out, build):
    """`build(tmp)` -> (root, signatures), saved to a temporary directory beside `out`, then renamed to `out`."""
    with files.replacing(out) as tmp, portable_ops():  # the SavedModel may be served on a GPU
        root, signatures = build(tmp)
        _save(root, tmp, signatures, out)


def _save(root, path, signatures, name):
    """`tf.saved_model.save`, then `check_portable`."""
    tf.saved_model.save(root, path, signatures=signatures)
    check_portable(path, name)


def _write_file(out, net, kind, image_size, class_names, format):
    """`net` as one ONNX or TFLite file at `out` of side `image_size`, checked against `net` before it is renamed
    into place; `class_names` (if any) beside it."""
    serve = _serving_default(net, kind, tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images"))
    images = np.random.default_rng(0).uniform(size=(formats.CHECK_IMAGES, image_size, image_size, 3))
    images = images.astype(np.float32)
    output = "logits" if kind == "classification" else "feature_vector"
    with files.replacing(out) as tmp, portable_ops():
        # The Keras model as converted: its portable trace (eager, this CPU's fused ops differ by float32 noise).
        expected = serve(images)[output].numpy()
        saved_model = files.temporary(out, ".saved_model")  # checked; what the TFLite converter reads
        try:
            root = tf.train.Checkpoint()
            root.variables = [v.value for v in net.variables]
            _save(root, saved_model, {"serving_default": serve}, out)
            formats.convert(serve, saved_model, format, tmp, images, output, expected)
        finally:
            shutil.rmtree(saved_model, ignore_errors=True)
        formats.check(tmp, format, out, output, images, expected)
    if class_names is not None:
        files.write_text(formats.labels_path(out), "".join(f"{name}\n" for name in class_names))


def add_labels(root, tmp, class_names):
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


def _serving_default(net, kind, images=IMAGES):
    @tf.function(input_signature=[images])
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


def check_out(out, overwrite, file=False):
    """Refuse an existing `out` unless `overwrite`, and never replace what is not a SavedModel (or empty), or
    with a `file`, a directory."""
    if not os.path.exists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists (pass {arg('overwrite')} to replace it)")
    if file and os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is a directory: not replacing it; choose another {arg('out')}")
    if not file and (
        not os.path.isdir(out) or (os.listdir(out) and not os.path.exists(os.path.join(out, "saved_model.pb")))
    ):
        raise FileExistsError(
            f"{out} exists and is not a SavedModel export: not replacing it; choose another {arg('out')}"
        )
