"""Fine-tuning in-process: the run folder, micro-batching, freezing, mixed precision, tfds, bad input.

Strategies (Mirrored, MultiWorkerMirrored) and the SIGKILL resume run in subprocesses: test_processes.py.
"""

import contextlib
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import bit_keras
from bit_keras.data import pipeline
from bit_keras.models.layers import portable_ops
from bit_keras.models.resolve import PRESET_FILES
from bit_keras.training.finetune import finetune
from bit_keras.training.run_folder import RunFolder
from bit_keras.training.trainer import MomentumSGD, Trainer
from tests.finetune_helpers import CLASSES, ROOT, stripes_data, weights_of, write_image_folder

pytestmark = pytest.mark.timeout(600)

# What a fine-tuning run folder and its metrics.json held before the run engine was unified (kept, added to).
# The model carries its class names now: the run folder is a keras-hub preset directory instead of class_names.txt.
RUN_FILES = {"run.json", "tensorboard", "model.keras", "curves.png", "metrics.json", ".lock", *PRESET_FILES}
METRICS_KEYS = {
    "name", "test_accuracy", "evals", "steps", "wall_s", "images_per_s", "num_train", "num_test", "dataset_size",
    "dataset_size_source", "replicas", "batch_split", "xla", "data", "examples_per_class", "examples_per_class_seed",
    "model", "eval_every", "seed", "trainable_from", "mixed_precision", "hyperrule",
}  # fmt: skip
EVAL_KEYS = {"step", "test_accuracy", "test_loss", "train_loss", "train_accuracy", "learning_rate"}

# A short run of the small random checkpoint on 8x8 stripes: 16px crops, batch 8, 6 steps.
FAST = dict(resolution=16, batch=8, steps=6, eval_every=3, verbose=0)


def test_run_folder(small_npz, tmp_path):
    result = finetune(data=stripes_data(), model=small_npz, logdir=str(tmp_path), name="run", base_lr=0.5, **FAST)
    run = tmp_path / "run"
    assert result.run_dir == str(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == result.metrics
    assert set(metrics) >= METRICS_KEYS and all(set(e) == EVAL_KEYS for e in metrics["evals"])
    assert RUN_FILES | {"train.log"} == set(os.listdir(run))
    assert [e["step"] for e in metrics["evals"]] == [3, 6]
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["test_accuracy"] == metrics["evals"][-1]["test_accuracy"]
    assert metrics["wall_s"] > 0 and metrics["images_per_s"] > 0
    assert (metrics["dataset_size"], metrics["dataset_size_source"], metrics["num_test"]) == (24, "arrays", 12)
    assert metrics["hyperrule"]["supports"] == [1, 2, 4, 5, 6] and metrics["hyperrule"]["crop"] == 16
    assert metrics["hyperrule"]["lr"] == pytest.approx(0.5 * 8 / 512)
    assert bit_keras.BiTImageClassifier.from_preset(str(run)).class_names == CLASSES  # the run folder is a preset
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(files for _, _, files in os.walk(run / "tensorboard"))
    assert not (run / "checkpoint").exists()  # the training state goes once the model is saved
    # The log file has the HyperRule, every evaluation and the final accuracy, timestamped.
    log = (run / "train.log").read_text()
    assert "BiT-HyperRule for 24 training examples" in log and "step 3/6: train loss" in log
    assert f"test accuracy {metrics['test_accuracy']:.4f} after 6 steps" in log
    assert all(line[:4].isdigit() and " INFO " in line for line in log.splitlines())
    # The saved model is the trained one, and its test accuracy is the reported one.
    loaded = keras.saving.load_model(run / "model.keras")
    assert loaded.num_classes == 3
    test_images = stripes_data().test.map(lambda x, y: x).batch(12).get_single_element()
    images = tf.image.resize(tf.image.convert_image_dtype(test_images, tf.float32), (16, 16))
    np.testing.assert_allclose(loaded(images), result.model(images), atol=1e-6)
    labels = np.array([y for _, y in stripes_data().test.as_numpy_iterator()])
    accuracy = np.mean(np.argmax(loaded(images), -1) == labels)
    assert accuracy == pytest.approx(metrics["test_accuracy"])
    # A finished run is not overwritten by accident.
    with pytest.raises(ValueError, match="finished run.*overwrite to start this one afresh"):
        finetune(data=stripes_data(), model=small_npz, logdir=str(tmp_path), name="run", **FAST)
    again = finetune(data=stripes_data(), model=small_npz, logdir=str(tmp_path), name="run", overwrite=True, **FAST)
    assert again.metrics["evals"][0]["step"] == 3


def test_learns_and_new_head_is_zero(small_npz, tmp_path):
    """The pretrained head (10 classes) is replaced by a zero head of 3; the stripes are learnt."""
    before = bit_keras.create_model(small_npz, num_classes=3)
    assert not np.any(before.output_dense.kernel.numpy())
    result = finetune(
        data=stripes_data(n_train=16),
        model=small_npz,
        logdir=str(tmp_path),
        resolution=16,
        batch=16,
        steps=20,
        eval_every=10,
        base_lr=0.5,
        verbose=0,
    )
    evals = result.metrics["evals"]
    assert evals[-1]["train_loss"] < 0.5 * np.log(3)
    assert result.metrics["test_accuracy"] >= 0.9


def _trainer(model_path, split, lr=1e-3):
    model = bit_keras.create_model(model_path, num_classes=3)
    trainer = Trainer(model, batch_split=split)
    trainer.compile_sgd(lr, momentum=0.9)
    return trainer


def check_batch_split_equals_unsplit(npz, ops, steps):
    """`batch_split=4` trains the same weights as the whole batch over `steps` steps (module-level: the test runs
    it in a fresh process)."""
    d = stripes_data()
    batches = pipeline.train_batches(d.train, 17, 16, batch_size=8, seed=0, num_classes=3, mixup_alpha=0.2, steps=steps)
    finals = {}
    for split in (1, 4):
        trainer = _trainer(npz, split)
        initial = weights_of(trainer.model)
        with portable_ops() if ops == "portable" else contextlib.nullcontext():
            history = trainer.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False).history
        finals[split] = weights_of(trainer.model), history
    (one, history_one), (four, history_four) = finals[1], finals[4]
    assert history_one["loss"][0] == pytest.approx(history_four["loss"][0], rel=1e-5)
    moved = 0
    for path in one:
        scale = np.abs(one[path]).max() + 1e-12
        assert np.abs(one[path] - four[path]).max() <= 1e-5 * scale, path
        delta = np.abs(one[path] - initial[path]).max()
        if delta > 0:
            moved += 1
            tolerance = 1e-3 * delta + 4 * np.spacing(scale)  # the updates agree, not only the weights
            assert np.abs(one[path] - four[path]).max() <= tolerance, path
    assert moved > len(one) // 2


# The 4-step case as before this session's fused weight standardization, on the portable ops it then used;
# the fused path over 2 steps: its rounding flipped a ReLU input near zero at a 4th step, after which updates
# differ by ~3.5e-3 although single-step gradients of the split and unsplit batches agree to ~2e-7.
# A fresh process each: the 4-step case ends within 1.3x of its tolerance, and where the last bits land depends
# on what the process ran before (it passes alone and fails right after an in-process run with evaluation).
@pytest.mark.parametrize("ops,steps", [("portable", 4), ("fused", 2)])
def test_batch_split_equals_unsplit(small_npz, ops, steps):
    code = "from tests.test_finetune import check_batch_split_equals_unsplit as check\n"
    code += f"check({small_npz!r}, {ops!r}, {steps})"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_sgd_is_keras_sgd(nesterov):
    """The fused momentum kernel gives Keras' SGD updates bit for bit, on a schedule, in a strategy scope too."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)).astype(np.float32), rng.normal(size=(32, 3)).astype(np.float32)
    initial = [rng.normal(size=s).astype(np.float32) for s in ((8, 16), (16,), (16, 3), (3,))]
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
    results = {}
    for optimizer in (keras.optimizers.SGD, MomentumSGD):
        with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, "relu"), keras.layers.Dense(3)])
            model.set_weights(initial)
            model.compile(optimizer(schedule, momentum=0.9, nesterov=nesterov), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        results[optimizer] = model.get_weights() + [m.numpy() for m in model.optimizer.momentums]
    for ours, keras_sgd in zip(results[MomentumSGD], results[keras.optimizers.SGD], strict=True):
        np.testing.assert_array_equal(ours, keras_sgd)
    assert not np.array_equal(results[MomentumSGD][0], initial[0])


def test_batch_split_must_divide(small_npz):
    trainer = _trainer(small_npz, 3)
    batch = (tf.zeros((8, 16, 16, 3)), tf.one_hot([0] * 8, 3))
    with pytest.raises(ValueError, match="per-replica batch 8 is not divisible by batch_split=3"):
        trainer.fit(tf.data.Dataset.from_tensors(batch), verbose=0, shuffle=False)
    spec = (tf.TensorSpec([None, 16, 16, 3]), tf.TensorSpec([None, 3]))
    unknown_size = tf.data.Dataset.from_generator(lambda: [batch], output_signature=spec)
    assert unknown_size.element_spec[0].shape[0] is None
    with pytest.raises(tf.errors.InvalidArgumentError, match="divisible by batch_split=3"):
        trainer.fit(unknown_size, verbose=0, shuffle=False)
    with pytest.raises(ValueError, match="must split evenly"):
        finetune(data=stripes_data(), model="R26x0.5", batch=8, batch_split=3, logdir="unused", verbose=0)


@pytest.mark.parametrize("trainable_from", ["block3", "head"])
def test_freezing(small_npz, tmp_path, trainable_from):
    before = weights_of(bit_keras.create_model(small_npz, num_classes=3))
    kwargs = {"freeze_backbone": True} if trainable_from == "head" else {"trainable_from": trainable_from}
    result = finetune(data=stripes_data(), model=small_npz, logdir=str(tmp_path), base_lr=1.0, **FAST, **kwargs)
    after = weights_of(result.model)
    # The backbone's layers in order, then the classifier's head.
    layers = [*result.model.backbone.layers, result.model.output_dense]
    order = [layer.name for layer in result.model.backbone.layers] + ["head"]
    first_trained = next(i for i, name in enumerate(order) if name.startswith(trainable_from))
    for layer, name in zip(layers, order):
        changed = [not np.array_equal(before[w.path], after[w.path]) for w in layer.weights]
        if not changed:
            continue
        if order.index(name) < first_trained:
            assert not any(changed), f"{name} is frozen but changed"
        elif name.startswith(("block", "head")):
            assert any(changed), f"{name} is trainable but did not change"
        assert all(w.trainable == (order.index(name) >= first_trained) for w in layer.weights)
    assert result.metrics["trainable_from"] == trainable_from
    assert result.metrics["evals"][-1]["train_loss"] < np.log(3)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision(small_npz, tmp_path, precision):
    result = finetune(data=stripes_data(), model=small_npz, logdir=str(tmp_path), mixed_precision=precision, **FAST)
    loaded = keras.saving.load_model(os.path.join(result.run_dir, "model.keras"))
    assert loaded.backbone.get_layer("root_conv").dtype_policy.name == f"mixed_{precision}"
    assert loaded.output_dense.kernel.dtype == "float32"
    assert loaded(tf.zeros((1, 16, 16, 3))).dtype == "float32"
    assert 0 <= result.metrics["test_accuracy"] <= 1
    assert result.metrics["evals"][-1]["train_loss"] < np.log(3)


@pytest.mark.slow  # an XLA compile of the train step (~35 s)
def test_xla_single_device(small_npz, tmp_path):
    result = finetune(data=stripes_data(), model=small_npz, logdir=str(tmp_path), xla=True, base_lr=0.5, **FAST)
    assert result.metrics["evals"][-1]["train_loss"] < np.log(3)


def test_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        result = finetune(
            "cifar10", model="R26x0.5", logdir=str(tmp_path), resolution=16, batch=4, steps=5, eval_every=5, verbose=0
        )
    metrics = result.metrics
    assert metrics["data"] == "cifar10" and metrics["num_train"] == 12 and metrics["dataset_size_source"] == "counted"
    assert metrics["num_test"] == 12 and metrics["hyperrule"]["resize"] == 17
    assert len(keras.saving.load_model(tmp_path / "cifar10-R26x0.5" / "model.keras").class_names) == 10


def test_dataset_size_flag_and_log(tmp_path, caplog, small_npz):
    """A given dataset size drives the HyperRule (MixUp from 20k examples on), and the log says so."""
    result = finetune(
        data=stripes_data(),
        model=small_npz,
        logdir=str(tmp_path),
        dataset_size=30_000,
        examples_per_class=4,
        **{**FAST, "verbose": 1},
    )
    out = caplog.text
    assert "dataset_size=30,000 (given)" in out and "MixUp alpha 0.1" in out
    assert "scaled by batch/512: 0.003 x 8/512" in out
    assert "12 training examples (few-shot)" in out and result.metrics["num_train"] == 12
    assert result.metrics["dataset_size_source"] == "flag" and result.metrics["hyperrule"]["mixup_alpha"] == 0.1


def test_small_data_is_said_and_clamped(tmp_path, caplog, small_npz):
    """3 classes x 10 images of 24px: the log says how the folder was split (--test_fraction), clamps the
    HyperRule's batch of 512 to the 21 training images (lr scaled to it) and warns of the 5x upsampling."""
    folder = write_image_folder(tmp_path / "images", n_per_class=10, size=24)
    result = finetune(
        image_folder=str(folder), test_fraction=0.3, model=small_npz, logdir=str(tmp_path), steps=5, eval_every=5
    )
    out = caplog.text
    assert "3 classes, 21 training and 9 test images (a stratified 30% per class held out for testing, seed 0)" in out
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "batch 512 is larger than the 21 training examples: clamped to 21 (lr scaled to it); the schedule's 5 steps "
        "are ~5 epochs",
        "the 128px crops upsample the 24x24 images 5x (the HyperRule's size for small images); resolution sets a "
        "smaller one",
    ]
    rule = result.metrics["hyperrule"]
    assert (rule["batch"], rule["lr"], result.metrics["num_test"]) == (21, pytest.approx(0.003 * 21 / 512), 9)
    assert "batch 21 = 1 x 1 x 21" in out


# --- bad input: a clear error naming the item, and no run folder claiming success ------------------------------


def test_unreadable_image(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    bad = folder / "top" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=f"{bad}: not a readable"):
        finetune(image_folder=str(folder), model="R26x0.5", logdir=str(tmp_path / "runs"), **FAST)
    assert not (tmp_path / "runs").exists()


def test_image_with_corrupt_body(tmp_path):
    """A valid PNG header over a corrupt body passes the scan and fails in training: the error names the file."""
    folder = write_image_folder(tmp_path / "images")
    png = tf.io.encode_png(tf.zeros((8, 8, 3), tf.uint8)).numpy()
    bad = folder / "middle" / "corrupt.png"
    bad.write_bytes(png[:33] + b"\x00\x00\x00\x10IDAT" + b"not zlib data!!!" + b"\x00" * 4 + png[-12:])
    with pytest.raises(ValueError, match=f"{bad}: the image does not decode"):
        finetune(image_folder=str(folder), model="R26x0.5", logdir=str(tmp_path / "runs"), name="run", **FAST)
    assert not (tmp_path / "runs" / "run" / "metrics.json").exists()


def test_empty_class_folder(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    os.makedirs(folder / "zebra")
    with pytest.raises(ValueError, match=f"class folder {folder / 'zebra'} contains no images"):
        finetune(image_folder=str(folder), model="R26x0.5", logdir=str(tmp_path / "runs"), **FAST)
    assert not (tmp_path / "runs").exists()


def test_unknown_tfds_name(tmp_path):
    with pytest.raises(ValueError, match="unknown tensorflow-datasets dataset 'no_such_dataset'"):
        finetune("no_such_dataset", model="R26x0.5", logdir=str(tmp_path), **FAST)
    assert not list(tmp_path.iterdir())


def test_checkpoint_of_another_class_count(small_npz, tmp_path, monkeypatch):
    """A run that stopped after a checkpoint cannot be resumed with data of another class count."""

    def crash(*args):
        raise KeyboardInterrupt("stopped before finishing")

    monkeypatch.setattr(RunFolder, "finish", crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(data=stripes_data(), model=small_npz, logdir=str(tmp_path), name="run", **FAST)
    monkeypatch.undo()
    checkpoint = tmp_path / "run" / "checkpoint"
    assert (checkpoint / "state.json").exists() and not (tmp_path / "run" / "metrics.json").exists()
    with pytest.raises(
        ValueError, match=f"{checkpoint}: the data changed since this checkpoint was written \\(and with it class_names"
    ):
        finetune(data=stripes_data(classes=4), model=small_npz, logdir=str(tmp_path), name="run", **FAST)
    assert not (tmp_path / "run" / "metrics.json").exists()
    # The same data resumes it: nothing is left to train, so it only finishes.
    result = finetune(data=stripes_data(), model=small_npz, logdir=str(tmp_path), name="run", **FAST)
    assert [e["step"] for e in result.metrics["evals"]] == [3, 6]


def test_resume_on_changed_data_is_refused(small_npz, tmp_path, monkeypatch):
    """run.json fingerprints the image folder: an image overwritten or added after the checkpoint refuses the resume
    by name; the folder as it was resumes it."""
    folder = write_image_folder(tmp_path / "images")
    run = dict(image_folder=str(folder), model=small_npz, logdir=str(tmp_path), name="run", **FAST)
    monkeypatch.setattr(RunFolder, "finish", lambda *args: sys.exit("stopped before finishing"))
    with pytest.raises(SystemExit):
        finetune(**run)
    monkeypatch.undo()
    image, other = sorted((folder / "top").iterdir())[0], sorted((folder / "middle").iterdir())[0]
    before, stat = image.read_bytes(), image.stat()
    changed = f"{tmp_path / 'run' / 'checkpoint'}: the data changed since this checkpoint was written"
    image.write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match=changed):
        finetune(**run)
    image.write_bytes(before)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (folder / "top" / "added.png").write_bytes(before)
    with pytest.raises(ValueError, match=changed):
        finetune(**run)
    (folder / "top" / "added.png").unlink()
    result = finetune(**run)
    assert [e["step"] for e in result.metrics["evals"]] == [3, 6]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data_fingerprint"]["kind"] == "image_folder"


def test_bad_choices():
    with pytest.raises(ValueError, match="trainable_from must be one of"):
        finetune(data=stripes_data(), model="R26x0.5", trainable_from="block9")
    with pytest.raises(ValueError, match="contradicts trainable_from='block2'"):
        finetune(data=stripes_data(), model="R26x0.5", freeze_backbone=True, trainable_from="block2")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        finetune(data=stripes_data(), model="R26x0.5", mixed_precision="int8")
    with pytest.raises(ValueError, match="unknown strategy"):
        finetune(data=stripes_data(), model="R26x0.5", strategy="horovod")
    with pytest.raises(ValueError, match="data_dir applies to a tfds dataset only; test_split applies"):
        finetune(data=stripes_data(), model="R26x0.5", data_dir="/tmp", test_split="validation")
    with pytest.raises(ValueError, match="data_dir applies to a tfds dataset only"):
        finetune("digits", model="R26x0.5", data_dir="/tmp")  # a bundled dataset is not read from tfds
    with pytest.raises(ValueError, match="bit_pretrained_dir applies to checkpoint names only, not 'R26x0.5'"):
        finetune(data=stripes_data(), model="R26x0.5", bit_pretrained_dir="/tmp")
    with pytest.raises(ValueError, match="TPU address is for the tpu strategy, not 'mirrored'"):
        finetune(data=stripes_data(), model="R26x0.5", strategy="mirrored", tpu="local")
    with pytest.raises(FileNotFoundError, match="BiT-M-R50x1.npz does not exist"):
        finetune(data=stripes_data(), model="BiT-M-R50x1", bit_pretrained_dir="/nonexistent", verbose=0)


def test_damaged_run_files_are_named_and_metrics_are_strict_json(tmp_path):
    """A cut-short run.json or state.json is a one-line error naming the file; NaN never reaches a JSON file."""
    import json

    from bit_keras.training.run_folder import strict_json

    run = RunFolder(str(tmp_path / "run"))
    run.start({"a": 1})
    state = os.path.join(run.checkpoint_dir, "state.json")
    with open(state, "w") as f:
        f.write('{"step": 1')
    with pytest.raises(ValueError, match=f"^{re.escape(state)} is not valid JSON .*pass overwrite to start"):
        run.prepare({"a": 1})
    with open(state, "w") as f:
        json.dump({"step": 1, "weights": "step-1.npz", "evals": []}, f)
    with open(os.path.join(run.path, "run.json"), "w") as f:
        f.write("")
    with pytest.raises(ValueError, match=f"^{re.escape(os.path.join(run.path, 'run.json'))} is not valid JSON"):
        run.prepare({"a": 1})
    run._write_json(str(tmp_path / "m.json"), {"x": float("nan"), "y": [1.0, float("inf")], "z": 2.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": None, "y": [1.0, None], "z": 2.5}
    assert "NaN" not in (tmp_path / "m.json").read_text() and strict_json((float("-inf"),)) == [None]
