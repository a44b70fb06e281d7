"""A training run's folder: its configuration, exact-resume checkpoints, log, final model and metrics.

    LOGDIR/NAME/
      run.json            what the run trains (checked on resume)
      train.log           the run's log (a resumed run appends to it)
      checkpoint/         latest training state: step-S.npz (model + optimizer variables) and state.json
      tensorboard/        TensorBoard logs
      model.keras         the final model          \
      class_names.txt     one class name per line   } written at the end;
      curves.png          learning curves          /
      checkpoint.npz      pretraining runs: the weights in the official layout (at the end)
      metrics.json        written last: its presence means the run finished (the checkpoint is then deleted)
      .lock               held (flock) by the process running in the folder: one run per folder

Every file is written through `bit_keras.files` (a temporary name renamed into place), so a killed run never
leaves a half-written file, a full disk stops the run with one line and the previous checkpoint intact, the
next run removes what a killed one left, and only a finished run has `metrics.json`.
"""

import contextlib
import dataclasses
import fcntl
import io
import json
import math
import os
import shutil
import socket
import tempfile
import time

import keras
import numpy as np

from bit_keras import files
from bit_keras.models.resolve import CLASS_NAMES_FILE, METRICS_FILE, MODEL_FILE, save_model

CONFIG, STATE, LOG, LOCK = "run.json", "state.json", "train.log", ".lock"
# What a run writes (and --overwrite deletes).
ENTRIES = (
    CONFIG,
    "checkpoint",
    "tensorboard",
    MODEL_FILE,
    CLASS_NAMES_FILE,
    "curves.png",
    "checkpoint.npz",
    METRICS_FILE,
    LOG,
)


@dataclasses.dataclass
class RunResult:
    """What a finished run returns."""

    model: keras.Model  # the trained model (images in [0, 1] -> logits)
    metrics: dict  # as written to metrics.json
    run_dir: str


class RunFolder:
    """The files of one run at `path`. On a non-chief multi-worker task (`chief=False`) everything is
    written to a private temporary folder instead (the workers must all save, only one may publish)."""

    def __init__(self, path, chief=True):
        self.path = path if chief else tempfile.mkdtemp(prefix="bit_keras_worker_")
        self.chief = chief
        self.checkpoint_dir = os.path.join(self.path, "checkpoint")
        self.tensorboard_dir = os.path.join(self.path, "tensorboard")
        self.model_path = os.path.join(self.path, MODEL_FILE)
        self.classes_path = os.path.join(self.path, CLASS_NAMES_FILE)
        self.plot_path = os.path.join(self.path, "curves.png")
        self.metrics_path = os.path.join(self.path, METRICS_FILE)
        self.log_path = os.path.join(self.path, LOG)

    def refuse_foreign(self):
        """A one-line error when the folder is not a run folder (no run.json) but holds a name a run writes: a run
        neither writes into nor (`overwrite`) deletes such a folder."""
        if not os.path.exists(os.path.join(self.path, CONFIG)):
            found = [e for e in ENTRIES if os.path.exists(os.path.join(self.path, e))]
            if found:
                raise ValueError(
                    f"{self.path} is not a bit_keras run folder (no {CONFIG}) but holds {found[0]}: a run neither "
                    "writes into nor (--overwrite) deletes it; choose another --name or --logdir"
                )

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock (`.lock`, an exclusive `flock`) while the block runs; a one-line error naming the
        folder and the holder when another process holds it. The kernel releases it when its holder dies, so a
        killed run leaves no stale lock."""
        os.makedirs(self.path, exist_ok=True)
        path = os.path.join(self.path, LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(
                f"{self.path} is in use by another run ({holder}); wait for it or use another --name"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(
                fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode()
            )
            for folder in (self.path, self.checkpoint_dir):  # what a killed run left half-written
                files.remove_temporaries(folder)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def finished(self):
        return os.path.exists(self.metrics_path)

    def prepare(self, config, overwrite=False):
        """Before anything is written: clear it on `overwrite`; refuse a checkpoint or a finished run of another
        configuration. Returns the metrics of a finished run of this configuration (not to be trained again), else
        None."""
        if overwrite and self.chief:
            for entry in ENTRIES:
                path = os.path.join(self.path, entry)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        self.check_config(config)
        return _read_json(self.metrics_path) if self.finished() else None

    def state(self):
        """The saved training state (`step`, `weights`, `evals`, `history`, `wall_s`), or None."""
        path = os.path.join(self.checkpoint_dir, STATE)
        return _read_json(path) if os.path.exists(path) else None

    def check_config(self, config):
        """Refuse to resume a checkpoint, or to report a finished run, of another configuration; name what differs."""
        path = os.path.join(self.path, CONFIG)
        finished = self.finished()
        if not (finished or self.state()) or not os.path.exists(path):
            return
        saved = _read_json(path)
        config = json.loads(json.dumps(config))  # tuples as lists, as saved
        differ = [k for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
        if finished:
            where, since, label, other = self.path, "this run finished", "finished", "the finished run there is"
        else:
            where, since, label = self.checkpoint_dir, "this checkpoint was written", "checkpoint"
            other = "the checkpoint there was written for"
        if "data_fingerprint" in differ:
            others = [k for k in differ if k != "data_fingerprint"]
            also = f" (and with it {', '.join(others)})" if others else ""
            raise ValueError(
                f"{where}: the data changed since {since}{also}: files added, removed or modified; restore the data, "
                "or use another --name or --overwrite to start afresh"
            )
        if differ:
            details = "; ".join(f"{k}: {label} {saved.get(k)!r}, now {config.get(k)!r}" for k in differ[:4])
            raise ValueError(
                f"{where}: {other} another run ({details}); use another --name, or --overwrite to start this one afresh"
            )

    def start(self, config):
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self._write_json(os.path.join(self.path, CONFIG), config)

    def save(self, trainer, state):
        """Save the trainer's variables (model and optimizer) and `state`, replacing the previous ones only once both
        are written. The variables go to an `.npz` by their order in `_training_variables` (h5py, Keras' weights
        format, crashes the process on a full disk; an in-memory npz written at once fails with a clean error)."""
        weights = f"step-{state['step']}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, *[np.asarray(v.numpy()) for v in _training_variables(trainer)])
        with files.replacing(os.path.join(self.checkpoint_dir, weights)) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
        previous = self.state()
        self._write_json(os.path.join(self.checkpoint_dir, STATE), {**state, "weights": weights})
        if previous and previous["weights"] != weights:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.checkpoint_dir, previous["weights"]))

    def restore(self, trainer):
        """Load the saved variables into `trainer` (its optimizer built) and return the state, or None."""
        state = self.state()
        if state is None:
            return None
        path = os.path.join(self.checkpoint_dir, state["weights"])
        variables = _training_variables(trainer)
        try:
            with np.load(path, allow_pickle=False) as saved:
                values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        except (OSError, ValueError, EOFError, KeyError) as err:
            raise ValueError(f"{path}: a damaged checkpoint ({err}); pass --overwrite to start afresh") from None
        shapes = [tuple(v.shape) for v in variables]
        if [tuple(x.shape) for x in values] != shapes:
            raise ValueError(f"{path}: its variables do not fit this run's model and optimizer; pass --overwrite")
        for variable, value in zip(variables, values):
            variable.assign(value)
        return state

    def finish(self, model, class_names, metrics):
        """Write the final model, class names, curves and, last, `metrics.json`."""
        save_model(model, self.model_path)
        files.write_text(self.classes_path, "".join(f"{name}\n" for name in class_names))
        plot_curves(metrics, self.plot_path)
        self._write_json(self.metrics_path, metrics)
        shutil.rmtree(self.checkpoint_dir)  # the training state is no longer needed: model.keras has the weights

    def _write_json(self, path, value):
        files.write_text(path, json.dumps(strict_json(value), indent=2, allow_nan=False) + "\n")


def _training_variables(trainer):
    """Every variable a resume needs, in a fixed order: the model's weights, then the optimizer's."""
    return [*trainer.model.weights, *trainer.optimizer.variables]


def strict_json(value):
    """`value` with every NaN or infinite float replaced by None, as strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def _read_json(path):
    """A run file's JSON; a one-line error naming the file when it is not JSON (e.g. cut short by a full disk)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}): a damaged run file; remove it, or pass --overwrite to start afresh"
        ) from None


def headline_metric(metrics):
    """The key of a run's result in its metrics: COCO AP for detection, else accuracy."""
    return "test_ap" if "test_ap" in metrics else "test_accuracy"


def plot_curves(metrics, path):
    """Losses and scores (accuracy, AP, ...) against the step, from `metrics["evals"]`, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    evals = metrics["evals"]
    steps = [e["step"] for e in evals]
    scores = [k for k in evals[-1] if k.startswith(("train_", "test_")) and not k.endswith("loss")]
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(steps, [e["train_loss"] for e in evals], marker="o", label="train (since the previous eval)")
    loss_ax.plot(steps, [e["test_loss"] for e in evals], marker="o", label="test")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    for key in scores:
        values = [e.get(key) for e in evals]
        if None not in values:
            label = "train (against the targets' argmax)" if key == "train_accuracy" else key.replace("_", " ")
            score_ax.plot(steps, values, marker="o", label=label)
    headline = headline_metric(metrics)
    score_ax.set(xlabel="step", ylabel="score", title=f"{headline.replace('_', ' ')} {metrics[headline]:.4f}")
    score_ax.set_ylim(0, 1)
    score_ax.legend()
    fig.suptitle(metrics.get("name", ""))
    fig.tight_layout()
    try:
        with files.replacing(path, ".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
