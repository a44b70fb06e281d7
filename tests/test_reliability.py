"""Reliability with real processes: one run per folder (the lock), a non-finite loss stopping a run."""

import json
import math
import re
import signal
import time

import pytest

from tests.test_cli import TF_NOISE
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
