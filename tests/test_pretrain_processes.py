"""Upstream pretraining across processes: 2-worker MultiWorkerMirroredStrategy on 127.0.0.1, exact resume after
SIGKILL."""

import pytest

from tests.finetune_helpers import write_image_folder
from tests.test_finetune_processes import resume_after_sigkill, run_two_workers

pytestmark = pytest.mark.timeout(600)

RUN = """
import json
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


def test_multi_worker_pretraining_two_processes(tmp_path):
    metrics = run_two_workers(
        lambda i: RUN.format(logdir=str(tmp_path / "runs"), out=str(tmp_path / f"w{i}.npz")), tmp_path
    )
    assert metrics[0]["steps"] == 6
    assert (tmp_path / "runs" / "run" / "checkpoint.npz").exists()


def test_pretrain_resume_after_sigkill_is_exact(tmp_path):
    folder = str(write_image_folder(tmp_path / "images", n_per_class=16, size=48))
    args = ["--image_folder", folder, "--model", "R26x0.5", "--logdir", str(tmp_path / "runs"), "--batch", "8"]
    args += ["--epochs", "8", "--decay_epochs", "6", "--warmup_steps", "5", "--resolution", "48", "--base_lr", "0.1"]
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
