"""Distillation by function matching: the loss against a float64 numpy KL, teacher and student fed the identical
augmented tensor, exact resume after SIGKILL, MirroredStrategy against one device, the Python and command-line
entry points, bad input; the no-flag default (fine-tuning its teacher first) is `slow`."""

import json
import os

import keras
import numpy as np
import pytest

import bit_keras
from bit_keras.training import engine
from bit_keras.training.distill import DistillRecipe, FunctionMatching
from tests.test_cli import BIT_KERAS, _env, message_lines, run_in_process
from tests.test_processes import _finish, _start, _weights, resume_after_sigkill

SHIPPED = "BiT-R14x0.5-mnist5k"  # a 10-class digit classifier inside the package: the teacher of these tests
SMALL = ["--teacher", SHIPPED, "--student", "R14x0.5", "--batch", "8", "--resolution", "16"]


def _numpy_kl(teacher, student, t):
    """t**2 * sum over examples of KL(softmax(teacher / t) || softmax(student / t)), in float64."""

    def log_softmax(x):
        x = np.asarray(x, np.float64) / t
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(teacher), log_softmax(student)
    return t**2 * np.sum(np.exp(log_p) * (log_p - log_q))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_is_the_kl_divergence_of_a_float64_reference(temperature):
    rng = np.random.default_rng(0)
    outputs = {
        "student": rng.normal(size=(16, 10)).astype("float32") * 3,
        "teacher": rng.normal(size=(16, 10)).astype("float32") * 5,
    }
    labels = np.eye(10, dtype="float32")[rng.integers(0, 10, 16)]
    objective = FunctionMatching(temperature)
    loss = float(objective.loss_sum(labels, outputs) / objective.count(labels))
    expected = _numpy_kl(outputs["teacher"], outputs["student"], temperature) / 16
    assert expected > 0.1
    assert loss == pytest.approx(expected, rel=1e-6)
    same = {"student": outputs["teacher"], "teacher": outputs["teacher"]}
    assert float(objective.loss_sum(labels, same)) == 0.0  # log p - log p, exactly


def _recipe_parts(teacher_input):
    recipe = DistillRecipe(
        teacher=SHIPPED, student=SHIPPED, steps=10, teacher_input=teacher_input, embedded=True, mixup_alpha=None
    )
    options = engine.RunOptions(batch=8, base_lr=0.03, resolution=16)
    data = recipe.load_data(options)
    plan = recipe.plan(data, options)
    model = recipe.build_model(data, plan, options)
    model.student.set_weights(model.teacher.get_weights())  # one function: equal inputs give equal outputs
    images, _ = next(iter(recipe.train_batches(data, plan, options, start_step=3)))
    return plan, model, images


def test_teacher_and_student_receive_the_identical_augmented_tensor():
    """With the student's weights set to the teacher's, the two outputs are bit-identical on a MixUp-ed,
    inception-cropped training batch only if both were given the same tensor; the fixed teacher's plain view (the
    control) makes them differ."""
    plan, model, images = _recipe_parts("same")
    assert plan.config["mixup_alpha"] == 1.0
    outputs = model(images, training=True)
    student, teacher = (keras.ops.convert_to_numpy(outputs[k]) for k in ("student", "teacher"))
    assert np.abs(teacher).max() > 1  # a trained head, not zeros
    np.testing.assert_array_equal(student, teacher)

    _, model, (augmented, plain) = _recipe_parts("fixed")
    assert np.abs(keras.ops.convert_to_numpy(augmented - plain)).max() > 0.1  # the augmentation changed them
    outputs = model((augmented, plain), training=True)
    assert not np.array_equal(*(keras.ops.convert_to_numpy(outputs[k]) for k in ("student", "teacher")))


def test_resume_after_sigkill_is_exact(tmp_path):
    args = [*SMALL, "--steps", "12", "--eval_every", "4", "--quiet"]
    resume_after_sigkill(tmp_path, "distill", args, steps=12, eval_every=4)


DISTILL_RUN = """
import json
import numpy as np
import tensorflow as tf
if {devices} > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * {devices})
import bit_keras
from tests.finetune_helpers import weights_of
result = bit_keras.distill(
    teacher="BiT-R14x0.5-mnist5k", student="R14x0.5", logdir={logdir!r}, name="run", strategy={strategy!r},
    resolution=16, batch=8, steps=6, eval_every=3, verbose=0,
)
np.savez({out!r}, **weights_of(result.model))
print("METRICS", json.dumps(result.metrics))
"""


def test_mirrored_two_logical_cpus_equals_one_device(tmp_path):
    """The same global batch of 8: 2 replicas x 4 under MirroredStrategy, or 8 on one device; the Python entry point
    returns the student with the data's classes and the run's input size."""
    procs = {}
    for devices, strategy in ((1, "default"), (2, "mirrored")):
        code = DISTILL_RUN.format(
            devices=devices,
            logdir=str(tmp_path / str(devices)),
            strategy=strategy,
            out=str(tmp_path / f"{devices}.npz"),
        )
        procs[devices] = _start(code)
    metrics = {devices: _finish(proc) for devices, proc in procs.items()}
    assert (metrics[1]["replicas"], metrics[2]["replicas"]) == (1, 2)
    one, two = _weights(tmp_path / "1.npz"), _weights(tmp_path / "2.npz")
    assert one.keys() == two.keys()
    for path, value in one.items():
        np.testing.assert_allclose(two[path], value, rtol=0, atol=1e-5 * (np.abs(value).max() + 1e-12), err_msg=path)
    losses = [e["test_loss"] for e in metrics[1]["evals"]]
    assert losses[0] != losses[-1]  # training moved the student, so the equality below means something
    for a, b in zip(metrics[1]["evals"], metrics[2]["evals"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
        assert a["test_teacher_accuracy"] == b["test_teacher_accuracy"]
    final = metrics[1]
    assert {"test_accuracy", "test_teacher_accuracy", "test_agreement"} <= final.keys()
    assert final["teacher"] == SHIPPED and final["model"] == "R14x0.5" and final["mixup_alpha"] == 1.0
    student = keras.saving.load_model(tmp_path / "1" / "run" / "model.keras")
    assert isinstance(student, bit_keras.BiTImageClassifier) and student.image_size == 16
    assert student.class_names == [str(i) for i in range(10)]


def _classifier_file(tmp_path, num_classes):
    path = tmp_path / f"teacher{num_classes}.keras"
    bit_keras.create_model("R14x0.5", num_classes=num_classes).save(path)
    return path


def test_bad_input_is_one_line_before_any_folder(tmp_path):
    three = _classifier_file(tmp_path, 3)
    cases = {
        ("--temperature", "0"): "--temperature must be a positive finite number",
        ("--temperature", "nan"): "--temperature must be a positive finite number",
        ("--temperature", "-1"): "--temperature must be a positive finite number",
        ("--steps", "0"): "--steps must be",
        ("--mixup_alpha", "-0.5"): "--mixup_alpha must be",
        ("--weight_decay", "nan"): "--weight_decay must be",
        ("--warmup_steps", "20", "--steps", "20"): "--warmup_steps (20) must be below the 20 steps",
        ("--teacher_input", "fixed", "--mixup_alpha", "0.5"): "pass --mixup_alpha 0",
        ("--teacher", str(tmp_path / "missing.keras")): "missing.keras",
        ("--teacher", str(three)): "has 3 classes, the data digits 10 (--teacher)",
        (
            "--teacher",
            "R14x0.5",
        ): "an architecture without trained weights; a teacher is a trained classifier (--teacher)",
    }
    for args, message in cases.items():
        argv = ["distill", *SMALL, *args, "--logdir", tmp_path / "runs"]
        result = run_in_process(argv)
        assert result.returncode != 0, args
        lines = message_lines(result.stderr)
        assert len(lines) == 1 and message in lines[0], (args, lines)
    # Without --teacher the default teacher, missing here, would be fine-tuned first: bad input stops before that.
    result = run_in_process(["distill", "--warmup_steps", "500", "--logdir", tmp_path / "runs"])
    (line,) = message_lines(result.stderr)
    assert result.returncode != 0 and "--warmup_steps (500) must be below the 500 steps" in line, line
    assert sorted(os.listdir(tmp_path)) == ["teacher3.keras"]


def test_fixed_teacher_runs_without_mixup(tmp_path):
    result = bit_keras.distill(
        teacher=SHIPPED,
        student="R14x0.5",
        teacher_input="fixed",
        resolution=32,
        batch=8,
        steps=4,
        eval_every=2,
        batch_split=2,
        logdir=str(tmp_path),
        verbose=0,
    )
    assert result.metrics["mixup_alpha"] == 0.0 and result.metrics["teacher_input"] == "fixed"
    assert os.path.basename(result.run_dir) == "digits-R14x0.5-from-BiT-R14x0.5-mnist5k"
    assert result.metrics["test_teacher_accuracy"] > 0.5  # the MNIST model on the digits; chance 0.1
    options = json.loads((tmp_path / "digits-R14x0.5-from-BiT-R14x0.5-mnist5k" / "run.json").read_text())["options"]
    assert options["warmup_steps"] == 0 and options["teacher"] == SHIPPED


@pytest.mark.slow
def test_default_run_fine_tunes_its_teacher_first_offline(tmp_path):
    """`bit-keras distill` with no flags in an empty folder: the main job's run is missing, so it is fine-tuned first
    (saying so), then the R14x0.5 student is distilled from it; all offline."""
    import subprocess

    proc = subprocess.run(
        [*BIT_KERAS, "distill"], cwd=tmp_path, env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "fine-tuning it first" in text
    teacher = json.loads((tmp_path / "runs" / "digits-BiT-R14x0.5-mnist5k" / "metrics.json").read_text())
    run = tmp_path / "runs" / "digits-R14x0.5-from-digits-BiT-R14x0.5-mnist5k"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_teacher_accuracy"] == pytest.approx(teacher["test_accuracy"])
    assert metrics["steps"] == 500 and metrics["test_accuracy"] > 0.5 and metrics["test_agreement"] > 0.5


@pytest.mark.slow
def test_distillation_table_example(tmp_path):
    """examples/distillation_table.py on one seed and a few steps: its four students, as a Markdown table."""
    import subprocess
    import sys

    from tests.finetune_helpers import ROOT

    script = os.path.join(ROOT, "examples", "distillation_table.py")
    args = [
        "--seeds",
        "0",
        "--steps",
        "5",
        "--teacher",
        SHIPPED,
        "--logdir",
        tmp_path / "runs",
        "--out",
        tmp_path / "t.md",
    ]
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "t.md").read_text().splitlines()
    assert table[0] == "| student | command | seed 0 | mean ± std |"
    students = [row.split("|")[1].strip() for row in table[2:6]]
    assert students == ["labels only", "labels only, base lr 0.3", "function matching", "fixed teacher"]
    assert sorted(os.listdir(tmp_path / "runs")) == ["fixed-seed0", "labels-lr-seed0", "labels-seed0", "matching-seed0"]
