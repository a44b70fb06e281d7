"""How the `bit-keras` command behaves for a person at a terminal or a script reading its output: --help, --version
and argument errors without TensorFlow, no TensorFlow start-up lines, one line per evaluation (a progress bar on a
terminal only), `--quiet`, a finished run reported when run again, Ctrl-C, and tfds downloads without a network.

Real processes where the process is the point (start-up time, stderr, signals); `bit_keras.cli.main` in this
process otherwise."""

import contextlib
import importlib.metadata
import io
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from bit_keras import cli, defaults, startup
from tests.test_cli import BIT_KERAS, TF_NOISE, message_lines, run_in_process

pytestmark = pytest.mark.timeout(300)

FAST_S = 3  # --help, --version and argument errors, start to end (0.1 s here)
OFFLINE_S = 20  # a tfds download without a network fails within this (the probe waits at most 5 s per host)
SHORT = ["--steps", "10", "--eval_every", "5"]  # the embedded default (digits, shipped R14x0.5), 10 steps
RUN_NAME = "digits-BiT-R14x0.5-mnist5k"  # the run folder `bit-keras finetune` writes with no flags
EVAL_LINE = re.compile(
    r"step (\d+)/(\d+): train loss \d+\.\d{4}, accuracy \d\.\d{4}; test loss \d+\.\d{4}, accuracy \d\.\d{4}; "
    r"lr [0-9.e-]+; [\d,]+ images/s(, ETA \d+:\d\d:\d\d)?"
)


def _env(tmp_path):
    """The user's environment: no TF_CPP_MIN_LOG_LEVEL or BIT_KERAS_VERBOSE of the test run's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", startup.VERBOSE)}
    return dict(env, KERAS_BACKEND="tensorflow", BIT_KERAS_CACHE=str(tmp_path / "cache"))


def _run(args, tmp_path, stdout=subprocess.PIPE):
    """`bit-keras ARGS` in a real process; `stdout` may be a file (the result's stdout is then read from it)."""
    proc = subprocess.run(
        [*BIT_KERAS, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=240,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    if stdout is not subprocess.PIPE:
        proc.stdout = pathlib.Path(stdout.name).read_text()
    return proc


# ----------------------------------------------------------------------------- start-up


def test_help_version_and_argument_errors_are_fast_and_quiet(tmp_path):
    """None of them imports TensorFlow (the parser needs only `bit_keras.defaults`), so nothing but their own output
    reaches stdout and stderr."""
    cases = {
        ("--help",): (0, "usage: bit-keras [-h] [--version] [--verbose]"),
        ("--version",): (0, f"bit-keras {importlib.metadata.version('bit-keras')}\n"),
        ("finetune", "--help"): (0, "[--verbose]"),
        ("finetune", "--batch", "x"): (2, ""),
    }
    for args, (returncode, out) in cases.items():
        start = time.perf_counter()
        proc = _run(args, tmp_path)
        elapsed = time.perf_counter() - start
        assert proc.returncode == returncode, (args, proc.stderr)
        assert out in proc.stdout, (args, proc.stdout)
        assert elapsed < FAST_S, (args, elapsed)
        if returncode == 0:
            assert proc.stderr == "", (args, proc.stderr)
    assert proc.stderr.splitlines()[-1] == "bit-keras finetune: error: argument --batch: invalid int value: 'x'"
    start = time.perf_counter()
    module = subprocess.run(
        [sys.executable, "-m", "bit_keras.cli", "--help"], capture_output=True, text=True, env=_env(tmp_path)
    )
    assert module.returncode == 0 and module.stdout.startswith("usage: bit-keras")
    assert time.perf_counter() - start < FAST_S


def test_tensorflow_is_quiet_unless_verbose(tmp_path):
    """A subcommand that imports TensorFlow keeps its start-up lines off stderr unless --verbose: the one error line
    only (`export` of an architecture as a classifier, refused after TensorFlow is loaded)."""
    args = ("export", "--model", "R14x0.5", "--kind", "classification", "--out", str(tmp_path / "e"))
    quiet, verbose = _run(args, tmp_path), _run((*args, "--verbose"), tmp_path)
    assert quiet.returncode == 1 and quiet.stderr.splitlines() == [
        "bit-keras export: R14x0.5 is an architecture (random weights, no head): --kind classification needs a "
        "checkpoint name, a .keras file or a run folder; leave --kind out for a feature-vector export"
    ]
    assert verbose.returncode == 1 and any(TF_NOISE.match(line) for line in verbose.stderr.splitlines())


def test_models_is_fast(tmp_path):
    """The zoo table needs no Keras: no TensorFlow import, no start-up line."""
    start = time.perf_counter()
    assert _run(("models",), tmp_path).returncode == 0
    assert time.perf_counter() - start < FAST_S


def test_verbose_environment_variable(monkeypatch, capfd):
    """BIT_KERAS_VERBOSE=1 lets native stderr through; unset or 0, it is silenced."""
    for value, shown in (("1", True), ("0", False), (None, False)):
        if value is None:
            monkeypatch.delenv(startup.VERBOSE, raising=False)
        else:
            monkeypatch.setenv(startup.VERBOSE, value)
        with startup.quiet_native_stderr():
            os.write(2, b"native line\n")
        assert ("native line" in capfd.readouterr().err) == shown, value


def test_defaults_are_the_recipes():
    """The parser's defaults (`bit_keras.defaults`, importable without TensorFlow) are the recipes' own."""
    from bit_keras.data import images
    from bit_keras.detection import finetune as detection
    from bit_keras.models import layers
    from bit_keras.training import finetune, strategy, upstream

    assert images.MAX_PIXELS == defaults.MAX_PIXELS
    assert (finetune.EMBEDDED, finetune.TRAINABLE_FROM) == (defaults.FINETUNE_EMBEDDED, defaults.TRAINABLE_FROM)
    assert (strategy.STRATEGIES, layers.NORMALIZATIONS) == (defaults.STRATEGIES, defaults.NORMALIZATIONS)
    assert (upstream.BATCH, upstream.BASE_LR, upstream.PRESETS) == (4096, 0.03, defaults.UPSTREAM_PRESETS)
    assert (detection.DEFAULTS, detection.EMBEDDED) == (defaults.DETECTION_DEFAULTS, defaults.DETECTION_EMBEDDED)
    assert (detection.EPOCHS, detection.BATCH, detection.BASE_LR, detection.IMAGE_SIZE) == (30, 256, 0.08, 1024)


# ----------------------------------------------------------------------------- training output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short default run with stdout to a file, then the same command again."""
    tmp = tmp_path_factory.mktemp("runs")
    args = ["finetune", *SHORT, "--logdir", str(tmp)]
    with open(tmp / "out.txt", "w") as out:
        first = _run(args, tmp, stdout=out)
    return tmp, {"first": first, "again": _run(args, tmp)}


@contextlib.contextmanager
def plain_console():
    """Inside the block, the root logger of a plain program: without pytest's log capture, runs print as they would."""
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []
    try:
        yield
    finally:
        root.handlers = handlers


KERAS_METRIC = re.compile(r"\bval_")  # Keras' progress bar names the validation metrics val_loss, val_accuracy


def test_output_to_a_file_is_one_line_per_evaluation(runs):
    tmp, results = runs
    result = results["first"]
    assert result.returncode == 0, result.stderr
    assert message_lines(result.stderr) == []
    # No carriage returns, nor Keras' bar (its "Epoch" lines and val_* metrics; the options line has eval_every).
    assert "\r" not in result.stdout and "Epoch" not in result.stdout and not KERAS_METRIC.search(result.stdout)
    lines = result.stdout.splitlines()
    evals = [line for line in lines if line.startswith("step ")]
    assert [EVAL_LINE.fullmatch(line).group(1, 2) for line in evals] == [("5", "10"), ("10", "10")]
    assert "ETA" in evals[0] and "ETA" not in evals[1]  # nothing left after the last
    metrics = json.loads((tmp / RUN_NAME / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [5, 10]
    assert lines[-1] == f"test accuracy {metrics['test_accuracy']:.4f} after 10 steps; run folder {tmp / RUN_NAME}"
    log = (tmp / RUN_NAME / "train.log").read_text()
    assert all(line in log for line in evals + lines[-1:])  # train.log has it all, timestamped


def test_quiet_prints_only_the_result(tmp_path):
    with plain_console():
        result = run_in_process(["finetune", "--steps", "5", "--eval_every", "5", "--logdir", tmp_path, "--quiet"])
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / RUN_NAME / "metrics.json").read_text())
    run_dir = tmp_path / RUN_NAME
    assert result.stdout == f"test accuracy {metrics['test_accuracy']:.4f} after 5 steps; run folder {run_dir}\n"
    assert "step 5/5: train loss" in (run_dir / "train.log").read_text()


def test_a_finished_run_run_again_prints_its_result(runs):
    tmp, results = runs
    again = results["again"]
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    metrics = json.loads((tmp / RUN_NAME / "metrics.json").read_text())
    result = f"test accuracy {metrics['test_accuracy']:.4f} after 10 steps; run folder {tmp / RUN_NAME}"
    assert again.stdout == f"{result} (finished before; --overwrite trains again)\n"
    assert metrics == json.loads((tmp / RUN_NAME / "metrics.json").read_text())


def test_a_finished_run_of_other_settings_is_refused(runs):
    tmp, _ = runs
    other = run_in_process(["finetune", "--steps", "10", "--eval_every", "2", "--logdir", tmp, "--quiet"])
    assert other.returncode == 1
    assert message_lines(other.stderr) == [
        f"bit-keras finetune: {tmp / RUN_NAME}: the finished run there is another run (eval_every: finished 5, now 2);"
        " use another --name, or --overwrite to start this one afresh"
    ]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_one_progress_bar_and_the_same_lines(tmp_path):
    out = _Terminal()
    with plain_console(), contextlib.redirect_stdout(out):
        assert cli.main(["finetune", *SHORT, "--logdir", str(tmp_path), "--name", "tty"]) == 0
    text = out.getvalue()
    assert "\r" in text and "10/10" in text and "step/s" in text  # tqdm's bar over the whole run
    assert "Epoch" not in text and not KERAS_METRIC.search(text)  # not Keras' bar per evaluation interval
    lines = [line.split("\r")[-1] for line in text.splitlines()]
    assert [EVAL_LINE.fullmatch(line).group(1) for line in lines if line.startswith("step ")] == ["5", "10"]
    assert lines[-1].startswith("test accuracy ")


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path):
    proc = subprocess.Popen(
        [*BIT_KERAS, "finetune", "--steps", "3000", "--eval_every", "5", "--logdir", str(tmp_path), "--name", "stop"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not inherited ignored from the runner
    )
    try:
        for line in proc.stdout:
            if line.startswith("step 5/3000"):  # logged once its checkpoint is written
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.INTERRUPTED, err
    state = json.loads((tmp_path / "stop" / "checkpoint" / "state.json").read_text())
    assert err.splitlines() == [
        f"bit-keras finetune: stopped (Ctrl-C); the same command resumes it from the checkpoint of step "
        f"{state['step']} in {tmp_path / 'stop'}"
    ]
    assert not (tmp_path / "stop" / "metrics.json").exists()


# ----------------------------------------------------------------------------- offline tfds


@pytest.fixture
def offline(monkeypatch):
    """No network: every proxy variable names a closed port on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ftp_proxy"):
        monkeypatch.setenv(name, closed)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return closed


def test_tfds_without_network_fails_in_seconds_with_one_line(tmp_path, offline):
    data_dir = tmp_path / "tfds"
    start = time.perf_counter()
    args = ["finetune", "--dataset", "mnist", "--data_dir", data_dir, "--logdir", tmp_path / "runs"]
    result = run_in_process([*args, "--model", "BiT-R14x0.5-mnist5k"])  # the default BiT-M-R50x1 is probed first
    assert time.perf_counter() - start < OFFLINE_S
    assert result.returncode == 1
    (line,) = message_lines(result.stderr)
    assert line.startswith("bit-keras finetune: mnist is not prepared and cannot be downloaded: 127.0.0.1:")
    assert "(the proxy for https://storage.googleapis.com)" in line
    for alternative in ("--data_dir", "--manual_dir", "--image_folder"):
        assert alternative in line
    assert not data_dir.exists() and not (tmp_path / "runs").exists()  # no empty folder left behind


def test_detection_tfds_without_network_fails_in_seconds(tmp_path, offline):
    """The detector's tfds datasets (COCO, VOC) are prepared the same way, naming its own local alternative."""
    start = time.perf_counter()
    args = ["finetune-detector", "--dataset", "voc/2007", "--data_dir", tmp_path / "tfds", "--logdir", tmp_path / "r"]
    result = run_in_process([*args, "--model", "BiT-R14x0.5-mnist5k"])
    assert time.perf_counter() - start < OFFLINE_S
    (line,) = message_lines(result.stderr)
    assert result.returncode == 1 and "voc/2007 is not prepared and cannot be downloaded" in line, line
    assert line.endswith("or use --coco_folder") and "--manual_dir" not in line
    assert sorted(os.listdir(tmp_path)) == []


def test_flags_are_checked_before_any_download(tmp_path, offline):
    """Checks of the recipe's schedule that need no data come before the download (offline: before its error)."""
    cases = {
        ("finetune", "--dataset", "mnist", "--steps", "2"): "steps=2: the schedule needs at least 5 steps",
        ("finetune-detector", "--dataset", "voc/2007", "--steps", "3"): "steps must be at least 4",
    }
    for args, message in cases.items():
        result = run_in_process([*args, "--data_dir", tmp_path / "tfds", "--logdir", tmp_path / "runs"])
        assert result.returncode == 1
        (line,) = message_lines(result.stderr)
        assert message in line, line
    assert sorted(os.listdir(tmp_path)) == []
