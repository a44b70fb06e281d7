"""TF-Hub-style exports: hub.KerasLayer (tf_keras), hub.load and saved_model_cli in fresh processes that do not
import bit_keras; the Keras 3 SavedModelLayer; mixed precision and strategy-scope exports; bad input; the CLI."""

import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import bit_keras
from bit_keras.models import download, presets, zoo
from bit_keras.models.layers import portable_ops
from bit_keras.models.resolve import resolve_model
from bit_keras.serving.export import export, export_inputs
from tests.test_cli import BIT_KERAS, TF_NOISE, _env, run_all

pytestmark = pytest.mark.timeout(600)

CLASS_NAMES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def exported(small_npz, tmp_path_factory):
    """The small random checkpoint exported both ways, and its outputs on fixed images."""
    root = tmp_path_factory.mktemp("exports")
    model = bit_keras.create_model(small_npz)
    images = np.random.default_rng(0).uniform(size=(3, 40, 48, 3)).astype(np.float32)
    features = model.feature_extractor(["pre_logits"])(images)["pre_logits"].numpy()
    np.savez(root / "expected.npz", images=images, features=features, logits=model(images).numpy())
    png = tf.io.encode_png(tf.image.convert_image_dtype(images[0], tf.uint8, saturate=True)).numpy()
    (root / "image.png").write_bytes(png)
    export(model, root / "fv", "feature_vector")
    export(model, root / "cls", "classification", CLASS_NAMES, image_size=32, top_k=3)
    return root, model


def _fresh(code, timeout=300):
    """Run `code` in a fresh Python that must not import bit_keras; returns stdout."""
    check = "\nimport sys\nassert not any(m.startswith('bit_keras') for m in sys.modules), 'bit_keras was imported'\n"
    proc = subprocess.run(
        [sys.executable, "-c", code + check], capture_output=True, text=True, timeout=timeout, env=_env("/nonexistent")
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


HUB_KERAS_LAYER = """
import numpy as np, tensorflow as tf, tf_keras, tensorflow_hub as hub
root = {root!r}
expected = np.load(root + "/expected.npz")
x = expected["images"]
layer = hub.KerasLayer(root + "/fv", trainable=True)
features = layer(x).numpy()
assert np.abs(features - expected["features"]).max() <= 1e-5 * np.abs(expected["features"]).max(), "outputs differ"
images = np.random.default_rng(1).uniform(size=(24, 32, 32, 3)).astype("float32")
labels = np.arange(24) % 3
model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer, tf_keras.layers.Dense(3)])
before = [v.numpy().copy() for v in layer.trainable_variables]
loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(tf_keras.optimizers.SGD(0.01, momentum=0.9), loss)
losses = model.fit(images, labels, epochs=4, batch_size=8, verbose=0).history["loss"]
assert losses[-1] < losses[0], losses
assert len(before) > 50 and all(not np.array_equal(b, v.numpy()) for b, v in zip(before, layer.trainable_variables))

frozen = hub.KerasLayer(root + "/fv", trainable=False)
model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), frozen, tf_keras.layers.Dense(3)])
model.compile(tf_keras.optimizers.SGD(0.01), loss)
values = [v.numpy().copy() for v in frozen.variables]
model.fit(images, labels, epochs=1, batch_size=8, verbose=0)
assert frozen.trainable_weights == [] and len(model.trainable_weights) == 2
assert all(np.array_equal(b, v.numpy()) for b, v in zip(values, frozen.variables))

# Re-heading a classification export: its backbone with a new zero head of 4 classes.
backbone = hub.KerasLayer(hub.load(root + "/cls").feature_vector, trainable=True)
new_head = tf_keras.layers.Dense(4, kernel_initializer="zeros")
reheaded = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), backbone, new_head])
assert reheaded(images[:2]).shape == (2, 4)
print("OK")
"""


def test_hub_keras_layer_tf_keras(exported):
    root, _ = exported
    assert _fresh(HUB_KERAS_LAYER.format(root=str(root))).strip().endswith("OK")


HUB_LOAD = """
import numpy as np, tensorflow as tf, tensorflow_hub as hub
root = {root!r}
expected = np.load(root + "/expected.npz")
x, scale = expected["images"], np.abs(expected["logits"]).max()
fv, cls = hub.load(root + "/fv"), hub.load(root + "/cls")
assert np.abs(fv(x) - expected["features"]).max() <= 1e-5 * np.abs(expected["features"]).max()
assert np.abs(cls(x) - expected["logits"]).max() <= 1e-5 * scale
assert np.abs(cls(x, training=True) - expected["logits"]).max() <= 1e-5 * scale  # no dropout/BN: the same
assert len(fv.variables) == len(fv.trainable_variables) > 50 and list(fv.regularization_losses) == []
out = cls.signatures["serving_default"](images=tf.constant(x))
assert sorted(out) == ["logits", "probabilities"] and np.allclose(out["probabilities"].numpy().sum(-1), 1)
assert sorted(fv.signatures["serving_default"](images=tf.constant(x))) == ["feature_vector"]
png = open(root + "/image.png", "rb").read()
top = cls.signatures["serving_bytes"](image_bytes=tf.constant([png, png]))
assert top["classes"].shape == (2, 3) and top["labels"].numpy()[0, 0].decode() == "class_%d" % top["classes"][0, 0]

def error(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the message is what is tested
        return f"{{type(e).__name__}}: {{e}}"
    raise AssertionError("no error")

print("FLOAT64", error(lambda: cls(x.astype("float64"))).replace("\\n", " "))
print("UINT8", error(lambda: cls((x * 255).astype("uint8"))).replace("\\n", " "))
print("RANK", error(lambda: cls(x[0])).replace("\\n", " "))
print("CHANNELS", error(lambda: cls(x[..., :1])).replace("\\n", " "))
serve_bytes = cls.signatures["serving_bytes"]
print("CORRUPT", error(lambda: serve_bytes(image_bytes=tf.constant([b"not an image"]))).replace("\\n", " "))
"""


def test_hub_load_signatures_and_bad_input(exported):
    root, _ = exported
    out = _fresh(HUB_LOAD.format(root=str(root)))
    errors = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ")[0].isupper())
    for key in ("FLOAT64", "UINT8", "RANK", "CHANNELS"):  # the message shows what was given and what is expected
        assert "Could not find matching concrete function" in errors[key], errors[key][:300]
        assert "dtype=tf.float32" in errors[key] and "shape=(None, None, None, 3)" in errors[key]
    assert "dtype=float64" in errors["FLOAT64"] and "dtype=uint8" in errors["UINT8"]
    assert "Unknown image file format" in errors["CORRUPT"]


def test_saved_model_cli_run(exported, tmp_path):
    root, _ = exported
    expected = np.load(root / "expected.npz")
    np.save(tmp_path / "images.npy", expected["images"])
    np.save(tmp_path / "bytes.npy", np.array([(root / "image.png").read_bytes()]))  # fixed-width bytes, no pickle
    runs = {
        "default": ["--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}"],
        "bytes": ["--signature_def", "serving_bytes", "--inputs", f"image_bytes={tmp_path / 'bytes.npy'}"],
    }
    outputs = {}
    for name, args in runs.items():
        cmd = ["saved_model_cli", "run", "--dir", str(root / "cls"), "--tag_set", "serve", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env("/nonexistent"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = proc.stdout
    assert (
        "Result for output key logits" in outputs["default"]
        and "Result for output key probabilities" in outputs["default"]
    )
    first = re.search(r"Result for output key logits:\n\[\[([^\]]+)\]", outputs["default"]).group(1)
    np.testing.assert_allclose(np.array(first.split(), float), expected["logits"][0], rtol=1e-4, atol=1e-4)
    assert "Result for output key labels" in outputs["bytes"] and "b'class_" in outputs["bytes"]


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_keras3_layer_trains_and_round_trips(exported, tmp_path, optimizer):
    root, _ = exported
    layer = bit_keras.SavedModelLayer(str(root / "fv"))
    model = keras.Sequential([keras.Input((32, 32, 3)), layer, keras.layers.Dense(3)])
    before = {w.path: w.numpy().copy() for w in layer.weights}
    assert all(":" not in w.name and "/" not in w.name for w in layer.weights)
    opt = keras.optimizers.SGD(0.01, momentum=0.9) if optimizer == "sgd_momentum" else keras.optimizers.Adam(1e-3)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images = np.random.default_rng(1).uniform(size=(16, 32, 32, 3)).astype(np.float32)
    model.fit(images, np.arange(16) % 3, epochs=2, batch_size=8, verbose=0)
    changed = [not np.array_equal(before[w.path], w.numpy()) for w in layer.weights]
    assert len(changed) > 50 and all(changed)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded(images), model(images))  # the trained weights, not the export's


def test_keras3_layer_freezing_training_flag_member_and_errors(exported, tmp_path):
    root, _ = exported
    frozen = bit_keras.SavedModelLayer(str(root / "fv"), trainable=False)
    assert frozen.trainable_weights == [] and len(frozen.non_trainable_weights) > 50
    backbone = bit_keras.SavedModelLayer(str(root / "cls"), member="feature_vector")
    x = np.load(root / "expected.npz")["images"]
    np.testing.assert_allclose(
        backbone(x, training=True), np.load(root / "expected.npz")["features"], rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="has no member 'head'"):
        bit_keras.SavedModelLayer(str(root / "cls"), member="head")
    plain = tf.Module()
    plain.v = tf.Variable(1.0)
    tf.saved_model.save(plain, str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="is not a Reusable SavedModel"):
        bit_keras.SavedModelLayer(str(tmp_path / "plain"))


def test_keras3_layer_in_mirrored_scope(exported):
    root, _ = exported
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        layer = bit_keras.SavedModelLayer(str(root / "fv"))
        model = keras.Sequential([keras.Input((32, 32, 3)), layer, keras.layers.Dense(3)])
        model.compile(
            keras.optimizers.SGD(0.01, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
    before = layer.weights[0].numpy().copy()
    images = np.random.default_rng(4).uniform(size=(8, 32, 32, 3)).astype(np.float32)
    model.fit(images, np.arange(8) % 3, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(before, layer.weights[0].numpy())


def test_mixed_precision_and_strategy_scope_exports(small_npz, tmp_path):
    x = np.random.default_rng(2).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    bf16 = bit_keras.create_model(small_npz, dtype="mixed_bfloat16")
    export(bf16, tmp_path / "bf16", "classification", CLASS_NAMES, image_size=32)
    loaded = tf.saved_model.load(str(tmp_path / "bf16"))
    assert loaded(x).dtype == tf.float32 and loaded.feature_vector(x).dtype == tf.float32
    # The same graph as the model traced by tf.function (eager bfloat16 rounds differently, at bfloat16's ~1e-2),
    # with the export's portable ops (the CPU's fused weight standardization rounds kernels differently).
    with portable_ops():
        reference = tf.function(lambda images: bf16(images, training=False))(x).numpy()
    assert np.abs(loaded(x).numpy() - reference).max() <= 1e-5 * np.abs(reference).max()
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        mirrored = bit_keras.create_model(small_npz)
        export(mirrored, tmp_path / "mirrored", "feature_vector")
    features = tf.saved_model.load(str(tmp_path / "mirrored"))(x)
    assert features.dtype == tf.float32
    reference = mirrored.feature_extractor(["pre_logits"])(x)["pre_logits"].numpy()
    assert np.abs(features.numpy() - reference).max() <= 1e-5 * np.abs(reference).max()


def test_exports_are_portable(small_npz, tmp_path, monkeypatch):
    """SavedModels hold no function XLA must compile (the group norm's kernel; tf2onnx leaves it unconverted) and
    no FusedBatchNormV3 (this CPU's fast weight standardization, whose epsilon cuDNN would clamp): every export
    kind and Keras' `Model.export`, all within 1e-5 of the Keras model. An in-process trace here holds both, and
    the writer refuses a graph that does."""
    from bit_keras.detection.export import export_detector
    from bit_keras.detection.retinanet import create_detector
    from bit_keras.serving.export import check_portable
    from tests.detection_helpers import SMALL

    model = bit_keras.create_model(small_npz)
    detector = create_detector(small_npz, 2, image_size=128, class_names=["a", "b"], **SMALL)
    spec = tf.TensorSpec((None, 32, 32, 3), tf.float32)
    traced = tf.function(model).get_concrete_function(spec).graph.as_graph_def().SerializeToString()
    assert b"FusedBatchNormV3" in traced and b"_XlaMustCompile" in traced
    export(model, tmp_path / "fv", "feature_vector")
    export(model, tmp_path / "cls", "classification", CLASS_NAMES, image_size=32)
    export_detector(detector, tmp_path / "det")
    model.export(str(tmp_path / "keras_export"), verbose=False)
    for kind in ("fv", "cls", "det", "keras_export"):
        graph = (tmp_path / kind / "saved_model.pb").read_bytes()
        assert b"Conv2D" in graph and b"FusedBatchNormV3" not in graph and b"_XlaMustCompile" not in graph, kind
        check_portable(tmp_path / kind)

    x = np.random.default_rng(8).uniform(size=(2, 128, 128, 3)).astype(np.float32)
    features = model.feature_extractor(["pre_logits"])(x)["pre_logits"].numpy()
    raw = tf.sigmoid(detector(x)["cls_logits"]).numpy()
    loaded = {kind: tf.saved_model.load(str(tmp_path / kind)) for kind in ("fv", "cls", "det", "keras_export")}
    for got, expected in (
        (loaded["fv"](x), features),
        (loaded["cls"](x), model(x).numpy()),
        (loaded["keras_export"].serve(x), model(x).numpy()),
        (loaded["det"].signatures["serving_default"](images=x)["raw_detection_scores"], raw),
    ):
        assert np.abs(got.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()

    def save(name, fn):
        module = tf.Module()
        module.fn = tf.function(fn, input_signature=[tf.TensorSpec([None, 3, 3, 4])])
        tf.saved_model.save(module, str(tmp_path / name))
        return tmp_path / name

    with pytest.raises(RuntimeError, match=r"xla: function \S+: (XLA must compile it|it calls \S+ with _XlaMustC)"):
        check_portable(save("xla", tf.function(lambda x: 2 * x, jit_compile=True)))
    ones, empty = tf.ones(4), tf.zeros([0])
    fused = lambda x: tf.raw_ops.FusedBatchNormV3(x=x, scale=ones, offset=0 * ones, mean=empty, variance=empty)[0]
    with pytest.raises(RuntimeError, match=r"fused: function \S+: it holds a training-mode FusedBatchNormV3 \("):
        check_portable(save("fused", fused), "fused")
    monkeypatch.setattr("bit_keras.serving.export.portable_ops", contextlib.nullcontext)  # a trace that slips
    with pytest.raises(RuntimeError, match=r"refused: function \S+: .*, which not every consumer runs .*: not export"):
        export(model, tmp_path / "refused", "feature_vector")
    assert not any(name.startswith(".refused") or name == "refused" for name in os.listdir(tmp_path))


def test_export_is_atomic_and_refuses_to_overwrite(small_npz, tmp_path, monkeypatch):
    model = bit_keras.create_model(small_npz)
    target = tmp_path / "exports" / "fv"
    export(model, target, "feature_vector")
    with pytest.raises(FileExistsError, match="exists"):
        export(model, target, "feature_vector")
    stamp = (target / "saved_model.pb").stat().st_mtime_ns

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.saved_model, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(model, target, "feature_vector", overwrite=True)
    assert (target / "saved_model.pb").stat().st_mtime_ns == stamp  # the old export is untouched
    assert sorted(os.listdir(tmp_path / "exports")) == ["fv"]  # and no temporary directory is left
    monkeypatch.undo()
    export(model, target, "feature_vector", overwrite=True)
    with pytest.raises(ValueError, match=r"needs 10 class names \(got 3\)$"):
        export(model, tmp_path / "x", "classification", ["a", "b", "c"], image_size=32)
    with pytest.raises(ValueError, match="needs a model with a head"):
        export(model.with_new_head(0), tmp_path / "x", "classification", [], image_size=32)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network (every name lookup and connection is recorded and refused) and an empty download cache."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(101, "Network is unreachable (the test's)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "empty_cache"))
    monkeypatch.delenv(download.DEADLINE_ENV, raising=False)
    return attempts


def test_offline_export_inputs(offline, small_npz, tmp_path, monkeypatch):
    """With the network unreachable: a feature vector of a zoo name with local weights downloads nothing; its
    classification takes "0".."N-1" with a note naming the URL and the alternatives; a bare .npz takes 224 with a
    note; a .keras file without its folder's files is one line naming all that is missing."""
    like_m_r50x1 = dataclasses.replace(zoo.CHECKPOINTS["BiT-M-R50x1"], name="BiT-M-R26x0.5", arch="R26x0.5")
    monkeypatch.setitem(zoo.CHECKPOINTS, "BiT-M-R26x0.5", dataclasses.replace(like_m_r50x1, num_classes=10))
    source = resolve_model("BiT-M-R26x0.5", weights=small_npz)
    assert export_inputs(source, "feature_vector") == (None, None, [])
    assert export_inputs(source, "feature_vector", format="onnx") == (None, 224, [])
    export(source.model, tmp_path / "fv", "feature_vector")
    assert offline == []  # no download attempted

    start = time.monotonic()
    class_names, image_size, (note,) = export_inputs(source, "classification")
    assert time.monotonic() - start < 5 and len(offline) == 1  # one attempt, failed at once
    assert (class_names, image_size) == ([str(i) for i in range(10)], 224)
    url = zoo.LABEL_SOURCES["imagenet21k"]
    assert note == (
        f'class names "0".."9": {url}: connection error: [Errno 101] Network is unreachable (the test\'s); the label '
        f"names of BiT-M-R26x0.5: pass labels=FILE, or put the file at {download.cached_path(url)} (the cache: "
        "$BIT_KERAS_CACHE)"
    )

    shipped = resolve_model("BiT-R14x0.5-mnist5k")
    assert export_inputs(shipped, "classification", "tflite") == ([str(i) for i in range(10)], 32, [])
    bare = resolve_model(small_npz)
    assert export_inputs(bare, "feature_vector", "onnx") == (
        None,
        224,
        ["image size 224, BiT's upstream resolution (r26x0_5_random records none): pass image_size for another"],
    )
    with pytest.raises(ValueError, match=r"^r26x0_5_random: the export needs labels \(labels=FILE, one class"):
        export_inputs(bare, "classification")
    bare.model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError) as refused:
        export_inputs(resolve_model(str(tmp_path / "m.keras")), "classification")
    assert str(refused.value) == (
        "m: the export needs labels (labels=FILE, one class name per line) and image_size (the side images are "
        "resized to)"
    )
    assert len(offline) == 1


def test_label_download_fails_within_seconds(tmp_path, monkeypatch):
    """A label server that accepts the connection and never answers: a one-line error after LABELS_DEADLINE_S."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/imagenet21k_wordnet_lemmas.txt"
    monkeypatch.setitem(zoo.LABEL_SOURCES, "imagenet21k", url)
    monkeypatch.setattr(presets, "LABELS_DEADLINE_S", 1)  # where label_names reads it (zoo re-exports it)
    monkeypatch.delenv(download.DEADLINE_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(download.DownloadError, match=r"^http://127\.0\.0\.1:\d+/imagenet21k_wordnet_lemmas\.txt: "):
        zoo.label_names("BiT-M-R50x1", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    silent.close()


def test_with_new_head(small_npz):
    model = bit_keras.create_model(small_npz)
    reheaded = model.with_new_head(4)
    assert reheaded.num_classes == 4 and not np.any(reheaded.get_layer("predictions").kernel.numpy())
    x = np.random.default_rng(3).uniform(size=(1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        reheaded.feature_extractor(["pre_logits"])(x)["pre_logits"],
        model.feature_extractor(["pre_logits"])(x)["pre_logits"],
    )


@pytest.fixture(scope="module")
def stripes_run(small_npz, tmp_path_factory):
    """A finished fine-tuning run of the small checkpoint on an image folder of stripes (16px, 20 steps)."""
    from bit_keras.training.finetune import finetune
    from tests.finetune_helpers import write_image_folder

    root = tmp_path_factory.mktemp("stripes_run")
    folder = write_image_folder(root / "images", n_per_class=4, size=16)
    result = finetune(
        image_folder=str(folder),
        model=small_npz,
        logdir=str(root / "runs"),
        name="stripes",
        resolution=16,
        batch=8,
        steps=20,
        base_lr=0.5,
        verbose=0,
    )
    return result.run_dir


def test_resolve_model_of_a_run(stripes_run, small_npz, tmp_path):
    source = resolve_model(stripes_run)
    assert (source.name, source.class_names, source.image_size) == ("stripes", ["bottom", "middle", "top"], 16)
    keras_file = resolve_model(os.path.join(stripes_run, "model.keras"))
    assert (keras_file.name, keras_file.class_names, keras_file.image_size) == ("model", source.class_names, 16)
    with pytest.raises(FileNotFoundError, match="must be a finished run, a preset or a model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="holds its weights already"):
        resolve_model(stripes_run, weights=small_npz)


def test_what_a_model_name_means(tmp_path, monkeypatch):
    from bit_keras.models.resolve import check_spec, kind_of

    monkeypatch.chdir(tmp_path)
    (tmp_path / "R50x1").mkdir()  # a folder named like an architecture does not shadow it
    assert [kind_of(s) for s in ("BiT-M-R50x1", "R50x1", "a/b.npz", "https://x/y", "m.keras")] == [
        "checkpoint",
        "architecture",
        "npz",
        "npz",
        "keras",
    ]
    with pytest.raises(ValueError, match="unknown model 'R51x1'"):
        kind_of("R51x1")
    with pytest.raises(ValueError, match="bit_pretrained_dir applies to checkpoint names only"):
        check_spec("R50x1", pretrained_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="BiT-S-R50x1.npz does not exist"):
        check_spec("BiT-S-R50x1", pretrained_dir=str(tmp_path))


def _cli_all(commands, cwd):
    """Run `bit-keras` command lines concurrently: [(returncode, stdout, stderr lines without TF's), ...]."""
    results = run_all([[*BIT_KERAS, *args] for args in commands], cwd, cwd / "cache")
    return [
        (r.returncode, r.stdout, [line for line in r.stderr.splitlines() if not TF_NOISE.match(line)]) for r in results
    ]


def test_cli_export_and_predict(stripes_run, tmp_path):
    from tests.finetune_helpers import stripes

    ((rc, out, err),) = _cli_all([["export", "--run", stripes_run]], tmp_path)
    assert rc == 0, err
    target = tmp_path / "exports" / "stripes" / "classification"
    assert out.strip() == f"wrote {target}: classification export of stripes"
    assert (target / "assets" / "labels.txt").read_text().split() == ["bottom", "middle", "top"]

    x, _ = stripes(1, size=16, seed=5)
    for i, image in enumerate(x):
        tf.io.write_file(str(tmp_path / f"{i}.png"), tf.io.encode_png(image))
    (tmp_path / "broken.png").write_bytes(b"nope")
    images = [str(tmp_path / f"{i}.png") for i in range(len(x))]
    again, json_export, json_keras, table, sized, broken = _cli_all(
        [
            ["export", "--run", stripes_run],
            ["predict", "--model", str(target), *images, "--json", "--top_k", "2"],
            ["predict", "--model", os.path.join(stripes_run, "model.keras"), *images, "--json", "--top_k", "2"],
            ["predict", "--model", str(target), images[0]],
            ["predict", "--model", str(target), images[0], "--image_size", "64"],
            ["predict", "--model", str(target), str(tmp_path / "broken.png")],
        ],
        tmp_path,
    )
    rc, _, err = again
    assert rc == 1 and "exists (pass --overwrite to replace it)" in err[0]
    rc, out, err = json_export
    assert rc == 0, err
    from_export = json.loads(out)
    assert [r["image"] for r in from_export] == images and all(len(r["predictions"]) == 2 for r in from_export)
    rc, out, err = json_keras
    assert rc == 0, err
    from_keras = json.loads(out)
    for a, b in zip(from_export, from_keras):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert a["predictions"][0]["probability"] == pytest.approx(b["predictions"][0]["probability"], abs=1e-4)
    rc, out, err = table
    assert rc == 0 and out.splitlines()[0] == images[0] and out.splitlines()[1].strip().startswith("1. ")
    rc, _, err = sized
    assert rc == 1 and "is an export: it has its own labels and image size" in err[0]
    rc, _, err = broken
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"bit-keras predict: {tmp_path / 'broken.png'}: not a readable image (Unknown image file")
    assert err[0].endswith("required.)")


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _examples(*commands, cwd):
    """Run example scripts (name, *args) concurrently; returns their stdouts."""
    argvs = [[sys.executable, os.path.join(EXAMPLES, name), *map(str, args)] for name, *args in commands]
    results = run_all(argvs, cwd, cwd)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return [result.stdout for result in results]


@pytest.mark.slow  # three example scripts in their own processes (~45 s); CI runs it in the slow step
def test_examples(exported, tmp_path):
    root, _ = exported
    hub_out, keras3_out, serving_out = _examples(
        ("finetune_hub_keras_layer_tf_keras.py", root / "fv", "--epochs", 1, "--train_examples", 64),
        (
            "finetune_saved_model_layer_keras3.py",
            root / "cls",
            "--member",
            "feature_vector",
            "--epochs",
            1,
            "--train_examples",
            64,
            "--out",
            tmp_path / "m.keras",
        ),
        ("serving_rest_request.py", root / "cls", root / "image.png", root / "image.png"),
        cwd=tmp_path,
    )
    assert re.search(r"test accuracy [01]\.\d{4}", hub_out)
    assert re.search(r"test accuracy [01]\.\d{4}; saved", keras3_out) and (tmp_path / "m.keras").exists()
    body = json.loads((tmp_path / "request.json").read_text())
    assert body["signature_name"] == "serving_bytes" and len(body["instances"]) == 2
    assert set(body["instances"][0]["image_bytes"]) == {"b64"}
    response = json.loads(serving_out)
    assert len(response["predictions"]) == 2 and response["predictions"][0]["labels"][0].startswith("class_")
