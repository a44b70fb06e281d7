"""Nothing the user had is lost, nothing leaves the run folder, nothing hangs: symbolic links and crafted run files,
inputs that detect would replace, FIFOs and devices named as images, damaged checkpoints, runs that never start,
class names that cannot be stored one per line, and the CLI's one line for every error."""

import os
import pathlib
import resource
import shutil
import subprocess

import matplotlib
import numpy as np
import pytest
from PIL import Image

import bit_keras
from bit_keras import checks, cli, files
from bit_keras.data import sources
from bit_keras.detection.detect import detect
from bit_keras.models import zoo
from bit_keras.training import engine, run_folder
from tests.test_cli import BIT_KERAS, _env, message_lines, run_in_process

pytestmark = pytest.mark.timeout(300)

SHIPPED = zoo.CHECKPOINTS["BiT-R14x0.5-mnist5k"].url
SHORT = dict(steps=10, eval_every=5, verbose=0)  # the embedded digits on the shipped model, two checkpoints


def _png(path, size=(8, 8), value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return str(path)


def _one_line(result, *expected):
    """The CLI's exit status was 1 and its stderr one line holding each of `expected`; returns that line."""
    lines = message_lines(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_detect_replaces_neither_inputs_nor_existing_pictures(tmp_path):
    """Pictures go to --out as NAME.png: an input of that name, a second input drawn to the same file and (without
    --overwrite) an existing file are refused in one line, before the model is even looked for."""
    d = tmp_path / "d"
    photo, holiday_jpg, holiday_png = _png(d / "photo.png", value=1), _png(d / "holiday.jpg"), _png(d / "holiday.png")
    before = {path: pathlib.Path(path).read_bytes() for path in (photo, holiday_jpg, holiday_png)}
    missing = str(tmp_path / "no-such-run")
    for overwrite in ([], ["--overwrite"]):  # an input is never replaced
        result = run_in_process(["detect", "--model", missing, photo, holiday_jpg, "--out", d, *overwrite])
        _one_line(result, f"{photo}: drawing {photo} there would replace the input image")
    result = run_in_process(["detect", "--model", missing, holiday_jpg, "--out", d])
    _one_line(result, f"{holiday_png} exists: pass --overwrite to replace it, or choose another --out")
    other = _png(tmp_path / "e" / "holiday.png")
    result = run_in_process(["detect", "--model", missing, holiday_jpg, other, "--out", tmp_path / "out"])
    _one_line(result, f"both {holiday_jpg} and {other} would be drawn there")
    assert {path: pathlib.Path(path).read_bytes() for path in before} == before
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="pass overwrite to replace it, or choose another out$"):  # Python's names
        detect(missing, [holiday_jpg], out=str(d))
    # With --overwrite the existing picture is no obstacle: the command goes on to look for the model.
    result = run_in_process(["detect", "--model", missing, holiday_jpg, "--out", d, "--overwrite"])
    _one_line(result, f"{missing}")


@pytest.mark.parametrize("entry", [".lock", "train.log", "checkpoint", "tensorboard", "run.json"])
def test_links_in_the_run_folder_are_refused_and_their_targets_untouched(tmp_path, entry):
    """A run writes only inside its folder: a link named like what it writes (the lock above all, which would be
    truncated and overwritten) is refused in one line, before anything is written."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "victim.txt").write_text("precious")
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    if entry != "run.json":  # a run folder (else a folder holding run files is not touched at all)
        (run / "run.json").write_text("{}")
    target = victim / "victim.txt" if entry in (".lock", "train.log", "run.json") else victim
    os.symlink(target, run / entry)
    before = sorted(os.listdir(run))
    result = run_in_process(["finetune", "--logdir", tmp_path / "runs", "--name", "x", "--steps", "5"])
    expected = "the lock must be a regular file" if entry == ".lock" else "a run writes only inside its folder"
    _one_line(result, f"{run / entry} is a symbolic link (to {target})", expected)
    assert (victim / "victim.txt").read_text() == "precious" and os.listdir(victim) == ["victim.txt"]
    assert sorted(os.listdir(run)) == before, "nothing is written"


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    os.mkfifo(run / ".lock")
    result = run_in_process(["finetune", "--logdir", tmp_path / "runs", "--name", "x", "--steps", "5"])
    _one_line(result, f"{run / '.lock'} is not a regular file")


def _stopped_run(logdir, monkeypatch, model):
    """A run of the embedded digits on `model` stopped (Ctrl-C) right after its first checkpoint (step 5)."""
    save = run_folder.RunFolder.save

    def save_then_stop(self, trainer, state):
        save(self, trainer, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.RunFolder, "save", save_then_stop)
    with pytest.raises(engine.RunStopped, match="resumes it from the checkpoint of step 5"):
        bit_keras.finetune(model=model, logdir=str(logdir), name="r", **SHORT)
    monkeypatch.setattr(run_folder.RunFolder, "save", save)
    return logdir / "r"


def test_damaged_checkpoints_and_run_files_are_one_line(tmp_path, monkeypatch):
    """A run stopped after its first checkpoint, then: its model file damaged (the resume fails to start: the folder
    and its checkpoint stay), its checkpoint truncated (one line naming the file and --overwrite), its state.json
    crafted to name a file of another run (refused naming the key; that file is neither loaded nor deleted), and a
    FIFO as state.json (refused, not a hang)."""
    model = tmp_path / "model.npz"
    shutil.copy(SHIPPED, model)
    run = _stopped_run(tmp_path / "runs", monkeypatch, str(model))
    kept = sorted(os.listdir(run / "checkpoint"))
    assert kept == ["state.json", "step-5.npz"]
    args = ["finetune", "--model", model, "--logdir", tmp_path / "runs", "--name", "r", *("--steps", 10)]
    args += ["--eval_every", 5]

    model.write_bytes(b"not an npz")
    _one_line(run_in_process(args), str(model))
    assert sorted(os.listdir(run / "checkpoint")) == kept and (run / "run.json").exists()
    shutil.copy(SHIPPED, model)

    checkpoint = run / "checkpoint" / "step-5.npz"
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])
    _one_line(run_in_process(args), f"{checkpoint}: a damaged checkpoint", "pass --overwrite to start afresh")
    checkpoint.write_bytes(whole)

    other = tmp_path / "R1" / "checkpoint" / "step-10.npz"
    other.parent.mkdir(parents=True)
    other.write_bytes(whole)
    state = run / "checkpoint" / "state.json"
    saved = state.read_text()
    for weights in ("../../../R1/checkpoint/step-10.npz", str(other), "step-5.npz/..", ".."):
        state.write_text(saved.replace('"step-5.npz"', f'"{weights}"'))
        _one_line(run_in_process(args), f"{state}: a damaged state.json ('weights' is {weights!r}")
        assert other.read_bytes() == whole
    os.remove(checkpoint)
    os.symlink(other, checkpoint)
    state.write_text(saved)
    _one_line(
        run_in_process(args), f"{checkpoint} is a symbolic link (to {other}): a run writes only inside its folder"
    )
    os.remove(checkpoint)
    checkpoint.write_bytes(whole)
    os.remove(state)
    os.mkfifo(state)
    _one_line(run_in_process(args), f"{state}: a FIFO, not a regular file")
    os.remove(state)
    state.write_text(saved)
    assert run_in_process(args).returncode == 0  # intact again: the run resumes and finishes
    assert other.read_bytes() == whole


def test_a_run_that_never_starts_leaves_no_folder(tmp_path):
    """A start that fails (here on a model file that is no checkpoint) removes the run folder and the log folder it
    created; a folder that existed before is kept."""
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    result = run_in_process(["finetune", "--model", bad, "--logdir", tmp_path / "runs" / "deep", "--steps", "5"])
    _one_line(result, str(bad))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = run_in_process(["finetune", "--model", bad, "--logdir", tmp_path / "mine", "--steps", "5"])
    assert result.returncode == 1
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_a_start_that_fails_inside_the_lock_leaves_no_folder(tmp_path, monkeypatch):
    """A failure after the run folder and its lock exist but before the run starts (here the model's build) removes
    them; a folder that held a checkpoint before keeps it."""
    from bit_keras.training.finetune import HyperRuleRecipe

    def fails(*args, **kwargs):
        raise RuntimeError("the model cannot be built")

    monkeypatch.setattr(HyperRuleRecipe, "build_model", fails)
    logdir = tmp_path / "runs" / "deep"
    with pytest.raises(RuntimeError, match="cannot be built"):
        bit_keras.finetune(logdir=str(logdir), steps=5, verbose=0)
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept" / "digits-BiT-R14x0.5-mnist5k" / "checkpoint"
    kept.mkdir(parents=True)
    (kept / "step-5.npz").write_bytes(b"an earlier checkpoint")
    (kept.parent / "run.json").write_text("{}")  # a run folder of an earlier start
    with pytest.raises(RuntimeError, match="cannot be built"):
        bit_keras.finetune(logdir=str(tmp_path / "kept"), steps=5, verbose=0)
    assert (kept / "step-5.npz").read_bytes() == b"an earlier checkpoint"


def test_a_full_disk_at_the_lock_names_it_and_leaves_nothing(tmp_path):
    """Under a file-size limit of 20 bytes (as a full disk) the lock cannot be written: one line naming it, and no
    folder left."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))
    proc = subprocess.run(
        [*BIT_KERAS, "finetune", "--logdir", "runs", "--name", "full", "--steps", "5", "--quiet"],
        cwd=tmp_path,
        env=_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=240,
    )
    # (TensorFlow's AutoGraph cannot write its temporary files either, and warns: not the command's own lines.)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bit-keras ")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("bit-keras finetune: runs/full/.lock: cannot write (File too large); nothing was")
    assert not (tmp_path / "runs").exists()


def test_class_names_that_cannot_be_stored_one_per_line_are_refused(tmp_path):
    """A class folder named with a line break would give class_names.txt more lines than classes: refused at the
    scan, naming the folder; names given with the data are checked when the run starts."""
    root = tmp_path / "photos"
    for name in ("a", "b\nc"):
        _png(root / name / "0.png")
        _png(root / name / "1.png")
    with pytest.raises(ValueError, match=r"photos/b\\nc'.*holds the control character '\\n'"):
        sources.from_image_folder(str(root))
    x = np.zeros((4, 8, 8, 3), np.uint8)
    data = sources.from_arrays(x, [0, 1, 0, 1], x, [0, 1, 0, 1], class_names=["a", "b\tc"])
    with pytest.raises(ValueError, match=r"class name 'b\\tc' holds the control character '\\t'"):
        bit_keras.finetune(data=data, model="BiT-R14x0.5-mnist5k", logdir=str(tmp_path / "runs"), **SHORT)
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(60)
def test_only_regular_files_are_read_as_images(tmp_path):
    """A FIFO would block the open forever and /dev/zero never end: predict refuses both in one line, and an image
    folder holding a FIFO is refused at the scan."""
    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        result = run_in_process(["predict", "--model", "BiT-R14x0.5-mnist5k", path])
        _one_line(result, f"{path}: {kind}, not a regular file")
    for i in range(2):
        _png(tmp_path / "folder" / "a" / f"{i}.png")
        _png(tmp_path / "folder" / "b" / f"{i}.png")
    os.mkfifo(tmp_path / "folder" / "b" / "2.png")
    with pytest.raises(ValueError, match="2.png: a FIFO, not a regular file"):
        sources.from_image_folder(str(tmp_path / "folder"))


def test_unexpected_errors_are_one_line_with_the_verbose_hint(tmp_path, monkeypatch, capsys):
    """What bit_keras did not foresee is still one line, with its type and the way to the traceback; --verbose shows
    the traceback."""

    def broken(args):
        raise ZeroDivisionError("something unforeseen\nwith a second line")

    monkeypatch.setattr(cli, "_models", broken)  # the parser takes the function when it is built
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err.strip()
    unforeseen = "unexpected ZeroDivisionError: something unforeseen (rerun with --verbose for the traceback)"
    assert err == f"bit-keras models: {unforeseen}"
    monkeypatch.setenv("BIT_KERAS_VERBOSE", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["models"])


def test_curves_leave_pyplot_alone_and_take_missing_scores(tmp_path):
    """plot_curves draws on its own Figure: a notebook's backend is unchanged by a fine-tuning run; a score that is
    None (no finite value) is drawn as a gap and titled "-"."""
    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        bit_keras.finetune(logdir=str(tmp_path / "runs"), **SHORT)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    evals = [{"step": 1, "train_loss": 1.0, "test_loss": None, "test_ap": None}, {"step": 2, "train_loss": 0.5}]
    run_folder.plot_curves({"evals": evals, "test_ap": None, "name": "n"}, str(tmp_path / "curves.png"))
    assert Image.open(tmp_path / "curves.png").size == (1000, 400)


def test_messages_name_python_arguments_in_python_and_flags_on_the_command_line():
    for arg, cli_text, python_text in (
        ("labels", "--labels FILE", "labels=FILE"),
        ("overwrite", "--overwrite", "overwrite"),
    ):
        value = "FILE" if arg == "labels" else None
        assert checks.arg(arg, value) == python_text
        with checks.command_line():
            assert checks.arg(arg, value) == cli_text
    with pytest.raises(ValueError, match="^batch must be a positive integer"):
        checks.check_int("batch", 0)
    with checks.command_line(), pytest.raises(ValueError, match="^--batch must be a positive integer"):
        checks.check_int("batch", 0)
    assert files.read_regular(SHIPPED, "checkpoints")[:2] == b"PK"
