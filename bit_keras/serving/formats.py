"""ONNX and TFLite files of BiT models, for runtimes without TensorFlow (`export(..., format="onnx"|"tflite")`).

A file takes `images`, float32 RGB in [0, 1] of shape [batch, side, side, 3] (the side fixed at export, the batch
dynamic), and returns `logits` and `probabilities` [batch, classes] (classification) or `feature_vector`
[batch, features]. A classification file's class names are beside it, one per line: `NAME.labels.txt`.

ONNX through tf2onnx (`pip install "bit-keras[onnx]"`) on the export's serving function (what Keras'
`export(format="onnx")` calls too, but with our output names); TFLite through
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


def convert(serve, saved_model: str, fmt: str, path: str) -> None:
    """Write the `fmt` file at `path`: ONNX from `serve` (a tf.function of one fixed-size input, traced), TFLite
    from `saved_model`, the SavedModel of `serve`."""
    if fmt == "onnx":
        tf2onnx = _onnx_module("tf2onnx")
        tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, output_path=path)
    else:
        data = tf.lite.TFLiteConverter.from_saved_model(saved_model).convert()
        with open(path, "wb") as f:
            f.write(data)


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
        ort = _onnx_module("onnxruntime")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
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


def _onnx_module(name: str):
    """`import name` (tf2onnx, onnxruntime), or a one-line ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f'ONNX export and prediction need {name}: pip install "bit-keras[onnx]"') from None
