"""Training across processes: MirroredStrategy over 2 logical CPUs, 2-worker MultiWorkerMirroredStrategy on
127.0.0.1 (fine-tuning, pretraining and detection), exact resume after SIGKILL, the `bit-keras finetune`,
`pretrain` and `finetune-detector` command lines (the no-flag defaults and the examples are `slow`).

The strategy runs are independent, so one fixture starts all their processes at once and each test checks its own:
the TensorFlow start-up and tracing of one overlaps the others' training."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import bit_keras
from tests.detection_helpers import write_coco_folder
from tests.finetune_helpers import ROOT, write_image_folder
from tests.test_cli import BIT_KERAS, TF_NOISE, _env

pytestmark = pytest.mark.timeout(600)

RUN = """
import json, sys
import numpy as np
import tensorflow as tf
if {devices} > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * {devices})
from bit_keras.training.finetune import finetune
from bit_keras.training.strategy import make_strategy
from tests.finetune_helpers import stripes_data, weights_of
strategy = make_strategy({strategy!r})  # before any TensorFlow op, as multi-worker collectives need
result = finetune(
    data=stripes_data(), model={npz!r}, logdir={logdir!r}, name="run", strategy=strategy, resolution=16, batch=8,
    steps=6, eval_every=3, base_lr=0.1, mixup_alpha=0.2, verbose=0,
)
np.savez({out!r}, **weights_of(result.model))
print("METRICS", json.dumps(result.metrics))
"""


def _start(code, env=None):
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
    )


def _finish(proc, timeout=400):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("METRICS "))[8:])


def _weights(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


PRETRAIN_RUN = """
import json
import math
import numpy as np
from bit_keras.training.pretrain import pretrain
from bit_keras.training.strategy import make_strategy
from tests.finetune_helpers import stripes_data, weights_of
strategy = make_strategy("auto")  # MultiWorkerMirroredStrategy from TF_CONFIG, before any TensorFlow op
result = pretrain(
    data=stripes_data(), model="R26x0.5", logdir={logdir!r}, name="run", strategy=strategy, resolution=16, batch=8,
    epochs=2, decay_epochs=(1,), warmup_steps=1, base_lr=0.1, verbose=0,
)
np.savez({out!r}, **weights_of(result.model))
print("METRICS", json.dumps(result.metrics))
"""


DETECTION_RUN = """
import json, sys
import numpy as np
import tensorflow as tf
if {devices} > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * {devices})
from bit_keras.detection.finetune import finetune_detector
from bit_keras.training.strategy import make_strategy
from tests.detection_helpers import SMALL
from tests.finetune_helpers import weights_of
strategy = make_strategy({strategy!r})  # before any TensorFlow op, as multi-worker collectives need
result = finetune_detector(
    coco_folder={folder!r}, model="R14x0.5", logdir={logdir!r}, name="run", strategy=strategy, resolution=128,
    batch=4, steps=4, eval_every=2, seed=1, verbose=0, **SMALL,
)
np.savez({out!r}, **weights_of(result.model))
print("METRICS", json.dumps(result.metrics))
"""


def _start_two_workers(code):
    """Start `code(index)` as workers 0 and 1 of a TF_CONFIG cluster on 127.0.0.1."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(_start(code(index), env={"TF_CONFIG": tf_config}))
    return procs


def _finish_two_workers(procs, folder):
    """Wait for both workers (each saved its final weights to folder/w{index}.npz); checks both ran with 2 replicas
    and ended with identical weights; returns their metrics."""
    try:
        metrics = [_finish(proc) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [m["replicas"] for m in metrics] == [2, 2]
    chief, worker = _weights(folder / "w0.npz"), _weights(folder / "w1.npz")
    assert chief.keys() == worker.keys()
    for path in chief:
        np.testing.assert_array_equal(chief[path], worker[path], err_msg=path)
    return metrics


@pytest.fixture(scope="module")
def strategy_runs(small_npz, tmp_path_factory):
    """Every strategy run of this module, started at once: {name: (folder, processes)}."""
    runs = {}
    coco = write_coco_folder(str(tmp_path_factory.mktemp("coco") / "shapes"))
    for devices in (1, 2):  # a global batch of 4: 4 on the default strategy, or 2 replicas x 2 mirrored
        folder = tmp_path_factory.mktemp(f"detection{devices}")
        strategy = "mirrored" if devices > 1 else "default"
        code = DETECTION_RUN.format(
            devices=devices, folder=coco, logdir=str(folder), strategy=strategy, out=str(folder / "w.npz")
        )
        runs[f"detection{devices}"] = (folder, [_start(code)])
    folder = tmp_path_factory.mktemp("detection_workers")
    runs["detection_workers"] = (
        folder,
        _start_two_workers(
            lambda i: DETECTION_RUN.format(
                devices=1, folder=coco, logdir=str(folder / "runs"), strategy="auto", out=str(folder / f"w{i}.npz")
            )
        ),
    )
    for devices in (1, 2):  # the same global batch of 8: 8 on the default strategy, or 2 replicas x 4 mirrored
        folder = tmp_path_factory.mktemp(f"mirrored{devices}")
        strategy = "mirrored" if devices > 1 else "default"
        code = RUN.format(
            devices=devices, npz=small_npz, logdir=str(folder), strategy=strategy, out=str(folder / "w.npz")
        )
        runs[f"devices{devices}"] = (folder, [_start(code)])
    folder = tmp_path_factory.mktemp("finetune_workers")
    runs["finetune_workers"] = (
        folder,
        _start_two_workers(
            lambda i: RUN.format(
                devices=1, npz=small_npz, logdir=str(folder / "runs"), strategy="auto", out=str(folder / f"w{i}.npz")
            )
        ),
    )
    pretrain_folder = tmp_path_factory.mktemp("pretrain_workers")
    runs["pretrain_workers"] = (
        pretrain_folder,
        _start_two_workers(
            lambda i: PRETRAIN_RUN.format(logdir=str(pretrain_folder / "runs"), out=str(pretrain_folder / f"w{i}.npz"))
        ),
    )
    yield runs
    for _, procs in runs.values():
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_mirrored_two_logical_cpus_equals_one_device(strategy_runs, small_npz, tmp_path):
    """Same global batch of 8: 2 replicas x 4 under MirroredStrategy, or 8 on the default strategy."""
    metrics = {devices: _finish(strategy_runs[f"devices{devices}"][1][0]) for devices in (1, 2)}
    assert metrics[1]["replicas"] == 1 and metrics[2]["replicas"] == 2
    initial = {w.path: w.numpy() for w in keras.saving.load_model(_save_initial(small_npz, tmp_path)).weights}
    one, two = (_weights(strategy_runs[f"devices{d}"][0] / "w.npz") for d in (1, 2))
    moved = 0
    for path, value in one.items():
        assert np.abs(value - two[path]).max() <= 1e-5 * (np.abs(value).max() + 1e-12), path
        moved += not np.array_equal(value, initial[path])
    assert moved > len(one) // 2  # training moved most weights, so the comparison means something
    for a, b in zip(metrics[1]["evals"], metrics[2]["evals"]):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_detection_mirrored_two_logical_cpus_equals_one_device(strategy_runs):
    """Same global batch of 4: the focal loss is normalized by the positive anchors of the global batch, so 2
    replicas x 2 images train as 4 images on one device."""
    metrics = {devices: _finish(strategy_runs[f"detection{devices}"][1][0]) for devices in (1, 2)}
    assert metrics[1]["replicas"] == 1 and metrics[2]["replicas"] == 2
    one, two = (_weights(strategy_runs[f"detection{d}"][0] / "w.npz") for d in (1, 2))
    for path, value in one.items():
        # Within 1e-4 of each tensor's scale, or 1e-6 absolute: the group norms' betas of the early blocks start at 0
        # and move ~2e-4 in 4 steps, their gradients sums of cancelling terms; replicas' rounding moves them ~4e-7
        # while the losses agree to ~3e-7 (checked below).
        np.testing.assert_allclose(two[path], value, rtol=1e-4, atol=1e-6, err_msg=path)
    for a, b in zip(metrics[1]["evals"], metrics[2]["evals"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


def test_detection_multi_worker_two_processes(strategy_runs):
    folder, procs = strategy_runs["detection_workers"]
    metrics = _finish_two_workers(procs, folder)
    assert metrics[0]["test_ap"] == metrics[1]["test_ap"] and metrics[0]["replicas"] == 2
    assert (folder / "runs" / "run" / "detections.png").exists()


def _save_initial(npz, tmp_path):
    """The model fine-tuning starts from (the checkpoint with a new zero head), as a .keras file."""
    path = tmp_path / "initial.keras"
    bit_keras.create_model(npz, num_classes=3).save(path)
    return path


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_two_processes(strategy_runs):
    folder, procs = strategy_runs["finetune_workers"]
    metrics = _finish_two_workers(procs, folder)
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    # Only the chief wrote the run folder.
    assert sorted(os.listdir(folder / "runs")) == ["run"]
    assert json.loads((folder / "runs" / "run" / "metrics.json").read_text())["replicas"] == 2


def test_multi_worker_pretraining_two_processes(strategy_runs):
    folder, procs = strategy_runs["pretrain_workers"]
    metrics = _finish_two_workers(procs, folder)
    assert metrics[0]["steps"] == 6
    assert (folder / "runs" / "run" / "checkpoint.npz").exists()


def _cli(args, cwd, cache, command="finetune"):
    return subprocess.Popen(
        [*BIT_KERAS, command, *args],
        cwd=cwd,
        env=_env(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def resume_after_sigkill(tmp_path, command, args, steps, eval_every):
    """Run `bit-keras COMMAND ARGS` whole and, in parallel, SIGKILLed after its first checkpoint and restarted;
    both must end with identical weights and evaluations."""
    whole = _cli([*args, "--name", "whole"], tmp_path, tmp_path / "cache", command)
    killed = _cli([*args, "--name", "killed"], tmp_path, tmp_path / "cache", command)
    state = tmp_path / "runs" / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    saved = json.loads(state.read_text())
    assert eval_every <= saved["step"] < steps, "the run finished before it could be killed"
    assert not (tmp_path / "runs" / "killed" / "metrics.json").exists()

    resumed = _cli([*args, "--name", "killed"], tmp_path, tmp_path / "cache", command)
    for proc in (whole, resumed):
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        assert len(out.splitlines()) == 1 and out.startswith("test "), out[-2000:]  # --quiet: the result line only
    a = keras.saving.load_model(tmp_path / "runs" / "whole" / "model.keras")
    b = keras.saving.load_model(tmp_path / "runs" / "killed" / "model.keras")
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=wa.path)
    evals = [json.loads((tmp_path / "runs" / n / "metrics.json").read_text())["evals"] for n in ("whole", "killed")]
    assert [e["step"] for e in evals[1]] == list(range(eval_every, steps + 1, eval_every))  # earlier evals kept
    for x, y in zip(*evals):
        headline = "test_ap" if "test_ap" in x else "test_accuracy"
        assert (x[headline], x["train_loss"], x["test_loss"]) == (y[headline], y["train_loss"], y["test_loss"])


def test_resume_after_sigkill_is_exact(small_npz, tmp_path):
    folder = str(write_image_folder(tmp_path / "images", n_per_class=10, size=32))
    args = ["--image_folder", folder, "--model", small_npz, "--logdir", str(tmp_path / "runs"), "--batch", "8"]
    args += ["--steps", "40", "--eval_every", "10", "--resolution", "32", "--mixup_alpha", "0.2", "--quiet"]
    resume_after_sigkill(tmp_path, "finetune", args, steps=40, eval_every=10)


def test_detection_resume_after_sigkill_is_exact(tmp_path):
    folder = write_coco_folder(str(tmp_path / "shapes"))
    args = ["--coco_folder", folder, "--model", "R14x0.5", "--logdir", str(tmp_path / "runs"), "--batch", "4"]
    args += ["--steps", "12", "--eval_every", "4", "--resolution", "128", "--quiet"]
    args += ["--fpn_channels", "32", "--head_channels", "32", "--head_depth", "1"]
    resume_after_sigkill(tmp_path, "finetune-detector", args, steps=12, eval_every=4)


def test_cli_bad_input(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    (folder / "top" / "broken.png").write_bytes(b"not an image")
    cases = {
        "unknown_dataset": (["--dataset", "no_such_dataset"], "unknown tensorflow-datasets dataset 'no_such_dataset'"),
        "broken_image": (
            ["--image_folder", str(folder), "--model", "BiT-R14x0.5-mnist5k"],  # the default would be probed first
            f"{folder / 'top' / 'broken.png'}: not a readable",
        ),
    }
    procs = {
        name: _cli([*args, "--logdir", str(tmp_path / name)], tmp_path, tmp_path / "cache")
        for name, (args, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=200)
        lines = [line for line in err.splitlines() if not TF_NOISE.match(line)]
        assert proc.returncode == 1, err[-2000:]
        assert len(lines) == 1 and lines[0].startswith("bit-keras finetune: ") and cases[name][1] in lines[0], lines
        assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_cli_default_run_reaches_90_percent(tmp_path):
    """The README's main command: no flags, offline, the shipped small BiT on the embedded digits."""
    proc = _cli([], tmp_path, tmp_path / "cache")
    out, err = proc.communicate(timeout=580)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "runs" / "digits-BiT-R14x0.5-mnist5k"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "BiT-R14x0.5-mnist5k" and metrics["test_accuracy"] >= 0.9
    assert f"test accuracy {metrics['test_accuracy']:.4f}" in out
    assert (run / "model.keras").exists()


def test_pretrain_resume_after_sigkill_is_exact(tmp_path):
    folder = str(write_image_folder(tmp_path / "images", n_per_class=16, size=32))
    args = ["--image_folder", folder, "--model", "R26x0.5", "--logdir", str(tmp_path / "runs"), "--batch", "8"]
    args += ["--epochs", "8", "--decay_epochs", "6", "--warmup_steps", "5", "--resolution", "32", "--base_lr", "0.1"]
    args += ["--eval_every", "8", "--quiet"]
    resume_after_sigkill(tmp_path, "pretrain", args, steps=32, eval_every=8)  # 39 training images: 4 steps an epoch


@pytest.mark.slow
def test_normalization_ablation_example(tmp_path):
    """The ablation script end to end (one epoch each: the full default run takes ~9 min), plot included."""
    import os
    import subprocess
    import sys

    from tests.finetune_helpers import ROOT

    script = os.path.join(ROOT, "examples", "normalization_ablation.py")
    proc = subprocess.run(
        [sys.executable, script, "--epochs", "1", "--logdir", str(tmp_path / "runs"), "--out", str(tmp_path / "a.png")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "test accuracy" in line]
    assert [line.split()[0] for line in lines] == ["GroupNorm", "BatchNorm"]
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_few_shot_table_example(small_npz, tmp_path):
    import os
    import subprocess
    import sys

    from tests.finetune_helpers import ROOT

    script = os.path.join(ROOT, "examples", "few_shot_table.py")
    args = [
        "--pretrained",
        small_npz,
        "--shots",
        "1",
        "2",
        "--seeds",
        "0",
        "--steps",
        "10",
        "--out",
        str(tmp_path / "t.md"),
    ]
    proc = subprocess.run(
        [sys.executable, script, *args, "--logdir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "t.md").read_text().splitlines()
    assert table[0] == (
        "| examples per class | R26x0.5-random fine-tuned, base lr 0.003 | R26x0.5-random fine-tuned, base lr 0.03 "
        "| R26x0.5 from scratch, base lr 0.1 |"
    )
    assert [row.split("|")[1].strip() for row in table[2:4]] == ["1", "2"] and "±" in table[2]


@pytest.mark.slow
def test_cli_detector_default_run_reaches_ap50_of_80_percent(tmp_path):
    """`bit-keras finetune-detector --logdir T --name demo`: no data flag, offline, the shipped small BiT as the
    backbone of a RetinaNet on the digit canvases."""
    proc = _cli(["--logdir", str(tmp_path / "T"), "--name", "demo"], tmp_path, tmp_path / "cache", "finetune-detector")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "T" / "demo"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "BiT-R14x0.5-mnist5k" and metrics["data"] == "digit-canvases"
    assert metrics["test_ap50"] >= 0.8, metrics["test_ap50"]
    assert f"test ap {metrics['test_ap']:.4f}" in out
    for name in ("model.keras", "detections.png", "curves.png", "train.log"):
        assert (run / name).exists(), name


@pytest.mark.slow
def test_detection_transfer_table_example(tmp_path):
    import subprocess
    import sys

    script = os.path.join(ROOT, "examples", "detection_transfer_table.py")
    args = ["--seeds", "0", "--steps", "8", "--logdir", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "t.md").read_text()
    assert "| BiT-R14x0.5-mnist5k backbone, fine-tuned |" in table and "| R14x0.5 from scratch |" in table
    assert "| BiT-L | 43.8 |" in table


@pytest.mark.slow
def test_multi_worker_command_line_two_processes(tmp_path):
    """The README's multi-worker launch: two `bit-keras finetune` processes with TF_CONFIG on 127.0.0.1 train one
    model with 2 replicas (the command sets up the collectives before anything initializes the devices); the chief
    writes the run folder, the other worker its checkpoints to a private temporary one: the same weights."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    args = ["--logdir", str(tmp_path / "runs"), "--name", "two", "--steps", "6", "--eval_every", "3", "--batch", "16"]
    procs = []
    for index in range(2):
        scratch = tmp_path / f"tmp{index}"  # where a worker's temporary run folder goes
        scratch.mkdir()
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = {**_env(tmp_path / "cache"), "TF_CONFIG": tf_config, "TMPDIR": str(scratch)}
        procs.append(
            subprocess.Popen(
                [*BIT_KERAS, "finetune", *args, "--quiet"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=500)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            proc.kill()
    metrics = json.loads((tmp_path / "runs" / "two" / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and os.listdir(tmp_path / "runs") == ["two"]
    # The other worker saved its checkpoints (model, then optimizer variables) but publishes nothing.
    (worker_run,) = [p for p in (tmp_path / "tmp1").iterdir() if p.name.startswith("bit_keras_worker_")]
    chief = keras.saving.load_model(tmp_path / "runs" / "two" / "model.keras")
    with np.load(worker_run / "checkpoint" / "step-6.npz") as worker:
        for i, weight in enumerate(chief.weights):
            np.testing.assert_array_equal(weight.numpy(), worker[f"arr_{i}"], err_msg=weight.path)
