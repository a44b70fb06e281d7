"""Upstream pretraining: a short real run, its official-layout checkpoint, multi-label data, preprocessing."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import bit_keras
from bit_keras.data import pipeline, sources
from bit_keras.models.resolve import PRESET_FILES
from bit_keras.training.pretrain import pretrain
from tests.finetune_helpers import stripes_data

pytestmark = pytest.mark.timeout(600)

# What a pretraining run folder and its metrics.json held before the run engine was unified (kept, added to).
RUN_FILES = {
    "run.json",
    "tensorboard",
    "model.keras",
    "curves.png",
    "checkpoint.npz",
    "metrics.json",
    ".lock",  # the run-folder lock's file (unlocked: the kernel holds no lock on it)
    *PRESET_FILES,  # the model as a keras-hub preset, carrying its class names and input size
}
METRICS_KEYS = {
    "name", "test_accuracy", "metric", "evals", "steps", "wall_s", "images_per_s", "replicas", "batch_split", "xla",
    "data", "num_train", "model", "normalization", "weight_standardization", "loss", "recipe", "resolution",
    "eval_every", "seed", "mixed_precision",
}  # fmt: skip

SHORT = dict(model="R26x0.5", resolution=16, batch=8, epochs=4, decay_epochs=(3,), warmup_steps=2, verbose=0)


def test_pretrain_run_and_checkpoint(tmp_path):
    result = pretrain(data=stripes_data(n_train=16), logdir=str(tmp_path), base_lr=0.1, **SHORT)
    metrics = json.loads((tmp_path / "stripes-R26x0.5-bit-m" / "metrics.json").read_text())
    assert metrics == result.metrics and metrics["metric"] == "accuracy" and metrics["loss"] == "softmax"
    assert set(metrics) >= METRICS_KEYS and RUN_FILES | {"train.log"} == set(os.listdir(result.run_dir))
    assert "upstream bit-m: 4 epochs of 6 steps" in (tmp_path / "stripes-R26x0.5-bit-m" / "train.log").read_text()
    assert metrics["recipe"]["steps_per_epoch"] == 6 and [e["step"] for e in metrics["evals"]] == [6, 12, 18, 24]
    assert metrics["recipe"]["lr"] == pytest.approx(0.1 * 8 / 256) and metrics["recipe"]["weight_decay"] == 1e-4
    assert metrics["evals"][-1]["learning_rate"] == pytest.approx(metrics["recipe"]["lr"] / 10)
    assert metrics["evals"][-1]["train_loss"] < metrics["evals"][0]["train_loss"]
    # The official-layout checkpoint loads through create_model like a zoo file.
    loaded = bit_keras.create_model(os.path.join(result.run_dir, "checkpoint.npz"))
    x = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), result.model(x), atol=1e-5)


def test_multi_label_data_trains_with_sigmoid(tmp_path):
    d = stripes_data(n_train=8)
    multi_hot = lambda x, y: (x, tf.one_hot(y, 3) + tf.one_hot((y + 1) % 3, 3))
    d = sources.Data(
        d.train.map(multi_hot), d.test.map(multi_hot), d.class_names, d.num_train, "arrays", (8, 8), "pairs"
    )
    result = pretrain(data=d, logdir=str(tmp_path), **SHORT)
    assert result.metrics["loss"] == "sigmoid" and result.metrics["metric"] == "precision_at_1"
    assert 0 <= result.metrics["test_accuracy"] <= 1


def test_batchnorm_ablation_model(tmp_path):
    result = pretrain(
        data=stripes_data(), logdir=str(tmp_path), normalization="batch", weight_standardization=False, **SHORT
    )
    backbone = result.model.backbone
    assert backbone.normalization == "batch" and not backbone.weight_standardization
    assert "pre_head_norm" in [layer.name for layer in backbone.layers]


def test_upstream_preprocessing():
    image = np.random.default_rng(1).integers(0, 255, size=(40, 60, 3)).astype(np.uint8)
    ds = tf.data.Dataset.from_tensors((image, np.int64(0)))
    batches = pipeline.train_batches(ds, 24, 24, batch_size=16, seed=0, inception_crop=True, steps=2)
    x = np.concatenate([b.numpy() for b, _ in batches])
    assert x.shape == (32, 24, 24, 3) and x.min() >= 0 and x.max() <= 1
    assert len({round(float(v), 4) for v in x.mean(axis=(1, 2, 3))}) > 16  # boxes of varying area and place
    ((center, _),) = pipeline.eval_batches(ds, 24, batch_size=1, center_crop=True)
    # Shorter side 40 -> 24 / 0.875 = 27.43 -> 27, longer 60 -> 41; the central 24x24 of that.
    resized = tf.image.resize(tf.image.convert_image_dtype(image, tf.float32), (27, 41))
    np.testing.assert_allclose(center[0], resized[1:25, 8:32], atol=1e-6)


def test_pretrain_needs_data_and_a_known_preset(tmp_path):
    with pytest.raises(ValueError, match="pretrain needs data"):
        pretrain(logdir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown schedule 'bit-z'"):
        pretrain(data=stripes_data(), logdir=str(tmp_path), schedule="bit-z")
    with pytest.raises(ValueError, match="unknown schedule 'bit-z'"):  # the earlier name of schedule
        pretrain(data=stripes_data(), logdir=str(tmp_path), preset="bit-z")
    with pytest.raises(ValueError, match="preset is the earlier name of schedule: give one of them"):
        pretrain(data=stripes_data(), logdir=str(tmp_path), preset="bit-s", schedule="bit-l")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        pretrain(data=stripes_data(), logdir=str(tmp_path), mixed_precision="int8")
    assert not list(tmp_path.iterdir())  # refused before any run folder exists


def test_preset_is_the_earlier_name_of_schedule(caplog, tmp_path):
    """`preset` still works and says it is now `schedule`; both given and different is refused."""
    with pytest.raises(ValueError, match="preset is the earlier name of schedule: give one of them"):
        pretrain(data=stripes_data(), schedule="bit-m", preset="bit-s", logdir=str(tmp_path))
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="batch must be a positive integer"):
        pretrain(data=stripes_data(), preset="bit-s", batch=0, logdir=str(tmp_path))  # warned, then checked
    assert "preset is now called schedule (the same values); preset still works" in caplog.text
    assert not tmp_path.joinpath("stripes-R50x1-bit-s").exists()
