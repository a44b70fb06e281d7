"""bit_keras: Big Transfer (BiT) for Keras 3 on TensorFlow.

The package is grouped by role: `models` (layers, the BiT model, the zoo, official checkpoints, the model
resolver), `data` (sources and the tf.data pipeline), `training` (the run engine and its recipes: fine-tuning
and upstream pretraining), `detection` (RetinaNet on BiT: model, data, objective, its recipe on the engine,
evaluation, pictures), `serving` (SavedModel export, prediction, `SavedModelLayer`) and `cli`. The verbs
and the model API are re-exported here. Importing this registers every model class with Keras' loader:
`import bit_keras` before `keras.saving.load_model` of a bit_keras `.keras` file.
"""

import importlib
import os
import sys

from bit_keras import startup

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    raise ImportError(
        f"bit_keras needs the TensorFlow backend of Keras, but KERAS_BACKEND={os.environ['KERAS_BACKEND']!r}: "
        "unset it or run with KERAS_BACKEND=tensorflow"
    )

__version__ = "0.1.0"
_MODULES = {  # public name -> the module that defines it
    "finetune_detector": "bit_keras.detection.finetune",
    "RetinaNet": "bit_keras.detection.retinanet",
    "create_detector": "bit_keras.detection.retinanet",
    "BiT": "bit_keras.models.bit",
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
    "finetune": "bit_keras.training.finetune",
    "pretrain": "bit_keras.training.pretrain",
    "RunResult": "bit_keras.training.run_folder",
}
__all__ = sorted(_MODULES)


def load() -> None:
    """Import Keras (TensorFlow's start-up lines silenced) and every module, registering each Keras class."""
    startup.import_keras()
    for name, module in _MODULES.items():
        globals()[name] = getattr(importlib.import_module(module), name)


def __getattr__(name):  # PEP 562: the public names of a package imported without `load()`
    if name not in _MODULES:
        raise AttributeError(f"module 'bit_keras' has no attribute {name!r}")
    load()
    return globals()[name]


def _command() -> bool:
    """Whether this process is the `bit-keras` command: the console script, or `python -m bit_keras.cli` (whose
    argv[0] is "-m" while its package is imported)."""
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0] == "bit-keras"
    return script or (sys.argv[0] == "-m" and "bit_keras.cli" in sys.orig_argv)


# Everything loads at import, because a bit_keras `.keras` file loads only once its classes are registered with Keras
# and `import bit_keras` is how users register them (as keras-hub's). The `bit-keras` command alone starts bare: it
# answers --help, --version, `models` and argument errors without waiting for TensorFlow, and its subcommands call
# `load()` when they need it.
if not _command():
    load()
