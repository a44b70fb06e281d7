"""bit_keras: Big Transfer (BiT) for Keras 3 on TensorFlow."""

import os

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    raise ImportError(
        f"bit_keras needs the TensorFlow backend of Keras, but KERAS_BACKEND={os.environ['KERAS_BACKEND']!r}: "
        "unset it or run with KERAS_BACKEND=tensorflow"
    )

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"bit_keras needs the TensorFlow backend of Keras, but Keras uses {keras.backend.backend()!r} "
        "(from ~/.keras/keras.json): run with KERAS_BACKEND=tensorflow or set \"backend\": \"tensorflow\" there"
    )

from bit_keras.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from bit_keras.download import DownloadError  # noqa: E402
from bit_keras.layers import PreActBottleneck, StandardizedConv2D  # noqa: E402
from bit_keras.model import BiT  # noqa: E402
from bit_keras.saved_model_layer import SavedModelLayer  # noqa: E402
from bit_keras.zoo import CHECKPOINTS, create_model, label_names, list_models, parameter_count  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BiT",
    "CHECKPOINTS",
    "CheckpointError",
    "DownloadError",
    "PreActBottleneck",
    "SavedModelLayer",
    "StandardizedConv2D",
    "create_model",
    "label_names",
    "list_models",
    "load_checkpoint",
    "parameter_count",
    "save_checkpoint",
]
