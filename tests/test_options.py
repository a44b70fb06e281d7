"""The training options are declared once (`bit_keras.options`): an option added there reaches every verb's signature,
its flag and --help, its check, and run.json; each verb's signature is typed and complete."""

import inspect
import json
import subprocess
import sys
import textwrap

import bit_keras
from bit_keras import options
from tests.test_cli import _env

VERBS = ("finetune", "pretrain", "finetune_detector")

# Runs in a fresh process: the declaration gets an option, the modules made from it are made again.
THROWAWAY = textwrap.dedent(
    """
    import importlib, inspect, io, json, os, sys, contextlib
    import bit_keras
    from bit_keras import cli, options

    options.RUN = options.RUN + (
        options.Option("throwaway", "float | None", help="a throwaway option of the test", check="rate"),
    )
    from bit_keras.training import engine, finetune, pretrain
    from bit_keras.detection import finetune as detection
    for module in (engine, finetune, pretrain, detection):
        importlib.reload(module)
    verbs = {"finetune": finetune.finetune, "pretrain": pretrain.pretrain}
    verbs["finetune_detector"] = detection.finetune_detector
    logdir = sys.argv[1]
    found = {"signature": {}, "flag": {}, "help": {}, "cli_refused": {}, "python_refused": {}}
    parser = cli.build_parser()
    for name, verb in verbs.items():
        command = name.replace("_", "-")
        found["signature"][name] = str(inspect.signature(verb).parameters.get("throwaway"))
        found["flag"][name] = parser.parse_args([command, "--throwaway", "2.5"]).throwaway
        with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):
            parser.parse_args([command, "--help"])
        found["help"][name] = "--throwaway THROWAWAY" in text.getvalue()
        for value in ("0", "nan"):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                status = cli.main([command, "--throwaway", value, "--logdir", logdir])
            found["cli_refused"][f"{name} {value}"] = [status, err.getvalue().strip()]
            try:
                verb(throwaway=float(value), logdir=logdir, verbose=0)
            except ValueError as error:
                found["python_refused"][f"{name} {value}"] = str(error)
    found["folder_after_refusals"] = os.path.exists(logdir)
    result = finetune.finetune(throwaway=2.5, steps=5, eval_every=5, resolution=16, logdir=logdir, verbose=0)
    with open(os.path.join(result.run_dir, "run.json")) as f:
        found["run_json"] = json.load(f)["options"]
    print(json.dumps(found))
    """
)


def test_an_option_declared_once_reaches_every_verb_flag_check_and_run_json(tmp_path):
    script = tmp_path / "throwaway.py"
    script.write_text(THROWAWAY)
    logdir = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(script), str(logdir)], capture_output=True, text=True, timeout=600, env=_env(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for verb in VERBS:
        assert found["signature"][verb] == "throwaway: 'float | None' = None", verb
        assert found["flag"][verb] == 2.5 and found["help"][verb], verb
        command = verb.replace("_", "-")
        for value, shown in (("0", "0.0"), ("nan", "nan")):
            status, message = found["cli_refused"][f"{verb} {value}"]
            assert status == 1 and message == (
                f"bit-keras {command}: --throwaway must be a positive finite number, got {shown}"
            ), message
            assert (
                found["python_refused"][f"{verb} {value}"] == f"throwaway must be a positive finite number, got {shown}"
            )
    assert not found["folder_after_refusals"]
    recorded = found["run_json"]
    assert recorded["throwaway"] == 2.5
    # Every option as the run used it: the embedded defaults and the HyperRule's choices, not None.
    assert (recorded["batch"], recorded["base_lr"], recorded["resolution"], recorded["steps"]) == (64, 0.03, 16, 5)
    assert recorded["model"] == "BiT-R14x0.5-mnist5k" and recorded["mixup_alpha"] == 0.0
    # The option is gone from this process's declaration.
    assert "throwaway" not in inspect.signature(bit_keras.finetune).parameters


def test_each_verb_has_the_typed_signature_of_its_declared_options():
    """`help(bit_keras.finetune)` and IDEs show every argument: the signature is the declaration's, typed, `dataset`
    positional, the rest keyword-only; unknown arguments are a TypeError as with any function."""
    for verb in VERBS:
        function = getattr(bit_keras, verb)
        parameters = inspect.signature(function).parameters
        assert list(parameters) == ["dataset", *(n for n in options.declared(verb) if n != "dataset")]
        assert parameters["dataset"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in parameters.items() if name != "dataset")
        assert all(p.annotation is not inspect.Parameter.empty for p in parameters.values())
        assert function.__doc__ and function.__name__ == verb
    assert inspect.signature(bit_keras.finetune).parameters["batch"].annotation == "int | None"
    assert inspect.signature(bit_keras.pretrain).parameters["weight_decay"].default == 1e-4
    try:
        bit_keras.finetune(batchsize=8)
    except TypeError as err:
        assert "batchsize" in str(err)
    else:
        raise AssertionError("an unknown argument was accepted")


def test_resolved_options_are_logged_and_written(tmp_path):
    """A run records and logs every option as it used it; a resume with other run-time options (verbosity) matches."""
    result = bit_keras.pretrain(
        "digits",
        model="R14x0.5",
        resolution=16,
        batch=256,
        epochs=2,
        decay_epochs=(1,),
        logdir=str(tmp_path),
        verbose=0,
    )
    run_json = json.loads((tmp_path / "digits-R14x0.5-bit-m" / "run.json").read_text())
    recorded = run_json["options"]
    assert recorded["schedule"] == "bit-m" and recorded["base_lr"] == 0.03 and recorded["decay_epochs"] == [1]
    assert recorded["warmup_steps"] == 5000 * 4096 // 256 and recorded["test_fraction"] is None
    log = (tmp_path / "digits-R14x0.5-bit-m" / "train.log").read_text()
    assert "options: dataset='digits'" in log and "schedule='bit-m'" in log
    assert result.metrics["steps"] > 0
