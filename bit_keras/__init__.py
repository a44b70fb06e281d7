"""bit_keras: Big Transfer (BiT) for Keras 3.

The package is grouped by role: `models` (layers, the keras-hub backbone and classifier, the presets and zoo,
official checkpoints, the model resolver), `data` (sources and the tf.data pipeline), `training` (the run engine and
its recipes: fine-tuning, upstream pretraining and distillation; few-shot evaluation), `detection` (RetinaNet on
BiT: model, data, objective, its recipe on the engine, evaluation, pictures), `serving` (SavedModel export,
prediction, `SavedModelLayer`) and `cli`. The verbs and the model API are re-exported here. Importing this registers
every model class with Keras' loader: `import bit_keras` before `keras.saving.load_model` of a bit_keras `.keras`
file.

The model core (`models`) runs on every Keras backend (TensorFlow, JAX, PyTorch); the rest needs TensorFlow. On
another backend, `import bit_keras` loads the model core alone (TensorFlow need not be installed), and the other
names raise an ImportError saying what to install and set.
"""

import importlib
import os
import sys

from bit_keras import startup

__version__ = "0.1.0"
_MODULES = {  # public name -> the module that defines it
    "finetune_detector": "bit_keras.detection.finetune",
    "RetinaNet": "bit_keras.detection.retinanet",
    "create_detector": "bit_keras.detection.retinanet",
    "BiTBackbone": "bit_keras.models.backbone",
    "BiT": "bit_keras.models.bit",
    "BiTImageClassifier": "bit_keras.models.classifier",
    "BiTImageClassifierPreprocessor": "bit_keras.models.classifier",
    "BiTImageConverter": "bit_keras.models.classifier",
    "CheckpointError": "bit_keras.models.checkpoint",
    "load_checkpoint": "bit_keras.models.checkpoint",
    "save_checkpoint": "bit_keras.models.checkpoint",
    "DownloadError": "bit_keras.models.download",
    "PreActBottleneck": "bit_keras.models.layers",
    "StandardizedConv2D": "bit_keras.models.layers",
    "ResolvedModel": "bit_keras.models.resolve",
    "resolve_model": "bit_keras.models.resolve",
    "CHECKPOINTS": "bit_keras.models.zoo",
    "create_model": "bit_keras.models.zoo",
    "label_names": "bit_keras.models.zoo",
    "list_models": "bit_keras.models.zoo",
    "parameter_count": "bit_keras.models.zoo",
    "export": "bit_keras.serving.export",
    "predict": "bit_keras.serving.predict",
    "SavedModelLayer": "bit_keras.serving.saved_model_layer",
    "distill": "bit_keras.training.distill",
    "fewshot": "bit_keras.training.fewshot",
    "finetune": "bit_keras.training.finetune",
    "pretrain": "bit_keras.training.pretrain",
    "RunResult": "bit_keras.training.run_folder",
}
# The subpackages beyond the model core (`bit_keras.models`), and what of TensorFlow they need.
_TENSORFLOW_ONLY = {"detection": "tf.data and tf.distribute", "serving": "SavedModel", "training": "tf.distribute"}
_CORE = {name: module for name, module in _MODULES.items() if module.split(".")[1] not in _TENSORFLOW_ONLY}
__all__ = sorted(_MODULES)


def load() -> None:
    """Import Keras (TensorFlow's start-up lines silenced) and every module, registering each Keras class; an
    ImportError on another backend than TensorFlow (where `import bit_keras` loads the model core alone)."""
    backend = _backend()
    if backend != "tensorflow":
        raise _needs_tensorflow("bit_keras.load and the bit-keras command", "training, detection and serving", backend)
    _import(_MODULES)


def _backend() -> str:
    """Keras' backend, Keras imported quietly."""
    return startup.import_keras().backend.backend()


def _import(names: dict[str, str]) -> None:
    for name, module in names.items():
        globals()[name] = getattr(importlib.import_module(module), name)


def _needs_tensorflow(what: str, needs: str, backend: str) -> ImportError:
    return ImportError(
        f"{what} needs the TensorFlow backend ({needs}), but Keras runs on {backend!r}: "
        "pip install tensorflow and set KERAS_BACKEND=tensorflow"
    )


def __getattr__(name):  # PEP 562: names not loaded at import (every one in the `bit-keras` command)
    if name not in _MODULES:
        raise AttributeError(f"module 'bit_keras' has no attribute {name!r}")
    backend, needs = _backend(), _TENSORFLOW_ONLY.get(_MODULES[name].split(".")[1])
    if backend == "tensorflow":
        load()
    elif needs:
        raise _needs_tensorflow(f"bit_keras.{name}", needs, backend)
    else:
        _import(_CORE)
    return globals()[name]


def _command() -> bool:
    """Whether this process is the `bit-keras` command: the console script, or `python -m bit_keras.cli` (whose
    argv[0] is "-m" while its package is imported)."""
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0] == "bit-keras"
    return script or (sys.argv[0] == "-m" and "bit_keras.cli" in sys.orig_argv)


# Everything loads at import, because a bit_keras `.keras` file loads only once its classes are registered with Keras
# and `import bit_keras` is how users register them (as keras-hub's); on another backend than TensorFlow, the model
# core. The `bit-keras` command alone starts bare: it answers --help, --version, `models` and argument errors without
# waiting for TensorFlow, and its subcommands call `load()` when they need it.
if not _command():
    if _backend() == "tensorflow":
        load()
    else:
        _import(_CORE)
        __all__ = sorted(_CORE)
