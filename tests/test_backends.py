"""The model core on JAX and PyTorch: the same checkpoint gives the same logits as on TensorFlow and as the float64
reference, `.keras` files move between backends, `fold_weight_standardization`, `save_checkpoint` and a stock `fit`
work, and the TensorFlow-only names say what to install.

Keras fixes its backend at import, so each backend runs in a subprocess (`python -m tests.test_backends JOB`, on
`KERAS_BACKEND`), once for all the checks, with TensorFlow unimportable there (`NoTensorFlow`: keras-hub imports
TensorFlow whenever it can, so the model core is checked to run without it); this process is the TensorFlow side.
"""

import contextlib
import functools
import importlib.abc
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.official_npz import random_checkpoint, write_npz
from tests.reference_bit import reference_forward

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("jax", "torch")
SHIPPED = "BiT-R14x0.5-mnist5k"  # the real checkpoint shipped in the package, 32px
UNITS = (1, 1, 1, 1)  # the random checkpoint's R14x0.5: float32 noise ~1-2e-6 here (R26x0.5's reaches 7e-6)
TOL = 1e-5  # of the largest |logit|: float32 noise between backends and against float64


def _logits(model, images):
    import keras

    return keras.ops.convert_to_numpy(model(images)).astype(np.float64)


def _fit(model):
    """Losses of a few stock `fit` epochs of one batch, and whether the root kernel moved."""
    import keras

    rng = np.random.default_rng(0)
    images, labels = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32), np.arange(8) % 3
    before = model.backbone.get_layer("root_conv").kernel.numpy().copy()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=loss)
    losses = model.fit(images, labels, batch_size=8, epochs=4, verbose=0).history["loss"]
    return np.array(losses), not np.array_equal(before, model.backbone.get_layer("root_conv").kernel.numpy())


def _jax_group_norm_gradients(model, images):
    """Gradients of the model's weights through the JAX fast path's hand-written group norm gradient and through
    autodiff (`portable_ops`): the largest deviation over the weights (relative to each one's largest gradient),
    and whether each trace used a custom gradient."""
    import jax

    from bit_keras.models.layers import portable_ops

    trainable = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]
    weights = np.random.default_rng(1).normal(size=model.output_shape[1:]).astype(np.float32)

    def loss(trainable):
        logits, _ = model.stateless_call(trainable, others, images, training=True)
        return (logits * weights).sum()

    gradients, used_custom = {}, {}
    for path in ("fast", "portable"):
        with portable_ops() if path == "portable" else contextlib.nullcontext():
            traced = functools.partial(loss)  # a new function: JAX caches traces by function, not by context
            gradients[path] = jax.grad(traced)(trainable)
            used_custom[path] = "custom_vjp_call" in str(jax.make_jaxpr(traced)(trainable))
    deviation = max(
        float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(gradients["fast"], gradients["portable"])
    )
    return deviation, used_custom["fast"], used_custom["portable"]


class NoTensorFlow(importlib.abc.MetaPathFinder):
    """One of `sys.meta_path`'s finders, finding what it finds but TensorFlow: as where TensorFlow is not installed
    (`import tensorflow` fails, `importlib.util.find_spec("tensorflow")` is None)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow" or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


def _worker(job_path):
    """On `KERAS_BACKEND`'s backend: every output the tests compare, into `job["out"]` (an .npz)."""
    with open(job_path) as f:
        job = json.load(f)
    import keras

    import bit_keras
    from bit_keras.models.checkpoint import read_npz

    images = np.load(job["images"])
    out = {}
    model = bit_keras.create_model(job["npz"])
    out["logits"] = _logits(model, images["random"])
    out["folded"] = _logits(model.fold_weight_standardization(), images["random"])
    out["shipped"] = _logits(bit_keras.create_model(SHIPPED, weights="pretrained"), images["shipped"])
    out["tensorflow_imported"] = "tensorflow" in sys.modules  # nothing got past `NoTensorFlow`
    out["tensorflow_blocked"] = any(isinstance(finder, NoTensorFlow) for finder in sys.meta_path)
    model.save(job["keras_out"])
    out["from_tensorflow_file"] = _logits(keras.saving.load_model(job["keras_in"]), images["random"])
    bit_keras.save_checkpoint(model, job["npz_out"])
    written, given = read_npz(job["npz_out"]), read_npz(job["npz"])
    out["checkpoint_round_trip"] = written.keys() == given.keys() and all(
        np.array_equal(written[k], given[k]) for k in given
    )
    new_head = bit_keras.resolve_model(SHIPPED, new_head=True).model.output_dense
    out["new_head_zero"] = not np.any(new_head.kernel.numpy()) and not np.any(new_head.bias.numpy())
    if keras.backend.backend() == "jax":
        out["jax_gradient_deviation"], out["jax_fast_custom"], out["jax_portable_custom"] = _jax_group_norm_gradients(
            model, images["random"]
        )
    out["fit_losses"], out["fit_moved"] = _fit(bit_keras.create_model("R14x0.5", num_classes=3))
    try:
        bit_keras.finetune  # noqa: B018 (the attribute access is the test)
    except ImportError as err:
        out["tensorflow_only_error"] = str(err)
    np.savez(job["out"], **out)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random official-layout checkpoint and images for it (64px) and for the shipped model (32px)."""
    folder = tmp_path_factory.mktemp("backends")
    params = random_checkpoint(UNITS, width=0.5, num_classes=10, seed=2)
    write_npz(folder / "random.npz", params)
    rng = np.random.default_rng(0)
    images = {"random": rng.uniform(0, 1, (2, 64, 64, 3)), "shipped": rng.uniform(0, 1, (2, 32, 32, 3))}
    images = {key: value.astype(np.float32) for key, value in images.items()}
    np.savez(folder / "images.npz", **images)
    return {
        "params": params,
        "npz": str(folder / "random.npz"),
        "images": images,
        "images_npz": str(folder / "images.npz"),
    }


@pytest.fixture(scope="module")
def reference(inputs):
    from bit_keras.models import zoo

    with np.load(zoo.CHECKPOINTS[SHIPPED].url) as f:
        shipped = {k: f[k] for k in f.files}
    images = inputs["images"]
    return {
        "logits": reference_forward(inputs["params"], images["random"], block_units=UNITS)["logits"],
        "shipped": reference_forward(shipped, images["shipped"], block_units=(1, 1, 1, 1))["logits"],
    }


@pytest.fixture(scope="module")
def tensorflow_outputs(inputs, tmp_path_factory):
    """The TensorFlow side: the same outputs as `_worker`'s, and a `.keras` file for the other backends."""
    import bit_keras

    model = bit_keras.create_model(inputs["npz"])
    keras_file = str(tmp_path_factory.mktemp("tensorflow") / "model.keras")
    model.save(keras_file)
    x = inputs["images"]
    return {
        "model": model,
        "keras_file": keras_file,
        "logits": _logits(model, x["random"]),
        "folded": _logits(model.fold_weight_standardization(), x["random"]),
        "shipped": _logits(bit_keras.create_model(SHIPPED, weights="pretrained"), x["shipped"]),
    }


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, inputs, tensorflow_outputs, tmp_path_factory):
    """`_worker`'s outputs on one backend (and the `.keras` file it saved), in a subprocess."""
    name = request.param
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[backends]'")
    folder = tmp_path_factory.mktemp(name)
    job = {
        "npz": inputs["npz"],
        "images": inputs["images_npz"],
        "keras_in": tensorflow_outputs["keras_file"],
        "keras_out": str(folder / "model.keras"),
        "npz_out": str(folder / "checkpoint.npz"),
        "out": str(folder / "out.npz"),
    }
    with open(folder / "job.json", "w") as f:
        json.dump(job, f)
    env = dict(os.environ, KERAS_BACKEND=name, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_backends", str(folder / "job.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(job["out"]) as f:
        return name, {k: f[k] for k in f.files} | {"keras_file": job["keras_out"]}


def _relative(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


def test_tensorflow_matches_the_reference(tensorflow_outputs, reference):
    for key in ("logits", "shipped"):
        assert _relative(tensorflow_outputs[key], reference[key]) < TOL, key


def test_logits_match_tensorflow_and_the_reference(backend, tensorflow_outputs, reference):
    name, out = backend
    for key in ("logits", "shipped"):  # the random checkpoint and the shipped one
        assert _relative(out[key], tensorflow_outputs[key]) < TOL, (name, key)
        assert _relative(out[key], reference[key]) < TOL, (name, key)


def test_fold_weight_standardization(backend, tensorflow_outputs):
    name, out = backend
    assert _relative(out["folded"], out["logits"]) < TOL, name
    assert _relative(out["folded"], tensorflow_outputs["folded"]) < TOL, name


def test_keras_files_move_between_backends(backend, tensorflow_outputs, inputs):
    """Same weights whichever backend wrote the file: a loaded model computes exactly what the backend computes
    from the checkpoint."""
    import keras

    _, out = backend
    np.testing.assert_array_equal(out["from_tensorflow_file"], out["logits"])
    loaded = keras.saving.load_model(out["keras_file"])
    np.testing.assert_array_equal(_logits(loaded, inputs["images"]["random"]), tensorflow_outputs["logits"])
    assert loaded.get_config() == tensorflow_outputs["model"].get_config()


def test_jax_group_norm_gradient_matches_autodiff(backend):
    """The JAX fast path's hand-written group norm gradient gives autodiff's weight gradients (float32 noise)."""
    name, out = backend
    if name != "jax":
        pytest.skip("a JAX fast path")
    assert out["jax_fast_custom"] and not out["jax_portable_custom"]  # the two traces took different paths
    assert out["jax_gradient_deviation"] < TOL


def test_save_checkpoint_round_trips(backend):
    name, out = backend
    assert out["checkpoint_round_trip"], name


def test_resolve_model_zeroes_a_new_head(backend):
    name, out = backend
    assert out["new_head_zero"], name


def test_stock_fit_trains(backend):
    name, out = backend
    losses = out["fit_losses"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], (name, losses)
    assert out["fit_moved"], name


def test_model_core_runs_without_tensorflow_and_the_rest_says_what_to_install(backend):
    name, out = backend
    assert out["tensorflow_blocked"], f"{name}: the worker ran with TensorFlow importable"
    assert not out["tensorflow_imported"], f"{name}: importing and running the model core imported TensorFlow"
    assert str(out.get("tensorflow_only_error")) == (
        f"bit_keras.finetune needs the TensorFlow backend (tf.distribute), but Keras runs on {name!r}: "
        "pip install tensorflow and set KERAS_BACKEND=tensorflow"
    )


# The model core where TensorFlow is not installed at all (a virtual environment with keras and jax[cpu] alone).
NO_TENSORFLOW = """
import importlib.util, sys
import numpy as np
import bit_keras, keras
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed here"
model = bit_keras.create_model("BiT-R14x0.5-mnist5k", weights="pretrained")
np.save(sys.argv[2], keras.ops.convert_to_numpy(model(np.load(sys.argv[1]))))
"""


@pytest.fixture(scope="module")
def no_tensorflow_python(tmp_path_factory):
    """The Python of a virtual environment holding keras, jax[cpu], tqdm and keras-hub without TensorFlow (this one's
    versions; keras-hub without its dependencies, which pull TensorFlow in through tensorflow-text, and with those it
    imports): `$BIT_KERAS_NO_TF_VENV` if set, else made here (pip reaches the package registry)."""
    from importlib.metadata import version

    venv = os.environ.get("BIT_KERAS_NO_TF_VENV") or str(tmp_path_factory.mktemp("no_tensorflow") / "venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
        light = ("keras", "tqdm", "absl-py", "kagglehub", "packaging", "regex", "rich", "tokenizers", "sentencepiece")
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        for needs in (
            [*(f"{name}=={version(name)}" for name in light), f"jax[cpu]=={version('jax')}"],
            ["--no-deps", f"keras-hub=={version('keras-hub')}"],
        ):
            result = subprocess.run([*pip, *needs], capture_output=True, text=True, timeout=480)
            assert result.returncode == 0, result.stderr[-3000:]
    return python


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pretrained_model_on_jax_without_tensorflow(no_tensorflow_python, tensorflow_outputs, inputs, tmp_path):
    np.save(tmp_path / "images.npy", inputs["images"]["shipped"])
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # this tree's bit_keras
    args = [no_tensorflow_python, "-c", NO_TENSORFLOW, str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _relative(np.load(tmp_path / "logits.npy").astype(np.float64), tensorflow_outputs["shipped"]) < TOL


if __name__ == "__main__":
    sys.meta_path[:] = [NoTensorFlow(finder) for finder in sys.meta_path]  # before Keras and bit_keras are imported
    _worker(sys.argv[1])
