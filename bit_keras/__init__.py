"""bit_keras: Big Transfer (BiT) for Keras 3 on TensorFlow.

The package is grouped by role: `models` (layers, the BiT model, the zoo, official checkpoints, the model
resolver), `data` (sources and the tf.data pipeline), `training` (the run engine and its recipes: fine-tuning
and upstream pretraining), `detection` (RetinaNet on BiT: model, data, objective, its recipe on the engine,
evaluation, pictures), `serving` (SavedModel export, prediction, `SavedModelLayer`) and `cli`. The verbs
and the model API are re-exported here (importing this registers every model class with Keras' loader).
"""

import os
import sys

from bit_keras.startup import quiet_native_stderr

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    raise ImportError(
        f"bit_keras needs the TensorFlow backend of Keras, but KERAS_BACKEND={os.environ['KERAS_BACKEND']!r}: "
        "unset it or run with KERAS_BACKEND=tensorflow"
    )

if "tensorflow" in sys.modules:  # its start-up lines were printed already
    import keras
else:
    os.environ.setdefault(
        "TF_CPP_MIN_LOG_LEVEL", "1"
    )  # TensorFlow's INFO lines (XLA service, ...) say nothing to users
    with quiet_native_stderr():
        import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"bit_keras needs the TensorFlow backend of Keras, but Keras uses {keras.backend.backend()!r} "
        '(from ~/.keras/keras.json): run with KERAS_BACKEND=tensorflow or set "backend": "tensorflow" there'
    )

from bit_keras.detection.finetune import finetune_detector
from bit_keras.detection.retinanet import RetinaNet, create_detector
from bit_keras.models.bit import BiT
from bit_keras.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bit_keras.models.download import DownloadError
from bit_keras.models.layers import PreActBottleneck, StandardizedConv2D
from bit_keras.models.resolve import ResolvedModel, resolve_model
from bit_keras.models.zoo import CHECKPOINTS, create_model, label_names, list_models, parameter_count
from bit_keras.serving.export import export
from bit_keras.serving.predict import predict
from bit_keras.serving.saved_model_layer import SavedModelLayer
from bit_keras.training.finetune import finetune
from bit_keras.training.pretrain import pretrain
from bit_keras.training.run_folder import RunResult

__version__ = "0.1.0"
__all__ = [
    "CHECKPOINTS",
    "BiT",
    "CheckpointError",
    "DownloadError",
    "PreActBottleneck",
    "ResolvedModel",
    "RetinaNet",
    "RunResult",
    "SavedModelLayer",
    "StandardizedConv2D",
    "create_detector",
    "create_model",
    "export",
    "finetune",
    "finetune_detector",
    "label_names",
    "list_models",
    "load_checkpoint",
    "parameter_count",
    "predict",
    "pretrain",
    "resolve_model",
    "save_checkpoint",
]
