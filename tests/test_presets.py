"""BiT as keras-hub ships models: every zoo checkpoint a preset of `BiTBackbone` / `BiTImageClassifier` (its name and
alias), loaded from the official `.npz`; `save_to_preset` and a finished run folder loaded by keras-hub's own base
classes in a fresh process with the class names and input size they carry; export and predict with nothing beside
the model."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bit_keras
from bit_keras.models import presets, zoo
from bit_keras.models.backbone import BiTBackbone
from bit_keras.models.classifier import BiTImageClassifier
from tests.finetune_helpers import ROOT
from tests.official_npz import write_npz
from tests.reference_bit import reference_forward
from tests.test_cli import run_in_process

pytestmark = pytest.mark.timeout(600)


def test_every_zoo_checkpoint_is_a_preset_by_name_and_alias():
    for cls in (BiTBackbone, BiTImageClassifier):
        listed = cls.presets
        for preset in zoo.CHECKPOINTS.values():
            assert preset.name in listed and preset.alias in listed, preset.name
            assert listed[preset.name]["metadata"]["official_name"] == preset.name
    assert presets.find("bit_m_r50x1_ilsvrc2012") is zoo.CHECKPOINTS["BiT-M-R50x1-ILSVRC2012"]
    assert zoo.Checkpoint is presets.Preset  # the record's earlier name


def test_shipped_preset_offline():
    classifier = BiTImageClassifier.from_preset("BiT-R14x0.5-mnist5k")
    assert classifier.class_names == [str(i) for i in range(10)] and classifier.image_size == 32
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    same = bit_keras.create_model("BiT-R14x0.5-mnist5k", weights="pretrained")
    np.testing.assert_array_equal(classifier(x), same(x))
    backbone = BiTBackbone.from_preset("bit_r14x0_5_mnist5k")
    assert backbone(x).shape == (2, 1, 1, 1024)


def test_official_name_from_a_local_official_npz_matches_the_float64_reference(tmp_path, small_params):
    """An official preset name (its architecture borrowed for the test's small random checkpoint) from
    `pretrained_dir/NAME.npz`: the reference's logits within 5e-5, the labels from a file, a new head on request."""
    preset = presets.Preset("BiT-S-R26x0.5", "R26x0.5", "test", 10, 64, "https://127.0.0.1:1/none.npz", "imagenet1k")
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    write_npz(pretrained / "BiT-S-R26x0.5.npz", small_params)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"c{i}\n" for i in range(10)))
    presets.PRESETS[preset.name] = preset
    try:
        classifier = BiTImageClassifier.from_preset(preset.name, pretrained_dir=str(pretrained), labels=str(labels))
        x = np.random.default_rng(3).uniform(0, 1, (2, 64, 64, 3)).astype("float32")
        expected = reference_forward(small_params, x, block_units=(2, 2, 2, 2), width=0.5)["logits"]
        got = np.asarray(classifier(x), np.float64)
        assert np.abs(got - expected).max() <= 5e-5 * np.abs(expected).max()
        assert classifier.class_names == [f"c{i}" for i in range(10)] and classifier.image_size == 64
        fresh = BiTImageClassifier.from_preset(preset.name, pretrained_dir=str(pretrained), num_classes=3)
        assert fresh.class_names is None and not np.asarray(fresh(x)).any()  # a zero head
    finally:
        del presets.PRESETS[preset.name]


FRESH = """
import json, sys
import numpy as np
import bit_keras, keras_hub
classifier = keras_hub.models.ImageClassifier.from_preset(sys.argv[1])
backbone = keras_hub.models.Backbone.from_preset(sys.argv[1])
x = np.load(sys.argv[2])
raw = (np.random.default_rng(0).uniform(0, 1, (2, 45, 37, 3)) * 255).astype("uint8")
print(json.dumps({
    "class": type(classifier).__name__, "backbone": type(backbone).__name__,
    "class_names": classifier.class_names, "image_size": classifier.image_size,
    "logits": np.asarray(classifier(x)).tolist(), "raw": np.asarray(classifier.predict(raw, verbose=0)).tolist(),
}))
"""


def _load_in_fresh_process(preset_dir, x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": "tensorflow"}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(preset_dir), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_save_to_preset_loads_in_a_fresh_process_through_keras_hub(tmp_path):
    classifier = BiTImageClassifier.from_preset("BiT-R14x0.5-mnist5k")
    classifier.save_to_preset(str(tmp_path / "preset"))
    x = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    loaded = _load_in_fresh_process(tmp_path / "preset", x, tmp_path)
    assert (loaded["class"], loaded["backbone"]) == ("BiTImageClassifier", "BiTBackbone")
    assert loaded["class_names"] == classifier.class_names and loaded["image_size"] == 32
    np.testing.assert_allclose(loaded["logits"], classifier(x), atol=1e-6)
    assert np.asarray(loaded["raw"]).shape == (2, 10)


def _png(path, rng, size=(40, 48)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished fine-tuning run of an image folder (3 classes of 40x48 images) on the shipped model."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cat"):
        for i in range(5):
            _png(root / "images" / name / f"{i}.png", rng)
    result = bit_keras.finetune(
        image_folder=str(root / "images"),
        model="BiT-R14x0.5-mnist5k",
        resolution=32,
        steps=5,
        batch=6,
        logdir=str(root / "runs"),
        name="insects",
        verbose=0,
    )
    return root, result


def test_a_finished_run_folder_is_a_preset_directory(finished_run, tmp_path):
    result = finished_run[1]
    run = result.run_dir
    assert not os.path.exists(os.path.join(run, "class_names.txt"))  # the model carries them
    x = np.random.default_rng(2).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    loaded = _load_in_fresh_process(run, x, tmp_path)
    assert loaded["class_names"] == ["ant", "bee", "cat"] and loaded["image_size"] == 32
    np.testing.assert_allclose(loaded["logits"], result.model(x), atol=1e-6)
    again = BiTImageClassifier.from_preset(run)
    assert again.class_names == ["ant", "bee", "cat"]


def test_export_and_predict_need_nothing_beside_the_model(finished_run, tmp_path):
    """The run folder copied without its metrics and logs: export and predict ask the model for its class names and
    input size."""
    root, result = finished_run
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in os.listdir(result.run_dir):
        if name not in ("metrics.json", "run.json", "train.log", "curves.png", "tensorboard", ".lock"):
            src = os.path.join(result.run_dir, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, bare / name)
    image = os.path.join(root, "images", "bee", "0.png")
    predicted = run_in_process(["predict", "--model", bare, image, "--json", "--top_k", "3"])
    assert predicted.returncode == 0, predicted.stderr
    (found,) = json.loads(predicted.stdout)
    assert sorted(p["label"] for p in found["predictions"]) == ["ant", "bee", "cat"]
    exported = run_in_process(["export", "--model", bare, "--out", tmp_path / "export"])
    assert exported.returncode == 0, exported.stderr
    labels = (tmp_path / "export" / "assets" / "labels.txt").read_text().split()
    assert labels == ["ant", "bee", "cat"]
    served = run_in_process(["predict", "--model", tmp_path / "export", image, "--json", "--top_k", "3"])
    assert json.loads(served.stdout)[0]["predictions"][0]["label"] == found["predictions"][0]["label"]
