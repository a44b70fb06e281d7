"""ONNX and TFLite files of BiT models, for runtimes without TensorFlow (`export(..., format="onnx"|"tflite")`).

A file takes `images`, float32 RGB in [0, 1] of shape [batch, side, side, 3] (the side fixed at export, the batch
dynamic), and returns `logits` and `probabilities` [batch, classes] (classification) or `feature_vector`
[batch, features]. A classification file's class names are beside it, one per line: `NAME.labels.txt`.

ONNX through tf2onnx (`pip install "bit-keras[onnx]"`) on the export's serving function (what Keras'
`export(format="onnx")` calls too, but with our output names), at opset 21, the batch dimension named `batch` on
the input and every output, each group norm the GroupNormalization op (`convert` says where not); TFLite through
`tf.lite.TFLiteConverter.from_saved_model`. Every file is run (onnxruntime, `tf.lite.Interpreter`) on random
images before it is renamed into place, and refused unless it matches the Keras model.
"""

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from bit_keras import startup

SUFFIXES = {"onnx": ".onnx", "tflite": ".tflite"}
LABELS_SUFFIX = ".labels.txt"
ONNX_LIMIT = 2**31  # bytes: protobuf's limit on one message, so on a single-file ONNX model
# The largest difference from the Keras model, relative to its largest output magnitude: float32 noise (R50x1 at
# 224px: onnxruntime 1.5e-5 off TensorFlow, 1.2e-5 off float64; TFLite 8e-6), not a conversion error (Keras'
# GroupNormalization epsilon instead of BiT's moves logits by ~1.7e-4).
TOLERANCE = 5e-5
CHECK_IMAGES = 2  # random images each written file is checked on
ONNX_OPSET = 21  # GroupNormalization with per-channel scale and bias (opset 18's scales whole groups)
# onnxruntime's GroupNormalization computes the variance as E[x^2] - E[x]^2: on inputs whose mean is large against
# their spread it loses float32 digits that the primitive ops' two-pass variance keeps (`convert` measures it).
GROUP_NORM_TOLERANCE = 1e-5
BATCH = "batch"  # the ONNX file's name of its batch dimension, on its input and every output


@dataclasses.dataclass
class LoadedFile:
    """An ONNX or TFLite file ready to run: `run(images)` -> {output name: array}."""

    run: Callable[[np.ndarray], dict[str, np.ndarray]]
    image_size: int
    outputs: list[str]


def file_format(path) -> str | None:
    """The format of the file at `path` by its suffix: "onnx", "tflite", or None."""
    return next((fmt for fmt, suffix in SUFFIXES.items() if str(path).endswith(suffix)), None)


def labels_path(path) -> str:
    """Where the class names of the file at `path` are: `NAME.labels.txt` beside `NAME.onnx`."""
    return os.path.splitext(os.fspath(path))[0] + LABELS_SUFFIX


def convert(serve, saved_model: str, fmt: str, path: str, images: np.ndarray, output: str, expected: np.ndarray):
    """Write the `fmt` file at `path`: ONNX from `serve` (a tf.function of one fixed-size input, traced), TFLite
    from `saved_model`, the SavedModel of `serve`. ONNX group norms are GroupNormalization ops where onnxruntime
    runs them giving `expected` as `output` on `images` within `GROUP_NORM_TOLERANCE` of its largest magnitude, or
    closer than the primitive ops; else those."""
    if fmt == "onnx":
        primitive = onnx_model(serve)
        fused = fuse_group_norms(primitive)
        feed = {serve.input_signature[0].name: images}
        diffs = [
            np.abs(_session(m.SerializeToString()).run([output], feed)[0] - expected).max() for m in (fused, primitive)
        ]
        best = fused if diffs[0] <= max(GROUP_NORM_TOLERANCE * np.abs(expected).max(), diffs[1]) else primitive
        _onnx_module("onnx").save(best, path)
    else:
        data = tf.lite.TFLiteConverter.from_saved_model(saved_model).convert()
        with open(path, "wb") as f:
            f.write(data)


def onnx_model(serve):
    """The ONNX model (opset `ONNX_OPSET`) of `serve` (traced), as tf2onnx writes it (group norms as primitive ops),
    its batch dimension named `BATCH`."""
    tf2onnx, onnx = _onnx_module("tf2onnx"), _onnx_module("onnx")
    # tf2onnx writes up to opset 18; onnx's version converter takes it on.
    model, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=18)
    model = onnx.version_converter.convert_version(model, ONNX_OPSET)
    model.ir_version = onnx.helper.find_min_ir_version_for(model.opset_import)
    model.graph.ClearField("value_info")  # the converter's shape inference: a symbol per dimension it could not tie
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = BATCH
    onnx.checker.check_model(model, full_check=True)
    return model


def check(path: str, fmt: str, name: str, output: str, images: np.ndarray, expected: np.ndarray) -> None:
    """A RuntimeError naming `name` unless the `fmt` file at `path` gives `expected` as `output` on `images` within
    `TOLERANCE` of its largest magnitude."""
    try:
        got = load(path, fmt).run(images)[output]
    except Exception as err:  # the runtimes' own exceptions: a file that does not load or run
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"{name}: the converted file does not run ({reason}): not written") from err
    diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    if not diff <= TOLERANCE * scale:
        raise RuntimeError(
            f"{name}: {output} differs from the Keras model's by {diff:.3g} (allowed {TOLERANCE:g} of the largest "
            f"magnitude, {scale:.3g}): not written"
        )


def load(path, fmt: str | None = None) -> LoadedFile:
    """The ONNX (onnxruntime, CPU) or TFLite (`tf.lite.Interpreter`) file at `path` (of format `fmt`, by default
    its suffix's), its input side and outputs."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if (fmt or file_format(path)) == "onnx":
        session = _session(path)
        (given,) = session.get_inputs()
        names = [o.name for o in session.get_outputs()]
        return LoadedFile(
            lambda images: dict(zip(names, session.run(names, {given.name: images}))), int(given.shape[1]), names
        )
    with warnings.catch_warnings():  # deprecated for ai_edge_litert's: the same interpreter, packaged apart
        warnings.filterwarnings("ignore", r"\s*Warning: tf\.lite\.Interpreter is deprecated")
        runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    (given,) = runner.get_input_details().values()

    def run(images):
        with startup.quiet_native_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            return runner(images=images)

    return LoadedFile(run, int(given["shape"][1]), list(runner.get_output_details()))


def _session(model):
    """An onnxruntime session on the CPU of the ONNX file at `model`, or of the serialized model `model`."""
    return _onnx_module("onnxruntime").InferenceSession(model, providers=["CPUExecutionProvider"])


def _onnx_module(name: str):
    """`import name` (tf2onnx, onnxruntime), or a one-line ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f'ONNX export and prediction need {name}: pip install "bit-keras[onnx]"') from None


# BiT's `_group_norm` as tf2onnx writes it (after the reshape of the input to [batch, pixels, groups, channels per
# group], `x`; before the ReLU, if any, and the reshape back): tuples are nodes (op type, inputs), strings tensors,
# lists alternatives: TensorFlow folds away a gamma of ones where it does not broadcast (one channel per group), and
# writes the shift 0 - mean * scale of a zero beta as a Neg.
_MEAN = ("ReduceMean", "x", "axes")
_VARIANCE = ("ReduceMean", ("Mul", ("Sub", "x", _MEAN), ("Sub", "x", _MEAN)), "axes")
_INVERSE_STD = ("Reciprocal", ("Sqrt", ("Add", _VARIANCE, "epsilon")))
_SCALE = [("Mul", _INVERSE_STD, "gamma"), _INVERSE_STD]
_GROUP_NORM = ("Add", ("Mul", "x", _SCALE), [("Sub", "beta", ("Mul", _MEAN, _SCALE)), ("Neg", ("Mul", _MEAN, _SCALE))])
# The only attributes the pattern's nodes may have, and their values (the axes are never empty: [1, 3]).
_ATTRIBUTES = {"ReduceMean": {"keepdims": (1,), "noop_with_empty_axes": (0, 1)}}


def fuse_group_norms(model):
    """A copy of the ONNX model `model` (`onnx_model`'s) with each BiT group norm of primitive ops replaced by the
    GroupNormalization op (NCHW: between transposes where its input is NHWC) and Relu where it has one, without
    the transposes that cancel and what is left unused."""
    onnx = _onnx_module("onnx")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info
    shapes = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim] for v in inferred}
    nodes = []
    for node in graph.node:
        found = _group_norm_at(node, producers, constants, shapes)
        if found is None:
            nodes.append(node)
            continue
        source, nhwc, attributes, affine, relu = found
        for name, values in affine.items():  # once each: tf2onnx shares equal constants
            if name not in constants:
                constants[name] = values
                graph.initializer.append(onnx.numpy_helper.from_array(values, name))
        steps = [("Transpose", [], {"perm": [0, 3, 1, 2]})] * nhwc
        steps += [("GroupNormalization", list(affine), attributes)]
        steps += [("Relu", [], {})] * relu + [("Transpose", [], {"perm": [0, 2, 3, 1]})] * nhwc
        if shapes.get(node.output[0]) != shapes[source]:  # else the reshape back is the identity
            steps.append(("Reshape", node.input[1:], {}))
        value, shape = source, shapes[source]
        for i, (op, inputs, attributes) in enumerate(steps):
            name = f"{node.name}/{op}_{i}"
            inputs, value = [value, *inputs], node.output[0] if i == len(steps) - 1 else f"{name}:0"
            nodes.append(onnx.helper.make_node(op, inputs, [value], name=name, **attributes))
            if op == "GroupNormalization":  # onnx infers no shape for it: what comes after would have none
                nchw = [BATCH, shape[3], *shape[1:3]] if nhwc else [BATCH, *shape[1:]]
                graph.value_info.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, nchw))
    graph.ClearField("node")
    graph.node.extend(nodes)
    _cancel_transposes(graph)
    _prune(graph)
    onnx.checker.check_model(model, full_check=True)
    return model


def _group_norm_at(node, producers, constants, shapes):
    """`(input, nhwc, attributes, affine, relu)` if `node` is the reshape that ends a group norm of primitive ops
    (after a ReLU if `relu`): `input` the tensor it normalizes, NHWC or (`nhwc` False) [batch, channels, 1, 1];
    `affine` the per-channel gamma and beta, {initializer name: values}. Else None."""
    value = node.input[0] if node.op_type == "Reshape" else None
    relu = value in producers and producers[value].op_type == "Relu"
    if relu:
        value = producers[value].input[0]
    bound = {}
    grouping = producers.get(bound["x"]) if value and _match(_GROUP_NORM, value, producers, bound) else None
    if grouping is None or grouping.op_type != "Reshape":
        return None
    source = grouping.input[0]
    shape, grouped = shapes.get(source, []), shapes.get(bound["x"], [])
    if len(shape) != 4 or len(grouped) != 4 or None in shape[1:] + grouped[2:]:
        return None
    groups, channels = grouped[2], grouped[2] * grouped[3]
    if shape[3] != channels and shape[1:] != [channels, 1, 1]:
        return None
    affine = {}
    for name, default in (("gamma", np.ones), ("beta", np.zeros)):  # the default where folded away
        values = constants.get(bound[name]) if name in bound else default((1, 1, *grouped[2:]), np.float32)
        if values is None or values.shape != (1, 1, *grouped[2:]):
            return None
        name = f"{bound[name]}/channels" if name in bound else f"group_norm_{default.__name__}_{channels}"
        affine[name] = values.reshape(-1)
    axes, epsilon = constants.get(bound["axes"]), constants.get(bound["epsilon"])
    if axes is None or axes.tolist() != [1, 3] or epsilon is None or epsilon.size != 1:
        return None
    return source, shape[3] == channels, {"num_groups": groups, "epsilon": float(epsilon.reshape(()))}, affine, relu


def _match(pattern, name, producers, bound) -> bool:
    """Whether the tensor `name` is computed as `pattern` (Add and Mul either way round), binding its strings to
    tensor names in `bound`, each string to one tensor."""
    if isinstance(pattern, str):
        return bound.setdefault(pattern, name) == name
    if isinstance(pattern, list):
        return any(_match(p, name, producers, bound) for p in pattern)
    node = producers.get(name)
    allowed = _ATTRIBUTES.get(pattern[0], {})
    if node is None or node.op_type != pattern[0] or len(node.input) != len(pattern) - 1:
        return False
    if any(_attribute(node, a.name) not in allowed.get(a.name, ()) for a in node.attribute):
        return False
    for inputs in [pattern[1:], pattern[:0:-1]][: 2 if pattern[0] in ("Add", "Mul") else 1]:
        trial = dict(bound)
        if all(_match(p, i, producers, trial) for p, i in zip(inputs, node.input)):
            bound.update(trial)
            return True
    return False


def _attribute(node, name):
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _cancel_transposes(graph) -> None:
    """Feed whatever reads a Transpose that undoes the Transpose before it that one's input."""
    producers, renamed, outputs = {}, {}, {o.name for o in graph.output}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        before = producers.get(node.input[0]) if node.op_type == "Transpose" else None
        if before is not None and before.op_type == "Transpose" and node.output[0] not in outputs:
            first, second = _attribute(before, "perm"), _attribute(node, "perm")
            if first and second and [first[k] for k in second] == list(range(len(second))):
                renamed[node.output[0]] = before.input[0]
        producers.update((name, node) for name in node.output)


def _prune(graph) -> None:
    """Drop the nodes and initializers that no graph output depends on."""
    used, kept = {o.name for o in graph.output}, []
    for node in reversed(graph.node):
        if used.intersection(node.output):
            kept.append(node)
            used.update(node.input)
    graph.ClearField("node")
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
