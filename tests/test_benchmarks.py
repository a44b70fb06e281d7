"""Smoke tests of benchmarks/benchmark.py, run as a real subprocess on a tiny configuration (no peer)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a minute of benchmarking: CI's slow step

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
TINY = ["--model", "R26x0.5", "--resolution", "32", "--train_resolution", "32", "--batch", "2", "--train_batch", "2"]
TINY += ["--repeats", "2", "--steps", "1", "--warmup", "1", "--pipeline_images", "20", "--peer", "none"]


def run(*args, timeout=240):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_tiny_run_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run(*TINY, "--json", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    ours = results["bit_keras"]
    for task in ("inference", "folded", "training", "pipeline"):
        assert ours[task]["images_per_s"] > 0, task
        assert ours[task]["images_per_s_min"] <= ours[task]["images_per_s"] <= ours[task]["images_per_s_max"]
        assert len(ours[task]["images_per_s_reps"]) == 2
        assert ours[task]["peak_rss_mb"] > 100, task  # TensorFlow alone takes more
    assert ours["training"]["first_step_s"] > 0
    assert ours["inference"]["params"] == 4517768  # bit_keras.models.zoo.parameter_count("R26x0.5", 1000)
    assert (ours["pipeline"]["resize"], ours["pipeline"]["crop"]) == (34, 32)  # the HyperRule's ratio at crop 32
    assert results["settings"]["arch"] == "R26x0.5" and results["settings"]["peer"] is None
    assert results["machine"]["logical_cpus"] >= 1 and results["versions"]["tensorflow"]
    assert "| inference, images/s: median [min, max] |" in proc.stdout
    assert "| training step, images/s: median [min, max] |" in proc.stdout
    assert "| inference, weight standardization folded (`fold_weight_standardization()`), images/s |" in proc.stdout
    assert "input pipeline alone" in proc.stdout and "x the training step" in proc.stdout


def test_unknown_model_is_named():
    proc = run("--model", "R51x1", "--peer", "none", timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'R51x1'" in proc.stderr


def test_group_norm_script_times_both_layers():
    script = SCRIPT.parent / "group_norm.py"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    command = [
        sys.executable,
        str(script),
        "--model",
        "R26x0.5",
        "--resolution",
        "32",
        "--batch",
        "2",
        "--repeats",
        "1",
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row[0].strip().split()[0] for row in rows] == ["bit_keras", "keras.layers.GroupNormalization(epsilon=1e-5)"]
    for _, forward_ms, both_ms, error in rows:
        assert 0 < float(forward_ms) <= float(both_ms) and float(error) < 1e-5
    assert "R26x0.5's 25 layers" in proc.stdout  # 8 units x 3 + the pre-head norm
