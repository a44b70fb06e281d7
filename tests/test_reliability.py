"""Reliability with real processes: one run per folder (the lock), a non-finite loss stopping a run, a full disk
(a file-size limit, RLIMIT_FSIZE) stopping a run cleanly, temporaries of killed runs removed by the next one."""

import json
import math
import os
import re
import resource
import signal
import socket
import subprocess
import time

import pytest

from tests.test_cli import BIT_KERAS, TF_NOISE, _env
from tests.test_processes import _cli

pytestmark = pytest.mark.timeout(600)


def test_one_run_per_folder(tmp_path):
    """A second run on a folder in use is refused by name (holder included); the lock dies with its holder."""
    args = ["--logdir", str(tmp_path / "runs"), "--name", "dup", "--steps", "400", "--eval_every", "200", "--quiet"]
    first = _cli(args, tmp_path, tmp_path / "cache")
    config = tmp_path / "runs" / "dup" / "run.json"
    deadline = time.time() + 120
    while not config.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = _cli(args, tmp_path, tmp_path / "cache")
    _, err = second.communicate(timeout=200)
    lines = [line for line in err.splitlines() if not TF_NOISE.match(line)]
    assert second.returncode == 1 and len(lines) == 1, err[-2000:]
    assert f"{tmp_path / 'runs' / 'dup'} is in use by another run (pid {first.pid} on " in lines[0]
    assert first.poll() is None, "the first run must still be training"
    first.send_signal(signal.SIGKILL)
    first.communicate()
    # The dead holder's lock is gone: a new run takes the folder (afresh, with a short schedule) and finishes.
    third = _cli(
        [*args[:4], "--steps", "10", "--eval_every", "10", "--quiet", "--overwrite"], tmp_path, tmp_path / "cache"
    )
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-2000:]
    assert (tmp_path / "runs" / "dup" / "metrics.json").exists()


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    """A loss that becomes NaN stops the run with one line naming the step; the last good checkpoint is kept and
    no metrics.json (with bare NaN) is written."""
    args = ["--logdir", str(tmp_path / "runs"), "--name", "nan", "--steps", "40", "--eval_every", "2", "--quiet"]
    proc = _cli([*args, "--base_lr", "1e30"], tmp_path, tmp_path / "cache")
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if not TF_NOISE.match(line)]
    assert proc.returncode == 1 and len(lines) == 1, err[-2000:]
    match = re.search(r"the training loss became (nan|inf) at step (\d+): the run stopped \((.*)\)", lines[0])
    assert match, lines[0]
    run = tmp_path / "runs" / "nan"
    assert not (run / "metrics.json").exists()
    state = json.loads((run / "checkpoint" / "state.json").read_text())  # the evaluation at step 2 saved one
    assert f"the checkpoint of step {state['step']} is kept" in match[3] and state["step"] < int(match[2])
    assert all(math.isfinite(e["train_loss"]) for e in state["evals"])
    assert (run / "checkpoint" / state["weights"]).exists()


def _file_size_limit(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_full_disk_stops_the_run_with_one_line_and_the_next_run_cleans_up(tmp_path):
    """Under a file-size limit too small for a checkpoint (as a full disk), the run exits 1 with one line naming the
    checkpoint file and the cause, leaves no temporary file, and no segfault; the same command without the limit
    then trains from the start and finishes, after removing what a killed run left half-written."""
    args = ["--logdir", str(tmp_path / "runs"), "--name", "full", "--steps", "5", "--eval_every", "5", "--batch", "8"]
    args.append("--quiet")
    limited = subprocess.run(
        [*BIT_KERAS, "finetune", *args],
        cwd=tmp_path,
        env=_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(2_000_000),  # the shipped model's checkpoint (weights + momentum) is ~16 MB
    )
    lines = [line for line in limited.stderr.splitlines() if not TF_NOISE.match(line)]
    assert limited.returncode == 1 and len(lines) == 1, limited.stderr[-3000:]
    checkpoint = tmp_path / "runs" / "full" / "checkpoint"
    assert f"{checkpoint / 'step-5.npz'}: cannot write (File too large); nothing was replaced" in lines[0]
    assert sorted(os.listdir(checkpoint)) == []
    # What a SIGKILLed writer leaves (this host, a pid that is gone), removed by the next run under its lock.
    dead = f"{socket.gethostname()}-{2**22 + 17}"
    left = [checkpoint / f".step-5.npz.tmp-{dead}", tmp_path / "runs" / "full" / f".model.keras.tmp-{dead}.keras"]
    for path in left:
        path.write_bytes(b"partial")
    rerun = _cli(args, tmp_path, tmp_path / "cache")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert not any(path.exists() for path in left)
    assert not [name for name in os.listdir(tmp_path / "runs" / "full") if ".tmp-" in name]


def test_a_failed_checkpoint_keeps_the_previous_one(tmp_path):
    """A checkpoint that cannot be written (file-size limit) raises DiskFullError naming it; the previous checkpoint
    and its state stay and restore exactly (in a child process, where the limit is set)."""
    script = f"""
import os, resource
import numpy as np
import keras
from bit_keras import files
from bit_keras.models.zoo import create_model
from bit_keras.training.run_folder import RunFolder
from bit_keras.training.trainer import Trainer

model = create_model("R14x0.5", num_classes=3)
trainer = Trainer(model)
trainer.compile_sgd(0.1, 0.9)
trainer.optimizer.build(trainer.trainable_variables)
run = RunFolder({str(tmp_path / "run")!r})
run.start({{}})
run.save(trainer, {{"step": 2, "evals": []}})
saved = [np.array(v.numpy()) for v in trainer.model.weights]
for v in trainer.model.weights:
    v.assign(v + 1.0)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    run.save(trainer, {{"step": 4, "evals": []}})
except files.DiskFullError as err:
    print("ERROR", err)
print("FILES", sorted(os.listdir(run.checkpoint_dir)))
state = run.restore(trainer)
print("STEP", state["step"], all(np.array_equal(a, v.numpy()) for a, v in zip(saved, trainer.model.weights)))
"""
    out = subprocess.run(
        ["python", "-c", script], env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["ERROR"].startswith(f"{tmp_path / 'run' / 'checkpoint' / 'step-4.npz'}: cannot write (File too")
    assert lines["FILES"] == "['state.json', 'step-2.npz']"
    assert lines["STEP"] == "2 True"


def test_a_log_file_that_cannot_be_written_is_one_warning(tmp_path):
    """train.log past the file-size limit: one warning line on stderr, the records still on the screen."""
    script = f"""
import logging, resource
from bit_keras.training import logs
resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
with logs.run_logging(verbose=1) as run_log:
    run_log.to_file({str(tmp_path / "train.log")!r})
    for i in range(20):
        logging.getLogger("bit_keras.test").info(f"record {{i}} " + "x" * 40)
"""
    out = subprocess.run(["python", "-c", script], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if not TF_NOISE.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f"warning: cannot write {tmp_path / 'train.log'} ("), lines
    assert out.stdout.count("record ") == 20
