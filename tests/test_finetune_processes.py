"""Fine-tuning across processes: MirroredStrategy over 2 logical CPUs, 2-worker MultiWorkerMirroredStrategy on
127.0.0.1, exact resume after SIGKILL, and the `bit-keras finetune` command line (its no-flag default is `slow`)."""

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


def test_mirrored_two_logical_cpus_equals_one_device(small_npz, tmp_path):
    """Same global batch of 8: 2 replicas x 4 under MirroredStrategy, or 8 on the default strategy."""
    procs = {
        devices: _start(
            RUN.format(
                devices=devices,
                npz=small_npz,
                logdir=str(tmp_path / f"d{devices}"),
                strategy="mirrored" if devices > 1 else "default",
                out=str(tmp_path / f"w{devices}.npz"),
            )
        )
        for devices in (1, 2)
    }
    metrics = {devices: _finish(proc) for devices, proc in procs.items()}
    assert metrics[1]["replicas"] == 1 and metrics[2]["replicas"] == 2
    initial = {w.path: w.numpy() for w in keras.saving.load_model(_save_initial(small_npz, tmp_path)).weights}
    one, two = _weights(tmp_path / "w1.npz"), _weights(tmp_path / "w2.npz")
    moved = 0
    for path, value in one.items():
        assert np.abs(value - two[path]).max() <= 1e-5 * (np.abs(value).max() + 1e-12), path
        moved += not np.array_equal(value, initial[path])
    assert moved > len(one) // 2  # training moved most weights, so the comparison means something
    for a, b in zip(metrics[1]["evals"], metrics[2]["evals"]):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


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


def run_two_workers(code, tmp_path):
    """Run `code(index)` as workers 0 and 1 of a TF_CONFIG cluster on 127.0.0.1; each saves its final weights to
    tmp_path/w{index}.npz. Checks both ran with 2 replicas and ended with identical weights; returns their metrics."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(_start(code(index), env={"TF_CONFIG": tf_config}))
    try:
        metrics = [_finish(proc) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [m["replicas"] for m in metrics] == [2, 2]
    chief, worker = _weights(tmp_path / "w0.npz"), _weights(tmp_path / "w1.npz")
    assert chief.keys() == worker.keys()
    for path in chief:
        np.testing.assert_array_equal(chief[path], worker[path], err_msg=path)
    return metrics


def test_multi_worker_two_processes(small_npz, tmp_path):
    code = lambda index: RUN.format(
        devices=1, npz=small_npz, logdir=str(tmp_path / "runs"), strategy="auto", out=str(tmp_path / f"w{index}.npz")
    )
    metrics = run_two_workers(code, tmp_path)
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    # Only the chief wrote the run folder.
    assert sorted(os.listdir(tmp_path / "runs")) == ["run"]
    assert json.loads((tmp_path / "runs" / "run" / "metrics.json").read_text())["replicas"] == 2


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
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
    a = keras.saving.load_model(tmp_path / "runs" / "whole" / "model.keras")
    b = keras.saving.load_model(tmp_path / "runs" / "killed" / "model.keras")
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=wa.path)
    evals = [json.loads((tmp_path / "runs" / n / "metrics.json").read_text())["evals"] for n in ("whole", "killed")]
    assert [e["step"] for e in evals[1]] == list(range(eval_every, steps + 1, eval_every))  # earlier evals kept
    for x, y in zip(*evals):
        assert (x["test_accuracy"], x["train_loss"]) == (y["test_accuracy"], y["train_loss"])


def test_resume_after_sigkill_is_exact(small_npz, tmp_path):
    folder = str(write_image_folder(tmp_path / "images", n_per_class=10, size=64))
    args = ["--image_folder", folder, "--model", small_npz, "--logdir", str(tmp_path / "runs"), "--batch", "8"]
    args += ["--steps", "60", "--eval_every", "10", "--resolution", "64", "--mixup_alpha", "0.2", "--quiet"]
    resume_after_sigkill(tmp_path, "finetune", args, steps=60, eval_every=10)


def test_cli_bad_input(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    (folder / "top" / "broken.png").write_bytes(b"not an image")
    cases = {
        "unknown_dataset": (["--dataset", "no_such_dataset"], "unknown tensorflow-datasets dataset 'no_such_dataset'"),
        "broken_image": (["--image_folder", str(folder)], f"{folder / 'top' / 'broken.png'}: not a readable"),
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
