"""benchmarks/benchmark.py and group_norm.py as real subprocesses on a tiny configuration (no peer), and the shared
harness and the CPU report on made-up numbers."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from benchmarks import harness, report


def slow(test):
    """A minute of benchmarking: CI's slow step."""
    return pytest.mark.slow(pytest.mark.timeout(300)(test))


SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
TINY = ["--model", "R26x0.5", "--resolution", "32", "--train_resolution", "32", "--batch", "2", "--train_batch", "2"]
TINY += ["--repeats", "2", "--steps", "1", "--warmup", "1", "--pipeline_images", "20", "--peer", "none"]


def run(*args, timeout=240):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@slow
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


@slow
def test_unknown_model_is_named():
    proc = run("--model", "R51x1", "--peer", "none", timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'R51x1'" in proc.stderr


@slow
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


def worker_script(tmp_path, body):
    """A script that runs `body` with `out` (its --worker_out) and `arguments` (the others) defined."""
    script = tmp_path / "worker.py"
    prologue = "import json, subprocess, sys, time\narguments, out = sys.argv[1:-2], sys.argv[-1]\n"
    script.write_text(prologue + textwrap.dedent(body))
    return script


def test_fresh_process_returns_what_the_worker_wrote(tmp_path):
    script = worker_script(tmp_path, "json.dump({'images_per_s': float(arguments[0])}, open(out, 'w'))")
    result = harness.measure_in_fresh_process(script, ["12.5"], 60, "--timeout")
    assert result["images_per_s"] == 12.5 and result["worker_s"] > 0 and "stderr_tail" not in result


def test_fresh_process_that_dies_reports_its_last_stderr_line(tmp_path):
    script = worker_script(tmp_path, "print('loading', file=sys.stderr); print('killed', file=sys.stderr); exit(3)")
    result = harness.measure_in_fresh_process(script, [], 60, "--timeout")
    assert result["error"] == "killed" and result["stderr_tail"] == ["loading", "killed"]


def test_fresh_process_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = worker_script(
        tmp_path,
        """
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open(arguments[0], "w").write(str(child.pid))
        time.sleep(60)
        """,
    )
    result = harness.measure_in_fresh_process(script, [str(pid_file)], 2, "--timeout")
    assert result["error"] == "timed out after 2 s (--timeout)" and 2 <= result["worker_s"] < 30
    status = pathlib.Path(f"/proc/{pid_file.read_text()}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # killed (a zombie where nothing reaps it)


INTERRUPTED_PARENT = """
    import sys
    from benchmarks import harness
    harness.measure_in_fresh_process(sys.argv[1], sys.argv[2:], 60, "--timeout")
"""


def test_interrupted_parent_kills_its_worker(tmp_path):
    pid_file = tmp_path / "worker.pid"
    script = worker_script(tmp_path, "import os; open(arguments[0], 'w').write(str(os.getpid())); time.sleep(60)")
    command = [sys.executable, "-c", textwrap.dedent(INTERRUPTED_PARENT), script, pid_file]
    proc = subprocess.Popen(command, cwd=SCRIPT.parents[1], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert "KeyboardInterrupt" in proc.communicate(timeout=30)[1]
    status = pathlib.Path(f"/proc/{pid_file.read_text()}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_worker_writes_the_error_cause(tmp_path):
    out = tmp_path / "result.json"

    def measure():
        raise RuntimeError("Graph execution error:\n\n  File ...\nOOM when allocating tensor\n  [[node]]")

    assert harness.run_worker(measure, out) == 1
    assert json.loads(out.read_text()) == {"error": "RuntimeError: OOM when allocating tensor"}
    assert harness.run_worker(lambda: {"step_ms": 3.0}, out) == 0
    assert json.loads(out.read_text()) == {"step_ms": 3.0}


def test_repetition_rates_and_median_step_from_end_times():
    schedule = harness.Schedule(warmup=2, repeats=2, steps=2)
    assert schedule.calls == 6
    rates = harness.repetition_rates(0.5, [1.0, 2.0, 3.0, 4.0, 6.0, 8.0], schedule, batch=4)
    assert rates == {
        "first_step_s": 0.5,
        "images_per_s": 3.0,  # repetitions of 2 and 4 s: 8 images each
        "images_per_s_min": 2.0,
        "images_per_s_max": 4.0,
        "images_per_s_reps": [4.0, 2.0],
        "batch": 4,
    }
    step = harness.median_step(1.0, [5.0, 6.0, 8.0, 12.0], harness.Schedule(warmup=1, repeats=3), batch=8)
    assert step == {"first_step_s": 4.0, "images_per_s": 4.0, "ms_per_step": 2000.0, "step_ms": [1e3, 2e3, 4e3]}


def rate(images_per_s, **extra):
    """A measured rate, its repetitions 1 image/s either side."""
    return dict(images_per_s=images_per_s, images_per_s_min=images_per_s - 1, images_per_s_max=images_per_s + 1) | extra


def test_cpu_report_divides_by_the_peer_and_lists_failures():
    results = {
        "machine": {
            "cpu": "Test CPU",
            "cpu_flags": [],
            "logical_cpus": 2,
            "usable_cpus": 2,
            "memory_gb": 8.0,
            "load_average_start": [0.1, 0.2, 0.3],
            "load_average_end": [1.0, 1.0, 1.0],
        },
        "versions": {"python": "3.11", "torch": None},
        "settings": {
            **dict(arch="R50x1", dtype="float32", xla=False, batch=16, resolution=224, train_batch=8),
            **dict(train_resolution=128, num_classes=1000, warmup=2, repeats=5, steps=2, threads=2),
            **dict(strategy="auto", cpu_devices=1, peer="timm", peer_note=None),
        },
        "bit_keras": {
            "inference": rate(30.0, first_step_s=3.0, peak_rss_mb=1200, params=25_549_352),
            "folded": rate(33.0),
            "training": {"error": "OOM"},
        },
        "timm": {"inference": rate(20.0, first_step_s=0.5, peak_rss_mb=1500, params=25_549_352, model="bit")},
    }
    lines = report.cpu_markdown(results, ((240, 360), (320, 480))).splitlines()
    assert "| | bit_keras | timm | bit_keras / timm |" in lines
    assert "| inference, images/s: median [min, max] | 30.0 [29.0, 31.0] | 20.0 [19.0, 21.0] | 1.50 |" in lines
    folded = "| inference, weight standardization folded (`fold_weight_standardization()`), images/s |"
    assert f"{folded} 33.0 [32.0, 34.0] | 20.0 [19.0, 21.0] | 1.65 |" in lines  # over timm's inference
    assert "| peak memory, inference, MB | 1200 | 1500 | 0.80 |" in lines
    assert "| training step, images/s: median [min, max] | failed | - | - |" in lines
    assert lines[-1] == "- bit_keras training failed: OOM"
    assert "none of avx2" in lines[2] and "1.0/1.0/1.0 at end" in lines[2]
    assert not any("Warning" in line for line in lines)  # a load of 0.1 at the start
    assert report.failures(results) == ["bit_keras training failed: OOM"]


def test_ratio_is_a_dash_without_two_numbers():
    assert report.ratio({"images_per_s": 3.0}, {"images_per_s": 2.0}) == "1.50"
    assert report.ratio({"step_ms": 30.0}, {"step_ms": 40.0}, "step_ms") == "0.75"
    for theirs in (None, {"error": "timed out"}, {"images_per_s": 0.0}):
        assert report.ratio({"images_per_s": 3.0}, theirs) == "-"
    assert report.ratio({"error": "OOM"}, {"images_per_s": 2.0}) == "-"


@slow
def test_training_levers_swap_the_kernels_and_compare_gradients(tmp_path):
    """A tiny interleaved A/B: the saved-statistics group norm (its own backward kernel) trains within 1e-5 of the
    code as it is, with a gradient that is not bit-identical (the variant really replaced the layers)."""
    out = tmp_path / "levers.json"
    script = SCRIPT.parent / "training_levers.py"
    args = ["--model", "R26x0.5", "--resolution", "32", "--batch", "2", "--num_classes", "10", "--repeats", "2"]
    args += ["--warmup", "1", "--steps", "1", "--variants", "current", "saved_stats", "--peers", "--json", out]
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = json.loads(out.read_text())["runs"]
    check = runs["saved_stats"]["gradient_check"]
    assert check["within"] and 0 < check["relative"] < 1e-5, check
    assert runs["current"]["gradient_check"]["relative"] == 0
    for name in ("current", "saved_stats"):
        assert len(runs[name]["repetitions"]) == 2 and all(s > 0 for s in runs[name]["repetitions"][0]["step_s"])
    assert "| saved_stats |" in proc.stdout
