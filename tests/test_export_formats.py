"""ONNX and TFLite exports of the shipped model, run by their real consumers (onnxruntime, TensorFlow Lite's
interpreter) against the Keras model; `predict` on them; the checks that refuse a file."""

import collections
import dataclasses
import os
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf

from bit_keras.models.resolve import resolve_model
from bit_keras.models.zoo import create_model
from bit_keras.serving import formats
from bit_keras.serving.export import export
from bit_keras.serving.predict import predict

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")]

SHIPPED = "BiT-R14x0.5-mnist5k"  # in the package: offline, 32px, labels "0".."9"


@pytest.fixture(scope="module")
def shipped():
    return resolve_model(SHIPPED)


@pytest.fixture(scope="module")
def exported(shipped, tmp_path_factory):
    """The shipped model's classification exports, {"onnx": path, "tflite": path}."""
    root = tmp_path_factory.mktemp("formats")
    return {
        fmt: export(
            shipped.model, root / f"digits.{fmt}", "classification", shipped.class_names, shipped.image_size, format=fmt
        )
        for fmt in formats.SUFFIXES
    }


def _outputs(path, images):
    """`{output name: array}` of the file at `path` on `images`, run by onnxruntime or tf.lite.Interpreter."""
    if path.endswith(".onnx"):
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [("images", [32, 32, 3])]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {"images": images})))
    runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    assert list(runner.get_input_details()) == ["images"]
    return runner(images=images)


def test_files_match_keras(shipped, exported):
    images = np.random.default_rng(5).uniform(size=(3, 32, 32, 3)).astype(np.float32)  # not the check's batch of 2
    expected = shipped.model(images).numpy()
    for path in exported.values():
        outputs = _outputs(path, images)
        assert sorted(outputs) == ["logits", "probabilities"], path
        assert np.abs(outputs["logits"] - expected).max() <= 1e-5 * np.abs(expected).max(), path
        np.testing.assert_allclose(outputs["probabilities"], tf.nn.softmax(expected).numpy(), atol=1e-6)
        with open(formats.labels_path(path)) as f:
            assert f.read().split() == [str(i) for i in range(10)]


def test_predict_through_each_file(shipped, exported, tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in (3, 7):  # 8x8 digits in 0..16, upscaled to 32x32 RGB as the bundled data
        pixels = np.kron(digits.images[i] * (255 / 16), np.ones((4, 4))).astype(np.uint8)
        paths.append(str(tmp_path / f"{i}.png"))
        tf.io.write_file(paths[-1], tf.io.encode_png(np.repeat(pixels[..., None], 3, axis=-1)))
    from_keras = predict(SHIPPED, paths, top_k=3)
    for path in exported.values():
        from_file = predict(path, paths, top_k=3)
        for a, b in zip(from_file, from_keras):
            assert a["image"] == b["image"] and len(a["predictions"]) == 3
            assert a["predictions"][0]["label"] == b["predictions"][0]["label"], path
            assert a["predictions"][0]["probability"] == pytest.approx(b["predictions"][0]["probability"], abs=1e-5)
        with pytest.raises(ValueError, match="is an export: it has its own labels and image size"):
            predict(path, paths, image_size=64)


def test_feature_vector_file(shipped, tmp_path):
    images = np.random.default_rng(6).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    expected = shipped.model.feature_extractor(["pre_logits"])(images)["pre_logits"].numpy()
    for fmt in formats.SUFFIXES:
        path = export(shipped.model, tmp_path / f"fv.{fmt}", "feature_vector", format=fmt, image_size=32)
        features = _outputs(path, images)["feature_vector"]
        assert np.abs(features - expected).max() <= 1e-5 * np.abs(expected).max()
        assert not os.path.exists(formats.labels_path(path))
        with pytest.raises(ValueError, match="is not a classification export"):
            predict(path, [])
    assert _batch_dims(onnx.load(tmp_path / "fv.onnx")) == {"images": "batch", "feature_vector": "batch"}


def _batch_dims(model):
    """{name: its dim 0's dim_param} of the graph inputs and outputs of the ONNX `model`, after checking that no
    tensor it gives a shape has another symbolic dimension (tf2onnx's `unk__N`)."""
    values = [*model.graph.input, *model.graph.output]
    dims = {v.name: [d.dim_param for d in v.type.tensor_type.shape.dim] for v in [*values, *model.graph.value_info]}
    assert all(d[0] == "batch" and not any(d[1:]) for d in dims.values()), dims
    return {v.name: dims[v.name][0] for v in values}


def test_onnx_file_for_its_consumers(shipped, exported):
    """One batch dimension named `batch`; the standard GroupNormalization op (opset 21), checked by onnx and run by
    onnxruntime at batch 1 and 3 against the Keras model."""
    model = onnx.load(exported["onnx"])
    onnx.checker.check_model(model, full_check=True)
    assert _batch_dims(model) == {"images": "batch", "logits": "batch", "probabilities": "batch"}
    strict = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    (logits, _) = strict.graph.output
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 10]
    assert [(o.domain, o.version) for o in model.opset_import if not o.domain] == [("", 21)]
    ops = collections.Counter(node.op_type for node in model.graph.node)
    # 13 group norms (3 in each of the 4 units, the pre-head one), each then a ReLU; the one ReduceMean pools.
    assert (ops["GroupNormalization"], ops["Relu"], ops["ReduceMean"], ops["Sqrt"]) == (13, 13, 1, 0), ops
    assert ops["Transpose"] == 1, ops  # the input's, to NCHW: the others cancelled
    (epsilon,) = {a.f for node in model.graph.node for a in node.attribute if a.name == "epsilon"}
    assert epsilon == pytest.approx(1e-5, rel=1e-6)
    session = onnxruntime.InferenceSession(exported["onnx"], providers=["CPUExecutionProvider"])
    assert [v.shape[0] for v in [*session.get_inputs(), *session.get_outputs()]] == ["batch"] * 3
    for batch in (1, 3):
        images = np.random.default_rng(batch).uniform(size=(batch, 32, 32, 3)).astype(np.float32)
        expected = shipped.model(images).numpy()
        logits, probabilities = session.run(["logits", "probabilities"], {"images": images})
        assert logits.shape == probabilities.shape == (batch, 10)
        assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
        np.testing.assert_allclose(probabilities, tf.nn.softmax(expected).numpy(), atol=1e-5)


def test_group_norm_op_in_a_fresh_model(tmp_path):
    """Initial weights: TensorFlow folds away gamma (ones, one channel per group in the first unit) and beta (zeros)."""
    model = create_model("R14x0.5", num_classes=0, input_shape=(32, 32, 3))
    path = export(model, tmp_path / "fresh.onnx", format="onnx", image_size=32)
    ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert (ops["GroupNormalization"], ops["Sqrt"], ops["Neg"]) == (13, 0, 0), ops
    images = np.random.default_rng(9).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    expected = model(images).numpy()
    assert np.abs(_outputs(path, images)["feature_vector"] - expected).max() <= 1e-5 * np.abs(expected).max()


def test_group_norm_op_only_where_onnxruntime_matches(shipped, tmp_path, monkeypatch):
    """A GroupNormalization that onnxruntime runs off the Keras model (here: epsilon 0.1) is not written: the
    primitive ops are, which match it."""
    real = formats.fuse_group_norms

    def off(model):
        fused = real(model)
        for attribute in (a for node in fused.graph.node for a in node.attribute if a.name == "epsilon"):
            attribute.f = 0.1
        return fused

    monkeypatch.setattr(formats, "fuse_group_norms", off)
    path = export(shipped.model, tmp_path / "m.onnx", "classification", shipped.class_names, 32, format="onnx")
    model = onnx.load(path)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert ops["GroupNormalization"] == 0 and ops["Sqrt"] == 13, ops
    assert _batch_dims(model) == {"images": "batch", "logits": "batch", "probabilities": "batch"}
    images = np.random.default_rng(7).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    expected = shipped.model(images).numpy()
    assert np.abs(_outputs(path, images)["logits"] - expected).max() <= 1e-5 * np.abs(expected).max()
    fused = onnxruntime.InferenceSession(off(onnx.load(path)).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(fused.run(["logits"], {"images": images})[0] - expected).max() > 1e-3 * np.abs(expected).max()


def test_tflite_outputs_without_the_signature_runner(shipped, exported):
    """The plain interpreter's outputs are `StatefulPartitionedCall:0` and `:1`; the signature's output details
    name them (`logits`, `probabilities`: the outputs in alphabetical order) by tensor index."""
    interpreter = tf.lite.Interpreter(model_path=exported["tflite"])
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["logits", "probabilities"]}
    }
    named = {name: d["index"] for name, d in interpreter.get_signature_runner().get_output_details().items()}
    plain = interpreter.get_output_details()
    assert [d["name"] for d in plain] == ["StatefulPartitionedCall:0", "StatefulPartitionedCall:1"]
    assert [d["index"] for d in plain] == [named["logits"], named["probabilities"]]
    images = np.random.default_rng(8).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    (given,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(given["index"], images.shape)  # the file's batch is 1 until resized
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], images)
    interpreter.invoke()
    expected = shipped.model(images).numpy()
    logits = interpreter.get_tensor(named["logits"])
    assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
    probabilities = interpreter.get_tensor(named["probabilities"])
    # The second tensor is the softmax of the first (to float32 rounding), so within the logits' bound of Keras'
    # probabilities: softmax moves no probability by more than the largest change of a logit.
    np.testing.assert_allclose(probabilities, tf.nn.softmax(logits).numpy(), atol=1e-6)
    assert np.abs(probabilities - tf.nn.softmax(expected).numpy()).max() <= 1e-5 * np.abs(expected).max()


def test_refused(shipped, tmp_path, monkeypatch):
    model, names = shipped.model, shipped.class_names
    with pytest.raises(ValueError, match=r"format='onnx' writes one file: out must end in \.onnx"):
        export(model, tmp_path / "m.tflite", format="onnx", image_size=32)
    with pytest.raises(ValueError, match=r"a classification tflite export needs 10 class names \(got none\) and "):
        export(model, tmp_path / "m.tflite", "classification", format="tflite")
    with pytest.raises(ValueError, match="over the 2 GiB of one ONNX file"):
        monkeypatch.setattr(formats, "ONNX_LIMIT", 1000)
        export(model, tmp_path / "m.onnx", "feature_vector", format="onnx", image_size=32)
    monkeypatch.undo()
    mixed = resolve_model(SHIPPED, dtype="mixed_bfloat16", num_classes=10).model
    with pytest.raises(ValueError, match="^format=.tflite. exports float32 models only: .* in mixed_bfloat16$"):
        export(mixed, tmp_path / "m.tflite", "feature_vector", format="tflite", image_size=32)
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # the extra not installed
    with pytest.raises(ImportError, match=r'^ONNX export and prediction need tf2onnx: pip install "bit-keras\[onnx\]"'):
        export(model, tmp_path / "m.onnx", "feature_vector", format="onnx", image_size=32)
    monkeypatch.undo()

    real = formats.load

    def off_by_one(path, fmt):  # a runtime that computes something else than the Keras model
        loaded = real(path, fmt)
        return dataclasses.replace(loaded, run=lambda images: {k: v + 1 for k, v in loaded.run(images).items()})

    monkeypatch.setattr(formats, "load", off_by_one)
    with pytest.raises(RuntimeError, match=r"m\.tflite: logits differs from the Keras model's by 1 \(allowed 5e-05"):
        export(model, tmp_path / "m.tflite", "classification", names, 32, format="tflite")
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary
    monkeypatch.undo()
    path = export(model, tmp_path / "m.tflite", "feature_vector", format="tflite", image_size=32)
    with pytest.raises(FileExistsError, match="exists"):
        export(model, path, "feature_vector", format="tflite", image_size=32)
    os.remove(path)
    os.mkdir(path)
    with pytest.raises(FileExistsError, match="exists and is a directory"):
        export(model, path, "feature_vector", format="tflite", image_size=32, overwrite=True)
