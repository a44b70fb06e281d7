"""A training run's folder: its configuration, exact-resume checkpoints, log, final model and metrics.

    LOGDIR/NAME/
      run.json            what the run trains (checked on resume)
      train.log           the run's log (a resumed run appends to it)
      checkpoint/         latest training state: step-S.npz (model + optimizer variables) and state.json
      tensorboard/        TensorBoard logs
      model.keras         the final model, with its class names and input size   \
      config.json, ...    the same model as a keras-hub preset (from_preset)     } written at the end;
      curves.png          learning curves                                        /
      checkpoint.npz      pretraining runs: the weights in the official layout (at the end)
      metrics.json        written last: its presence means the run finished (the checkpoint is then deleted)
      .lock               held (flock) by the process running in the folder: one run per folder

Every file is written through `bit_keras.files` (a temporary name renamed into place), so a killed run never
leaves a half-written file, a full disk stops the run with one line and the previous checkpoint intact, the
next run removes what a killed one left, and only a finished run has `metrics.json`. No write leaves the folder:
an entry above (or inside `checkpoint/`, `tensorboard/`) that is a symbolic link is refused, the lock is opened
without following one, and the checkpoint `state.json` names is a plain file name in `checkpoint/`. A run that
fails before it starts (before `run.json`) leaves no folder it created.
"""

import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import zipfile

import keras
import numpy as np

from bit_keras import files
from bit_keras.checks import arg
from bit_keras.models.resolve import CLASS_NAMES_FILE, METRICS_FILE, MODEL_FILE, PRESET_FILES, save_model, save_preset

CONFIG, STATE, LOG, LOCK = "run.json", "state.json", "train.log", ".lock"
OPTIONS = "options"  # run.json's record of every option as the run used it (a resume may differ in them)
WEIGHTS_NAME = re.compile(r"step-\d+\.npz")  # the training state's file in checkpoint/
MAX_RUN_FILE_BYTES = 256 << 20  # run.json, state.json, metrics.json: kilobytes, a megabyte for long runs
# What a run writes (and --overwrite deletes).
ENTRIES = (
    CONFIG,
    "checkpoint",
    "tensorboard",
    MODEL_FILE,
    CLASS_NAMES_FILE,  # written by earlier versions
    *PRESET_FILES,
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
        self.plot_path = os.path.join(self.path, "curves.png")
        self.metrics_path = os.path.join(self.path, METRICS_FILE)
        self.log_path = os.path.join(self.path, LOG)

    def refuse_foreign(self):
        """A one-line error when the folder is not a run folder (no run.json) but holds a name a run writes: a run
        neither writes into nor (`overwrite`) deletes such a folder."""
        if not os.path.exists(os.path.join(self.path, CONFIG)):
            found = [e for e in ENTRIES if os.path.lexists(os.path.join(self.path, e))]
            if found:
                raise ValueError(
                    f"{self.path} is not a bit_keras run folder (no {CONFIG}) but holds {found[0]}: a run neither "
                    f"writes into nor ({arg('overwrite')}) deletes it; choose another {arg('name')} or {arg('logdir')}"
                )

    def refuse_links(self):
        """A one-line error naming the first entry a run writes (or one inside `checkpoint/` and `tensorboard/`)
        that is a symbolic link: writing through it would reach outside the run folder."""
        paths = [os.path.join(self.path, entry) for entry in (*ENTRIES, LOCK)]
        for folder in (self.checkpoint_dir, self.tensorboard_dir):
            if os.path.isdir(folder) and not os.path.islink(folder):
                for parent, dirs, names in os.walk(folder):
                    paths += [os.path.join(parent, name) for name in dirs + names]
        for path in paths:
            if os.path.islink(path):
                raise ValueError(
                    f"{path} is a symbolic link (to {os.readlink(path)}): a run writes only inside its folder; "
                    "remove the link"
                )

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock (`.lock`, an exclusive `flock`) while the block runs; a one-line error naming the
        folder and the holder when another process holds it. The kernel releases it when its holder dies, so a
        killed run leaves no stale lock. When the block ends before the run started (`start`), the lock and the
        folders made for it are removed again."""
        created = _missing_folders(self.path)
        os.makedirs(self.path, exist_ok=True)
        path = os.path.join(self.path, LOCK)
        made_lock = not os.path.lexists(path)
        try:
            fd = _open_lock(path)
        except BaseException:
            _remove_unstarted(created, path if made_lock else None)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(
                f"{self.path} is in use by another run ({holder}); wait for it or use another {arg('name')}"
            ) from None
        self.started = False
        try:
            try:
                os.ftruncate(fd, 0)
                holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                view = memoryview(holder.encode())
                while view:  # a write may be partial (then the next one fails with the reason)
                    view = view[os.write(fd, view) :]
            except OSError as err:
                if err.errno in files.DISK_FULL:
                    raise files.disk_full(err, path) from None
                raise
            self.refuse_links()
            for folder in (self.path, self.checkpoint_dir):  # what a killed run left half-written
                files.remove_temporaries(folder)
            yield
        finally:
            if not self.started:
                _remove_unstarted(created, path if made_lock else None)
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
        """The saved training state (`step`, `weights`, `evals`, `wall_s`, ...), or None; a damaged one (a key of
        the wrong type, `weights` anything but a `step-S.npz` file in `checkpoint/`) is a one-line error."""
        path = os.path.join(self.checkpoint_dir, STATE)
        if not os.path.lexists(path):
            return None
        state = _read_json(path)
        weights = state.get("weights") if isinstance(state, dict) else None
        problem = None
        if not isinstance(state, dict):
            problem = "it is not a JSON object"
        elif not (isinstance(weights, str) and WEIGHTS_NAME.fullmatch(weights)):
            problem = f"'weights' is {weights!r}, not the name of a step-S.npz file in {self.checkpoint_dir}"
        elif not (isinstance(state.get("step"), int) and state["step"] >= 0 and isinstance(state.get("evals"), list)):
            problem = "'step' is not a step number or 'evals' not a list"
        if problem:
            raise ValueError(f"{path}: a damaged state.json ({problem}); pass {arg('overwrite')} to start afresh")
        return state

    def check_config(self, config):
        """Refuse to resume a checkpoint, or to report a finished run, of another configuration; name what differs."""
        path = os.path.join(self.path, CONFIG)
        finished = self.finished()
        if not (finished or self.state()) or not os.path.exists(path):
            return
        saved = {k: v for k, v in _read_json(path).items() if k != OPTIONS}  # how it ran, not what it trains
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
                f"or use another {arg('name')} or {arg('overwrite')} to start afresh"
            )
        if differ:
            details = "; ".join(f"{k}: {label} {saved.get(k)!r}, now {config.get(k)!r}" for k in differ[:4])
            raise ValueError(
                f"{where}: {other} another run ({details}); use another {arg('name')}, or {arg('overwrite')} to start "
                "this one afresh"
            )

    def start(self, config, options=None):
        """Write run.json, `config` and the run's `options` (every option as the run uses them): from here on the run
        has started (what it writes stays, however it ends)."""
        self.started = True
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self._write_json(os.path.join(self.path, CONFIG), config if options is None else config | {OPTIONS: options})

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
            with files.open_regular(path, "checkpoints") as f, np.load(f, allow_pickle=False) as saved:
                values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"{path}: a damaged checkpoint ({reason}), the only one kept: pass {arg('overwrite')} to start afresh"
            ) from None
        shapes = [tuple(v.shape) for v in variables]
        if [tuple(x.shape) for x in values] != shapes:
            raise ValueError(
                f"{path}: its variables do not fit this run's model and optimizer; pass {arg('overwrite')}"
            )
        for variable, value in zip(variables, values):
            variable.assign(value)
        return state

    def finish(self, model, metrics):
        """Write the final model (a `.keras` file, and its keras-hub preset when it is a keras-hub model: the run
        folder is then a preset directory), the curves and, last, `metrics.json`."""
        save_model(model, self.model_path)
        if hasattr(model, "save_to_preset"):
            save_preset(model, self.path)
        plot_curves(metrics, self.plot_path)
        self._write_json(self.metrics_path, metrics)
        shutil.rmtree(self.checkpoint_dir)  # the training state is no longer needed: model.keras has the weights

    def _write_json(self, path, value):
        files.write_text(path, json.dumps(strict_json(value), indent=2, allow_nan=False) + "\n")


def _training_variables(trainer):
    """Every variable a resume needs, in a fixed order: the model's weights (a model that holds weights it rebuilds
    from their source, as a distiller's teacher, names the rest as `checkpoint_weights`), then the optimizer's."""
    model = trainer.model
    return [*getattr(model, "checkpoint_weights", model.weights), *trainer.optimizer.variables]


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
        return json.loads(files.read_regular(path, "run files", MAX_RUN_FILE_BYTES).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}): a damaged run file; remove it, or pass {arg('overwrite')} to start "
            "afresh"
        ) from None


def _open_lock(path):
    """The descriptor of the lock file at `path`, created if missing; a one-line error when it is a symbolic link
    or not a regular file (never followed, never truncated), or when the disk is full."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(
                f"{path} is a symbolic link (to {os.readlink(path)}): the lock must be a regular file; remove the link"
            ) from None
        if err.errno in files.DISK_FULL:
            raise files.disk_full(err, path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file: the lock must be one; remove it")
    return fd


def _missing_folders(path):
    """`path` and its ancestors that do not exist, deepest first: the folders `os.makedirs(path)` creates."""
    missing = []
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_unstarted(created, lock):
    """Remove what a run that never started left: the `lock` it made, then the `created` folders that are empty."""
    if lock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
    for path in created:
        try:
            os.rmdir(path)
        except OSError:  # not empty: something else is there
            break


def headline_metric(metrics):
    """The key of a run's result in its metrics: COCO AP for detection, else accuracy."""
    return "test_ap" if "test_ap" in metrics else "test_accuracy"


def plot_curves(metrics, path):
    """Losses and scores (accuracy, AP, ...) against the step, from `metrics["evals"]`, as a PNG. Drawn on a
    `matplotlib.figure.Figure` of its own: pyplot's state and backend (a notebook's) are left as they are."""
    from matplotlib.figure import Figure

    evals = metrics["evals"]
    steps = [e["step"] for e in evals]
    values = lambda key: [math.nan if e.get(key) is None else e[key] for e in evals]  # None: not a finite number
    scores = [k for k in evals[-1] if k.startswith(("train_", "test_")) and not k.endswith("loss")]
    fig = Figure(figsize=(10, 4))
    loss_ax, score_ax = fig.subplots(1, 2)
    loss_ax.plot(steps, values("train_loss"), marker="o", label="train (since the previous eval)")
    loss_ax.plot(steps, values("test_loss"), marker="o", label="test")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    for key in scores:
        if any(e.get(key) is not None for e in evals):
            label = "train (against the targets' argmax)" if key == "train_accuracy" else key.replace("_", " ")
            score_ax.plot(steps, values(key), marker="o", label=label)
    headline = headline_metric(metrics)
    value = metrics.get(headline)
    score_ax.set(xlabel="step", ylabel="score", title=f"{headline.replace('_', ' ')} {format_score(value)}")
    score_ax.set_ylim(0, 1)
    if score_ax.lines:
        score_ax.legend()
    fig.suptitle(metrics.get("name", ""))
    fig.tight_layout()
    with files.replacing(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)


def format_score(value):
    """A score for a title: four decimals, or "-" when it is not a number (None)."""
    return "-" if value is None else f"{value:.4f}"
