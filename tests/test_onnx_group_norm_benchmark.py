"""Smoke test of benchmarks/onnx_group_norm.py, run as a real subprocess on a tiny configuration."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # half a minute: TensorFlow, a conversion, two sessions

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "onnx_group_norm.py"


def test_tiny_run_times_both_files():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, str(SCRIPT), "--arch", "R14x0.5", "--size", "32", "--batch", "1", "2", "--repeats", "2"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "R14x0.5 at 32px, random weights, opset 21" in proc.stdout
    files = dict(re.findall(r"^\| (primitive ops|GroupNormalization) \| \d+ \| (\d+) \| \d+ \|$", proc.stdout, re.M))
    assert files == {"primitive ops": "0", "GroupNormalization": "13"}
    row = r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.e+-]+), ([\d.e+-]+) \|$"
    rows = re.findall(row, proc.stdout, re.M)
    assert [row[0] for row in rows] == ["1", "2"], proc.stdout
    for _, before, after, ratio, *diffs in rows:
        assert float(ratio) == pytest.approx(float(before) / float(after), rel=0.05)
        assert all(float(diff) < 1e-5 for diff in diffs)
    assert "(medians of 2 runs of each file, the two alternating)" in proc.stdout
