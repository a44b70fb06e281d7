"""benchmarks/gpu.py on its CPU path (real subprocesses on a tiny configuration, every peer), and its report's
ratios and targets on made-up numbers."""

import gzip
import json
import math
import pathlib
import subprocess
import sys

import pytest

from benchmarks import report

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
TINY = ["--device", "cpu", "--model", "R26x0.5", "--resolutions", "32", "--batch", "2", "--train_batch", "2"]
TINY += ["--steps", "2", "--warmup", "1"]
KERAS_PEERS = ["bit_keras", "bit_keras_folded", "bit_keras_autodiff", "plain_keras"]
R26_CONVOLUTIONS = 1 + 8 * 3 + 4  # the root, three per unit, a projection per block


def slow(test):
    """About a minute of benchmarking: CI's slow step."""
    return pytest.mark.slow(pytest.mark.timeout(480)(test))


def run(*args, timeout=240):
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def flops_per_image(arch, resolution):
    """2 x the multiply-adds of every convolution and of the head of a built bit_keras model."""
    import keras

    from bit_keras.models import zoo
    from bit_keras.models.layers import PreActBottleneck

    model = zoo.create_model(arch, num_classes=1000, input_shape=(resolution, resolution, 3))
    macs = 0
    for layer in [*model.backbone.layers, *model.layers]:  # the backbone's units and root, then the classifier's head
        if isinstance(layer, PreActBottleneck):
            (_, height, width, _), (_, out_height, out_width, _) = layer.input.shape, layer.output.shape
            outputs = {"conv_a": (height, width), "conv_b": (out_height, out_width)}
            outputs |= {"conv_c": (out_height, out_width), "proj": (out_height, out_width)}
            for name, (h, w) in outputs.items():
                conv = getattr(layer, name)
                macs += h * w * math.prod(conv.kernel.shape) if conv is not None else 0
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = layer.output.shape
            macs += h * w * math.prod(layer.kernel.shape)
        elif isinstance(layer, keras.layers.Dense):
            macs += math.prod(layer.kernel.shape)
    return 2 * macs


@slow
def test_tiny_cpu_run_measures_every_keras_peer(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run(*TINY, "--dtypes", "bf16", "--peers", *KERAS_PEERS, "--json", out, "--dump_hlo", tmp_path / "hlo")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {(r["peer"], r["task"]): r for r in report["results"]}
    assert sorted(rows) == sorted(
        [("bit_keras", "inference"), ("bit_keras_folded", "inference"), ("plain_keras", "inference")]
        + [("bit_keras", "training"), ("bit_keras_autodiff", "training"), ("plain_keras", "training")]
    )
    forward = flops_per_image("R26x0.5", 32)
    assert report["forward_flops_per_image"] == {"32": forward}
    for (peer, task), row in rows.items():
        assert (row["dtype"], row["resolution"], row["batch"]) == ("bf16", 32, 2)
        assert row["images_per_s"] > 0 and row["first_step_s"] > 0 and row["peak_memory_bytes"] > 0, (peer, task)
        assert len(row["step_ms"]) == 2 and row["peak_memory_of"] == "process RSS"
        assert row["flops_per_image"] == forward * (3 if task == "training" else 1)
        assert row["params"] == 4517768, peer  # bit_keras.models.zoo.parameter_count("R26x0.5", 1000): plain too
        assert "mfu" not in row  # on GPU only
    # Every convolution of bit_keras's bf16 step in bf16: forward, kernel gradients, input gradients but the root's.
    assert rows["bit_keras", "training"]["convolution_dtypes"] == {"bf16": 3 * R26_CONVOLUTIONS - 1}
    assert rows["bit_keras_autodiff", "training"]["convolution_dtypes"] == {"bf16": 3 * R26_CONVOLUTIONS - 1}
    for peer in ("bit_keras", "bit_keras_autodiff", "plain_keras"):  # XLA's CPU backend computes them in f32
        assert rows[peer, "training"]["compiled_convolution_dtypes"] == {"f32": 3 * R26_CONVOLUTIONS - 1}, peer
        with gzip.open(tmp_path / "hlo" / f"{peer}-bf16-32px-batch2.hlo.txt.gz", "rt") as f:
            assert f.read().startswith("HloModule"), peer
    assert sum(rows["plain_keras", "training"]["convolution_dtypes"].values()) == 3 * R26_CONVOLUTIONS - 1
    assert report["device"]["kind"] == "cpu" and report["versions"]["jax"]
    assert "gpu.py --device cpu" in report["command"]
    assert "| bit_keras | bf16 | training | 32 | 2 |" in proc.stdout
    assert "| bf16 | inference | 32 | bit_keras, WS folded |" in proc.stdout  # the ratios table
    assert "| bit_keras | 32 | 86 | 86 | 0 | 0 |" in proc.stdout  # the dtype audit
    assert "bit_keras's first training step: at most 30 s (bf16, 32 px, batch 2): " in proc.stdout
    assert "MFU" not in proc.stdout


@slow
def test_tiny_cpu_run_measures_timm_eager_and_compiled(tmp_path):
    """The timm peers' code on the CPU (torch.compile through Inductor's C++ backend there, Triton on a GPU)."""
    out = tmp_path / "gpu.json"
    proc = run(*TINY, "--dtypes", "bf16", "--peers", "timm", "timm_compile", "--json", out, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["not_installed"] == {} and report["versions"]["timm"] and report["versions"]["torch"]
    rows = {(r["peer"], r["task"]): r for r in report["results"]}
    assert sorted(rows) == sorted(
        (peer, task) for peer in ("timm", "timm_compile") for task in ("inference", "training")
    )
    for key, row in rows.items():
        assert row["images_per_s"] > 0 and row["first_step_s"] > 0 and row["peak_memory_bytes"] > 0, key
        assert row["params"] == 4517768, key  # timm's ResNetV2 with its *_bit arguments: bit_keras's count
    assert "| timm + torch.compile | bf16 | training | 32 | 2 |" in proc.stdout


@slow
def test_time_budget_stops_a_measurement_and_skips_the_rest(tmp_path):
    out = tmp_path / "gpu.json"
    two = ["--peers", "bit_keras", "plain_keras", "--tasks", "inference", "--dtypes", "fp32"]
    proc = run(*TINY, *two, "--budget_s", "1", "--json", out)  # the first one is stopped after 1 s
    assert proc.returncode == 1
    first, second = json.loads(out.read_text())["results"]
    assert first["error"].startswith("timed out after 1 s") and first["peer"] == "bit_keras"
    assert second["not_run"] == "the time budget (--budget_s 1) was spent"
    assert "| bit_keras | fp32 | inference | 32 | 2 | failed |" in proc.stdout
    assert "| plain Keras | fp32 | inference | 32 | 2 | not run |" in proc.stdout


@slow
def test_bad_steps_is_one_line_naming_the_flag():
    proc = run("--steps", "0", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu.py: error: argument --steps: must be an integer from 1 to 10000, got '0'"
    ]


def measured(peer, task, images_per_s, batch, resolution=224, **extra):
    """A made-up bf16 result of the GPU benchmark."""
    setting = dict(peer=peer, dtype="bf16", task=task, resolution=resolution, batch=batch)
    return setting | {"images_per_s": images_per_s} | extra


def test_targets_are_requirements_met_or_not():
    results = [
        measured("bit_keras", "training", 5000, 64, first_step_s=31.0),
        measured("timm_compile", "training", 3800, 64),  # 1.32x and above the floor
        measured("bit_keras", "inference", 18000, 128),  # 1.20x: too little
        measured("bit_keras_folded", "inference", 16000, 128),  # 1.07x and below the floor
        measured("timm_compile", "inference", 15000, 128),
        measured("timm_compile", "inference", 1000, 32),  # another batch: not the target's
        measured("bit_keras", "training", 900, 32, resolution=480, first_step_s=12.0),
    ]
    training = "bf16 training at batch 64, 224 px: at least 1.3x timm + torch.compile and at least 4,800 images/s"
    inference = "bf16 inference at batch 128, 224 px: at least 1.3x timm + torch.compile and at least 17,000 images/s"
    assert report.target_lines(results) == [
        f"- {training}: bit_keras 5,000 images/s, 1.32x timm + torch.compile: met",
        f"- {inference}: bit_keras 18,000 images/s, 1.20x timm + torch.compile: NOT met",
        f"- {inference}: bit_keras, WS folded 16,000 images/s, 1.07x timm + torch.compile: NOT met",
        "- bit_keras's first training step: at most 30 s (bf16, 224 px, batch 64): 31.0 s, NOT met",
        "- bit_keras's first training step: at most 30 s (bf16, 480 px, batch 32): 12.0 s, met",
    ]


def test_targets_without_the_peer_check_the_floor_alone():
    assert report.target_lines([measured("bit_keras", "training", 5000, 64)])[0].endswith(
        ": bit_keras 5,000 images/s, timm + torch.compile not measured; floor met"
    )
    lines = report.target_lines([measured("bit_keras", "training", 4000, 64, first_step_s=3.0)])
    assert lines[0].endswith(": bit_keras 4,000 images/s, timm + torch.compile not measured; floor not met")
    assert lines[1].endswith(": bit_keras not measured") and lines[2].endswith(": bit_keras, WS folded not measured")
    assert report.target_lines([])[-1] == "- bit_keras's first training step: at most 30 s: not measured"


def test_ratios_divide_each_bit_keras_variant_by_each_peer():
    results = [
        measured("bit_keras", "inference", 300, 2, resolution=32),
        measured("bit_keras_folded", "inference", 360, 2, resolution=32),
        measured("timm_compile", "inference", 200, 2, resolution=32),
        measured("timm", "inference", 150, 2, resolution=32),
        {**measured("plain_keras", "inference", 0, 2, resolution=32), "error": "timed out"},
    ]
    del results[-1]["images_per_s"]  # a failed measurement has no rate
    assert report.ratios_table(results) == [
        "| precision | task | resolution | bit_keras variant | / timm + torch.compile | / timm eager | / plain Keras |",
        "|---|---|---|---|---|---|---|",
        "| bf16 | inference | 32 | bit_keras | 1.50 | 2.00 | - |",
        "| bf16 | inference | 32 | bit_keras, WS folded | 1.80 | 2.40 | - |",
    ]
