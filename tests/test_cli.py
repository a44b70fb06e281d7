"""Tests for the `bit-keras` console script (`models`, `convert`).

Conversions run as real subprocesses and their `.keras` files are loaded back in a fresh Python process and
compared with the independent float64 numpy forward pass of tests/reference_bit.py; one failing conversion runs
as a real process too (the one-line error on a real stderr). The other error cases, `--overwrite` and the zoo
table run `bit_keras.cli.main` in this process: the same code behind the console script, without paying
TensorFlow's start-up again for each.
"""

import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests.official_npz import write_npz

pytestmark = pytest.mark.timeout(300)

TIMEOUT_S = 180
SMALL_UNITS = (2, 2, 2, 2)


def _script():
    """The installed `bit-keras` console script of this interpreter (else on PATH, else `-m bit_keras.cli`)."""
    beside = pathlib.Path(sys.executable).with_name("bit-keras")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("bit-keras")
    return [found] if found else [sys.executable, "-m", "bit_keras.cli"]


BIT_KERAS = _script()
# TensorFlow/absl start-up logging that is not the CLI's own output.
TF_NOISE = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl|To enable the following instructions)")


def _env(cache):
    return dict(os.environ, KERAS_BACKEND="tensorflow", BIT_KERAS_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="2")


def run_all(commands, cwd, cache):
    """Run the argv lists concurrently; returns their CompletedProcess objects in order."""
    procs = [
        (
            cmd,
            subprocess.Popen(cmd, cwd=cwd, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )
        for cmd in commands
    ]
    results = []
    try:
        for cmd, proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def cli(*args):
    return BIT_KERAS + [str(a) for a in args]


def run_in_process(argv):
    """`bit_keras.cli.main(argv)` here, as a CompletedProcess (returncode, stdout, stderr)."""
    from bit_keras import cli as cli_lib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        returncode = cli_lib.main([str(a) for a in argv])
    return subprocess.CompletedProcess(argv, returncode, out.getvalue(), err.getvalue())


def message_lines(stderr):
    """stderr without TensorFlow's start-up logging."""
    return [line for line in stderr.splitlines() if line.strip() and not TF_NOISE.match(line)]


def assert_close(actual, expected):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(actual, expected, rtol=0, atol=5e-5 * scale)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


# ----------------------------------------------------------------------------- models


def test_models_table(workdir):
    from bit_keras.models import zoo

    plain, with_archs = run_in_process(["models"]), run_in_process(["models", "--architectures"])
    assert plain.returncode == 0, plain.stderr
    assert with_archs.returncode == 0, with_archs.stderr
    rows = {line.split()[0]: line.split() for line in plain.stdout.splitlines() if line.strip()}
    for name, entry in zoo.CHECKPOINTS.items():
        assert name in rows, name
        assert f"{zoo.parameter_count(entry.arch, entry.num_classes) / 1e6:.1f}" in rows[name]
        assert str(entry.num_classes) in rows[name]
    for name in ("BiT-S-R50x1", "BiT-M-R50x1-ILSVRC2012", "BiT-R50x1-distilled-224", "BiT-R50x1-distilled-160"):
        assert "25.5" in rows[name]
    assert "R26x0.5" not in rows
    arch_rows = {line.split()[0]: line.split() for line in with_archs.stdout.splitlines() if line.strip()}
    assert set(rows) < set(arch_rows)
    for arch in ("R26x0.5", "R50x1", "R152x4"):
        assert f"{zoo.parameter_count(arch) / 1e6:.1f}" in arch_rows[arch]


# ----------------------------------------------------------------------------- convert + fresh-process load

LOAD_SCRIPT = """
import json, sys
import numpy as np
import bit_keras, keras
images = np.load(sys.argv[1])
info = {}
for i, path in enumerate(sys.argv[3:]):
    model = keras.saving.load_model(path)
    np.save(f"{sys.argv[2]}/out{i}.npy", model.predict(images, verbose=0))
    info[path] = {"class": type(model).__name__, "num_classes": model.num_classes,
                  "block_units": list(model.backbone.block_units), "width": model.backbone.width}
print(json.dumps(info))
"""


@pytest.fixture(scope="module")
def converted(small_npz, workdir):
    """`convert` of small_npz with its head and (into a new sub-directory) as a features model."""
    out = workdir / "converted"
    out.mkdir()
    model, features = out / "model.keras", out / "sub" / "features.keras"
    results = run_all(
        [cli("convert", small_npz, "--out", model), cli("convert", small_npz, "--num_classes", 0, "--out", features)],
        workdir,
        workdir / "cache",
    )
    return {"dir": out, "model": model, "features": features, "results": results}


def test_convert_writes_keras_files(converted):
    for result, path, classes in zip(converted["results"], (converted["model"], converted["features"]), ("10", "no")):
        assert result.returncode == 0, result.stderr
        assert message_lines(result.stderr) == []
        assert f"wrote {path}" in result.stdout
        assert f"{classes} head classes" in result.stdout
        assert zipfile.is_zipfile(path)
    leftovers = sorted(p.name for p in converted["dir"].rglob("*") if p.is_file())
    assert leftovers == ["features.keras", "model.keras"]


def test_convert_round_trip_in_fresh_process(converted, small_images, small_reference, workdir):
    assert all(r.returncode == 0 for r in converted["results"])
    out = workdir / "loaded"
    out.mkdir()
    np.save(out / "images.npy", small_images)
    cmd = [sys.executable, "-c", LOAD_SCRIPT, out / "images.npy", out, converted["model"], converted["features"]]
    (result,) = run_all([[str(c) for c in cmd]], workdir, workdir / "cache")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info[str(converted["model"])] == {
        "class": "BiTImageClassifier",
        "num_classes": 10,
        "block_units": [2, 2, 2, 2],
        "width": 0.5,
    }
    assert info[str(converted["features"])]["num_classes"] == 0
    assert_close(np.load(out / "out0.npy"), small_reference["logits"])
    features = np.load(out / "out1.npy")
    assert features.shape == (2, 1024)
    assert_close(features, small_reference["pre_logits"])


def test_convert_overwrite(small_npz, workdir, small_images, small_reference):
    import keras

    import bit_keras  # noqa: F401  (registers the classes)

    out = workdir / "overwrite"
    out.mkdir()
    kept, replaced = out / "kept.keras", out / "replaced.keras"
    kept.write_bytes(b"old")
    replaced.write_bytes(b"old")
    refused = run_in_process(["convert", small_npz, "--out", kept])
    done = run_in_process(["convert", small_npz, "--out", replaced, "--overwrite"])
    assert refused.returncode != 0
    (line,) = message_lines(refused.stderr)
    assert str(kept) in line and "--overwrite" in line
    assert kept.read_bytes() == b"old"
    assert done.returncode == 0, done.stderr
    model = keras.saving.load_model(replaced)
    assert_close(model.predict(small_images, verbose=0), small_reference["logits"])
    assert sorted(p.name for p in out.iterdir()) == ["kept.keras", "replaced.keras"]


# ----------------------------------------------------------------------------- convert errors

MISSING_KEY = "resnet/block3/unit02/b/group_norm/beta"
SHAPE_KEY = "resnet/block2/unit01/b/standardized_conv2d/kernel"  # (3, 3, 64, 64) in R26x0.5


def _bad_checkpoints(small_npz, small_params, directory):
    """name -> (input path, substrings the error line must contain)."""
    cases = {}
    truncated = directory / "truncated.npz"
    truncated.write_bytes(pathlib.Path(small_npz).read_bytes()[:1000])
    cases["truncated"] = (truncated, [str(truncated)])
    text = directory / "text.npz"
    text.write_text("this is not a checkpoint\n")
    cases["text"] = (text, [str(text)])

    missing = dict(small_params)
    del missing[MISSING_KEY]
    write_npz(directory / "missing.npz", missing)
    cases["missing_key"] = (directory / "missing.npz", [MISSING_KEY, "missing"])

    extra = dict(small_params, **{"resnet/extra/conv2d/kernel": np.zeros((1, 1, 4, 4), np.float32)})
    write_npz(directory / "extra.npz", extra)
    cases["extra_key"] = (directory / "extra.npz", ["resnet/extra/conv2d/kernel", "unexpected"])

    shaped = dict(small_params, **{SHAPE_KEY: np.zeros((3, 3, 64, 48), np.float32)})
    write_npz(directory / "shape.npz", shaped)
    cases["wrong_shape"] = (directory / "shape.npz", [SHAPE_KEY, "(3, 3, 64, 48)", "(3, 3, 64, 64)"])
    return cases


ERROR_CASES = ["truncated", "text", "missing_key", "extra_key", "wrong_shape"]


@pytest.fixture(scope="module")
def failed_converts(small_npz, small_params, workdir):
    """Every failing `convert` run at once: name -> (CompletedProcess, output dir, expected substrings)."""
    inputs = workdir / "bad_inputs"
    inputs.mkdir()
    cases = _bad_checkpoints(small_npz, small_params, inputs)
    assert sorted(cases) == sorted(ERROR_CASES)
    results = {}
    for name in ERROR_CASES:
        outdir = workdir / "failed" / name
        outdir.mkdir(parents=True)
        argv = ["convert", cases[name][0], "--out", outdir / "out.keras"]
        if name == "truncated":  # a real process
            (result,) = run_all([cli(*argv)], workdir, workdir / "cache")
        else:
            result = run_in_process(argv)
        results[name] = (result, outdir, cases[name][1])
    return results


@pytest.mark.parametrize("case", ERROR_CASES)
def test_convert_error_is_one_line_and_writes_nothing(failed_converts, case):
    result, outdir, expected = failed_converts[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = message_lines(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("bit-keras convert: ")
    for text in expected:
        assert text in lines[0]
    assert "wrote" not in result.stdout
    assert list(outdir.iterdir()) == []
