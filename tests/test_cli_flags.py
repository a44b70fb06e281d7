"""The command line keeps every flag it had: each subcommand's flags, defaults, choices and types as recorded
before the run engine was unified (tests/data/cli_before_issue12.json, dumped from that parser and its `--help`),
one `--help` in a real process, and the CLI-level checks of `export`."""

import argparse
import json
import os
import pathlib
import socket
import subprocess

import pytest

from bit_keras import cli, defaults
from tests.test_cli import BIT_KERAS, _env, message_lines

BEFORE = json.loads((pathlib.Path(__file__).parent / "data" / "cli_before_issue12.json").read_text())


def _subparsers():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _spec(action):
    return {
        "dest": action.dest,
        "default": action.default,
        "choices": list(action.choices) if action.choices else None,
        "nargs": action.nargs,
        "type": getattr(action.type, "__name__", None),
        "required": action.required,
        "action": type(action).__name__,
    }


# What a training recipe uses for an option left out (the declared default None): the defaults the flags had.
RECIPE_DEFAULTS = {
    "finetune": {"test_fraction": defaults.TEST_FRACTION, "train_split": "train", "test_split": "test"},
    "pretrain": {
        **defaults.PRETRAIN_DEFAULTS,
        "preset": defaults.PRETRAIN_DEFAULTS["schedule"],
        "test_fraction": defaults.TEST_FRACTION,
        "train_split": "train",
        "test_split": "test",
    },
}


@pytest.mark.parametrize("command", sorted(BEFORE["flags"]))
def test_every_flag_keeps_its_name_and_meaning(command):
    """Each recorded flag parses as before; where the recorded default is now None (the recipe's default), the recipe
    resolves None to the recorded value."""
    actions = {
        (a.option_strings[-1] if a.option_strings else a.dest): a
        for a in _subparsers()[command]._actions
        if not isinstance(a, argparse._HelpAction)
    }
    for flag, before in BEFORE["flags"][command].items():
        assert flag in actions, f"{command} lost {flag}"
        expected = {k: v for k, v in before.items() if k != "help"}
        spec = json.loads(json.dumps(_spec(actions[flag]), default=str))
        if spec["default"] is None and expected["default"] is not None:
            assert RECIPE_DEFAULTS[command][spec["dest"]] == expected["default"], (command, flag)
            spec["default"] = expected["default"]
        assert spec == expected, (command, flag)


@pytest.mark.parametrize("command", sorted(BEFORE["help_flags"]))
def test_help_lists_every_flag_it_listed(command):
    text = _subparsers()[command].format_help()
    missing = [flag for flag in BEFORE["help_flags"][command] if flag not in text]
    assert not missing, missing


def test_help_in_a_real_process_is_clean(tmp_path):
    """`--help` of a training subcommand: exit 0, the shared flags once each, nothing from TensorFlow on stderr."""
    proc = subprocess.run(
        [*BIT_KERAS, "finetune", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    usage = proc.stdout[: proc.stdout.index("options:")]
    for flag in ("--batch", "--eval_every", "--mixed_precision", "--quiet", "--examples_per_class"):
        assert usage.count(f"[{flag} ") + usage.count(f"[{flag}]") == 1, flag


def test_export_needs_exactly_one_source(capsys):
    assert cli.main(["export"]) == 1
    assert cli.main(["export", "--model", "R26x0.5", "--run", "runs/x"]) == 1
    lines = message_lines(capsys.readouterr().err)
    assert (
        lines
        == ["bit-keras export: give exactly one of --model (a name, .npz or .keras file) and --run (a run folder)"] * 2
    )


def test_training_flags_are_checked_before_anything(tmp_path, capsys):
    """Zero and non-finite numbers are errors naming the flag, not defaults; no run folder appears."""
    cases = {
        ("--batch", "0"): "batch must be a positive integer, got 0",
        ("--base_lr", "nan"): "base_lr must be a positive finite number, got nan",
        ("--eval_every", "-1"): "eval_every must be a positive integer, got -1",
        ("--steps", "0"): "steps must be a positive integer, got 0",
        ("--mixup_alpha", "inf"): "mixup_alpha must be a finite number >= 0, got inf",
    }
    for args, message in cases.items():
        assert cli.main(["finetune", "--logdir", str(tmp_path / "runs"), *args]) == 1
        assert message in capsys.readouterr().err, args
    assert cli.main(["finetune", "--logdir", str(tmp_path / "runs"), "--examples_per_class_seed", "-1"]) == 1
    assert "examples_per_class_seed must be an integer >= 0, got -1" in capsys.readouterr().err
    pretrain_cases = {
        ("--resolution", "0"): "resolution must be a positive integer, got 0",
        ("--epochs", "0"): "epochs must be a positive integer, got 0",
        ("--warmup_steps", "-1"): "warmup_steps must be an integer >= 0, got -1",
        ("--weight_decay", "nan"): "weight_decay must be a finite number >= 0, got nan",
        ("--decay_epochs", "3", "0"): "decay_epochs must be a positive integer, got 0",
    }
    for args, message in pretrain_cases.items():
        assert cli.main(["pretrain", "--dataset", "digits", "--logdir", str(tmp_path / "runs"), *args]) == 1
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "runs").exists()


def test_serving_numbers_and_dtypes_are_checked(tmp_path, capsys):
    """`x or default` is gone from serving too: 0 and negatives are errors naming the flag; a dtype that is no
    Keras dtype policy is refused when the model is named, before any file is written."""
    image = tmp_path / "x.png"
    image.write_bytes(b"not read: the numbers are checked first")
    cases = {
        ("predict", "--model", "R14x0.5", "--top_k", "0", str(image)): "top_k must be a positive integer, got 0",
        (
            "predict",
            "--model",
            "R14x0.5",
            "--image_size",
            "0",
            str(image),
        ): "image_size must be a positive integer, got 0",
        ("export", "--model", "BiT-R14x0.5-mnist5k", "--top_k", "-3"): "top_k must be a positive integer, got -3",
        (
            "export",
            "--model",
            "BiT-R14x0.5-mnist5k",
            "--image_size",
            "0",
        ): "image_size must be a positive integer, got 0",
        ("convert", "R14x0.5", "--num_classes", "0", "--dtype", "bf16", "--out", str(tmp_path / "m.keras")): (
            "dtype must be a Keras dtype policy (e.g. mixed_bfloat16), got 'bf16'"
        ),
    }
    for args, message in cases.items():
        assert cli.main([*args, *(["--out", str(tmp_path / "e")] if args[0] == "export" else [])]) == 1, args
        lines = message_lines(capsys.readouterr().err)
        assert len(lines) == 1 and message in lines[0], (args, lines)
    assert sorted(os.listdir(tmp_path)) == ["x.png"]


def test_folders_that_are_not_ours_are_never_replaced(tmp_path, capsys):
    """`--overwrite` replaces only what bit_keras wrote: an export over a folder that is no SavedModel, and a run in a
    folder without run.json that holds a name a run writes (model.keras, checkpoint/, ...), are refused by name with
    the user's files untouched. An architecture exports its random features without asking for a head size."""
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    assert cli.main(["export", "--model", "R14x0.5", "--out", str(users), "--overwrite"]) == 1
    lines = message_lines(capsys.readouterr().err)
    assert lines == [
        f"bit-keras export: {users} exists and is not a SavedModel export: not replacing it; choose another --out"
    ]
    (users / "model.keras").write_text("a model of mine")
    for overwrite in ([], ["--overwrite"]):
        args = ["finetune", "--logdir", str(tmp_path), "--name", "mine", "--steps", "5", *overwrite]
        assert cli.main(args) == 1
        lines = message_lines(capsys.readouterr().err)
        assert (
            len(lines) == 1 and f"{users} is not a bit_keras run folder (no run.json) but holds model.keras" in lines[0]
        )
    assert sorted(os.listdir(users)) == ["model.keras", "notes.txt"]
    assert (users / "model.keras").read_text() == "a model of mine"
    assert cli.main(["export", "--model", "R14x0.5", "--kind", "classification", "--out", str(tmp_path / "e")]) == 1
    assert "R14x0.5 is an architecture (random weights, no head)" in capsys.readouterr().err
    assert cli.main(["export", "--model", "R14x0.5", "--out", str(tmp_path / "e")]) == 0
    assert "feature_vector export of r14x0_5 (random weights)" in capsys.readouterr().out
    assert (tmp_path / "e" / "saved_model.pb").exists()


def test_what_a_killed_convert_or_export_left_is_removed_by_the_next(tmp_path, capsys):
    """Temporaries of a dead process (this host) beside a target are removed by the next write of that target; a
    live process's are kept."""
    dead, alive = f"{socket.gethostname()}-{2**22 + 17}", f"{socket.gethostname()}-1"
    left = [tmp_path / f".m.keras.tmp-{dead}.keras", tmp_path / f".e.tmp-{dead}"]
    left[0].write_bytes(b"partial")
    left[1].mkdir()
    (left[1] / "saved_model.pb").write_bytes(b"partial")
    kept = tmp_path / f".m.keras.tmp-{alive}.keras"
    kept.write_bytes(b"someone's")
    assert cli.main(["convert", "R14x0.5", "--num_classes", "0", "--out", str(tmp_path / "m.keras")]) == 0
    assert cli.main(["export", "--model", str(tmp_path / "m.keras"), "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["e", "m.keras", kept.name])
